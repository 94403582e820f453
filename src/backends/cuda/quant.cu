// linear with a weight-format w on the GPU (cuda_ops.h). Two paths:
//  - fp8 weights with bf16 activations where cuBLASLt has an fp8 kernel (compute capability
//    ≥ 8.9, shapes and alignment it accepts; gemm_cublaslt.cpp asks it once per shape): the
//    activation is quantized to e4m3 with scale = max|x| / 448 (1 for zeros), value =
//    rne(x / scale) (core/quant.cpp's rule, so the bytes equal the CPU's) — per row (token)
//    where cuBLASLt takes outer-vector scales, else over the whole tensor —, then one fp8 GEMM
//    on the tensor cores with the weight's per-output-channel scales applied as the scaling
//    allows (cuda_ops.h Fp8Scaling; profile: "fp8_act_quant", the linear, and "fp8_rescale"
//    for the Scalar scaling's channel pass).
//  - every other case: the weight is dequantized into a workspace buffer in the activation
//    dtype, then the GEMM of linear() runs on it (profile: "dequant"). For bf16 activations,
//    Q8_0, Q4_0 and fp8 (K a multiple of 16) take bandwidth-bound kernels: one thread per 8
//    (fp8: 16) output values, 16-byte stores, consecutive threads on consecutive bytes; the
//    other formats (and f32 activations) one thread per 32-value block or 256-value super-block.
//    The buffer comes from the pool, so consecutive layers reuse the same memory.
// The arithmetic is that of core/quant.cpp (ggml's), so the dequantized values equal the CPU's
// before the bf16 rounding.
#include <cuda_fp8.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "backends/cuda/e4m3_rows.cuh"

