// RMSNorm, LayerNorm (no affine) and GroupNorm (+ optional fused SiLU) on the GPU. Row
// statistics accumulate in f32 per thread and are reduced across the warp/block; GroupNorm's
// statistics over up to millions of elements take two passes (mean, then squared deviations)
// with per-thread f32 partials of at most a few thousand elements combined in f64; the
// normalisation is one f32 FMA per element with per-channel scale and shift.
#include <algorithm>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "backends/cuda/e4m3_rows.cuh"

namespace zi::cuda {
namespace {

// Rows of at most kWarpRowMax elements get one warp each (q/k-norm: D = 128 over S·H rows);
// longer rows one block of 256 threads.
constexpr int64_t kWarpRowMax = 1024;

template <class T>
__global__ void rms_norm_warp(T* x, const float* w, int64_t R, int64_t D, float eps) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= R) return;
  const int l = threadIdx.x & 31;
  T* row = x + r * D;
  float s = 0;
  for (int64_t j = l; j < D; j += 32) {
    const float v = ld<T>(row, j);
    s += v * v;
  }
  s = warp_sum(s);
  const float inv = rsqrtf(s / float(D) + eps);
  for (int64_t j = l; j < D; j += 32) st<T>(row, j, ld<T>(row, j) * inv * w[j]);
}

template <class T>
__global__ void rms_norm_block(T* x, const float* w, int64_t D, float eps) {
  T* row = x + blockIdx.x * D;
  float s = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float v = ld<T>(row, j);
    s += v * v;
  }
  s = block_sum(s);
  const float inv = rsqrtf(s / float(D) + eps);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) st<T>(row, j, ld<T>(row, j) * inv * w[j]);
}

// One block per row, 16-byte vectors (D a multiple of the vector width):
// y = x·inv·w (⊙ scale), y may be x.
template <class T>
__global__ void rms_norm_vec(const T* x, T* y, const float* w, const float* scale, int64_t D, float eps) {
  constexpr int N = Vec<T>::N;
  const T* row = x + blockIdx.x * D;
  T* out = y + blockIdx.x * D;
  float s = 0;
  for (int64_t j = threadIdx.x * N; j < D; j += blockDim.x * N) {
    float f[N];
    load_vec(row + j, f);
#pragma unroll
    for (int e = 0; e < N; ++e) s += f[e] * f[e];
  }
  const float inv = rsqrtf(block_sum(s) / float(D) + eps);
  for (int64_t j = threadIdx.x * N; j < D; j += blockDim.x * N) {
    float f[N];
    load_vec(row + j, f);
#pragma unroll
    for (int e = 0; e < N; ++e) f[e] = f[e] * inv * w[j + e] * (scale ? scale[j + e] : 1.0f);
    store_vec(out + j, f);
  }
}

// x += gate ⊙ (y·inv(y)·w) (gate null: 1), one block per row, 16-byte vectors.
template <class T>
__global__ void rms_norm_add_vec(T* x, const T* y, const float* w, const float* gate, int64_t D, float eps) {
  constexpr int N = Vec<T>::N;
  const T* yr = y + blockIdx.x * D;
  T* xr = x + blockIdx.x * D;
  float s = 0;
  for (int64_t j = threadIdx.x * N; j < D; j += blockDim.x * N) {
    float f[N];
    load_vec(yr + j, f);
#pragma unroll
    for (int e = 0; e < N; ++e) s += f[e] * f[e];
  }
  const float inv = rsqrtf(block_sum(s) / float(D) + eps);
  for (int64_t j = threadIdx.x * N; j < D; j += blockDim.x * N) {
    float f[N], o[N];
    load_vec(yr + j, f);
    load_vec(xr + j, o);
#pragma unroll
    for (int e = 0; e < N; ++e) o[e] += (gate ? gate[j + e] : 1.0f) * (f[e] * inv * w[j + e]);
    store_vec(xr + j, o);
  }
}

// Per-head RMSNorm then adjacent-pairs RoPE, one warp per head vector x[s, h, :] (D even), read
// from in[s · in_stride + h · D + j] and written to out[(s · H + h) · D + j]; in may be out (in
// place, in_stride H·D): each lane writes only elements it has read.
template <class T>
__global__ void rms_norm_rope_pairs_warp(const T* in, int64_t in_stride, T* out, const float* w, const float* cs,
                                         const float* sn, int64_t S, int64_t H, int64_t D, float eps) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= S * H) return;
  const int l = threadIdx.x & 31;
  const int64_t s = r / H, h = r % H, half = D / 2;
  const T* row = in + s * in_stride + h * D;
  T* orow = out + r * D;
  float q = 0;
  for (int64_t j = l; j < D; j += 32) {
    const float v = ld<T>(row, j);
    q += v * v;
  }
  const float inv = rsqrtf(warp_sum(q) / float(D) + eps);
  for (int64_t m = l; m < half; m += 32) {
    const float a = ld<T>(row, 2 * m) * inv * w[2 * m], b = ld<T>(row, 2 * m + 1) * inv * w[2 * m + 1];
    const float c = cs[s * half + m], si = sn[s * half + m];
    st<T>(orow, 2 * m, a * c - b * si);
    st<T>(orow, 2 * m + 1, a * si + b * c);
  }
}

