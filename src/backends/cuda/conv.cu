// conv2d on the GPU (stride 1, zero padding), x [Cin, H, W] as NCHW with N = 1.
// Fast path: cuDNN's convolution (tensor cores for bf16 with f32 accumulation; FMA math, no
// TF32, for f32), loaded with dlopen at first use so that a machine without cuDNN still runs
// (on the plain kernel) instead of failing to start. The algorithm of each shape is the
// fastest that cuDNN measures (cudnnFindConvolutionForwardAlgorithm, once per shape: the
// heuristic alone picked a 10× slower one for 128 channels at 1024², seen on an H200) among
// those whose workspace fits kMaxWorkspace.
// Fallback: a direct kernel, one thread per output element, f32 accumulation.
// The bias is added by a small kernel in f32 (the same for both paths).
#include <dlfcn.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"

#if __has_include(<cudnn.h>)
#include <cudnn.h>
#define ZI_HAVE_CUDNN_HEADERS 1
#endif

namespace zi::cuda {
namespace {

ConvPath g_path = ConvPath::Auto;
constexpr int64_t kIm2colMinPixels = int64_t(1) << 19;
constexpr int64_t kColBudget = int64_t(256) << 20;  // bytes of one im2col chunk

// col[k, r·Wo + ox] (k = (ci·kh + ky)·kw + kx; output row oy0 + r) = x at the tap, 0 outside.
// One block per (output row, k): the tap is fixed per block, threads walk the row (coalesced
// reads and writes, 32-bit index math).
template <class T>
__global__ void im2col_rows(const T* __restrict__ x, T* __restrict__ col, int H, int W, int kh, int kw, int pad,
                            int Wo, int oy0, int nrows) {
  const int k = blockIdx.y, r = blockIdx.x;
  const int kx = k % kw, ky = (k / kw) % kh, ci = k / (kw * kh);
  const int iy = oy0 + r + ky - pad;
  T* dst = col + int64_t(k) * nrows * Wo + int64_t(r) * Wo;
  const bool row_ok = iy >= 0 && iy < H;
  const T* src = x + (int64_t(ci) * H + (row_ok ? iy : 0)) * W;
  for (int ox = threadIdx.x; ox < Wo; ox += blockDim.x) {
    const int ix = ox + kx - pad;
    dst[ox] = (row_ok && ix >= 0 && ix < W) ? src[ix] : T(0.0f);
  }
}

// out[Cout, Ho·Wo] in chunks of pixels: col (K × P) then one GEMM per chunk,
// outᵀ[p0:p0+P, :] (column-major, ld Ho·Wo) = colᵀ (P × K, ld P) · Wᵀ (K × Cout, ld K).
void conv_im2col(const Tensor& x, const Tensor& w, int pad, Tensor& out) {
  const int64_t Cin = x.dim(0), H = x.dim(1), W = x.dim(2), Cout = w.dim(0), Ho = out.dim(1), Wo = out.dim(2);
  const int kh = int(w.dim(2)), kw = int(w.dim(3));
  const int64_t K = Cin * kh * kw, HW = Ho * Wo, es = int64_t(dtype_size(x.dtype()));
  Tensor wt = w.dtype() == x.dtype() ? w.contiguous(Tag::Workspace) : w.to(x.dtype(), Tag::Workspace);
  ZI_CHECK(K < 65536 && Ho < 65536, "[conv2d] im2col path: shape too large");
  const int64_t rows = std::clamp<int64_t>(kColBudget / (K * Wo * es), 1, Ho);  // output rows per chunk
  Tensor col = scratch(K * rows * Wo * es);
  for (int64_t oy0 = 0; oy0 < Ho; oy0 += rows) {
    const int64_t nr = std::min(rows, Ho - oy0), np = nr * Wo, p0 = oy0 * Wo;
    const dim3 g{unsigned(nr), unsigned(K)};
    ZI_DISPATCH_ACT(x.dtype(), im2col_rows<T><<<g, 256, 0, stream()>>>(x.data<T>(), static_cast<T*>(col.raw()),
                                                                      int(H), int(W), kh, kw, pad, int(Wo), int(oy0),
                                                                      int(nr)));
    ZI_CUDA_LAUNCHED();
    gemm_nn(np, Cout, K, col.raw(), np, wt.raw(), K, static_cast<char*>(out.raw()) + p0 * es, HW, x.dtype());
  }
}

template <class T>
__global__ void add_channel_bias(T* y, const float* b, int64_t C, int64_t HW) {
  const int64_t n = C * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    st<T>(y, i, ld<T>(y, i) + b[i / HW]);
}

// out[co, oy, ox] = Σ w[co, ci, ky, kx] · x[ci, oy + ky − pad, ox + kx − pad].
template <class T>
__global__ void conv_direct(const T* x, const float* w, T* out, int64_t Cin, int64_t H, int64_t W, int64_t Cout,
                            int kh, int kw, int pad, int64_t Ho, int64_t Wo) {
  const int64_t n = Cout * Ho * Wo;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ox = i % Wo, oy = (i / Wo) % Ho, co = i / (Wo * Ho);
    float s = 0;
    for (int64_t ci = 0; ci < Cin; ++ci)
      for (int ky = 0; ky < kh; ++ky) {
        const int64_t iy = oy + ky - pad;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < kw; ++kx) {
          const int64_t ix = ox + kx - pad;
          if (ix < 0 || ix >= W) continue;
          s += w[((co * Cin + ci) * kh + ky) * kw + kx] * ld<T>(x, (ci * H + iy) * W + ix);
        }
      }
    st<T>(out, i, s);
  }
}

