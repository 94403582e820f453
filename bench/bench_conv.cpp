// conv2d at the VAE decoder's shapes (3×3, pad 1, f32 and bf16 kernels). Spatial sizes
// are cut to a band of rows where the full image would take seconds per call: the
// rate does not depend on the height. Variants:
//   0 sgemm_ceiling  threaded sgemm [Cout, Cin·9] · [Cin·9, 16384], what im2col + GEMM can reach
//   1 conv2d         ops::conv2d (row blocks over OpenMP: im2col into a bounded buffer + sgemm)
// GFLOP/s counts 2·Cout·Cin·kh·kw·Ho·Wo.
#include <benchmark/benchmark.h>
#include <cblas.h>

#include "core/tensor.h"
#include "ops/ops.h"
#include "bench_util.h"

namespace {

using zi::bench::CpuRate;
using zi::bench::random_tensor;

// args: Cin, Cout, H, W, k
double conv_flops(benchmark::State& st) {
  return 2.0 * double(st.range(0)) * double(st.range(1)) * double(st.range(2)) * double(st.range(3)) *
         double(st.range(4) * st.range(4));
}

void BM_0_sgemm_ceiling(benchmark::State& st) {
  const int64_t Cin = st.range(0), Cout = st.range(1), k = st.range(4), K = Cin * k * k, N = 16384;
  zi::Tensor w = random_tensor({Cout, K}, 1), col = random_tensor({K, N}, 2), y = zi::Tensor::empty({Cout, N}, zi::DType::F32);
  CpuRate rate;
  for (auto _ : st)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(Cout), int(N), int(K), 1.0f, w.f32(), int(K), col.f32(),
                int(N), 0.0f, y.f32(), int(N));
  rate.report(st, 2.0 * double(Cout) * double(N) * double(K));
}

template <zi::DType WT>
void BM_1_conv2d(benchmark::State& st) {
  const int64_t Cin = st.range(0), Cout = st.range(1), H = st.range(2), W = st.range(3), k = st.range(4);
  zi::Tensor x = random_tensor({Cin, H, W}, 1), w = random_tensor({Cout, Cin, k, k}, 2).to(WT), b = random_tensor({Cout}, 3);
  CpuRate rate;
  for (auto _ : st) benchmark::DoNotOptimize(zi::ops::conv2d(x, w, &b, int(k / 2)).raw());
  rate.report(st, conv_flops(st));
}

void shapes(benchmark::internal::Benchmark* b) {
  b->Unit(benchmark::kMillisecond)->UseRealTime();
  b->Args({512, 512, 128, 128, 3})   // mid block and first up block at 1024² (latent 128²)
      ->Args({256, 256, 64, 512, 3})  // third up block (512² image), 64 of 512 rows
      ->Args({128, 128, 32, 1024, 3}) // last up block (1024² image), 32 of 1024 rows
      ->Args({512, 256, 128, 128, 1});  // 1×1 shortcut
}

}  // namespace

BENCHMARK(BM_0_sgemm_ceiling)->Apply(shapes);
BENCHMARK(BM_1_conv2d<zi::DType::F32>)->Apply(shapes);
BENCHMARK(BM_1_conv2d<zi::DType::BF16>)->Apply(shapes);

int main(int argc, char** argv) {
  zi::set_num_threads(0);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