// Row-in-registers forms for rows of at most VPT·128 vectors (D = 3840 bf16: 480 vectors, VPT 4):
// one block of 128 threads per row, every vector of the row loaded once up front (all loads in
// flight before the first use), squared sum reduced, then scaled from the registers; the f32
// weights/gates are read as 16-byte vectors. One read of each input row instead of two.
constexpr int kRegThreads = 128;

template <int N>
__device__ __forceinline__ void load_f32n(const float* p, float (&f)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 u = *reinterpret_cast<const float4*>(p + i);
    f[i] = u.x, f[i + 1] = u.y, f[i + 2] = u.z, f[i + 3] = u.w;
  }
}

// kAdd false: out = in·inv(in)·w (⊙ mul), out may be in (mul: a scale).
// kAdd true:  out += mul ⊙ (in·inv(in)·w) (mul: a gate).      mul null: 1.
// kQ (bf16, kAdd false): also the e4m3 copy of the bf16 row written, q [R, D] and qs [R]
// (e4m3_rows.cuh: the bytes and scales quant.cu's separate pass would write); out null: the
// copy alone (the bf16 row is rounded as if stored, not stored).
template <class T, int VPT, bool kAdd, bool kQ = false>
__global__ void __launch_bounds__(kRegThreads) rms_norm_reg(const T* in, T* out, const float* w, const float* mul,
                                                            int D, float eps, uint8_t* q = nullptr,
                                                            float* qs = nullptr) {
  static_assert(!kQ || (!kAdd && sizeof(T) == 2), "the e4m3 copy is of bf16 norms");
  constexpr int N = Vec<T>::N;
  const T* ir = in + int64_t(blockIdx.x) * D;
  T* orow = out ? out + int64_t(blockIdx.x) * D : nullptr;
  float f[VPT][N], o[kAdd ? VPT : 1][N];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int j = (threadIdx.x + i * kRegThreads) * N;
    if (j < D) {
      load_vec(ir + j, f[i]);
      if constexpr (kAdd) load_vec(orow + j, o[i]);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) f[i][e] = 0.0f;
    }
  }
  float s = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int e = 0; e < N; ++e) s += f[i][e] * f[i][e];
  const float inv = rsqrtf(block_sum(s) / float(D) + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int j = (threadIdx.x + i * kRegThreads) * N;
    if (j >= D) continue;
    float wv[N];
    load_f32n<N>(w + j, wv);
    if (mul) {
      float mv[N];
      load_f32n<N>(mul + j, mv);
#pragma unroll
      for (int e = 0; e < N; ++e) wv[e] *= mv[e];
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float t = f[i][e] * inv;
      if constexpr (kAdd) f[i][e] = o[i][e] + wv[e] * t;
      else f[i][e] = t * wv[e];
    }
    if (!kQ || orow) store_vec(orow + j, f[i]);
  }
  if constexpr (kQ) quantize_row_e4m3(f, kRegThreads, D, q + int64_t(blockIdx.x) * D, qs + blockIdx.x);
}

// The value a store_vec of v keeps: v itself in f32, v rounded to bf16 (nearest even) in bf16.
template <class T>
__device__ __forceinline__ float stored_value(float v) {
  if constexpr (sizeof(T) == 4) return v;
  else return bf16_rounded(v);
}

