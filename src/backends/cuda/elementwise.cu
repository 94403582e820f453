// Elementwise ops, row broadcasts, RoPE, upsampling, concatenation and embedding lookup on
// the GPU. All are memory bound: grid-stride loops over contiguous data, math in f32, the
// result rounded once to the activation dtype.
#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "backends/cuda/e4m3_rows.cuh"

namespace zi::cuda {
namespace {

constexpr int kThreads = 256;

#define ZI_GRID_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

unsigned grid(int64_t n) { return grid_for(n, kThreads, int64_t(sm_count()) * 16); }

__device__ __forceinline__ float silu_f(float a) { return a / (1.0f + __expf(-a)); }

template <class T>
__global__ void silu_kernel(T* x, int64_t n) {
  ZI_GRID_LOOP(i, n) st<T>(x, i, silu_f(ld<T>(x, i)));
}
template <class T>
__global__ void tanh_kernel(T* x, int64_t n) {
  ZI_GRID_LOOP(i, n) st<T>(x, i, tanhf(ld<T>(x, i)));
}
template <class T>
__global__ void silu_mul_kernel(const T* a, const T* b, T* o, int64_t n) {
  ZI_GRID_LOOP(i, n) st<T>(o, i, silu_f(ld<T>(a, i)) * ld<T>(b, i));
}
// 16-byte vector forms (n a multiple of the vector width, 16-byte aligned pointers).
template <class T>
__global__ void silu_mul_vec(const T* a, const T* b, T* o, int64_t nv) {
  constexpr int N = Vec<T>::N;
  ZI_GRID_LOOP(v, nv) {
    float fa[N], fb[N];
    load_vec(a + v * N, fa);
    load_vec(b + v * N, fb);
#pragma unroll
    for (int e = 0; e < N; ++e) fa[e] = silu_f(fa[e]) * fb[e];
    store_vec(o + v * N, fa);
  }
}
// SwiGLU on the halves of each row of y [R, 2F]: o[r, i] = SiLU(y[r, i]) · y[r, F + i].
template <class T>
__global__ void silu_mul_halves_kernel(const T* y, T* o, int64_t F, int64_t n) {
  ZI_GRID_LOOP(i, n) {
    const int64_t r = i / F, c = i - r * F;
    const T* row = y + r * 2 * F;
    st<T>(o, i, silu_f(ld<T>(row, c)) * ld<T>(row, F + c));
  }
}
// 16-byte vectors (F a multiple of the vector width, y and o 16-byte aligned); fv = F / N.
template <class T>
__global__ void silu_mul_halves_vec(const T* y, T* o, int64_t fv, int64_t nv) {
  constexpr int N = Vec<T>::N;
  ZI_GRID_LOOP(v, nv) {
    const int64_t r = v / fv, c = (v - r * fv) * N;
    const T* row = y + r * 2 * fv * N;
    float fa[N], fb[N];
    load_vec(row + c, fa);
    load_vec(row + fv * N + c, fb);
#pragma unroll
    for (int e = 0; e < N; ++e) fa[e] = silu_f(fa[e]) * fb[e];
    store_vec(o + v * N, fa);
  }
}
// SwiGLU of one bf16 row per block (a and b rows `stride` elements apart: separate tensors, or
// the halves of one) with the e4m3 copy of the bf16 result (e4m3_rows.cuh): o [R, F], q [R, F],
// qs [R]; o null: the copy alone. The row stays in registers (F ≤ VPT · 8 · kRowThreads) between
// the max and the bytes.
constexpr int kRowThreads = 256;
template <int VPT>
__global__ void __launch_bounds__(kRowThreads) silu_mul_rows_e4m3(const bf16* a, const bf16* b, int64_t stride,
                                                                  bf16* o, uint8_t* q, float* qs, int F) {
  const bf16* ar = a + int64_t(blockIdx.x) * stride;
  const bf16* br = b + int64_t(blockIdx.x) * stride;
  bf16* orow = o ? o + int64_t(blockIdx.x) * F : nullptr;
  float f[VPT][8];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int j = (threadIdx.x + i * kRowThreads) * 8;
    if (j >= F) {
#pragma unroll
      for (int e = 0; e < 8; ++e) f[i][e] = 0.0f;
      continue;
    }
    float fb[8];
    load_vec(ar + j, f[i]);
    load_vec(br + j, fb);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[i][e] = silu_f(f[i][e]) * fb[e];
    if (orow) store_vec(orow + j, f[i]);
  }
  quantize_row_e4m3(f, kRowThreads, F, q + int64_t(blockIdx.x) * F, qs + blockIdx.x);
}

// a and b: rows R of F bf16 values, `stride` apart; false (nothing done) for shapes the row
// kernel does not take.
bool silu_mul_e4m3_rows(const bf16* a, const bf16* b, int64_t stride, int64_t R, int64_t F, Tensor& out, Tensor& q) {
  const int64_t fv = F / 8;
  const auto al = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!R || F % 16 || stride % 8 || !al(a) || !al(b) || !al(out.raw()) || !al(q.raw())) return false;
  bf16* o = out.data<bf16>();
  uint8_t* qp = static_cast<uint8_t*>(q.raw());
  float* qs = q.row_scale()->data<float>();
  if (fv <= 2 * kRowThreads) silu_mul_rows_e4m3<2><<<unsigned(R), kRowThreads, 0, stream()>>>(a, b, stride, o, qp, qs, int(F));
  else if (fv <= 4 * kRowThreads) silu_mul_rows_e4m3<4><<<unsigned(R), kRowThreads, 0, stream()>>>(a, b, stride, o, qp, qs, int(F));
  else if (fv <= 6 * kRowThreads) silu_mul_rows_e4m3<6><<<unsigned(R), kRowThreads, 0, stream()>>>(a, b, stride, o, qp, qs, int(F));
  else if (fv <= 8 * kRowThreads) silu_mul_rows_e4m3<8><<<unsigned(R), kRowThreads, 0, stream()>>>(a, b, stride, o, qp, qs, int(F));
  else return false;
  ZI_CUDA_LAUNCHED();
  return true;
}

