// GEMM at the DiT's real shapes: y[M, N] = x[M, K] · w[N, K]ᵀ. M = 288 is a 256² image
// (256 patches + text), M = 4128 a 1024² image (4096 + 32); K/N are the 3840-wide
// projections and the 10240-wide feed-forward. Numbered variants, llm.c style:
//   0 openblas_sgemm     cblas_sgemm on f32 weights: the ceiling for f32 activations
//   1 widen_all_sgemm    bf16 weights widened whole, then one sgemm (memory: 4 B per weight)
//   2 linear_f32/bf16/f16  ops::linear (f32: = 0; bf16/f16: per-thread widened panels + sgemm)
//   2 linear_path<dt, Panels|BlasThreads>  both backend paths forced (see cpu_ops.h)
//   3 openblas_sbgemm    cblas_sbgemm (bf16 × bf16 → f32), if this OpenBLAS exports it
//   4 linear_quant<fmt, Dequant|Int8|Int8Avx2>  quantized weights, each CPU path forced
//                        (skipped where the CPU lacks it)
//   5 linear_kquant<fmt, Dequant|Int8Avx2>  K-quant / Q5_0 weights (random blocks with sane
//                        scales: zimage reads K-quants, it does not make them)
// GFLOP/s = 2·M·N·K / wall time.
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "backends/cpu/cpu_ops.h"
#include "core/dtype.h"
#include "core/parallel.h"
#include "core/quant.h"
#include "core/tensor.h"
#include "bench_util.h"
#include "ops/ops.h"

namespace {

using zi::bench::CpuRate;
using zi::bench::random_tensor;

double gemm_flops(benchmark::State& st) { return 2.0 * double(st.range(0)) * double(st.range(1)) * double(st.range(2)); }

void BM_0_openblas_sgemm(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  zi::Tensor x = random_tensor({M, K}, 1), w = random_tensor({N, K}, 2), y = zi::Tensor::empty({M, N}, zi::DType::F32);
  CpuRate rate;
  for (auto _ : st)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, x.f32(), int(K), w.f32(),
                int(K), 0.0f, y.f32(), int(N));
  rate.report(st, gemm_flops(st));
}

void BM_1_widen_all_sgemm_bf16(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  zi::Tensor x = random_tensor({M, K}, 1), w = random_tensor({N, K}, 2).to(zi::DType::BF16);
  zi::Tensor y = zi::Tensor::empty({M, N}, zi::DType::F32);
  CpuRate rate;
  for (auto _ : st) {
    zi::Tensor wf = w.to(zi::DType::F32);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, x.f32(), int(K), wf.f32(),
                int(K), 0.0f, y.f32(), int(N));
  }
  rate.report(st, gemm_flops(st));
}

template <zi::DType WT>
void BM_2_linear(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  zi::Tensor x = random_tensor({M, K}, 1), w = random_tensor({N, K}, 2).to(WT);
  CpuRate rate;
  for (auto _ : st) benchmark::DoNotOptimize(zi::ops::linear(x, w).raw());
  rate.report(st, gemm_flops(st));
}

template <zi::DType WT, zi::cpu::GemmPath PATH>
void BM_2_linear_path(benchmark::State& st) {
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  zi::Tensor x = random_tensor({M, K}, 1), w = random_tensor({N, K}, 2).to(WT), y = zi::Tensor::empty({M, N}, zi::DType::F32);
  CpuRate rate;
  for (auto _ : st) zi::cpu::linear(x, w, nullptr, y, PATH);
  rate.report(st, gemm_flops(st));
}
constexpr auto kPanels = zi::cpu::GemmPath::Panels;
constexpr auto kBlas = zi::cpu::GemmPath::BlasThreads;

// cblas_sbgemm is declared by every OpenBLAS cblas.h but only exported by builds with
// BUILD_BFLOAT16=1, so it is looked up at run time.
using SbgemmFn = void (*)(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, blasint, blasint, blasint, float,
                          const uint16_t*, blasint, const uint16_t*, blasint, float, float*, blasint);