// rms_norm_reg<T, VPT, true> (x += gate ⊙ RMSNorm(y)·w_add) then rms_norm_reg<T, VPT, false, kQ>
// on the updated x (h = RMSNorm(x)·w_norm ⊙ scale, and its e4m3 copy with kQ) in one pass: the
// second stage takes x's row from the registers, rounded as stored, so every sum runs over the
// same values in the same order as the two kernels' and the bits are theirs. h null (kQ): the copy
// alone.
template <class T, int VPT, bool kQ>
__global__ void __launch_bounds__(kRegThreads)
    rms_norm_add_norm_reg(const T* y, T* x, const float* w_add, const float* gate, const float* w_norm,
                          const float* scale, T* h, int D, float eps, uint8_t* q, float* qs) {
  static_assert(!kQ || sizeof(T) == 2, "the e4m3 copy is of bf16 norms");
  constexpr int N = Vec<T>::N;
  const T* yr = y + int64_t(blockIdx.x) * D;
  T* xr = x + int64_t(blockIdx.x) * D;
  T* hr = h ? h + int64_t(blockIdx.x) * D : nullptr;
  float f[VPT][N], o[VPT][N];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int j = (threadIdx.x + i * kRegThreads) * N;
    if (j < D) {
      load_vec(yr + j, f[i]);
      load_vec(xr + j, o[i]);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) f[i][e] = 0.0f;
    }
  }
  float s = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int e = 0; e < N; ++e) s += f[i][e] * f[i][e];
  const float inv = rsqrtf(block_sum(s) / float(D) + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int j = (threadIdx.x + i * kRegThreads) * N;
    if (j >= D) continue;
    float wv[N];
    load_f32n<N>(w_add + j, wv);
    if (gate) {
      float mv[N];
      load_f32n<N>(gate + j, mv);
#pragma unroll
      for (int e = 0; e < N; ++e) wv[e] *= mv[e];
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float t = f[i][e] * inv;
      f[i][e] = o[i][e] + wv[e] * t;
    }
    store_vec(xr + j, f[i]);
#pragma unroll
    for (int e = 0; e < N; ++e) f[i][e] = stored_value<T>(f[i][e]);  // what x holds now
  }
  // The second stage: rms_norm_reg<T, VPT, false> on x's row (vectors past D hold 0).
  float s2 = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int e = 0; e < N; ++e) s2 += f[i][e] * f[i][e];
  const float inv2 = rsqrtf(block_sum(s2) / float(D) + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int j = (threadIdx.x + i * kRegThreads) * N;
    if (j >= D) continue;
    float wv[N];
    load_f32n<N>(w_norm + j, wv);
    if (scale) {
      float mv[N];
      load_f32n<N>(scale + j, mv);
#pragma unroll
      for (int e = 0; e < N; ++e) wv[e] *= mv[e];
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float t = f[i][e] * inv2;
      f[i][e] = t * wv[e];
    }
    if (!kQ || hr) store_vec(hr + j, f[i]);
  }
  if constexpr (kQ) quantize_row_e4m3(f, kRegThreads, D, q + int64_t(blockIdx.x) * D, qs + blockIdx.x);
}

// Per-head RMSNorm + adjacent-pairs RoPE for D = 128: one warp per head vector, lane l holds
// elements 4l..4l+3 (two RoPE pairs) from one 8-byte (bf16) or 16-byte (f32) load. Read from
// in[s · in_stride + h · 128 + …], written to out[(s · H + h) · 128 + …] (in may be out).
template <class T>
__global__ void rms_norm_rope128_warp(const T* in, int64_t in_stride, T* out, const float* w, const float* cs,
                                      const float* sn, int64_t S, int64_t H, float eps) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= S * H) return;
  const int l = threadIdx.x & 31;
  const int64_t s = r / H, h = r % H;
  const T* p = in + s * in_stride + h * 128 + 4 * l;
  T* po = out + r * 128 + 4 * l;
  float v[4];
  if constexpr (sizeof(T) == 4) {
    const float4 u = *reinterpret_cast<const float4*>(p);
    v[0] = u.x, v[1] = u.y, v[2] = u.z, v[3] = u.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(u.x << 16), v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16), v[3] = __uint_as_float(u.y & 0xffff0000u);
  }
  const float4 wv = *reinterpret_cast<const float4*>(w + 4 * l);
  const float2 c = *reinterpret_cast<const float2*>(cs + s * 64 + 2 * l);
  const float2 si = *reinterpret_cast<const float2*>(sn + s * 64 + 2 * l);
  const float inv = rsqrtf(warp_sum(v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3]) / 128.0f + eps);
  const float a0 = v[0] * inv * wv.x, b0 = v[1] * inv * wv.y, a1 = v[2] * inv * wv.z, b1 = v[3] * inv * wv.w;
  const float o0 = a0 * c.x - b0 * si.x, o1 = a0 * si.x + b0 * c.x;
  const float o2 = a1 * c.y - b1 * si.y, o3 = a1 * si.y + b1 * c.y;
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(po) = make_float4(o0, o1, o2, o3);
  } else {
    uint2 u;
    u.x = pack_bf16(o0, o1);
    u.y = pack_bf16(o2, o3);
    *reinterpret_cast<uint2*>(po) = u;
  }
}