#ifdef ZI_HAVE_CUDNN_HEADERS
constexpr size_t kMaxWorkspace = size_t(512) << 20;

// The handful of cuDNN entry points used, resolved from libcudnn.so.9.
struct Cudnn {
  bool ok = false;
  cudnnHandle_t handle = nullptr;
#define ZI_CUDNN_FN(name) decltype(&::name) name = nullptr;
  ZI_CUDNN_FN(cudnnCreate)
  ZI_CUDNN_FN(cudnnSetStream)
  ZI_CUDNN_FN(cudnnGetErrorString)
  ZI_CUDNN_FN(cudnnCreateTensorDescriptor)
  ZI_CUDNN_FN(cudnnSetTensor4dDescriptor)
  ZI_CUDNN_FN(cudnnCreateFilterDescriptor)
  ZI_CUDNN_FN(cudnnSetFilter4dDescriptor)
  ZI_CUDNN_FN(cudnnCreateConvolutionDescriptor)
  ZI_CUDNN_FN(cudnnSetConvolution2dDescriptor)
  ZI_CUDNN_FN(cudnnSetConvolutionMathType)
  ZI_CUDNN_FN(cudnnFindConvolutionForwardAlgorithm)
  ZI_CUDNN_FN(cudnnGetConvolutionForwardWorkspaceSize)
  ZI_CUDNN_FN(cudnnConvolutionForward)
#undef ZI_CUDNN_FN
};