template <class T>
__global__ void add_vec(T* x, const T* y, int64_t nv) {
  constexpr int N = Vec<T>::N;
  ZI_GRID_LOOP(v, nv) {
    float fx[N], fy[N];
    load_vec(x + v * N, fx);
    load_vec(y + v * N, fy);
#pragma unroll
    for (int e = 0; e < N; ++e) fx[e] += fy[e];
    store_vec(x + v * N, fx);
  }
}

bool vec_ok(int64_t n, DType dt, std::initializer_list<const void*> ptrs) {
  if (n % (16 / int64_t(dtype_size(dt)))) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
}

template <class T, class U>
__global__ void add_kernel(T* x, const U* y, int64_t n) {
  ZI_GRID_LOOP(i, n) st<T>(x, i, ld<T>(x, i) + ld<U>(y, i));
}
template <class T, class U>
__global__ void mul_kernel(T* x, const U* y, int64_t n) {
  ZI_GRID_LOOP(i, n) st<T>(x, i, ld<T>(x, i) * ld<U>(y, i));
}
template <class T>
__global__ void affine_kernel(T* x, int64_t n, float s, float a) {
  ZI_GRID_LOOP(i, n) st<T>(x, i, ld<T>(x, i) * s + a);
}
// add_scalar_(·, 1) on the even rows and tanh_ on the odd ones, the same arithmetic as those
// kernels (affine_kernel with s = 1, tanhf), so the bits are theirs.
template <class T>
__global__ void scale_gate_rows_kernel(T* x, int64_t n, int64_t D) {
  ZI_GRID_LOOP(i, n) {
    const float v = ld<T>(x, i);
    st<T>(x, i, (i / D) % 2 == 0 ? v * 1.0f + 1.0f : tanhf(v));
  }
}
template <class T>
__global__ void mul_rows_kernel(T* x, const float* v, int64_t n, int64_t D) {
  ZI_GRID_LOOP(i, n) st<T>(x, i, ld<T>(x, i) * v[i % D]);
}
template <class T, class U>
__global__ void add_gated_kernel(T* x, const float* v, const U* y, int64_t n, int64_t D) {
  ZI_GRID_LOOP(i, n) st<T>(x, i, ld<T>(x, i) + v[i % D] * ld<U>(y, i));
}