template <class T>
__global__ void layer_norm_block(T* x, int64_t D, float eps) {
  T* row = x + blockIdx.x * D;
  float s = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) s += ld<T>(row, j);
  const float mean = block_sum(s) / float(D);
  float q = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float d = ld<T>(row, j) - mean;
    q += d * d;
  }
  const float inv = rsqrtf(block_sum(q) / float(D) + eps);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) st<T>(row, j, (ld<T>(row, j) - mean) * inv);
}

// stats[g] += Σ over this block's slice of group g of (x − mean[g])^p, p = 1 (mean = null) or 2.
template <class T>
__global__ void group_sum(const T* x, int64_t n_per_group, const double* mean, double* acc) {
  const int g = blockIdx.y;
  const T* gp = x + int64_t(g) * n_per_group;
  const double m = mean ? mean[2 * g] / double(n_per_group) : 0.0;
  double s = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_per_group;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double v = double(ld<T>(gp, i));
    s += mean ? (v - m) * (v - m) : v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(&acc[2 * g + (mean ? 1 : 0)], s);
}

// Sums of one group slice with 16-byte loads (n_per_group a multiple of the vector, aligned):
// per-thread partials in f32 (a few thousand elements each), combined in double.
template <class T>
__global__ void group_sum_vec(const T* x, int64_t n_per_group, const double* mean, double* acc) {
  constexpr int VN = Vec<T>::N;
  const int g = blockIdx.y;
  const T* gp = x + int64_t(g) * n_per_group;
  const float m = mean ? float(mean[2 * g] / double(n_per_group)) : 0.0f;
  float s = 0.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_per_group / VN;
       i += int64_t(gridDim.x) * blockDim.x) {
    float f[VN];
    load_vec(gp + i * VN, f);
#pragma unroll
    for (int e = 0; e < VN; ++e) s += mean ? (f[e] - m) * (f[e] - m) : f[e];
  }
  const double t = block_sum(double(s));
  if (threadIdx.x == 0) atomicAdd(&acc[2 * g + (mean ? 1 : 0)], t);
}

// Per channel: y = x·scale + shift with scale = w·rstd(group), shift = b − mean·scale (double,
// rounded once), so the per-element work is one FMA (and the SiLU).
__global__ void group_coeffs(const double* stats, const float* w, const float* b, int64_t C, int64_t cpg, double cnt,
                             float eps, float* scale, float* shift) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t g = c / cpg;
  const double mean = stats[2 * g] / cnt, rstd = 1.0 / sqrt(stats[2 * g + 1] / cnt + double(eps));
  const double sc = rstd * double(w[c]);
  scale[c] = float(sc);
  shift[c] = float(double(b[c]) - mean * sc);
}

template <bool kSilu>
__device__ __forceinline__ float affine(float v, float sc, float sh) {
  v = fmaf(v, sc, sh);
  return kSilu ? v / (1.0f + __expf(-v)) : v;
}

template <class T, bool kSilu>
__global__ void group_apply(T* x, const float* scale, const float* shift, int64_t C, int64_t HW) {
  const int64_t n = C * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i / HW;
    st<T>(x, i, affine<kSilu>(ld<T>(x, i), scale[c], shift[c]));
  }
}

// One channel per blockIdx.y, 16-byte vectors along its HW pixels (HW a multiple of the vector).
template <class T, bool kSilu>
__global__ void group_apply_vec(T* x, const float* scale, const float* shift, int64_t HW) {
  constexpr int VN = Vec<T>::N;
  const int64_t c = blockIdx.y;
  T* xc = x + c * HW;
  const float sc = scale[c], sh = shift[c];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < HW / VN; i += int64_t(gridDim.x) * blockDim.x) {
    float f[VN];
    load_vec(xc + i * VN, f);
#pragma unroll
    for (int e = 0; e < VN; ++e) f[e] = affine<kSilu>(f[e], sc, sh);
    store_vec(xc + i * VN, f);
  }
}

// out[g] += Σ over group g's channels of rows [y0, y0 + rows) × cols [x0, x0 + cols) of x [C, H, W]
// of x (mean null) or (x − mean[g])², in double.
template <class T>
__global__ void group_region_sum(const T* x, int64_t cpg, int64_t H, int64_t W, int64_t y0, int64_t rows, int64_t x0,
                                 int64_t cols, const double* mean, double* out) {
  const int g = blockIdx.y;
  const int64_t n = cpg * rows * cols;
  const double m = mean ? mean[g] : 0.0;
  double s = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = g * cpg + i / (rows * cols), r = i % (rows * cols);
    const double v = double(ld<T>(x, (c * H + y0 + r / cols) * W + x0 + r % cols));
    s += mean ? (v - m) * (v - m) : v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(&out[g], s);
}

