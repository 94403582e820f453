// Attention at the real shapes, head_dim 128: the DiT at 1024² (S = 4128, 30 heads; run
// with 2 heads, the cost is linear in heads), the DiT at 256² (S = 288, 30 heads) and the
// Qwen3 text encoder (causal, 32 query / 8 kv heads, S = 512). Variants:
//   0 sgemm_ceiling   the two GEMMs alone (QKᵀ into a full S×S buffer, then P·V), threaded
//                     OpenBLAS, no softmax: what the blockwise kernel can at most reach
//   1 attention       ops::attention (query blocks × heads over OpenMP, sgemm per block)
// GFLOP/s counts 4·Sq·Sk·D per head (2·Sq·(Sq+1)·D when causal); s_per_head = time / heads (printed with an SI prefix: 5.1m = 5.1 ms).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <cmath>

#include "core/parallel.h"
#include "core/tensor.h"
#include "ops/ops.h"
#include "bench_util.h"

namespace {

using zi::bench::random_tensor;

void set_rate(benchmark::State& st, const zi::bench::CpuRate& rate, int64_t S, int64_t H, int64_t D, bool causal) {
  const double per_head = causal ? 2.0 * double(S) * double(S + 1) * double(D) : 4.0 * double(S) * double(S) * double(D);
  rate.report(st, per_head * double(H));
  st.counters["s_per_head"] =
      benchmark::Counter(double(H), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// args: S, Hq, Hkv, causal
void BM_0_sgemm_ceiling(benchmark::State& st) {
  const int64_t S = st.range(0), H = st.range(1), D = 128;
  zi::Tensor q = random_tensor({S, H, D}, 1), k = random_tensor({S, H, D}, 2), v = random_tensor({S, H, D}, 3);
  zi::Tensor p = zi::Tensor::empty({S, S}, zi::DType::F32), o = zi::Tensor::empty({S, H, D}, zi::DType::F32);
  const int ld = int(H * D);
  zi::bench::CpuRate rate;
  for (auto _ : st)
    for (int64_t h = 0; h < H; ++h) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(S), int(S), int(D), 1.0f, q.f32() + h * D, ld,
                  k.f32() + h * D, ld, 0.0f, p.f32(), int(S));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(S), int(D), int(S), 1.0f, p.f32(), int(S),
                  v.f32() + h * D, ld, 0.0f, o.f32() + h * D, ld);
    }
  set_rate(st, rate, S, H, D, false);
}

void BM_1_attention(benchmark::State& st) {
  const int64_t S = st.range(0), Hq = st.range(1), Hkv = st.range(2), D = 128;
  const bool causal = st.range(3) != 0;
  zi::Tensor q = random_tensor({S, Hq, D}, 1), k = random_tensor({S, Hkv, D}, 2), v = random_tensor({S, Hkv, D}, 3);
  const float scale = 1.0f / std::sqrt(float(D));
  zi::bench::CpuRate rate;
  for (auto _ : st) benchmark::DoNotOptimize(zi::ops::attention(q, k, v, scale, causal).raw());
  set_rate(st, rate, S, Hq, D, causal);
}

}  // namespace

BENCHMARK(BM_0_sgemm_ceiling)->Unit(benchmark::kMillisecond)->UseRealTime()->Args({4128, 2})->Iterations(3);
BENCHMARK(BM_0_sgemm_ceiling)->Unit(benchmark::kMillisecond)->UseRealTime()->Args({288, 30});
BENCHMARK(BM_1_attention)->Unit(benchmark::kMillisecond)->UseRealTime()->Args({4128, 2, 2, 0})->Iterations(3);
BENCHMARK(BM_1_attention)->Unit(benchmark::kMillisecond)->UseRealTime()->Args({288, 30, 30, 0});
BENCHMARK(BM_1_attention)->Unit(benchmark::kMillisecond)->UseRealTime()->Args({512, 32, 8, 1});

int main(int argc, char** argv) {
  zi::set_num_threads(0);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