// One thread per rotated pair. x [S, H, D]; cos/sin [S, D/2].
template <class T, bool kPairs>
__global__ void rope_kernel(T* x, const float* cs, const float* sn, int64_t S, int64_t H, int64_t D) {
  const int64_t half = D / 2, n = S * H * half;
  ZI_GRID_LOOP(i, n) {
    const int64_t m = i % half, sh = i / half, s = sh / H;
    T* row = x + sh * D;
    const float c = cs[s * half + m], si = sn[s * half + m];
    const int64_t i0 = kPairs ? 2 * m : m, i1 = kPairs ? 2 * m + 1 : m + half;
    const float a = ld<T>(row, i0), b = ld<T>(row, i1);
    if (kPairs) {
      st<T>(row, i0, a * c - b * si);
      st<T>(row, i1, a * si + b * c);
    } else {
      st<T>(row, i0, a * c - b * si);
      st<T>(row, i1, b * c + a * si);
    }
  }
}

template <class T>
__global__ void upsample_kernel(const T* x, T* o, int64_t C, int64_t H, int64_t W) {
  const int64_t n = C * 4 * H * W;
  ZI_GRID_LOOP(i, n) {
    const int64_t ox = i % (2 * W), r = i / (2 * W), oy = r % (2 * H), c = r / (2 * H);
    o[i] = x[(c * H + oy / 2) * W + ox / 2];
  }
}

template <class S, class T>
__global__ void embedding_kernel(const S* table, const int32_t* ids, T* out, int64_t n, int64_t D) {
  ZI_GRID_LOOP(i, n * D) {
    const int64_t r = i / D, j = i % D;
    st<T>(out, i, ld<S>(table, int64_t(ids[r]) * D + j));
  }
}

// Runs body with U bound to the element type of an f32/bf16 operand y.
#define ZI_DISPATCH_SECOND(dt, ...)                         \
  do {                                                      \
    if ((dt) == DType::F32) {                               \
      using U = float;                                      \
      __VA_ARGS__;                                          \
    } else {                                                \
      using U = bf16;                                       \
      __VA_ARGS__;                                          \
    }                                                       \
  } while (0)

}  // namespace

void silu_(Tensor& x) {
  const int64_t n = x.numel();
  if (!n) return;
  ZI_DISPATCH_ACT(x.dtype(), silu_kernel<T><<<grid(n), kThreads, 0, stream()>>>(x.data<T>(), n));
  ZI_CUDA_LAUNCHED();
}

void tanh_(Tensor& x) {
  const int64_t n = x.numel();
  if (!n) return;
  ZI_DISPATCH_ACT(x.dtype(), tanh_kernel<T><<<grid(n), kThreads, 0, stream()>>>(x.data<T>(), n));
  ZI_CUDA_LAUNCHED();
}

void silu_mul(const Tensor& a, const Tensor& b, Tensor& out) {
  const int64_t n = a.numel();
  if (!n) return;
  if (vec_ok(n, a.dtype(), {a.raw(), b.raw(), out.raw()})) {
    const int64_t nv = n / (16 / int64_t(dtype_size(a.dtype())));
    ZI_DISPATCH_ACT(a.dtype(), silu_mul_vec<T><<<grid(nv), kThreads, 0, stream()>>>(a.data<T>(), b.data<T>(),
                                                                                    out.data<T>(), nv));
  } else {
    ZI_DISPATCH_ACT(a.dtype(), silu_mul_kernel<T><<<grid(n), kThreads, 0, stream()>>>(a.data<T>(), b.data<T>(),
                                                                                      out.data<T>(), n));
  }
  ZI_CUDA_LAUNCHED();
}

bool silu_mul_e4m3(const Tensor& a, const Tensor& b, Tensor& out, Tensor& q) {
  const int64_t F = a.dim(-1);
  if (a.dtype() != DType::BF16 || !F) return false;
  return silu_mul_e4m3_rows(a.data<bf16>(), b.data<bf16>(), F, a.numel() / F, F, out, q);
}