namespace zi::cuda {
namespace {

__device__ __forceinline__ float f16at(const uint8_t* p) {
  const unsigned short h = (unsigned short)(p[0] | (p[1] << 8));
  return __half2float(__ushort_as_half(h));
}

__device__ void deq_q8_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  for (int j = 0; j < 32; ++j) y[j] = float(int8_t(b[2 + j])) * d;
}
__device__ void deq_q4_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = float(int(b[2 + j] & 0x0F) - 8) * d;
    y[16 + j] = float(int(b[2 + j] >> 4) - 8) * d;
  }
}
__device__ void deq_q5_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  const uint32_t qh = uint32_t(b[2]) | uint32_t(b[3]) << 8 | uint32_t(b[4]) << 16 | uint32_t(b[5]) << 24;
  for (int j = 0; j < 16; ++j) {
    y[j] = float(int((b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16) * d;
    y[16 + j] = float(int((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) * d;
  }
}
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, float* sc, float* m) {
  if (j < 4) {
    *sc = float(q[j] & 63);
    *m = float(q[j + 4] & 63);
  } else {
    *sc = float((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *m = float((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}
__device__ void deq_q4_k(const uint8_t* b, float* y) {
  const float d = f16at(b), dmin = f16at(b + 2);
  for (int g = 0; g < 4; ++g) {
    float s1, m1, s2, m2;
    scale_min_k4(2 * g, b + 4, &s1, &m1);
    scale_min_k4(2 * g + 1, b + 4, &s2, &m2);
    const float d1 = __fmul_rn(d, s1), mm1 = __fmul_rn(dmin, m1), d2 = __fmul_rn(d, s2), mm2 = __fmul_rn(dmin, m2);
    for (int l = 0; l < 32; ++l) {
      y[64 * g + l] = __fsub_rn(__fmul_rn(d1, float(b[16 + 32 * g + l] & 0x0F)), mm1);
      y[64 * g + 32 + l] = __fsub_rn(__fmul_rn(d2, float(b[16 + 32 * g + l] >> 4)), mm2);
    }
  }
}
__device__ void deq_q5_k(const uint8_t* b, float* y) {
  const float d = f16at(b), dmin = f16at(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int g = 0; g < 4; ++g) {
    float s1, m1, s2, m2;
    scale_min_k4(2 * g, b + 4, &s1, &m1);
    scale_min_k4(2 * g + 1, b + 4, &s2, &m2);
    const float d1 = __fmul_rn(d, s1), mm1 = __fmul_rn(dmin, m1), d2 = __fmul_rn(d, s2), mm2 = __fmul_rn(dmin, m2);
    for (int l = 0; l < 32; ++l) {
      y[64 * g + l] = __fsub_rn(__fmul_rn(d1, float((ql[32 * g + l] & 0x0F) | (((qh[l] >> (2 * g)) & 1) << 4))), mm1);
      y[64 * g + 32 + l] =
          __fsub_rn(__fmul_rn(d2, float((ql[32 * g + l] >> 4) | (((qh[l] >> (2 * g + 1)) & 1) << 4))), mm2);
    }
  }
}
__device__ void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16at(b + 208);
  for (int c = 0; c < 8; ++c) {
    const int g = c / 4, r = c % 4, shift_l = 4 * (r / 2), off_l = 64 * g + 32 * (r % 2), shift_h = 2 * r;
    for (int l = 0; l < 32; ++l) {
      const int e = 32 * c + l;
      const int q = int(((ql[off_l + l] >> shift_l) & 0x0F) | (((qh[32 * g + l] >> shift_h) & 3) << 4)) - 32;
      y[e] = __fmul_rn(__fmul_rn(d, float(sc[e / 16])), float(q));
    }
  }
}
__device__ void deq_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hm = b;
  const uint8_t* qs = b + 32;
  const uint8_t* s = b + 96;
  const float d = f16at(b + 108);
  for (int c = 0; c < 8; ++c) {
    const int g = c / 4, shift = 2 * (c % 4);
    for (int l = 0; l < 32; ++l) {
      const int e = 32 * c + l, i = e / 16;
      const int lo = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
      const int hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
      const float dl = __fmul_rn(d, float(int(int8_t(uint8_t(lo | (hi << 4)))) - 32));
      const int q = int((qs[32 * g + l] >> shift) & 3) - (((hm[l] >> c) & 1) ? 0 : 4);
      y[e] = __fmul_rn(dl, float(q));
    }
  }
}

__device__ float e4m3(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = __int_as_float(0x7fc00000);
  else if (e == 0) v = ldexpf(float(m) / 8.0f, -6);
  else v = ldexpf(1.0f + float(m) / 8.0f, e - 7);
  return s ? -v : v;
}

template <class T>
__global__ void dequant_blocks(const uint8_t* __restrict__ src, T* __restrict__ dst, int64_t nblocks, int fmt,
                               int block, int block_bytes) {
  float y[256];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nblocks; i += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t* b = src + i * block_bytes;
    switch (fmt) {
      case 0: deq_q8_0(b, y); break;
      case 1: deq_q4_0(b, y); break;
      case 2: deq_q5_0(b, y); break;
      case 3: deq_q4_k(b, y); break;
      case 4: deq_q5_k(b, y); break;
      case 5: deq_q6_k(b, y); break;
      default: deq_q3_k(b, y); break;
    }
    for (int j = 0; j < block; ++j) st(dst, i * block + j, y[j]);
  }
}

template <class T>
__global__ void dequant_fp8(const uint8_t* __restrict__ src, const float* __restrict__ scale, T* __restrict__ dst,
                            int64_t n, int64_t K) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    st(dst, i, __fmul_rn(e4m3(src[i]), scale ? scale[i / K] : 1.0f));
}

// ---- bandwidth-bound dequantization into bf16 (one thread per 16-byte store) ----

__device__ __forceinline__ float f16_bits(unsigned short h) { return __half2float(__ushort_as_half(h)); }

// Q8_0 (34-byte blocks, 2-byte aligned): thread t writes values 8·(t%4) … +7 of block t/4.
__global__ void dequant_q8_0_bf16(const uint8_t* __restrict__ src, bf16* __restrict__ dst, int64_t nchunks) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < nchunks; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t blk = t >> 2;
    const int j = int(t & 3);
    const unsigned short* b = reinterpret_cast<const unsigned short*>(src + blk * 34);
    const float d = f16_bits(b[0]);
    float f[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned short u = b[1 + 4 * j + i];
      f[2 * i] = float(int8_t(u & 0xff)) * d;
      f[2 * i + 1] = float(int8_t(u >> 8)) * d;
    }
    store_vec<bf16>(dst + t * 8, f);
  }
}

// Q4_0 (18-byte blocks): values 0…15 are the low nibbles of qs[0…15], 16…31 the high ones;
// thread t writes values 8·(t%4) … +7 of block t/4 (qs bytes 8·(j%2) … +7, low or high half).
__global__ void dequant_q4_0_bf16(const uint8_t* __restrict__ src, bf16* __restrict__ dst, int64_t nchunks) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < nchunks; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t blk = t >> 2;
    const int j = int(t & 3), shift = j >= 2 ? 4 : 0;
    const unsigned short* b = reinterpret_cast<const unsigned short*>(src + blk * 18);
    const float d = f16_bits(b[0]);
    float f[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned short u = b[1 + 4 * (j & 1) + i];
      f[2 * i] = float(int(((u & 0xff) >> shift) & 0x0F) - 8) * d;
      f[2 * i + 1] = float(int(((u >> 8) >> shift) & 0x0F) - 8) * d;
    }
    store_vec<bf16>(dst + t * 8, f);
  }
}