void BM_3_openblas_sbgemm(benchmark::State& st) {
  auto fn = reinterpret_cast<SbgemmFn>(dlsym(RTLD_DEFAULT, "cblas_sbgemm"));
  if (!fn) {
    st.SkipWithError("cblas_sbgemm is not exported by this OpenBLAS (built without BUILD_BFLOAT16)");
    return;
  }
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  zi::Tensor x = random_tensor({M, K}, 1).to(zi::DType::BF16), w = random_tensor({N, K}, 2).to(zi::DType::BF16);
  zi::Tensor y = zi::Tensor::empty({M, N}, zi::DType::F32);
  CpuRate rate;
  for (auto _ : st)
    fn(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, x.data<uint16_t>(), int(K),
       w.data<uint16_t>(), int(K), 0.0f, y.f32(), int(N));
  rate.report(st, gemm_flops(st));
}

template <zi::DType WT, zi::cpu::QuantPath PATH>
void BM_4_linear_quant(benchmark::State& st) {
  const bool ok = PATH == zi::cpu::QuantPath::Dequant || (PATH == zi::cpu::QuantPath::Int8 && zi::cpu::quant_int8_available(WT)) ||
                  (PATH == zi::cpu::QuantPath::Int8Avx2 && zi::cpu::quant_int8_avx2_available(WT));
  if (!ok) {
    st.SkipWithError("this CPU lacks the path");
    return;
  }
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  zi::Tensor x = random_tensor({M, K}, 1), y = zi::Tensor::empty({M, N}, zi::DType::F32);
  zi::Tensor w = zi::quant::quantize(random_tensor({N, K}, 2), WT, zi::Tag::Workspace);
  CpuRate rate;
  for (auto _ : st) zi::cpu::linear_quant(x, w, nullptr, y, PATH);
  rate.report(st, gemm_flops(st));
}

// Random blocks of a read-only format: random bytes, then the f16 scale fields set to 0.001.
zi::Tensor random_blocks(zi::DType t, int64_t N, int64_t K) {
  zi::Tensor w = zi::Tensor::empty({N, K}, t, zi::Tag::Workspace);
  uint8_t* p = static_cast<uint8_t*>(w.raw());
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < w.nbytes(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    p[i] = uint8_t(state >> 56);
  }
  std::vector<size_t> f16_at;  // offsets of the f16 fields in a block
  switch (t) {
    case zi::DType::Q5_0: f16_at = {0}; break;
    case zi::DType::Q4_K: case zi::DType::Q5_K: f16_at = {0, 2}; break;
    case zi::DType::Q6_K: f16_at = {208}; break;
    case zi::DType::Q3_K: f16_at = {108}; break;
    default: break;
  }
  const uint16_t h = zi::f32_to_f16(0.001f);
  const size_t bb = zi::dtype_block_bytes(t);
  for (size_t b = 0; b < w.nbytes() / bb; ++b)
    for (size_t o : f16_at) std::memcpy(p + b * bb + o, &h, 2);
  return w;
}

template <zi::DType WT, zi::cpu::QuantPath PATH>
void BM_5_linear_kquant(benchmark::State& st) {
  if (PATH == zi::cpu::QuantPath::Int8Avx2 && !zi::cpu::quant_int8_avx2_available(WT)) {
    st.SkipWithError("this CPU lacks the path");
    return;
  }
  const int64_t M = st.range(0), K = st.range(1), N = st.range(2);
  zi::Tensor x = random_tensor({M, K}, 1), y = zi::Tensor::empty({M, N}, zi::DType::F32);
  zi::Tensor w = random_blocks(WT, N, K);
  CpuRate rate;
  for (auto _ : st) zi::cpu::linear_quant(x, w, nullptr, y, PATH);
  rate.report(st, gemm_flops(st));
}

