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
// Auto takes Int8 where available.
enum class QuantPath { Auto, Dequant, Int8 };
bool quant_int8_available(DType t);
void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, QuantPath path = QuantPath::Auto);

// norm.cpp
void rms_norm_(Tensor& x, const Tensor& weight, float eps);
void layer_norm_(Tensor& x, float eps);
void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps);
// The tiled VAE decode's GroupNorm pieces (ops.h): per-group sums over a sub-rectangle, and a
// GroupNorm with given statistics; dst[:, y0:, x0:] = src.
void group_region_sums(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                       const std::vector<double>& mean, std::vector<double>& out);
void group_norm_given_(Tensor& x, int groups, const std::vector<float>& mean, const std::vector<float>& rstd,
                       const Tensor& weight, const Tensor& bias);
void paste_(Tensor& dst, const Tensor& src, int64_t y0, int64_t x0);

// elementwise.cpp
void silu_(Tensor& x);
void tanh_(Tensor& x);
void silu_mul(const Tensor& a, const Tensor& b, Tensor& out);
void add_(Tensor& x, const Tensor& y);
void mul_(Tensor& x, const Tensor& y);
void scale_(Tensor& x, float s);
void add_scalar_(Tensor& x, float s);
void mul_rows_(Tensor& x, const Tensor& v);
void add_gated_(Tensor& x, const Tensor& v, const Tensor& y);
void concat0(const std::vector<Tensor>& parts, Tensor& out);
void embedding(const Tensor& table, const std::vector<int32_t>& ids, Tensor& out);

// rope.cpp
void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin);
void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin);

// attention.cpp
void attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int64_t kv_len,
               Tensor& out);

// conv.cpp
void conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, Tensor& out);
void upsample_nearest2x(const Tensor& x, Tensor& out);

}  // namespace zi::cpu