// fp8 (K a multiple of 16): thread t reads 16 bytes and writes 16 values (two 16-byte stores).
__global__ void dequant_fp8_bf16(const uint8_t* __restrict__ src, const float* __restrict__ scale,
                                 bf16* __restrict__ dst, int64_t nchunks, int64_t K) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < nchunks; t += int64_t(gridDim.x) * blockDim.x) {
    const uint4 u = reinterpret_cast<const uint4*>(src)[t];
    const float s = scale ? scale[(t * 16) / K] : 1.0f;
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
    float f[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = __fmul_rn(e4m3(uint8_t(w[i / 4] >> (8 * (i % 4)))), s);
    float lo[8], hi[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) lo[i] = f[i], hi[i] = f[8 + i];
    store_vec<bf16>(dst + t * 16, lo);
    store_vec<bf16>(dst + t * 16 + 8, hi);
  }
}

// ---- per-row (token) e4m3 quantization of bf16 activations (K a multiple of 8) ----

// 8 bf16 values at x (16-byte aligned) → e4m3 bytes at q (8-byte aligned), scale s.
__device__ __forceinline__ void store_e4m3x8_bf16(const bf16* x, float s, uint8_t* q) {
  float f[8];
  load_vec<bf16>(x, f);
  store_e4m3x8(f, s, q);
}

// One block per row: max|x| (the row is read twice; the second read hits L2), scale =
// max / 448 (1 for a zero row), byte = rne-satfinite(x / scale).
__global__ void quantize_rows_e4m3(const bf16* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                   int64_t K) {
  const bf16* row = x + blockIdx.x * K;
  uint8_t* qrow = q + blockIdx.x * K;
  float m = 0.0f;
  for (int64_t c = threadIdx.x * 8; c < K; c += int64_t(blockDim.x) * 8) {
    float f[8];
    load_vec<bf16>(row + c, f);
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(f[i]));
  }
  const float s = e4m3_row_scale(block_max(m));
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  for (int64_t c = threadIdx.x * 8; c < K; c += int64_t(blockDim.x) * 8) {
    store_e4m3x8_bf16(row + c, s, qrow + c);
  }
}

// max|x| over the whole tensor into *amax (as its bits: non-negative floats order like their
// bit patterns; *amax starts at 0).
__global__ void absmax_bf16(const bf16* __restrict__ x, int64_t n8, unsigned* __restrict__ amax) {
  float m = 0.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    float f[8];
    load_vec<bf16>(x + i * 8, f);
#pragma unroll
    for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(f[k]));
  }
  m = block_max(m);
  if (threadIdx.x == 0) atomicMax(amax, __float_as_uint(m));
}

// The whole tensor with one scale s = amax / 448 (1 for zeros): q = rne-satfinite(x / s);
// thread 0 writes s to *scale; with `alpha`, the first N threads write alpha[n] = s · w_s[n]
// (w_s nullptr: 1).
__global__ void quantize_tensor_e4m3(const bf16* __restrict__ x, uint8_t* __restrict__ q, int64_t n8,
                                     const unsigned* __restrict__ amax, float* __restrict__ scale,
                                     const float* __restrict__ w_s, float* __restrict__ alpha, int64_t N) {
  const float m = __uint_as_float(*amax);
  const float s = e4m3_row_scale(m);
  const int64_t t0 = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t0 == 0) *scale = s;
  if (alpha)
    for (int64_t n = t0; n < N; n += int64_t(gridDim.x) * blockDim.x) alpha[n] = w_s ? s * w_s[n] : s;
  for (int64_t i = t0; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    store_e4m3x8_bf16(x + i * 8, s, q + i * 8);
  }
}

