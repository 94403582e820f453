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

#include "backends/device.h"
#include "core/tensor.h"

namespace zi {
// The device runtime's CUDA side (runtime.cu; stubs in no_cuda.cpp), called by backends/device.cpp
// only. Copies between a host and a device pointer are complete when they return.
void* cuda_device_alloc(size_t bytes, Tag tag);
void cuda_device_free(void* p, size_t bytes, Tag tag);
void cuda_memcpy(void* dst, Device dd, const void* src, Device sd, size_t bytes);
void cuda_memset0(void* p, size_t bytes);
void cuda_copy_strided(const Tensor& src, const Tensor& dst);  // same dtype; dst contiguous
void cuda_convert(const void* src, DType st, void* dst, DType dt, size_t n);
}  // namespace zi

namespace zi::cuda {

// ---- runtime (runtime.cu) ----
bool available();  // a usable GPU is present (never throws)
std::string unavailable_reason();  // why available() is false, one line ("" when it is true)
// "" when cuBLAS and cuBLASLt could be opened (blas_loader.cpp), else which one is missing.
std::string blas_unavailable_reason();
std::string device_description();  // "NVIDIA H100 80GB HBM3, 132 SMs, 79.1 GiB"
int compute_capability();  // 10·major + minor of the device (90 for H100; gemm_cublaslt.cpp)
int64_t memory_free_bytes();        // free device memory (cudaMemGetInfo) plus the pool's cache
int64_t memory_total_bytes();       // the card's memory (cudaMemGetInfo's total)
void synchronize();  // waits for all work of the compute stream
// The pool's release threshold: bytes kept cached after frees (--cache-limit). Default: all.
void set_cache_limit(size_t bytes);
void trim_cache();  // returns every cached block of the pool to the driver
using device::PoolStats;
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

// ---- block streaming (block_stream.cpp; device::SlotRing's CUDA side) ----
void* pinned_alloc(size_t bytes);
void pinned_free(void* p);
// A copy stream and one (filled, released) event pair per slot.
void* ring_create(int slots);
void ring_destroy(void* ring);
void ring_fill(void* ring, int slot, void* dst, const void* host, size_t bytes);
void ring_acquire(void* ring, int slot);
void ring_release(void* ring, int slot);
void ring_drain(void* ring);
double measure_h2d_rate(size_t bytes);

// ---- weight upload (weight_upload.cpp) ----
// Copies `n` elements of type `st` from host memory (a mapping) into `dst`, a device tensor of
// dtype `dt` (f32/bf16/f16; st may be any of those too), through a ring of pinned staging
// buffers: the host copy into one buffer overlaps the transfer and conversion of the previous.
void upload_convert(const void* src, DType st, int64_t n, Tensor& dst);
using device::UploadStats;
UploadStats upload_stats();

// ---- matrix products (gemm_cublaslt.cpp) ----
// y = x · wᵀ (+ bias). x [M, K] f32 or bf16; w [N, K] f32/bf16/f16 (converted to x's dtype on
// the fly when it differs); y [M, N] in x's dtype. bf16 runs on tensor cores, f32 in full f32.
void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y);
// linear with a weight-format w (quant.cu). fp8 weights with bf16 activations run on the fp8
// tensor cores where cuBLASLt has a kernel for it (linear_fp8; the activation is quantized per
// row on the fly, profile "fp8_act_quant"); otherwise w is dequantized into a reused device
// buffer of x's dtype (bf16 or f32), then the same GEMM as linear() runs on it (profile
// "dequant"). ZI_FP8_GEMM=0 in the environment, or set_fp8_gemm(false), forces the dequant
// path for fp8; set_fast_dequant(false) forces the per-block dequant kernels (tests compare).
void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y);
void set_fp8_gemm(bool on);
void set_fast_dequant(bool on);
const char* linear_quant_last_path();  // "fp8" or "dequant": the path of the latest linear_quant
// y[M, N] bf16 = (x8[M, K] · x_scale[M]) · (w8[N, K] · w_scale[N])ᵀ (+ bias[N] bf16), x8 and w8
// e4m3, scales f32 device vectors (gemm_cublaslt.cpp). False, nothing computed, where cuBLASLt
// has no fp8 kernel for it (compute capability < 8.9, K or N not a multiple of 16, pointers not
// 16-byte aligned, or its heuristic finds none; remembered per shape).
bool linear_fp8(int64_t M, int64_t N, int64_t K, const void* x8, const float* x_scale, const void* w8,
                const float* w_scale, const void* bias_bf16, void* y);
// C = A · B, column-major (m×k, k×n → m×n) with leading dimensions, f32 or bf16 operands of
// one dtype, f32 accumulation. The convolutions' im2col path uses it.
void gemm_nn(int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb, void* C,
             int64_t ldc, DType dt);

// ---- every other op (norm.cu, elementwise.cu, attention.cu, conv.cu) ----
#include "backends/op_signatures.inc"

// ---- attention (attention.cu) ----
// Which path attention() takes for these arguments: "flash" (the bf16 tensor-core kernel) or
// "blocked" (score blocks through cuBLAS, any dtype and head size).
const char* attention_path(const Tensor& q, const Tensor& k);
// Forces the blocked path (tests compare the two).
void set_force_blocked_attention(bool on);
// The flash path runs the Hopper kernel W where it applies (compute capability 9.0, head_dim
// 128, no causal mask) and the portable mma.sync kernel elsewhere; `on` forces the portable
// one everywhere (tests compare the two).
void set_portable_attention(bool on);

// ---- convolution (conv.cu) ----
bool cudnn_available();
// Which conv2d path runs: Auto (k×k kernels in bf16: the fastest of im2col + cuBLASLt, cuDNN
// NCHW and cuDNN NHWC, timed once per shape (stride included) at its first call; cuDNN NCHW
// otherwise; the direct kernel without cuDNN), or one forced (tests). Every path takes any stride.
enum class ConvPath { Auto, Cudnn, CudnnNhwc, Im2col, Direct };
void set_conv_path(ConvPath p);

}  // namespace zi::cuda
