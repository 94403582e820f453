// The CUDA backend: one function per op of ops/ops.h, plus the device runtime (stream, pool,
// copies) and the streamed weight upload. Arguments are checked by ops.cpp; these functions
// only compute. Activations are contiguous f32 or bf16 device tensors (the dtype of the
// input is the dtype of the output); small operands (norm weights, gates, biases) may be
// f32/bf16/f16 and are read as f32. Norms, softmax, RoPE and statistics run in f32,
// matrix products accumulate in f32. When ZIMAGE_CUDA is off, backends/no_cuda.cpp defines
// every function here as a stub that reports it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace zi::cuda {

// ---- runtime (runtime.cu) ----
bool available();  // a usable GPU is present (never throws)
std::string device_description();  // "NVIDIA H100 80GB HBM3, 132 SMs, 79.1 GiB"
int64_t memory_free_bytes();        // free device memory (cudaMemGetInfo) plus the pool's cache
void synchronize();  // waits for all work of the compute stream
// The pool's release threshold: bytes kept cached after frees (--cache-limit). Default: all.
void set_cache_limit(size_t bytes);
void trim_cache();  // returns every cached block of the pool to the driver
struct PoolStats {
  int64_t used_high = 0;      // most bytes handed out by the pool at once (since reset)
  int64_t reserved_high = 0;  // most bytes the pool held from the driver at once
  int64_t reserved_now = 0;
};
PoolStats pool_stats();
void reset_pool_peaks();

// GPU time per op when the environment sets ZI_CUDA_PROFILE=1: ops.cpp wraps each CUDA op in
// an OpTimer (two events on the stream); profile_report() waits for the GPU and returns a
// table of total milliseconds and calls per op name, and clears it (the pipeline prints one
// per GPU phase). Off: one branch per op.
class OpTimer {
 public:
  explicit OpTimer(const char* name);
  ~OpTimer();
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  int slot_ = -1;
};
std::string profile_report();

// ---- weight upload (weight_upload.cpp) ----
// Copies `n` elements of type `st` from host memory (a mapping) into `dst`, a device tensor of
// dtype `dt` (f32/bf16/f16; st may be any of those too), through a ring of pinned staging
// buffers: the host copy into one buffer overlaps the transfer and conversion of the previous.
void upload_convert(const void* src, DType st, int64_t n, Tensor& dst);
struct UploadStats {
  int64_t bytes = 0;   // bytes read from the host
  double seconds = 0;  // wall time spent in upload_convert
};
UploadStats upload_stats();

// ---- matrix products (gemm_cublaslt.cpp) ----
// y = x · wᵀ (+ bias). x [M, K] f32 or bf16; w [N, K] f32/bf16/f16 (converted to x's dtype on
// the fly when it differs); y [M, N] in x's dtype. bf16 runs on tensor cores, f32 in full f32.
void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y);
// linear with a weight-format w (quant.cu): w is dequantized block by block into a reused
// device buffer of x's dtype (bf16 or f32), then the same GEMM as linear() runs on it. The
// dequantization time is reported in the profile as "dequant".
void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y);
// C = A · B, column-major (m×k, k×n → m×n) with leading dimensions, f32 or bf16 operands of
// one dtype, f32 accumulation. The convolutions' im2col path uses it.
void gemm_nn(int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb, void* C,
             int64_t ldc, DType dt);

// ---- norms (norm.cu) ----
void rms_norm_(Tensor& x, const Tensor& weight, float eps);
void layer_norm_(Tensor& x, float eps);
void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps, bool silu);
// The tiled VAE decode's pieces (ops.h): per-group sums over a sub-rectangle (results on the
// host), GroupNorm with given statistics; dst[:, y0:, x0:] = src (src may be a strided view).
void group_region_sums(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                       const std::vector<double>& mean, std::vector<double>& out);
void group_norm_given_(Tensor& x, int groups, const std::vector<float>& mean, const std::vector<float>& rstd,
                       const Tensor& weight, const Tensor& bias);
void paste_(Tensor& dst, const Tensor& src, int64_t y0, int64_t x0);
// Fused forms (ops.h): y = RMSNorm(x)·w (⊙ scale); x += gate ⊙ RMSNorm(y)·w (y may be
// overwritten); per-head RMSNorm + adjacent-pairs RoPE.
void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor* scale, Tensor& y);
void rms_norm_add_(Tensor& x, Tensor& y, const Tensor& weight, float eps, const Tensor* gate);
void rms_norm_rope_pairs_(Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin);

// ---- elementwise (elementwise.cu) ----
void silu_(Tensor& x);
void tanh_(Tensor& x);
void silu_mul(const Tensor& a, const Tensor& b, Tensor& out);
void add_(Tensor& x, const Tensor& y);
void mul_(Tensor& x, const Tensor& y);
void scale_(Tensor& x, float s);
void add_scalar_(Tensor& x, float s);
void mul_rows_(Tensor& x, const Tensor& v);
void add_gated_(Tensor& x, const Tensor& v, const Tensor& y);
void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin);
void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin);
void upsample_nearest2x(const Tensor& x, Tensor& out);
void concat0(const std::vector<Tensor>& parts, Tensor& out);
void embedding(const Tensor& table, const std::vector<int32_t>& ids, Tensor& out);

// ---- attention (attention.cu) ----
void attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int64_t kv_len,
               Tensor& out);
// Which path attention() takes for these arguments: "flash" (the bf16 tensor-core kernel) or
// "blocked" (score blocks through cuBLAS, any dtype and head size).
const char* attention_path(const Tensor& q, const Tensor& k);
// Forces the blocked path (tests compare the two).
void set_force_blocked_attention(bool on);
// Which flash kernel runs: 0 picks the fastest by timing each once at the first call with at
// least 64K query rows (ZI_CUDA_PROFILE=1 prints the times); 1 (A: 64 queries a block), 2 (B: 128
// queries, two tiles a warp), 3 (C: B, rescaling the accumulators only when a row max moved) or
// 4 (H: wgmma on Hopper, head_dim 128, no causal mask; elsewhere C for head_dim 128, else A) or 5 (W:
// H warp-specialised, TMA loads and ping-pong between the warpgroups; else as 4) forces one.
void set_flash_variant(int v);

// ---- convolution (conv.cu) ----
void conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, Tensor& out);
bool cudnn_available();
// Which conv2d path runs: Auto (k×k kernels in bf16: the fastest of im2col + cuBLASLt, cuDNN
// NCHW and cuDNN NHWC, timed once per shape at its first call; cuDNN NCHW otherwise; the direct
// kernel without cuDNN), or one forced (tests).
enum class ConvPath { Auto, Cudnn, CudnnNhwc, Im2col, Direct };
void set_conv_path(ConvPath p);

}  // namespace zi::cuda