// y[m, n] = bf16(y[m, n] · w_s[n] (+ bias[n])), 8 values per thread (N a multiple of 16).
__global__ void rescale_channels(bf16* __restrict__ y, int64_t n8, int64_t N, const float* __restrict__ w_s,
                                 const bf16* __restrict__ bias) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    float f[8];
    load_vec<bf16>(y + i * 8, f);
    const int64_t c = (i * 8) % N;
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = f[k] * w_s[c + k] + (bias ? __bfloat162float(bias[c + k]) : 0.0f);
    store_vec<bf16>(y + i * 8, f);
  }
}

__global__ void fill_f32(float* p, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) p[i] = v;
}

std::atomic<int> g_fp8_gemm{-1};  // -1: not decided (environment ZI_FP8_GEMM=0 turns it off), 0 off, 1 on
std::atomic<bool> g_fast_dequant{true};  // off: the per-block kernels (tests compare the two)
bool fast_dequant() { return g_fast_dequant.load(); }
std::atomic<const char*> g_last_path{""};

std::atomic<int64_t> g_copies_used{0};
std::atomic<int> g_e4m3_copies{-1};  // -1: not decided (environment ZI_E4M3_COPIES=0 turns them off), 0 off, 1 on
std::atomic<int> g_e4m3_only{-1};    // -1: not decided (environment ZI_E4M3_ONLY=0 turns it off), 0 off, 1 on

}  // namespace

bool fp8_gemm_enabled() { return env_switch(g_fp8_gemm, "ZI_FP8_GEMM", true); }
bool e4m3_copies_enabled() { return env_switch(g_e4m3_copies, "ZI_E4M3_COPIES", true) && fp8_gemm_enabled(); }

void set_e4m3_copies(bool on) { g_e4m3_copies.store(on ? 1 : 0); }
bool e4m3_only_enabled() { return env_switch(g_e4m3_only, "ZI_E4M3_ONLY", true) && e4m3_copies_enabled(); }
void set_e4m3_only(bool on) { g_e4m3_only.store(on ? 1 : 0); }

bool fp8_reads_copy(int64_t M, const Tensor& w) {
  if (!fp8_gemm_enabled() || w.dtype() != DType::F8_E4M3 || w.ndim() != 2 || w.device() != Device::CUDA || M < 1)
    return false;
  // The copy and the output are pool buffers (256-byte aligned): the plan made for these
  // stand-ins is the one the GEMM will find.
  const void* pool = reinterpret_cast<const void*>(uintptr_t(256));
  return fp8_scaling_for(M, w.dim(0), w.dim(1), false, pool, w.raw(), pool) == int(Fp8Scaling::OuterVector);
}

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

std::atomic<const char*> g_last_scaling{""};

std::mutex g_refusal_mu;
std::string g_refusal;  // linear_fp8_last_refusal()

bool refuse(std::string why) {
  std::lock_guard<std::mutex> lk(g_refusal_mu);
  g_refusal = std::move(why);
  return false;
}