// x[c] ← (x[c] − mean[g]) · (rstd[g] · w[c]) + b[c], the CPU's arithmetic; one channel per blockIdx.y.
template <class T>
__global__ void group_norm_given(T* x, const float* stats, const float* w, const float* b, int64_t HW, int64_t cpg,
                                 int groups) {
  const int64_t c = blockIdx.y, g = c / cpg;
  const float m = stats[g], a = stats[groups + g] * w[c], bb = b[c];
  T* xc = x + c * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < HW; i += int64_t(gridDim.x) * blockDim.x)
    st<T>(xc, i, (ld<T>(xc, i) - m) * a + bb);
}

}  // namespace

void rms_norm_(Tensor& x, const Tensor& weight, float eps) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
  Tensor w = f32_vector(weight);
  if (D <= kWarpRowMax) {
    ZI_DISPATCH_ACT(x.dtype(), rms_norm_warp<T><<<unsigned(cdiv(R, 8)), 256, 0, stream()>>>(x.data<T>(),
                                                                                          w.data<float>(), R, D, eps));
  } else if (D % (16 / int64_t(dtype_size(x.dtype()))) == 0 && reinterpret_cast<uintptr_t>(x.raw()) % 16 == 0) {
    ZI_DISPATCH_ACT(x.dtype(), rms_norm_vec<T><<<unsigned(R), 256, 0, stream()>>>(x.data<T>(), x.data<T>(),
                                                                                  w.data<float>(), nullptr, D, eps));
  } else {
    ZI_DISPATCH_ACT(x.dtype(), rms_norm_block<T><<<unsigned(R), 256, 0, stream()>>>(x.data<T>(), w.data<float>(), D, eps));
  }
  ZI_CUDA_LAUNCHED();
}

namespace {
bool vec_ok(const Tensor& t, int64_t D) {
  const int64_t N = 16 / int64_t(dtype_size(t.dtype()));
  return D % N == 0 && reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0;
}
}  // namespace


namespace {
// Vectors per thread for the row-in-registers kernels (0: the row is too long for them).
int reg_vpt(int64_t D, DType dt) {
  const int64_t nv = D / (16 / int64_t(dtype_size(dt)));
  return nv <= kRegThreads ? 1 : nv <= 2 * kRegThreads ? 2 : nv <= 4 * kRegThreads ? 4 : 0;
}
// rms_norm_reg with the register layout reg_vpt chose (1, 2 or 4 vectors per thread), one row a block.
template <class T, bool kAdd, bool kQ = false>
void launch_rms_norm_reg(int vpt, int64_t R, const T* in, T* out, const float* w, const float* mul, int64_t D,
                         float eps, uint8_t* q = nullptr, float* qs = nullptr) {
  const unsigned g = unsigned(R);
  if (vpt == 1) rms_norm_reg<T, 1, kAdd, kQ><<<g, kRegThreads, 0, stream()>>>(in, out, w, mul, int(D), eps, q, qs);
  else if (vpt == 2) rms_norm_reg<T, 2, kAdd, kQ><<<g, kRegThreads, 0, stream()>>>(in, out, w, mul, int(D), eps, q, qs);
  else rms_norm_reg<T, 4, kAdd, kQ><<<g, kRegThreads, 0, stream()>>>(in, out, w, mul, int(D), eps, q, qs);
  ZI_CUDA_LAUNCHED();
}
// rms_norm_add_norm_reg with reg_vpt's layout, one row a block.
template <class T, bool kQ>
void launch_rms_norm_add_norm(int vpt, int64_t R, const T* y, T* x, const float* wa, const float* g, const float* wn,
                              const float* sc, T* h, int64_t D, float eps, uint8_t* q = nullptr, float* qs = nullptr) {
  const unsigned n = unsigned(R);
  if (vpt == 1) rms_norm_add_norm_reg<T, 1, kQ><<<n, kRegThreads, 0, stream()>>>(y, x, wa, g, wn, sc, h, int(D), eps, q, qs);
  else if (vpt == 2) rms_norm_add_norm_reg<T, 2, kQ><<<n, kRegThreads, 0, stream()>>>(y, x, wa, g, wn, sc, h, int(D), eps, q, qs);
  else rms_norm_add_norm_reg<T, 4, kQ><<<n, kRegThreads, 0, stream()>>>(y, x, wa, g, wn, sc, h, int(D), eps, q, qs);
  ZI_CUDA_LAUNCHED();
}
}  // namespace