bool silu_mul_halves_e4m3(const Tensor& y, Tensor& out, Tensor& q) {
  const int64_t F = out.dim(-1);
  if (y.dtype() != DType::BF16 || !F) return false;
  return silu_mul_e4m3_rows(y.data<bf16>(), y.data<bf16>() + F, 2 * F, out.numel() / F, F, out, q);
}

void silu_mul_halves(const Tensor& y, Tensor& out) {
  const int64_t n = out.numel(), F = out.dim(-1);
  if (!n) return;
  if (vec_ok(F, out.dtype(), {y.raw(), out.raw()})) {
    const int64_t vn = 16 / int64_t(dtype_size(out.dtype())), fv = F / vn, nv = n / vn;
    ZI_DISPATCH_ACT(out.dtype(), silu_mul_halves_vec<T><<<grid(nv), kThreads, 0, stream()>>>(y.data<T>(),
                                                                                             out.data<T>(), fv, nv));
  } else {
    ZI_DISPATCH_ACT(out.dtype(), silu_mul_halves_kernel<T><<<grid(n), kThreads, 0, stream()>>>(y.data<T>(),
                                                                                               out.data<T>(), F, n));
  }
  ZI_CUDA_LAUNCHED();
}

void add_(Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  if (!n) return;
  if (x.dtype() == y.dtype() && vec_ok(n, x.dtype(), {x.raw(), y.raw()})) {
    const int64_t nv = n / (16 / int64_t(dtype_size(x.dtype())));
    ZI_DISPATCH_ACT(x.dtype(), add_vec<T><<<grid(nv), kThreads, 0, stream()>>>(x.data<T>(), y.data<T>(), nv));
    ZI_CUDA_LAUNCHED();
    return;
  }
  ZI_DISPATCH_ACT(x.dtype(), ZI_DISPATCH_SECOND(y.dtype(), add_kernel<T, U><<<grid(n), kThreads, 0, stream()>>>(
                                                               x.data<T>(), y.data<U>(), n)));
  ZI_CUDA_LAUNCHED();
}

void mul_(Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  if (!n) return;
  ZI_DISPATCH_ACT(x.dtype(), ZI_DISPATCH_SECOND(y.dtype(), mul_kernel<T, U><<<grid(n), kThreads, 0, stream()>>>(
                                                               x.data<T>(), y.data<U>(), n)));
  ZI_CUDA_LAUNCHED();
}

void scale_(Tensor& x, float s) {
  const int64_t n = x.numel();
  if (!n) return;
  ZI_DISPATCH_ACT(x.dtype(), affine_kernel<T><<<grid(n), kThreads, 0, stream()>>>(x.data<T>(), n, s, 0.0f));
  ZI_CUDA_LAUNCHED();
}

void add_scalar_(Tensor& x, float s) {
  const int64_t n = x.numel();
  if (!n) return;
  ZI_DISPATCH_ACT(x.dtype(), affine_kernel<T><<<grid(n), kThreads, 0, stream()>>>(x.data<T>(), n, 1.0f, s));
  ZI_CUDA_LAUNCHED();
}

void scale_gate_rows_(Tensor& x) {
  const int64_t n = x.numel(), D = x.dim(1);
  if (!n) return;
  ZI_DISPATCH_ACT(x.dtype(), scale_gate_rows_kernel<T><<<grid(n), kThreads, 0, stream()>>>(x.data<T>(), n, D));
  ZI_CUDA_LAUNCHED();
}

void mul_rows_(Tensor& x, const Tensor& v) {
  const int64_t n = x.numel(), D = x.dim(-1);
  if (!n) return;
  Tensor vf = f32_vector(v);
  ZI_DISPATCH_ACT(x.dtype(), mul_rows_kernel<T><<<grid(n), kThreads, 0, stream()>>>(x.data<T>(), vf.data<float>(), n, D));
  ZI_CUDA_LAUNCHED();
}

void add_gated_(Tensor& x, const Tensor& v, const Tensor& y) {
  const int64_t n = x.numel(), D = x.dim(-1);
  if (!n) return;
  Tensor vf = f32_vector(v);
  ZI_DISPATCH_ACT(x.dtype(), ZI_DISPATCH_SECOND(y.dtype(), add_gated_kernel<T, U><<<grid(n), kThreads, 0, stream()>>>(
                                                               x.data<T>(), vf.data<float>(), y.data<U>(), n, D)));
  ZI_CUDA_LAUNCHED();
}