Cudnn& cudnn() {
  static Cudnn* c = [] {
    auto* d = new Cudnn;
    void* lib = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return d;
    bool all = true;
#define ZI_CUDNN_LOAD(name)                                                      \
  d->name = reinterpret_cast<decltype(d->name)>(dlsym(lib, #name));              \
  all = all && d->name != nullptr;
    ZI_CUDNN_LOAD(cudnnCreate)
    ZI_CUDNN_LOAD(cudnnSetStream)
    ZI_CUDNN_LOAD(cudnnGetErrorString)
    ZI_CUDNN_LOAD(cudnnCreateTensorDescriptor)
    ZI_CUDNN_LOAD(cudnnSetTensor4dDescriptor)
    ZI_CUDNN_LOAD(cudnnCreateFilterDescriptor)
    ZI_CUDNN_LOAD(cudnnSetFilter4dDescriptor)
    ZI_CUDNN_LOAD(cudnnCreateConvolutionDescriptor)
    ZI_CUDNN_LOAD(cudnnSetConvolution2dDescriptor)
    ZI_CUDNN_LOAD(cudnnSetConvolutionMathType)
    ZI_CUDNN_LOAD(cudnnFindConvolutionForwardAlgorithm)
    ZI_CUDNN_LOAD(cudnnGetConvolutionForwardWorkspaceSize)
    ZI_CUDNN_LOAD(cudnnConvolutionForward)
#undef ZI_CUDNN_LOAD
    if (!all) return d;
    ensure_init();
    if (d->cudnnCreate(&d->handle) != CUDNN_STATUS_SUCCESS) return d;
    if (d->cudnnSetStream(d->handle, stream()) != CUDNN_STATUS_SUCCESS) return d;
    d->ok = true;
    return d;
  }();
  return *c;
}

void dnn_check(cudnnStatus_t s, const char* what) {
  if (s != CUDNN_STATUS_SUCCESS) fail(str_cat("[cudnn] ", what, ": ", cudnn().cudnnGetErrorString(s)));
}

struct ConvPlan {
  cudnnTensorDescriptor_t x, y;
  cudnnFilterDescriptor_t w;
  cudnnConvolutionDescriptor_t conv;
  cudnnConvolutionFwdAlgo_t algo;
  size_t workspace;
};

using ConvKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int>;

const ConvPlan& conv_plan(int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t kh, int64_t kw, int pad,
                          DType dt) {
  static std::map<ConvKey, ConvPlan> plans;
  static std::mutex mu;
  std::lock_guard<std::mutex> lk(mu);
  const ConvKey key{Cin, H, W, Cout, kh, kw, pad, int(dt)};
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  Cudnn& d = cudnn();
  const cudnnDataType_t t = dt == DType::BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
  ConvPlan p{};
  dnn_check(d.cudnnCreateTensorDescriptor(&p.x), "x descriptor");
  dnn_check(d.cudnnCreateTensorDescriptor(&p.y), "y descriptor");
  dnn_check(d.cudnnCreateFilterDescriptor(&p.w), "w descriptor");
  dnn_check(d.cudnnCreateConvolutionDescriptor(&p.conv), "conv descriptor");
  const int64_t Ho = H + 2 * pad - kh + 1, Wo = W + 2 * pad - kw + 1;
  dnn_check(d.cudnnSetTensor4dDescriptor(p.x, CUDNN_TENSOR_NCHW, t, 1, int(Cin), int(H), int(W)), "x shape");
  dnn_check(d.cudnnSetTensor4dDescriptor(p.y, CUDNN_TENSOR_NCHW, t, 1, int(Cout), int(Ho), int(Wo)), "y shape");
  dnn_check(d.cudnnSetFilter4dDescriptor(p.w, t, CUDNN_TENSOR_NCHW, int(Cout), int(Cin), int(kh), int(kw)), "w shape");
  dnn_check(d.cudnnSetConvolution2dDescriptor(p.conv, pad, pad, 1, 1, 1, 1, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
            "conv params");
  dnn_check(d.cudnnSetConvolutionMathType(p.conv, dt == DType::BF16 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH),
            "math type");
  cudnnConvolutionFwdAlgoPerf_t perf[8];
  int found = 0;
  ZI_CUDA(cudaStreamSynchronize(stream()));  // Find times the algorithms on the device
  dnn_check(d.cudnnFindConvolutionForwardAlgorithm(d.handle, p.x, p.w, p.conv, p.y, 8, &found, perf), "find");
  bool chosen = false;
  for (int i = 0; i < found && !chosen; ++i) {
    if (perf[i].status != CUDNN_STATUS_SUCCESS) continue;
    size_t ws = 0;
    if (d.cudnnGetConvolutionForwardWorkspaceSize(d.handle, p.x, p.w, p.conv, p.y, perf[i].algo, &ws) !=
            CUDNN_STATUS_SUCCESS ||
        ws > kMaxWorkspace)
      continue;
    p.algo = perf[i].algo;
    p.workspace = ws;
    chosen = true;
  }
  ZI_CHECK(chosen, "[cudnn] no convolution algorithm fits the workspace for ", Cin, "x", H, "x", W, " -> ", Cout);
  return plans.emplace(key, p).first->second;
}

bool conv_cudnn(const Tensor& x, const Tensor& w, int pad, Tensor& out) {
  if (!cudnn().ok) return false;
  Cudnn& d = cudnn();
  const ConvPlan& p = conv_plan(x.dim(0), x.dim(1), x.dim(2), w.dim(0), w.dim(2), w.dim(3), pad, x.dtype());
  Tensor wt = w.dtype() == x.dtype() ? w.contiguous(Tag::Workspace) : w.to(x.dtype(), Tag::Workspace);
  Tensor ws = p.workspace ? scratch(int64_t(p.workspace)) : Tensor();
  const float one = 1.0f, zero = 0.0f;
  dnn_check(d.cudnnConvolutionForward(d.handle, &one, p.x, x.raw(), p.w, wt.raw(), p.conv, p.algo,
                                      p.workspace ? ws.raw() : nullptr, p.workspace, &zero, p.y, out.raw()),
            "forward");
  return true;
}
#else
bool conv_cudnn(const Tensor&, const Tensor&, int, Tensor&) { return false; }
#endif

}  // namespace

bool cudnn_available() {
#ifdef ZI_HAVE_CUDNN_HEADERS
  return cudnn().ok;
#else
  return false;
#endif
}

void set_conv_path(ConvPath p) { g_path = p; }

void conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, Tensor& out) {
  const int64_t Cin = x.dim(0), H = x.dim(1), W = x.dim(2), Cout = w.dim(0), Ho = out.dim(1), Wo = out.dim(2);
  if (!out.numel()) return;
  ConvPath path = g_path;
  if (path == ConvPath::Auto)
    path = w.dim(2) * w.dim(3) > 1 && Ho * Wo >= kIm2colMinPixels ? ConvPath::Im2col : ConvPath::Cudnn;
  bool done = false;
  if (path == ConvPath::Im2col) {
    conv_im2col(x, w, pad, out);
    done = true;
  } else if (path == ConvPath::Cudnn) {
    done = conv_cudnn(x, w, pad, out);
  }
  if (!done) {
    Tensor wf = f32_vector(w);
    ZI_DISPATCH_ACT(x.dtype(), conv_direct<T><<<grid_for(out.numel(), 256, 65536), 256, 0, stream()>>>(
                                   x.data<T>(), wf.data<float>(), out.data<T>(), Cin, H, W, Cout, int(w.dim(2)),
                                   int(w.dim(3)), pad, Ho, Wo));
    ZI_CUDA_LAUNCHED();
  }
  if (bias) {
    Tensor b = f32_vector(*bias);
    ZI_DISPATCH_ACT(x.dtype(), add_channel_bias<T><<<grid_for(out.numel(), 256, 65536), 256, 0, stream()>>>(
                                   out.data<T>(), b.data<float>(), Cout, Ho * Wo));
    ZI_CUDA_LAUNCHED();
  }
}

}  // namespace zi::cuda
