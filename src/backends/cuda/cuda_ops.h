// The CUDA backend: one function per op of ops/ops.h, plus the device runtime (stream, pool,
// copies) and the streamed weight upload. Arguments are checked by ops.cpp; these functions
// only compute. Activations are contiguous f32 or bf16 device tensors (the dtype of the
// input is the dtype of the output); small operands (norm weights, gates, biases) may be
// f32/bf16/f16 and are read as f32. Norms, softmax, RoPE and statistics run in f32,
// matrix products accumulate in f32. When ZIMAGE_CUDA is off, backends/no_cuda.cpp defines
// every function here as a stub that reports it.
#pragma once
#include <cstdint>
#include <functional>
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
// What the first GPU work of a process would otherwise wait for: the context, the cuBLASLt
// handle and workspace (gemm_cublaslt.cpp), cuDNN's library and handle (conv.cu). Never throws
// (a failure is reported by the first real use).
void warm_up();
void blas_warm_up();
void dnn_warm_up();
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

// Recorded graphs (device::Graph): the executable's handle, or null with the reason in *why.
// graph_destroy waits for the stream, destroys it and trims the driver's graph memory; the
// accounting follows the driver's reservation.
bool can_record();
bool profiling();  // ZI_CUDA_PROFILE is on
// device::SideStream: a stream of this thread's own that stream() returns until the end, which
// waits for its work and destroys it (throws if that work failed).
void* side_stream_begin();
void side_stream_end(void* s);
void* graph_record(const std::function<void()>& work, std::string* why);
void graph_launch(void* exec);
void graph_destroy(void* exec);

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
void upload_convert_read(const device::HostReader& read, DType st, int64_t n, Tensor& dst);
using device::UploadStats;
UploadStats upload_stats();
device::RuntimeTimes runtime_times();

// ---- matrix products (gemm_cublaslt.cpp) ----
// y = x · wᵀ (+ bias). x [M, K] f32 or bf16; w [N, K] f32/bf16/f16 (converted to x's dtype on
// the fly when it differs); y [M, N] in x's dtype. bf16 runs on tensor cores, f32 in full f32.
void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y);
// linear with a weight-format w (quant.cu). fp8 weights with bf16 activations run on the fp8
// tensor cores where cuBLASLt has a kernel for it (linear_fp8; the activation is quantized on
// the fly, profile "fp8_act_quant"); otherwise w is dequantized into a reused device buffer of
// x's dtype (bf16 or f32), then the same GEMM as linear() runs on it (profile "dequant").
// ZI_FP8_GEMM=0 in the environment, or set_fp8_gemm(false), forces the dequant path for fp8;
// set_fast_dequant(false) forces the per-block dequant kernels (tests compare).
void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y);
// Producers of fp8 GEMM inputs: the op (rms_norm, silu_mul, silu_mul_halves on bf16) that also
// writes the e4m3 copy of its output q (F8_E4M3 [rows, K] with row_scale [rows]) with the bytes
// and scales linear_quant's own quantization would write (e4m3_rows.cuh), so an fp8 GEMM that
// reads the copy (Tensor::e4m3_copy; outer-vector scaling only) gives the same result without
// its separate pass. false, nothing computed, for shapes or dtypes the fused kernels do not take.
bool rms_norm_e4m3(const Tensor& x, const Tensor& weight, float eps, const Tensor* scale, Tensor& y, Tensor& q);
bool rms_norm_add_norm_e4m3(Tensor& x, Tensor& y, const Tensor& w_add, const Tensor* gate, const Tensor& w_norm,
                            const Tensor* scale, float eps, Tensor& h, Tensor& q);