// One pass where the row-in-registers kernels take the rows (exactly their two kernels' bits),
// else the two ops.
void rms_norm_add_norm_(Tensor& x, Tensor& y, const Tensor& w_add, const Tensor* gate, const Tensor& w_norm,
                        const Tensor* scale, float eps, Tensor& h) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
  const int vpt = reg_vpt(D, x.dtype());
  if (vpt && vec_ok(x, D) && vec_ok(y, D) && vec_ok(h, D) && y.dtype() == x.dtype() && h.dtype() == x.dtype()) {
    Tensor wa = f32_vector(w_add), wn = f32_vector(w_norm), g = gate ? f32_vector(*gate) : Tensor(),
           sc = scale ? f32_vector(*scale) : Tensor();
    ZI_DISPATCH_ACT(x.dtype(), launch_rms_norm_add_norm<T, false>(vpt, R, y.data<T>(), x.data<T>(), wa.data<float>(),
                                                                   gate ? g.data<float>() : nullptr, wn.data<float>(),
                                                                   scale ? sc.data<float>() : nullptr, h.data<T>(), D, eps));
    return;
  }
  rms_norm_add_(x, y, w_add, eps, gate);
  rms_norm(x, w_norm, eps, scale, h);
}

bool rms_norm_add_norm_e4m3(Tensor& x, Tensor& y, const Tensor& w_add, const Tensor* gate, const Tensor& w_norm,
                            const Tensor* scale, float eps, Tensor& h, Tensor& q) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  const int vpt = reg_vpt(D, x.dtype());
  if (!R || x.dtype() != DType::BF16 || y.dtype() != DType::BF16 || !vec_ok(x, D) || !vec_ok(y, D) || !vec_ok(h, D) ||
      !vpt || D % 16 || reinterpret_cast<uintptr_t>(q.raw()) % 16)
    return false;
  Tensor wa = f32_vector(w_add), wn = f32_vector(w_norm), g = gate ? f32_vector(*gate) : Tensor(),
         sc = scale ? f32_vector(*scale) : Tensor();
  launch_rms_norm_add_norm<bf16, true>(vpt, R, y.data<bf16>(), x.data<bf16>(), wa.data<float>(),
                                       gate ? g.data<float>() : nullptr, wn.data<float>(),
                                       scale ? sc.data<float>() : nullptr, h.data<bf16>(), D, eps,
                                       static_cast<uint8_t*>(q.raw()), q.row_scale()->data<float>());
  return true;
}

void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor* scale, Tensor& y) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
  Tensor w = f32_vector(weight), sc = scale ? f32_vector(*scale) : Tensor();
  const float* sp = scale ? sc.data<float>() : nullptr;
  const int vpt = reg_vpt(D, x.dtype());
  if (vec_ok(x, D) && vec_ok(y, D) && vpt) {
    ZI_DISPATCH_ACT(x.dtype(), launch_rms_norm_reg<T, false>(vpt, R, x.data<T>(), y.data<T>(), w.data<float>(), sp, D, eps));
    return;
  }
  if (vec_ok(x, D) && vec_ok(y, D)) {
    ZI_DISPATCH_ACT(x.dtype(), rms_norm_vec<T><<<unsigned(R), 256, 0, stream()>>>(x.data<T>(), y.data<T>(),
                                                                                  w.data<float>(), sp, D, eps));
    ZI_CUDA_LAUNCHED();
    return;
  }
  if (y.raw() != x.raw()) ZI_CUDA(cudaMemcpyAsync(y.raw(), x.raw(), x.nbytes(), cudaMemcpyDeviceToDevice, stream()));
  rms_norm_(y, weight, eps);
  if (scale) mul_rows_(y, *scale);
}

bool rms_norm_e4m3(const Tensor& x, const Tensor& weight, float eps, const Tensor* scale, Tensor& y, Tensor& q) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  const int vpt = reg_vpt(D, x.dtype());
  if (!R || x.dtype() != DType::BF16 || !vec_ok(x, D) || !vec_ok(y, D) || !vpt || D % 16 ||
      reinterpret_cast<uintptr_t>(q.raw()) % 16)
    return false;
  Tensor w = f32_vector(weight), sc = scale ? f32_vector(*scale) : Tensor();
  const float* sp = scale ? sc.data<float>() : nullptr;
  uint8_t* qp = static_cast<uint8_t*>(q.raw());
  float* qs = q.row_scale()->data<float>();
  launch_rms_norm_reg<bf16, false, true>(vpt, R, x.data<bf16>(), y.data<bf16>(), w.data<float>(), sp, D, eps, qp, qs);
  return true;
}

