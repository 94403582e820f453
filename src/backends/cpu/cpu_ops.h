// The CPU backend (OpenBLAS + OpenMP): one function per op of ops/ops.h. Arguments are
// already checked by ops.cpp (shapes, dtypes, contiguity); these functions only compute.
// Activations are contiguous f32; weight operands may be f32/bf16/f16 and are widened
// to f32 (exactly) in bounded blocks, never as a whole matrix.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

// Hot loops are compiled three times (AVX-512, AVX2+FMA, baseline) and picked at load time,
// so a portable build still runs vector code on the machine it finds.
#define ZI_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace zi::cpu {

// dst[0..n) = src[0..n) widened to f32 (src dtype f32/bf16/f16; exact).
void widen(const void* src, DType dt, float* dst, int64_t n);
// A small operand (norm weight, bias, gate vector) widened into a Workspace tensor.
Tensor widen_vector(const Tensor& v);

// Threading: OpenBLAS runs its own pool. Inside our OpenMP regions each thread calls
// single-threaded sgemm; this guard sets OpenBLAS to one thread for its lifetime. The
// setting is process-wide, so ops must be called from one thread at a time (each op is
// parallel inside).
class BlasSingleThread {
 public:
  BlasSingleThread();
  ~BlasSingleThread();
  BlasSingleThread(const BlasSingleThread&) = delete;
  BlasSingleThread& operator=(const BlasSingleThread&) = delete;

 private:
  int saved_;
};

// gemm_openblas.cpp. y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias). Paths (the benchmark compares them):
//   BlasThreads  sgemm on OpenBLAS's own threads: f32 one call; bf16/f16 per 16 MB panel
//                of w, widened by all threads (OpenMP) first
//   Panels       OpenMP over column panels of y, single-threaded sgemm per panel; bf16/f16
//                panels are widened into a per-thread f32 buffer first. Auto takes Panels: its
//                tiles depend on the shapes only, so results do not depend on the thread count
//                (BlasThreads' split does; it is kept for the benchmark)
enum class GemmPath { Auto, BlasThreads, Panels };
void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, GemmPath path = GemmPath::Auto);

// quant_gemm.cpp. linear with a weight-format w (Q8_0 … Q3_K, F8_E4M3; see that file):
//   Dequant  panels of w dequantized to f32, single-threaded sgemm per panel (any format)
//   Int8     Q8_0/Q4_0 with AVX-512 VNNI: x quantized to 8-bit blocks, int8 dot products
//   Int8Avx2 the same products with AVX2 (vpmaddubsw/vpmaddwd), also for Q5_0 and the K-quants
// Auto takes Int8 where available, else Int8Avx2 where available, else Dequant.
enum class QuantPath { Auto, Dequant, Int8, Int8Avx2 };
bool quant_int8_available(DType t);       // Int8 (VNNI)
bool quant_int8_avx2_available(DType t);  // Int8Avx2: Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, Q3_K
void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, QuantPath path = QuantPath::Auto);
// Int8Avx2's activation quantization (needs AVX2; exposed for its test): rows of x [M, K] →
// q = roundf(x / d) per 32-block with d = max|x| / 127, d per block [M, K/32], Σq per 16 values [M, K/16].
void quantize_activation_blocks(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* sum);

// Every other op (norm.cpp, fused.cpp, elementwise.cpp, rope.cpp, attention.cpp, conv.cpp; the
// plain GroupNorm without the silu flag is norm.cpp's own):
void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps);
#include "backends/op_signatures.inc"

}  // namespace zi::cpu