// Small shapes run to the default time; the 1024² feed-forward (325 GFLOP) twice only.
void shapes(benchmark::internal::Benchmark* b) {
  b->Unit(benchmark::kMillisecond)->UseRealTime();
  b->Args({32, 3840, 3840})->Args({288, 3840, 3840})->Args({288, 3840, 10240});
}
void big_shape(benchmark::internal::Benchmark* b) {
  b->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2)->Args({4128, 3840, 10240});
}

}  // namespace

BENCHMARK(BM_0_openblas_sgemm)->Apply(shapes);
BENCHMARK(BM_1_widen_all_sgemm_bf16)->Apply(shapes);
BENCHMARK(BM_2_linear<zi::DType::F32>)->Apply(shapes);
BENCHMARK(BM_2_linear_path<zi::DType::F32, kPanels>)->Apply(shapes);
BENCHMARK(BM_2_linear_path<zi::DType::BF16, kPanels>)->Apply(shapes);
BENCHMARK(BM_2_linear_path<zi::DType::BF16, kBlas>)->Apply(shapes);
BENCHMARK(BM_2_linear<zi::DType::BF16>)->Apply(shapes);
BENCHMARK(BM_2_linear<zi::DType::F16>)->Apply(shapes);
BENCHMARK(BM_3_openblas_sbgemm)->Apply(shapes);
BENCHMARK(BM_4_linear_quant<zi::DType::Q8_0, zi::cpu::QuantPath::Dequant>)->Apply(shapes);
BENCHMARK(BM_4_linear_quant<zi::DType::Q8_0, zi::cpu::QuantPath::Int8>)->Apply(shapes);
BENCHMARK(BM_4_linear_quant<zi::DType::Q8_0, zi::cpu::QuantPath::Int8Avx2>)->Apply(shapes);
BENCHMARK(BM_4_linear_quant<zi::DType::Q4_0, zi::cpu::QuantPath::Int8Avx2>)->Apply(shapes);
BENCHMARK(BM_5_linear_kquant<zi::DType::Q4_K, zi::cpu::QuantPath::Dequant>)->Apply(shapes);
BENCHMARK(BM_5_linear_kquant<zi::DType::Q4_K, zi::cpu::QuantPath::Int8Avx2>)->Apply(shapes);
BENCHMARK(BM_5_linear_kquant<zi::DType::Q5_K, zi::cpu::QuantPath::Int8Avx2>)->Apply(shapes);
BENCHMARK(BM_5_linear_kquant<zi::DType::Q6_K, zi::cpu::QuantPath::Dequant>)->Apply(shapes);
BENCHMARK(BM_5_linear_kquant<zi::DType::Q6_K, zi::cpu::QuantPath::Int8Avx2>)->Apply(shapes);
BENCHMARK(BM_5_linear_kquant<zi::DType::Q3_K, zi::cpu::QuantPath::Int8Avx2>)->Apply(shapes);
BENCHMARK(BM_5_linear_kquant<zi::DType::Q5_0, zi::cpu::QuantPath::Int8Avx2>)->Apply(shapes);
BENCHMARK(BM_0_openblas_sgemm)->Apply(big_shape);
BENCHMARK(BM_2_linear<zi::DType::F32>)->Apply(big_shape);
BENCHMARK(BM_2_linear_path<zi::DType::F32, kPanels>)->Apply(big_shape);
BENCHMARK(BM_2_linear_path<zi::DType::BF16, kPanels>)->Apply(big_shape);
BENCHMARK(BM_2_linear_path<zi::DType::BF16, kBlas>)->Apply(big_shape);
BENCHMARK(BM_2_linear<zi::DType::BF16>)->Apply(big_shape);

int main(int argc, char** argv) {
  zi::set_num_threads(0);  // all cores, for our OpenMP loops and OpenBLAS alike
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