void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t S = x.dim(0), H = x.dim(1), D = x.dim(2);
  if (!S || !H) return;
  ZI_DISPATCH_ACT(x.dtype(), rope_kernel<T, false><<<grid(S * H * D / 2), kThreads, 0, stream()>>>(
                                 x.data<T>(), cos.data<float>(), sin.data<float>(), S, H, D));
  ZI_CUDA_LAUNCHED();
}

void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t S = x.dim(0), H = x.dim(1), D = x.dim(2);
  if (!S || !H) return;
  ZI_DISPATCH_ACT(x.dtype(), rope_kernel<T, true><<<grid(S * H * D / 2), kThreads, 0, stream()>>>(
                                 x.data<T>(), cos.data<float>(), sin.data<float>(), S, H, D));
  ZI_CUDA_LAUNCHED();
}

void upsample_nearest2x(const Tensor& x, Tensor& out) {
  const int64_t C = x.dim(0), H = x.dim(1), W = x.dim(2);
  if (!out.numel()) return;
  ZI_DISPATCH_ACT(x.dtype(), upsample_kernel<T><<<grid(out.numel()), kThreads, 0, stream()>>>(x.data<T>(),
                                                                                            out.data<T>(), C, H, W));
  ZI_CUDA_LAUNCHED();
}

void concat0(const std::vector<Tensor>& parts, Tensor& out) {
  char* o = static_cast<char*>(out.raw());
  for (const Tensor& t : parts) {
    const size_t n = t.nbytes();
    if (n) ZI_CUDA(cudaMemcpyAsync(o, t.raw(), n, cudaMemcpyDeviceToDevice, stream()));
    o += n;
  }
}

void embedding(const Tensor& table, const std::vector<int32_t>& ids, Tensor& out) {
  const int64_t n = int64_t(ids.size()), D = table.dim(1);
  if (!n) return;
  Tensor idt = Tensor::empty({n}, DType::I32, Tag::Workspace, Device::CUDA);
  ZI_CUDA(cudaMemcpyAsync(idt.raw(), ids.data(), size_t(n) * 4, cudaMemcpyHostToDevice, stream()));
  ZI_CUDA(cudaStreamSynchronize(stream()));  // ids is pageable host memory the caller owns
  auto run = [&](auto* tp) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(tp)>>;
    ZI_DISPATCH_ACT(out.dtype(), embedding_kernel<S, T><<<grid(n * D), kThreads, 0, stream()>>>(
                                     tp, idt.data<int32_t>(), out.data<T>(), n, D));
  };
  switch (table.dtype()) {
    case DType::F32: run(table.data<const float>()); break;
    case DType::BF16: run(table.data<const bf16>()); break;
    case DType::F16: run(table.data<const __half>()); break;
    default: fail("[embedding] table must be f32/bf16/f16");
  }
  ZI_CUDA_LAUNCHED();
}

namespace {

template <class T>
__global__ void paste_kernel(T* dst, const T* src, int64_t h, int64_t w, int64_t H, int64_t W, int64_t y0, int64_t x0,
                             int64_t sc, int64_t sy, int64_t sx, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = i % w, y = (i / w) % h, c = i / (w * h);
    dst[(c * H + y0 + y) * W + x0 + x] = src[c * sc + y * sy + x * sx];
  }
}

}  // namespace

void paste_(Tensor& dst, const Tensor& src, int64_t y0, int64_t x0) {
  const int64_t n = src.numel();
  if (!n) return;
  const auto& st = src.strides();
  ZI_DISPATCH_ACT(dst.dtype(), paste_kernel<T><<<grid_for(n, 256), 256, 0, stream()>>>(
                                   dst.data<T>(), src.data<T>(), src.dim(1), src.dim(2), dst.dim(1), dst.dim(2), y0, x0,
                                   st[0], st[1], st[2], n));
  ZI_CUDA_LAUNCHED();
}

}  // namespace zi::cuda
