// Threading: OpenMP for our kernels, sized by --threads; OpenBLAS is called single-threaded
// on tiles whose sizes never depend on the thread count, so every reduction has a fixed order
// and results are bit-identical for any --threads. The zimage binary starts OpenMP with a
// passive wait policy (idle workers sleep instead of spinning; see cli/main.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace zi {

// Sets the number of threads for our kernels (OpenBLAS stays at 1). n <= 0: all cores.
void set_num_threads(int n);
int num_threads();
// On a thread we started (a model loading ahead): its parallel regions use num_threads() threads
// like the main thread's (OpenMP's setting is per thread). Touches nothing global.
void adopt_num_threads();
// The BLAS library's own thread count; defined by the CPU backend (backends/cpu/common.cpp),
// which owns the BLAS library.
void set_blas_threads(int n);

// Runs fn(begin, end) over [0, n) split into chunks of at least `grain` items, in parallel.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  int64_t chunks = (n + grain - 1) / grain;
  if (chunks <= 1) {
    fn(int64_t(0), n);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t b = c * grain;
    int64_t e = b + grain < n ? b + grain : n;
    fn(b, e);
  }
}

// memcpy by several threads in 2 MiB pieces: one core copies ~8 GB/s, and one thread reading a
// cold mapping is page-fault bound (weight uploads, the streamed blocks' pinned copies).
inline void parallel_copy(void* dst, const void* src, size_t bytes) {
  parallel_for(int64_t(bytes), int64_t(2) << 20, [&](int64_t b, int64_t e) {
    std::memcpy(static_cast<char*>(dst) + b, static_cast<const char*>(src) + b, size_t(e - b));
  });
}

}  // namespace zi
