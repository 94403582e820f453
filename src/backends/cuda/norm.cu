// RMSNorm, LayerNorm (no affine) and GroupNorm (+ optional fused SiLU) on the GPU. Row
// statistics accumulate in f32 per thread and are reduced across the warp/block; GroupNorm's
// statistics over up to millions of elements use f64 partial sums (two passes: mean, then
// squared deviations) like the CPU backend. The normalisation itself runs in f32.
#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"

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

// Per-head RMSNorm then adjacent-pairs RoPE, one warp per head vector x[s, h, :] (D even).
template <class T>
__global__ void rms_norm_rope_pairs_warp(T* x, const float* w, const float* cs, const float* sn, int64_t S,
                                         int64_t H, int64_t D, float eps) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= S * H) return;
  const int l = threadIdx.x & 31;
  const int64_t s = r / H, half = D / 2;
  T* row = x + r * D;
  float q = 0;
  for (int64_t j = l; j < D; j += 32) {
    const float v = ld<T>(row, j);
    q += v * v;
  }
  const float inv = rsqrtf(warp_sum(q) / float(D) + eps);
  for (int64_t m = l; m < half; m += 32) {
    const float a = ld<T>(row, 2 * m) * inv * w[2 * m], b = ld<T>(row, 2 * m + 1) * inv * w[2 * m + 1];
    const float c = cs[s * half + m], si = sn[s * half + m];
    st<T>(row, 2 * m, a * c - b * si);
    st<T>(row, 2 * m + 1, a * si + b * c);
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

template <class T, bool kSilu>
__global__ void group_apply(T* x, const double* stats, const float* w, const float* b, int64_t C, int64_t HW,
                            int64_t cpg, float eps) {
  const int64_t n = C * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i / HW, g = c / cpg;
    const double cnt = double(cpg * HW);
    const float mean = float(stats[2 * g] / cnt);
    const float inv = float(1.0 / sqrt(stats[2 * g + 1] / cnt + double(eps)));
    float v = (ld<T>(x, i) - mean) * (inv * w[c]) + b[c];
    if (kSilu) v = v / (1.0f + __expf(-v));
    st<T>(x, i, v);
  }
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

void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor* scale, Tensor& y) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
  Tensor w = f32_vector(weight), sc = scale ? f32_vector(*scale) : Tensor();
  const float* sp = scale ? sc.data<float>() : nullptr;
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

void rms_norm_add_(Tensor& x, Tensor& y, const Tensor& weight, float eps, const Tensor* gate) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
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

void rms_norm_rope_pairs_(Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin) {
  const int64_t S = x.dim(0), H = x.dim(1), D = x.dim(2);
  if (!S || !H) return;
  Tensor w = f32_vector(weight);
  ZI_DISPATCH_ACT(x.dtype(), rms_norm_rope_pairs_warp<T><<<unsigned(cdiv(S * H, 8)), 256, 0, stream()>>>(
                                 x.data<T>(), w.data<float>(), cos.data<float>(), sin.data<float>(), S, H, D, eps));
  ZI_CUDA_LAUNCHED();
}

void layer_norm_(Tensor& x, float eps) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  if (!R) return;
  ZI_DISPATCH_ACT(x.dtype(), layer_norm_block<T><<<unsigned(R), 256, 0, stream()>>>(x.data<T>(), D, eps));
  ZI_CUDA_LAUNCHED();
}

void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps, bool silu) {
  const int64_t C = x.dim(0), HW = x.numel() / C, cpg = C / groups, npg = cpg * HW;
  Tensor w = f32_vector(weight), b = f32_vector(bias);
  // [groups, 2] doubles: Σx, then Σ(x − mean)².
  Tensor acc = scratch(int64_t(groups) * 2 * 8);
  ZI_CUDA(cudaMemsetAsync(acc.raw(), 0, size_t(groups) * 16, stream()));
  double* a = static_cast<double*>(acc.raw());
  const int chunks = int(std::max<int64_t>(1, std::min<int64_t>(cdiv(npg, 256 * 8), 4 * sm_count() / groups + 1)));
  const dim3 g{unsigned(chunks), unsigned(groups)};
  ZI_DISPATCH_ACT(x.dtype(), group_sum<T><<<g, 256, 0, stream()>>>(x.data<T>(), npg, nullptr, a));
  ZI_CUDA_LAUNCHED();
  ZI_DISPATCH_ACT(x.dtype(), group_sum<T><<<g, 256, 0, stream()>>>(x.data<T>(), npg, a, a));
  ZI_CUDA_LAUNCHED();
  const unsigned ga = grid_for(C * HW, 256, int64_t(sm_count()) * 16);
  if (silu) {
    ZI_DISPATCH_ACT(x.dtype(), group_apply<T, true><<<ga, 256, 0, stream()>>>(x.data<T>(), a, w.data<float>(),
                                                                              b.data<float>(), C, HW, cpg, eps));
  } else {
    ZI_DISPATCH_ACT(x.dtype(), group_apply<T, false><<<ga, 256, 0, stream()>>>(x.data<T>(), a, w.data<float>(),
                                                                               b.data<float>(), C, HW, cpg, eps));
  }
  ZI_CUDA_LAUNCHED();
}

}  // namespace zi::cuda
