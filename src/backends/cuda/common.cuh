// Shared pieces of the CUDA backend: error checks, the compute stream, element loads and
// stores that widen to / round from f32, and block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "core/check.h"
#include "core/tensor.h"

namespace zi::cuda {

[[noreturn]] void cuda_fail(cudaError_t e, const char* what, const char* file, int line);

#define ZI_CUDA(call)                                                          \
  do {                                                                         \
    cudaError_t zi_e_ = (call);                                                \
    if (zi_e_ != cudaSuccess) ::zi::cuda::cuda_fail(zi_e_, #call, __FILE__, __LINE__); \
  } while (0)
// After every launch: a bad configuration shows here, not at the next unrelated call.
#define ZI_CUDA_LAUNCHED() ZI_CUDA(cudaGetLastError())

cudaStream_t stream();  // the one stream all work goes to (created on first use)
void ensure_init();     // picks the device, creates the stream and the pool
int sm_count();

// n elements of src (dtype st) converted into dst (dtype dt), f32/bf16/f16, on the stream.
void convert_device(const void* src, DType st, void* dst, DType dt, int64_t n);

// A device scratch buffer from the accounted pool (Tag::Workspace), freed with the tensor.
Tensor scratch(int64_t bytes);

// A backend switch: `v` as a setter left it (0 off, 1 on), else (-1) decided once by the
// environment variable `name` ("0" off, "1" on, anything else or unset: `dflt`).
bool env_switch(std::atomic<int>& v, const char* name, bool dflt);
// A small operand widened to a contiguous f32 device vector (norm weights, gates, biases).
Tensor f32_vector(const Tensor& v);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned grid_for(int64_t n, int threads, int64_t cap = int64_t(1) << 20) {
  int64_t g = cdiv(n, threads);
  return unsigned(g < 1 ? 1 : (g > cap ? cap : g));
}

#ifdef __CUDACC__
using bf16 = __nv_bfloat16;

template <class T>
__device__ __forceinline__ float ld(const T* p, int64_t i);
template <>
__device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float ld<bf16>(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
template <>
__device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }

template <class T>
__device__ __forceinline__ void st(T* p, int64_t i, float v);
template <>
__device__ __forceinline__ void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
__device__ __forceinline__ void st<bf16>(bf16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ void st<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// 16-byte vectors of activations: VN elements of T, loaded and stored as f32.
template <class T>
struct Vec {
  static constexpr int N = 16 / int(sizeof(T));
};
template <class T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[16 / sizeof(T)]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  if constexpr (sizeof(T) == 4) {
    f[0] = __uint_as_float(u.x), f[1] = __uint_as_float(u.y), f[2] = __uint_as_float(u.z), f[3] = __uint_as_float(u.w);
  } else {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}
template <class T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[16 / sizeof(T)]) {
  uint4 u;
  if constexpr (sizeof(T) == 4) {
    u.x = __float_as_uint(f[0]), u.y = __float_as_uint(f[1]), u.z = __float_as_uint(f[2]), u.w = __float_as_uint(f[3]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __nv_bfloat162 b = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&b);
    }
    u.x = w[0], u.y = w[1], u.z = w[2], u.w = w[3];
  }
  *reinterpret_cast<uint4*>(p) = u;
}

// Shared-window address of a shared-memory pointer (for cp.async, ldmatrix, wgmma descriptors).
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// 2^x on the special-function unit (one MUFU op; −inf gives +0).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats rounded to bf16 (nearest even) in one 32-bit word, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A warp reduction (Sum or Max) over the whole block (blockDim.x a multiple of 32, at most
// 1024); every thread gets it. The identity A(0) pads the missing warps (Max: of |values|).
struct WarpSum {
  template <class A>
  __device__ A operator()(A v) const { return warp_sum(v); }
};
struct WarpMax {
  __device__ float operator()(float v) const { return warp_max(v); }
};
template <class Op, class A>
__device__ __forceinline__ A block_reduce(A v) {
  __shared__ A part[32];
  __syncthreads();  // the buffer may still be read by a previous call
  v = Op()(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (l == 0) part[w] = v;
  __syncthreads();
  return Op()(l < nw ? part[l] : A(0));
}
template <class A>
__device__ __forceinline__ A block_sum(A v) {
  return block_reduce<WarpSum>(v);
}

// Calls f.template operator()<T>() with T the element type of an activation dtype.
#define ZI_DISPATCH_ACT(dt, ...)                                      \
  do {                                                                \
    if ((dt) == ::zi::DType::F32) {                                   \
      using T = float;                                                \
      __VA_ARGS__;                                                    \
    } else if ((dt) == ::zi::DType::BF16) {                           \
      using T = ::zi::cuda::bf16;                                     \
      __VA_ARGS__;                                                    \
    } else {                                                          \
      ::zi::fail("[cuda] activations must be f32 or bf16");           \
    }                                                                 \
  } while (0)
#endif

}  // namespace zi::cuda