void rms_norm_add_(Tensor& x, Tensor& y, const Tensor& weight, float eps, const Tensor* gate) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
  if (vec_ok(x, D) && vec_ok(y, D) && x.dtype() == y.dtype() && reg_vpt(D, x.dtype())) {
    Tensor w = f32_vector(weight), g = gate ? f32_vector(*gate) : Tensor();
    const float* gp = gate ? g.data<float>() : nullptr;
    const int vpt = reg_vpt(D, x.dtype());
    ZI_DISPATCH_ACT(x.dtype(), launch_rms_norm_reg<T, true>(vpt, R, y.data<T>(), x.data<T>(), w.data<float>(), gp, D, eps));
    return;
  }
  if (vec_ok(x, D) && vec_ok(y, D) && x.dtype() == y.dtype()) {
    Tensor w = f32_vector(weight), g = gate ? f32_vector(*gate) : Tensor();
    ZI_DISPATCH_ACT(x.dtype(), rms_norm_add_vec<T><<<unsigned(R), 256, 0, stream()>>>(
                                   x.data<T>(), y.data<T>(), w.data<float>(), gate ? g.data<float>() : nullptr, D, eps));
    ZI_CUDA_LAUNCHED();
    return;
  }
  rms_norm_(y, weight, eps);
  if (gate) add_gated_(x, *gate, y);
  else add_(x, y);
}

namespace {
// x [S, H, D] read with row stride `in_stride` (elements), written contiguous to out (out may be x).
void norm_rope_pairs(const Tensor& x, int64_t in_stride, const Tensor& weight, float eps, const Tensor& cos,
                     const Tensor& sin, Tensor& out) {
  const int64_t S = x.dim(0), H = x.dim(1), D = x.dim(2);
  if (!S || !H) return;
  Tensor w = f32_vector(weight);
  if (D == 128 && reinterpret_cast<uintptr_t>(x.raw()) % 16 == 0 && (in_stride * int64_t(dtype_size(x.dtype()))) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(out.raw()) % 16 == 0 && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 &&
      reinterpret_cast<uintptr_t>(cos.raw()) % 8 == 0 && reinterpret_cast<uintptr_t>(sin.raw()) % 8 == 0) {
    ZI_DISPATCH_ACT(x.dtype(), rms_norm_rope128_warp<T><<<unsigned(cdiv(S * H, 8)), 256, 0, stream()>>>(
                                   x.data<T>(), in_stride, out.data<T>(), w.data<float>(), cos.data<float>(),
                                   sin.data<float>(), S, H, eps));
    ZI_CUDA_LAUNCHED();
    return;
  }
  ZI_DISPATCH_ACT(x.dtype(), rms_norm_rope_pairs_warp<T><<<unsigned(cdiv(S * H, 8)), 256, 0, stream()>>>(
                                 x.data<T>(), in_stride, out.data<T>(), w.data<float>(), cos.data<float>(),
                                 sin.data<float>(), S, H, D, eps));
  ZI_CUDA_LAUNCHED();
}
}  // namespace

void rms_norm_rope_pairs_(Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin) {
  norm_rope_pairs(x, x.dim(1) * x.dim(2), weight, eps, cos, sin, x);
}

void rms_norm_rope_pairs(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin,
                         Tensor& out) {
  norm_rope_pairs(x, x.strides()[0], weight, eps, cos, sin, out);
}

void layer_norm_(Tensor& x, float eps) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
  ZI_DISPATCH_ACT(x.dtype(), layer_norm_block<T><<<unsigned(R), 256, 0, stream()>>>(x.data<T>(), D, eps));
  ZI_CUDA_LAUNCHED();
}

