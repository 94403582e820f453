// Helpers shared by the benchmarks: random tensors and GFLOP/s counters.
// The build machine is shared, so besides the wall-clock rate each benchmark reports the
// rate per CPU-second of this process times the thread count ("GFLOP/s@cpu"): what the
// run would reach with its cores to itself, if it did not spin. Both are printed.
#pragma once
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <random>

#include "core/parallel.h"
#include "core/tensor.h"

namespace zi::bench {

inline Tensor random_tensor(const Shape& s, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> u(0.0f, 1.0f);
  Tensor t = Tensor::empty(s, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = u(g);
  return t;
}

// User + system CPU seconds of the whole process (all threads).
inline double process_cpu_seconds() {
  rusage r{};
  getrusage(RUSAGE_SELF, &r);
  return double(r.ru_utime.tv_sec + r.ru_stime.tv_sec) + 1e-6 * double(r.ru_utime.tv_usec + r.ru_stime.tv_usec);
}

// Measures process CPU time over a benchmark loop: construct before the loop, call
// report(st, flops per iteration) after it.
class CpuRate {
 public:
  CpuRate() : t0_(process_cpu_seconds()) {}
  void report(benchmark::State& st, double flops_per_iter) const {
    const double flops = flops_per_iter * double(st.iterations());
    const double cpu = process_cpu_seconds() - t0_;
    st.counters["GFLOP/s"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsRate);
    st.counters["GFLOP/s@cpu"] = cpu > 0 ? flops / 1e9 / (cpu / double(num_threads())) : 0.0;
  }

 private:
  double t0_;
};

}  // namespace zi::bench