// The fp8 tensor-core path; false (nothing computed, the reason kept) where it does not apply.
bool try_linear_fp8(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y) {
  const int64_t N = w.dim(0), K = w.dim(1), M = x.numel() / K;
  if (!fp8_gemm_enabled()) return refuse("fp8 GEMMs are off (ZI_FP8_GEMM=0)");
  if (M < 1 || x.dtype() != DType::BF16 || y.dtype() != DType::BF16)
    return refuse(str_cat("activations ", x.desc(), " -> ", y.desc(), ": bf16 needed"));
  if (K % 16 || N % 16) return refuse(str_cat("N=", N, " K=", K, ": multiples of 16 needed"));
  if (!x.is_contiguous() || !y.is_contiguous() || !aligned16(x.raw()) || !aligned16(w.raw()))
    return refuse("operands not contiguous or not 16-byte aligned");
  const float* ws = w.row_scale() ? w.row_scale()->data<float>() : nullptr;
  // The producer's e4m3 copy of x (Tensor::e4m3_copy), else quantized here into scratch.
  const Tensor* xc = x.e4m3_copy();
  if (xc && !(xc->dim(0) == M && xc->dim(1) == K && aligned16(xc->raw()))) xc = nullptr;
  Tensor xq = xc ? Tensor() : scratch(M * K);
  const int sc = fp8_scaling_for(M, N, K, bias != nullptr, xc ? xc->raw() : xq.raw(), w.raw(), y.raw());
  if (sc < 0) {
    const std::string plan = fp8_plan_refusal();
    return refuse(plan.empty() ? str_cat("no scaling allowed for M=", M, " N=", N, " K=", K,
                                         " (compute capability ", compute_capability(), ", ZI_FP8_SCALING)")
                               : plan);
  }
  const Fp8Scaling scaling = Fp8Scaling(sc);
  Tensor b;
  if (bias) b = bias->dtype() == DType::BF16 ? bias->contiguous(Tag::Workspace) : bias->to(DType::BF16, Tag::Workspace);
  ZI_CHECK(!x.values_in_e4m3_copy_only() || (xc && scaling == Fp8Scaling::OuterVector),
           "[linear] ", x.desc(), " exists only as its e4m3 copy, but the fp8 GEMM on ", w.desc(),
           " cannot read it (scaling ", fp8_scaling_name(scaling), "): its producer should have kept the bf16 values");
  if (xc && scaling != Fp8Scaling::OuterVector) {  // per-row scales are of no use: quantize here
    xc = nullptr;
    xq = scratch(M * K);
  }
  uint8_t* q = static_cast<uint8_t*>(xc ? xc->raw() : xq.raw());
  if (scaling == Fp8Scaling::OuterVector) {
    Tensor xs;
    if (xc) {
      xs = *xc->row_scale();
      g_copies_used.fetch_add(1);
    } else {
      xs = Tensor::empty({M}, DType::F32, Tag::Workspace, Device::CUDA);
      OpTimer prof("fp8_act_quant");
      quantize_rows_e4m3<<<unsigned(M), 256, 0, stream()>>>(x.data<bf16>(), q, xs.data<float>(), K);
      ZI_CUDA_LAUNCHED();
    }
    Tensor ones;
    if (!ws) {
      ones = Tensor::empty({N}, DType::F32, Tag::Workspace, Device::CUDA);
      fill_f32<<<grid_for(N, 256), 256, 0, stream()>>>(ones.data<float>(), N, 1.0f);
      ZI_CUDA_LAUNCHED();
      ws = ones.data<float>();
    }
    if (!linear_fp8(scaling, M, N, K, q, xs.data<float>(), w.raw(), ws, bias ? b.raw() : nullptr, y.raw()))
        return refuse(fp8_plan_refusal());
  } else {
    // [0]: max|x| bits, [4]: the activation's scale, [8, 8 + N): the alpha vector (cuBLASLt wants
    // its scale pointers 16-byte aligned).
    Tensor sv = Tensor::empty({8 + N}, DType::F32, Tag::Workspace, Device::CUDA);
    float* amax = sv.data<float>();
    float* x_scale = amax + 4;
    float* alpha = scaling == Fp8Scaling::AlphaVector ? amax + 8 : nullptr;
    const int64_t n8 = M * K / 8;
    {
      OpTimer prof("fp8_act_quant");
      ZI_CUDA(cudaMemsetAsync(amax, 0, sizeof(float), stream()));
      const unsigned grid = std::min<unsigned>(grid_for(n8, 256), unsigned(4 * sm_count()));
      absmax_bf16<<<grid, 256, 0, stream()>>>(x.data<bf16>(), n8, reinterpret_cast<unsigned*>(amax));
      ZI_CUDA_LAUNCHED();
      quantize_tensor_e4m3<<<grid_for(std::max(n8, N), 256), 256, 0, stream()>>>(
          x.data<bf16>(), q, n8, reinterpret_cast<const unsigned*>(amax), x_scale, ws, alpha, N);
      ZI_CUDA_LAUNCHED();
    }
    if (scaling == Fp8Scaling::AlphaVector) {
      if (!linear_fp8(scaling, M, N, K, q, nullptr, w.raw(), alpha, bias ? b.raw() : nullptr, y.raw()))
        return refuse(fp8_plan_refusal());
    } else {
      // Per-channel weight scales (or a bias after them) need the channel pass.
      const bool epilogue_bias = bias && !ws;
      if (!linear_fp8(scaling, M, N, K, q, x_scale, w.raw(), nullptr, epilogue_bias ? b.raw() : nullptr, y.raw()))
        return refuse(fp8_plan_refusal());
      if (ws) {
        OpTimer prof("fp8_rescale");
        const int64_t m8 = M * N / 8;
        rescale_channels<<<grid_for(m8, 256), 256, 0, stream()>>>(y.data<bf16>(), m8, N, ws,
                                                                    bias ? b.data<bf16>() : nullptr);
        ZI_CUDA_LAUNCHED();
      }
    }
  }
  g_last_scaling.store(fp8_scaling_name(scaling));
  refuse("");
  return true;
}

