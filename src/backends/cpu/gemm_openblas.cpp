// linear: y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias) on OpenBLAS sgemm. Two paths:
//   BlasThreads: f32 weights: one threaded sgemm. bf16/f16: w in 16 MB panels, each widened
//     by all threads (OpenMP), then one threaded sgemm per panel. Best for large M.
//   Panels: the output is cut into column panels (rows of w); each OpenMP thread widens its
//     panel into its own f32 buffer [P, K] and runs a single-threaded sgemm on it, so the
//     two thread pools never alternate and the widened panel is used while in cache.
// Either way the result equals an f32 GEMM on the widened weights; w is never widened whole.
// Auto takes Panels, whose tiling does not depend on the thread count (see linear_panels).
#include <cblas.h>
#include <omp.h>

#include <algorithm>

#include "backends/cpu/cpu_ops.h"
#include "core/parallel.h"

namespace zi::cpu {
namespace {

constexpr int64_t kPanelRows = 256;  // rows of w widened at a time (256×10240 f32 = 10 MB)
constexpr int64_t kBlasPanelBytes = int64_t(16) << 20;  // widened panel of the BlasThreads path

ZI_CPU_CLONES void add_bias_rows(float* y, int64_t rows, int64_t ld, const float* b, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * ld;
    for (int64_t j = 0; j < n; ++j) yr[j] += b[j];
  }
}

// The output is cut into tiles whose sizes depend on M and N only, never on the thread count:
// each tile is one single-threaded sgemm, so every output element is reduced in the same
// order whatever --threads is (bit-identical images for any thread count). Panel width:
// about kPanelRows; small N: rows of x are split as well so that there are at least
// kMinTasks tiles (the duplicated widening is small because the weight is small).
constexpr int64_t kMinTasks = 16;

void linear_panels(const float* x, const Tensor& w, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  const int T = std::max(1, num_threads());
  const int64_t P = std::min<int64_t>(N, kPanelRows);
  const int64_t n_panels = (N + P - 1) / P;
  const int64_t m_chunks =
      n_panels >= kMinTasks ? 1 : std::min<int64_t>((kMinTasks + n_panels - 1) / n_panels, std::max<int64_t>(1, M / 32));
  const int64_t m_step = (M + m_chunks - 1) / m_chunks;
  const int64_t tasks = n_panels * m_chunks;
  const int nthreads = int(std::min<int64_t>(T, tasks));
  const bool widened = w.dtype() != DType::F32;
  Tensor buf = widened ? Tensor::empty({nthreads, P * K}, DType::F32, Tag::Workspace) : Tensor();  // [threads, P, K]
  const size_t es = dtype_size(w.dtype());
  const char* wb = static_cast<const char*>(w.raw());
  BlasSingleThread single;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t pi = t / m_chunks, mi = t % m_chunks;
    const int64_t n0 = pi * P, np = std::min(P, N - n0);
    const int64_t m0 = mi * m_step, mm = std::min(m_step, M - m0);
    if (mm <= 0) continue;
    const float* panel = reinterpret_cast<const float*>(wb + size_t(n0 * K) * es);  // [np, K]
    if (widened) {
      float* dst = buf.data<float>() + int64_t(omp_get_thread_num()) * P * K;
      widen(wb + size_t(n0 * K) * es, w.dtype(), dst, np * K);
      panel = dst;
    }
    float* yc = y + m0 * N + n0;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(mm), int(np), int(K), 1.0f, x + m0 * K, int(K), panel,
                int(K), 0.0f, yc, int(N));
    if (bias) add_bias_rows(yc, mm, N, bias + n0, np);
  }
}

// One threaded sgemm over all of w (f32), or for bf16/f16 over large panels of w that all
// threads widen together first (OpenMP), so OpenBLAS's own threading does the GEMM.
void linear_blas_threads(const float* x, const Tensor& w, const float* bias, float* y, int64_t M, int64_t N,
                         int64_t K) {
  if (w.dtype() == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, x, int(K), w.data<float>(),
                int(K), 0.0f, y, int(N));
  } else {
    const int64_t P = std::min(N, std::max<int64_t>(64, kBlasPanelBytes / (4 * K) / 16 * 16));
    Tensor buf = Tensor::empty({P, K}, DType::F32, Tag::Workspace);  // [P, K]
    const size_t es = dtype_size(w.dtype());
    const char* wb = static_cast<const char*>(w.raw());
    for (int64_t n0 = 0; n0 < N; n0 += P) {
      const int64_t np = std::min(P, N - n0);
      const char* src = wb + size_t(n0 * K) * es;
      parallel_for(np * K, 1 << 16, [&](int64_t b, int64_t e) {
        widen(src + size_t(b) * es, w.dtype(), buf.data<float>() + b, e - b);
      });
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(np), int(K), 1.0f, x, int(K),
                  buf.data<float>(), int(K), 0.0f, y + n0, int(N));
    }
  }
  if (bias) {
    parallel_for(M, std::max<int64_t>(1, 65536 / N), [&](int64_t r0, int64_t r1) {
      add_bias_rows(y + r0 * N, r1 - r0, N, bias, N);
    });
  }
}

}  // namespace

void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, GemmPath path) {
  const int64_t N = w.dim(0), K = w.dim(1), M = x.numel() / K;
  if (M == 0 || N == 0) return;
  Tensor b = bias ? widen_vector(*bias) : Tensor();
  const float* bp = bias ? b.data<float>() : nullptr;
  // Auto is Panels: its tiles do not depend on the thread count, so results are the same for
  // any --threads. BlasThreads (OpenBLAS's own threading, whose split does depend on it) is
  // kept for the benchmark only.
  if (path == GemmPath::Auto) path = GemmPath::Panels;
  if (path == GemmPath::BlasThreads) {
    linear_blas_threads(x.data<float>(), w, bp, y.data<float>(), M, N, K);
  } else {
    linear_panels(x.data<float>(), w, bp, y.data<float>(), M, N, K);
  }
}

}  // namespace zi::cpu