void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps, bool silu) {
  const int64_t C = x.dim(0), HW = x.numel() / C, cpg = C / groups, npg = cpg * HW;
  if (!x.numel()) return;
  Tensor w = f32_vector(weight), b = f32_vector(bias);
  // [groups, 2] doubles: Σx, then Σ(x − mean)²; then per-channel scale and shift in f32.
  Tensor acc = scratch(int64_t(groups) * 2 * 8), coeff = scratch(C * 2 * 4);
  ZI_CUDA(cudaMemsetAsync(acc.raw(), 0, size_t(groups) * 16, stream()));
  double* a = static_cast<double*>(acc.raw());
  float* scale = static_cast<float*>(coeff.raw());
  float* shift = scale + C;
  const int64_t vn = 16 / int64_t(dtype_size(x.dtype()));
  const bool vec = HW % vn == 0 && reinterpret_cast<uintptr_t>(x.raw()) % 16 == 0;
  // Enough blocks to fill the GPU twice over, each thread summing a few thousand elements.
  const int chunks = int(std::clamp<int64_t>(cdiv(npg, 256 * 8 * 4), 1, 8 * sm_count() / groups + 1));
  const dim3 g{unsigned(chunks), unsigned(groups)};
  for (const double* mean : {static_cast<const double*>(nullptr), static_cast<const double*>(a)}) {
    if (vec) {
      ZI_DISPATCH_ACT(x.dtype(), group_sum_vec<T><<<g, 256, 0, stream()>>>(x.data<T>(), npg, mean, a));
    } else {
      ZI_DISPATCH_ACT(x.dtype(), group_sum<T><<<g, 256, 0, stream()>>>(x.data<T>(), npg, mean, a));
    }
    ZI_CUDA_LAUNCHED();
  }
  group_coeffs<<<unsigned(cdiv(C, 256)), 256, 0, stream()>>>(a, w.data<float>(), b.data<float>(), C, cpg,
                                                                double(npg), eps, scale, shift);
  ZI_CUDA_LAUNCHED();
  if (vec) {
    const dim3 ga{unsigned(std::clamp<int64_t>(cdiv(HW / vn, 256 * 4), 1, 65535)), unsigned(C)};
    if (silu) ZI_DISPATCH_ACT(x.dtype(), group_apply_vec<T, true><<<ga, 256, 0, stream()>>>(x.data<T>(), scale, shift, HW));
    else ZI_DISPATCH_ACT(x.dtype(), group_apply_vec<T, false><<<ga, 256, 0, stream()>>>(x.data<T>(), scale, shift, HW));
  } else {
    const unsigned ga = grid_for(C * HW, 256, int64_t(sm_count()) * 16);
    if (silu) ZI_DISPATCH_ACT(x.dtype(), group_apply<T, true><<<ga, 256, 0, stream()>>>(x.data<T>(), scale, shift, C, HW));
    else ZI_DISPATCH_ACT(x.dtype(), group_apply<T, false><<<ga, 256, 0, stream()>>>(x.data<T>(), scale, shift, C, HW));
  }
  ZI_CUDA_LAUNCHED();
}

void group_region_sums(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                       const std::vector<double>& mean, std::vector<double>& out) {
  const int64_t C = x.dim(0), H = x.dim(1), W = x.dim(2), cpg = C / groups, rows = y1 - y0, cols = x1 - x0;
  out.assign(size_t(groups), 0.0);
  if (rows <= 0 || cols <= 0) return;
  Tensor dev = scratch(int64_t(groups) * 2 * 8);  // [groups] sums, then [groups] means
  double* sums = static_cast<double*>(dev.raw());
  double* means = sums + groups;
  ZI_CUDA(cudaMemsetAsync(sums, 0, size_t(groups) * 8, stream()));
  if (!mean.empty())
    ZI_CUDA(cudaMemcpyAsync(means, mean.data(), size_t(groups) * 8, cudaMemcpyHostToDevice, stream()));
  const int64_t n = cpg * rows * cols;
  const dim3 g{unsigned(std::clamp<int64_t>(cdiv(n, 256 * 16), 1, 4 * sm_count() / groups + 1)), unsigned(groups)};
  ZI_DISPATCH_ACT(x.dtype(), group_region_sum<T><<<g, 256, 0, stream()>>>(x.data<T>(), cpg, H, W, y0, rows, x0, cols,
                                                                          mean.empty() ? nullptr : means, sums));
  ZI_CUDA_LAUNCHED();
  ZI_CUDA(cudaMemcpyAsync(out.data(), sums, size_t(groups) * 8, cudaMemcpyDeviceToHost, stream()));
  ZI_CUDA(cudaStreamSynchronize(stream()));
}

void group_norm_given_(Tensor& x, int groups, const std::vector<float>& mean, const std::vector<float>& rstd,
                       const Tensor& weight, const Tensor& bias) {
  const int64_t C = x.dim(0), HW = x.dim(1) * x.dim(2), cpg = C / groups;
  if (!x.numel()) return;
  Tensor w = f32_vector(weight), b = f32_vector(bias);
  std::vector<float> host(mean);
  host.insert(host.end(), rstd.begin(), rstd.end());
  Tensor stats = scratch(int64_t(host.size()) * 4);
  ZI_CUDA(cudaMemcpyAsync(stats.raw(), host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream()));
  const dim3 g{unsigned(std::clamp<int64_t>(cdiv(HW, 256 * 4), 1, 65535)), unsigned(C)};
  ZI_DISPATCH_ACT(x.dtype(), group_norm_given<T><<<g, 256, 0, stream()>>>(x.data<T>(), static_cast<float*>(stats.raw()),
                                                                          w.data<float>(), b.data<float>(), HW, cpg,
                                                                          groups));
  ZI_CUDA_LAUNCHED();
  ZI_CUDA(cudaStreamSynchronize(stream()));  // `host` is pageable and dies here
}

}  // namespace zi::cuda