int fmt_code(DType t) {
  switch (t) {
    case DType::Q8_0: return 0;
    case DType::Q4_0: return 1;
    case DType::Q5_0: return 2;
    case DType::Q4_K: return 3;
    case DType::Q5_K: return 4;
    case DType::Q6_K: return 5;
    case DType::Q3_K: return 6;
    default: return -1;
  }
}

}  // namespace

void set_fast_dequant(bool on) { g_fast_dequant.store(on); }
void set_fp8_gemm(bool on) { g_fp8_gemm.store(on ? 1 : 0); }
const char* linear_quant_last_path() { return g_last_path.load(); }
int64_t linear_fp8_copies_used() { return g_copies_used.load(); }
const char* linear_fp8_last_scaling() { return g_last_scaling.load(); }
std::string linear_fp8_last_refusal() {
  std::lock_guard<std::mutex> lk(g_refusal_mu);
  return g_refusal;
}

void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y) {
  const DType dt = x.dtype();
  ZI_CHECK(dt == DType::F32 || dt == DType::BF16, "[linear] cuda activations must be f32 or bf16, got ", x.desc());
  ZI_CHECK(w.device() == Device::CUDA && w.is_contiguous() && w.ndim() == 2, "[linear] bad weight ", w.desc());
  if (w.dtype() == DType::F8_E4M3 && try_linear_fp8(x, w, bias, y)) {
    g_last_path.store("fp8");
    return;
  }
  ZI_CHECK(!x.values_in_e4m3_copy_only(), "[linear] ", x.desc(), " exists only as its e4m3 copy, but the GEMM on ",
           w.desc(), " cannot read it (", linear_fp8_last_refusal(), "): its producer should have kept the bf16 values");
  g_last_path.store("dequant");
  const int64_t n = w.numel();
  Tensor wd = Tensor::empty(w.shape(), dt, Tag::Workspace, Device::CUDA);
  {
    OpTimer prof("dequant");
    const int threads = 128;
    const uint8_t* src = static_cast<const uint8_t*>(w.raw());
    const bool fast = dt == DType::BF16 && aligned16(wd.raw()) && fast_dequant();
    if (fast && w.dtype() == DType::F8_E4M3 && w.dim(1) % 16 == 0 && aligned16(src)) {
      const float* sc = w.row_scale() ? w.row_scale()->data<float>() : nullptr;
      const int64_t nc = n / 16;
      dequant_fp8_bf16<<<grid_for(nc, 256), 256, 0, stream()>>>(src, sc, wd.data<bf16>(), nc, w.dim(1));
    } else if (fast && (w.dtype() == DType::Q8_0 || w.dtype() == DType::Q4_0) && reinterpret_cast<uintptr_t>(src) % 2 == 0) {
      const int64_t nc = n / 8;
      if (w.dtype() == DType::Q8_0) dequant_q8_0_bf16<<<grid_for(nc, 256), 256, 0, stream()>>>(src, wd.data<bf16>(), nc);
      else dequant_q4_0_bf16<<<grid_for(nc, 256), 256, 0, stream()>>>(src, wd.data<bf16>(), nc);
    } else if (w.dtype() == DType::F8_E4M3) {
      const float* sc = w.row_scale() ? w.row_scale()->data<float>() : nullptr;
      const unsigned grid = grid_for(n, 256);
      if (dt == DType::BF16) dequant_fp8<bf16><<<grid, 256, 0, stream()>>>(src, sc, wd.data<bf16>(), n, w.dim(1));
      else dequant_fp8<float><<<grid, 256, 0, stream()>>>(src, sc, wd.data<float>(), n, w.dim(1));
    } else {
      const int code = fmt_code(w.dtype());
      ZI_CHECK(code >= 0, "[linear] no GPU dequantization for ", w.desc());
      const int block = int(dtype_block(w.dtype())), bb = int(dtype_block_bytes(w.dtype()));
      const int64_t nb = n / block;
      const unsigned grid = grid_for(nb, threads);
      if (dt == DType::BF16)
        dequant_blocks<bf16><<<grid, threads, 0, stream()>>>(src, wd.data<bf16>(), nb, code, block, bb);
      else
        dequant_blocks<float><<<grid, threads, 0, stream()>>>(src, wd.data<float>(), nb, code, block, bb);
    }
    ZI_CUDA_LAUNCHED();
  }
  linear(x, wd, bias, y);
}

}  // namespace zi::cuda