bool silu_mul_e4m3(const Tensor& a, const Tensor& b, Tensor& out, Tensor& q);
bool silu_mul_halves_e4m3(const Tensor& y, Tensor& out, Tensor& q);
// How many fp8 GEMMs read their input's e4m3 copy instead of quantizing it (tests, profiles).
int64_t linear_fp8_copies_used();
// Whether ops.cpp asks the producers for e4m3 copies: fp8 GEMMs on, and the copies on — the
// default (fp8 DiT at 1024², 8 steps: 0.603 → 0.576 s, same image; H100, 2026-12-07);
// ZI_E4M3_COPIES=0 in the environment, or set_e4m3_copies(false) (tests), turns them off.
bool e4m3_copies_enabled();
void set_e4m3_copies(bool on);
// Whether producers whose only readers are fp8 GEMMs that read the copy (ops' e4m3_only) write
// the copy alone, not their bf16 result (Tensor::values_in_e4m3_copy_only): the same GEMM results
// with one bf16 write per producer less (fp8 DiT at 1024², 8 steps: 0.586 → 0.576 s, the same
// image; H100, 2026-12-08). On by default; ZI_E4M3_ONLY=0 in the environment, or
// set_e4m3_only(false) (tests), turns it off; needs the copies on.
bool e4m3_only_enabled();
void set_e4m3_only(bool on);
// Whether an fp8 GEMM of M rows on w (F8_E4M3 [N, K] on the GPU, no bias) reads its input's e4m3
// copy: fp8 GEMMs on and an outer-vector plan for the shape.
bool fp8_reads_copy(int64_t M, const Tensor& w);
bool fp8_gemm_enabled();
void set_fp8_gemm(bool on);
void set_fast_dequant(bool on);
const char* linear_quant_last_path();  // "fp8" or "dequant": the path of the latest linear_quant

// How an fp8 GEMM applies the weight's per-output-channel scales w_s[N] and the activation's
// scales (cuBLASLt offers different things on different cards and versions; the first with a
// kernel for the shape is taken, in this order):
//  - OuterVector: per-row activation scales x_s[M] and w_s as cuBLASLt outer-vector scales
//    (D = x_s[m] · w_s[n] · Σ x8·w8);
//  - AlphaVector: one activation scale x_s for the tensor, alpha[n] = x_s · w_s[n] as cuBLASLt's
//    device alpha vector (one per row of D = output channel);
//  - Scalar: one activation scale as B's scalar scale, then w_s[n] (and the bias) applied by a
//    small kernel on the bf16 output.
enum class Fp8Scaling { OuterVector = 0, AlphaVector = 1, Scalar = 2 };
const char* fp8_scaling_name(Fp8Scaling s);
// The scaling linear_quant uses for this shape (M, N, K, bias, pointers' alignments), or -1 when
// cuBLASLt has no fp8 kernel for any (compute capability < 8.9, K or N not a multiple of 16,
// pointers not 16-byte aligned, or its heuristic finds none; remembered per shape). All three
// are tried in order; ZI_FP8_SCALING=outer|alpha|scalar allows only that one; force_fp8_scaling()
// overrides the environment (tests).
int fp8_scaling_for(int64_t M, int64_t N, int64_t K, bool bias, const void* x8, const void* w8, const void* y);
void force_fp8_scaling(int s);  // 0..2: that one; -1: any; -2: as the environment says
// The scaling of the latest fp8 GEMM linear_quant ran ("" before the first).
const char* linear_fp8_last_scaling();
// Why the latest fp8 GEMM linear_quant tried did not run on the tensor cores: the condition that
// ruled it out, or the plan cuBLASLt refused (scaling, shape, step, status); "" when it ran.
std::string linear_fp8_last_refusal();
std::string fp8_plan_refusal();  // the latest refused plan (gemm_cublaslt.cpp)
// ZI_GEMM_TUNE=1 (experiment): each cuBLASLt plan's candidate algorithms are timed at its first
// launch outside a recording and the fastest kept (gemm_cublaslt.cpp); the setter overrides the
// environment (tests), the count says how many plans were timed.
void set_gemm_tuning(bool on);
int gemm_tuned_plans();
// y[M, N] bf16 = Σ_k x8[m, k] · w8[n, k], scaled per `s` (see Fp8Scaling; `scale_a` is w_s[N] for
// OuterVector, the alpha vector [N] for AlphaVector, unused (nullptr) for Scalar; `scale_b` is
// x_s[M] for OuterVector, nullptr for AlphaVector, the device scalar x_s for Scalar) (+ bias[N]
// bf16 in the epilogue; Scalar with per-channel weights adds it in its own kernel instead).
// False, nothing computed, if cuBLASLt refuses at launch.
bool linear_fp8(Fp8Scaling s, int64_t M, int64_t N, int64_t K, const void* x8, const float* scale_b, const void* w8,
                const float* scale_a, const void* bias_bf16, void* y);
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
