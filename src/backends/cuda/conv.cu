// conv2d on the GPU (zero padding, any stride), x [Cin, H, W] as NCHW with N = 1. Every path
// below (im2col + cuBLASLt, cuDNN NCHW and NHWC, the direct kernel) takes the stride; the VAE
// encoder's downsample (3×3, stride 2 after ops::pad2d) runs on whichever Auto picks for its shape.
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
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "core/tuning_cache.h"

#if __has_include(<cudnn.h>)
#include <cudnn.h>
#define ZI_HAVE_CUDNN_HEADERS 1
#endif

namespace zi::cuda {
namespace {

// A tuning key's stride part: named only when it is not 1, so that the entries measured before
// strides existed stay valid.
std::string stride_key(int stride) { return stride != 1 ? str_cat(" s", stride) : std::string(); }

ConvPath g_path = ConvPath::Auto;

int64_t cudnn_version();  // 0 without cuDNN

// Measured choices persist across processes (core/tuning_cache.h), per GPU model and cuDNN version.
TuningCache& tuning() {
  static TuningCache* t = [] {
    const std::string dev = device_description();
    return new TuningCache(
        TuningCache::default_path(str_cat("cuda-", dev.substr(0, dev.find(',')), "-cudnn", cudnn_version())));
  }();
  return *t;
}
constexpr int64_t kColBudget = int64_t(256) << 20;  // bytes of one im2col chunk

// col[k, r·Wo + ox] (k = (ci·kh + ky)·kw + kx; output row oy0 + r) = x at the tap
// [ci, (oy0 + r)·stride + ky − pad, ox·stride + kx − pad], 0 outside.
// One block per (output row, k): the tap is fixed per block, threads walk the row (coalesced
// writes; reads coalesced at stride 1, every stride-th element otherwise; 32-bit index math).
template <class T>
__global__ void im2col_rows(const T* __restrict__ x, T* __restrict__ col, int H, int W, int kh, int kw, int pad,
                            int stride, int Wo, int oy0, int nrows) {
  const int k = blockIdx.y, r = blockIdx.x;
  const int kx = k % kw, ky = (k / kw) % kh, ci = k / (kw * kh);
  const int iy = (oy0 + r) * stride + ky - pad;
  T* dst = col + int64_t(k) * nrows * Wo + int64_t(r) * Wo;
  const bool row_ok = iy >= 0 && iy < H;
  const T* src = x + (int64_t(ci) * H + (row_ok ? iy : 0)) * W;
  for (int ox = threadIdx.x; ox < Wo; ox += blockDim.x) {
    const int ix = ox * stride + kx - pad;
    dst[ox] = (row_ok && ix >= 0 && ix < W) ? src[ix] : T(0.0f);
  }
}

// out[Cout, Ho·Wo] in chunks of pixels: col (K × P) then one GEMM per chunk,
// outᵀ[p0:p0+P, :] (column-major, ld Ho·Wo) = colᵀ (P × K, ld P) · Wᵀ (K × Cout, ld K).
void conv_im2col(const Tensor& x, const Tensor& w, int pad, int stride, Tensor& out) {
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
                                                                      int(H), int(W), kh, kw, pad, stride, int(Wo),
                                                                      int(oy0), int(nr)));
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

// out[b][c][r] = in[b][r][c] (+ bias[c] when given), through 32×32 tiles of shared memory so
// reads and writes are both coalesced. Layout changes of the NHWC cuDNN path. The tiles' rows
// are a grid-stride loop over blockIdx.y: R is H·W (4 Mi at 2048², 131072 tiles), beyond
// gridDim.y's 65535.
template <class T>
__global__ void transpose_tiles(const T* __restrict__ in, T* __restrict__ out, int64_t R, int64_t C,
                                const float* __restrict__ bias) {
  __shared__ float tile[32][33];
  const int64_t b = blockIdx.z;
  const T* src = in + b * R * C;
  T* dst = out + b * R * C;
  const int64_t c0 = int64_t(blockIdx.x) * 32;
  for (int64_t r0 = int64_t(blockIdx.y) * 32; r0 < R; r0 += int64_t(gridDim.y) * 32) {
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
      const int64_t r = r0 + i, c = c0 + threadIdx.x;
      if (r < R && c < C) tile[i][threadIdx.x] = ld<T>(src, r * C + c);
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
      const int64_t c = c0 + i, r = r0 + threadIdx.x;
      if (r < R && c < C) st<T>(dst, c * R + r, tile[threadIdx.x][i] + (bias ? bias[c] : 0.0f));
    }
    __syncthreads();  // the tile is refilled by the next row of tiles
  }
}

template <class T>
void transpose(const T* in, T* out, int64_t batch, int64_t R, int64_t C, const float* bias = nullptr) {
  ZI_CHECK(cdiv(C, 32) <= int64_t(INT32_MAX) && batch <= 65535, "[cuda transpose] ", batch, " x ", R, " x ", C,
           " is beyond the launch limits");
  const dim3 grid(unsigned(cdiv(C, 32)), unsigned(std::min<int64_t>(cdiv(R, 32), 65535)), unsigned(batch));
  transpose_tiles<T><<<grid, dim3(32, 8), 0, stream()>>>(in, out, R, C, bias);
  ZI_CUDA_LAUNCHED();
}

// out[co, oy, ox] = Σ w[co, ci, ky, kx] · x[ci, oy·stride + ky − pad, ox·stride + kx − pad].
template <class T>
__global__ void conv_direct(const T* x, const float* w, T* out, int64_t Cin, int64_t H, int64_t W, int64_t Cout,
                            int kh, int kw, int pad, int stride, int64_t Ho, int64_t Wo) {
  const int64_t n = Cout * Ho * Wo;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ox = i % Wo, oy = (i / Wo) % Ho, co = i / (Wo * Ho);
    float s = 0;
    for (int64_t ci = 0; ci < Cin; ++ci)
      for (int ky = 0; ky < kh; ++ky) {
        const int64_t iy = oy * stride + ky - pad;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < kw; ++kx) {
          const int64_t ix = ox * stride + kx - pad;
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
  ZI_CUDNN_FN(cudnnGetVersion)
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
    ZI_CUDNN_LOAD(cudnnGetVersion)
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

int64_t cudnn_version() { return cudnn().ok ? int64_t(cudnn().cudnnGetVersion()) : 0; }


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

using ConvKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, bool>;

// nhwc: x, w and y in channels-last layouts (NHWC, KRSC), where cuDNN's implicit-GEMM tensor-core
// kernels run; NCHW otherwise. The stride goes into the convolution descriptor (both directions).
const ConvPlan& conv_plan(int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t kh, int64_t kw, int pad,
                          int stride, DType dt, bool nhwc) {
  static std::map<ConvKey, ConvPlan> plans;
  static std::mutex mu;
  std::lock_guard<std::mutex> lk(mu);
  const ConvKey key{Cin, H, W, Cout, kh, kw, pad, stride, int(dt), nhwc};
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  Cudnn& d = cudnn();
  const cudnnDataType_t t = dt == DType::BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
  ConvPlan p{};
  dnn_check(d.cudnnCreateTensorDescriptor(&p.x), "x descriptor");
  dnn_check(d.cudnnCreateTensorDescriptor(&p.y), "y descriptor");
  dnn_check(d.cudnnCreateFilterDescriptor(&p.w), "w descriptor");
  dnn_check(d.cudnnCreateConvolutionDescriptor(&p.conv), "conv descriptor");
  const int64_t Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;  // ops::conv2d's
  const cudnnTensorFormat_t f = nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
  dnn_check(d.cudnnSetTensor4dDescriptor(p.x, f, t, 1, int(Cin), int(H), int(W)), "x shape");
  dnn_check(d.cudnnSetTensor4dDescriptor(p.y, f, t, 1, int(Cout), int(Ho), int(Wo)), "y shape");
  dnn_check(d.cudnnSetFilter4dDescriptor(p.w, t, f, int(Cout), int(Cin), int(kh), int(kw)), "w shape");
  dnn_check(d.cudnnSetConvolution2dDescriptor(p.conv, pad, pad, stride, stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                              CUDNN_DATA_FLOAT),
            "conv params");
  dnn_check(d.cudnnSetConvolutionMathType(p.conv, dt == DType::BF16 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH),
            "math type");
  const std::string tkey = str_cat("cudnn-algo ", Cin, "x", H, "x", W, "->", Cout, " k", kh, "x", kw, " p", pad,
                                   stride_key(stride), " ", dtype_name(dt),
                                   nhwc ? " nhwc" : " nchw");
  if (const auto v = tuning().get(tkey)) {  // measured by an earlier process
    const auto algo = cudnnConvolutionFwdAlgo_t(std::atoi(v->c_str()));
    size_t ws = 0;
    if (d.cudnnGetConvolutionForwardWorkspaceSize(d.handle, p.x, p.w, p.conv, p.y, algo, &ws) == CUDNN_STATUS_SUCCESS &&
        ws <= kMaxWorkspace) {
      p.algo = algo;
      p.workspace = ws;
      return plans.emplace(key, p).first->second;
    }
  }
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
  tuning().put(tkey, std::to_string(int(p.algo)));
  return plans.emplace(key, p).first->second;
}

// NCHW, or (nhwc) with x and w changed to channels-last first and y changed back with the bias
// added on the way (bias_done tells the caller).
bool conv_cudnn(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride, bool nhwc, Tensor& out,
                bool& bias_done) {
  if (!cudnn().ok) return false;
  Cudnn& d = cudnn();
  const int64_t Cin = x.dim(0), H = x.dim(1), W = x.dim(2), Cout = w.dim(0), kh = w.dim(2), kw = w.dim(3);
  const int64_t HWo = out.dim(1) * out.dim(2);
  const ConvPlan& p = conv_plan(Cin, H, W, Cout, kh, kw, pad, stride, x.dtype(), nhwc);
  Tensor wt = w.dtype() == x.dtype() ? w.contiguous(Tag::Workspace) : w.to(x.dtype(), Tag::Workspace);
  Tensor ws = p.workspace ? scratch(int64_t(p.workspace)) : Tensor();
  const float one = 1.0f, zero = 0.0f;
  if (!nhwc) {
    dnn_check(d.cudnnConvolutionForward(d.handle, &one, p.x, x.raw(), p.w, wt.raw(), p.conv, p.algo,
                                        p.workspace ? ws.raw() : nullptr, p.workspace, &zero, p.y, out.raw()),
              "forward");
    return true;
  }
  const int64_t es = int64_t(dtype_size(x.dtype()));
  Tensor xt = scratch(Cin * H * W * es), wk = scratch(wt.numel() * es), yt = scratch(Cout * HWo * es);
  Tensor b = bias ? f32_vector(*bias) : Tensor();
  ZI_DISPATCH_ACT(x.dtype(), {
    transpose<T>(x.data<T>(), static_cast<T*>(xt.raw()), 1, Cin, H * W);
    transpose<T>(wt.data<T>(), static_cast<T*>(wk.raw()), Cout, Cin, kh * kw);
  });
  dnn_check(d.cudnnConvolutionForward(d.handle, &one, p.x, xt.raw(), p.w, wk.raw(), p.conv, p.algo,
                                      p.workspace ? ws.raw() : nullptr, p.workspace, &zero, p.y, yt.raw()),
            "forward");
  ZI_DISPATCH_ACT(x.dtype(), transpose<T>(static_cast<const T*>(yt.raw()), out.data<T>(), 1, HWo, Cout,
                                          bias ? b.data<float>() : nullptr));
  bias_done = bias != nullptr;
  return true;
}
#else
bool conv_cudnn(const Tensor&, const Tensor&, const Tensor*, int, int, bool, Tensor&, bool&) { return false; }
int64_t cudnn_version() { return 0; }
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

namespace {

bool run_path(ConvPath path, const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride, Tensor& out,
              bool& bias_done) {
  bias_done = false;
  switch (path) {
    case ConvPath::Im2col:
      conv_im2col(x, w, pad, stride, out);
      return true;
    case ConvPath::Cudnn:
      return conv_cudnn(x, w, bias, pad, stride, false, out, bias_done);
    case ConvPath::CudnnNhwc:
      return conv_cudnn(x, w, bias, pad, stride, true, out, bias_done);
    default:
      return false;
  }
}

// Auto: for k×k kernels in bf16 each shape is timed once on its first call over the candidate
// paths (im2col + cuBLASLt, cuDNN NCHW, cuDNN NHWC) and the fastest is kept; the last run
// is the fastest's, so `out` holds its result. 1×1 kernels and f32 go to cuDNN NCHW.
using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int, int>;
std::map<ShapeKey, ConvPath> g_picked;

// The tuning cache's key.
std::string path_key(const Tensor& x, const Tensor& w, int pad, int stride) {
  return str_cat("conv-path ", x.dim(0), "x", x.dim(1), "x", x.dim(2), "->", w.dim(0), " k", w.dim(2), "x", w.dim(3),
                 " p", pad, stride_key(stride), " ", dtype_name(x.dtype()));
}
const char* path_name(ConvPath p) { return p == ConvPath::Im2col ? "im2col" : p == ConvPath::CudnnNhwc ? "nhwc" : "nchw"; }

ConvPath pick_and_run(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride, Tensor& out,
                      bool& bias_done) {
  const ShapeKey key{x.dim(0), x.dim(1), x.dim(2), w.dim(0), w.dim(2), pad, stride};
  const ConvPath cands[] = {ConvPath::Im2col, ConvPath::Cudnn, ConvPath::CudnnNhwc};
  float ms[3] = {0, 0, 0};
  cudaEvent_t e0, e1;
  ZI_CUDA(cudaEventCreate(&e0));
  ZI_CUDA(cudaEventCreate(&e1));
  int best = 0;
  // cuDNN's NCHW kernels ran at 30 TFLOP/s from 2^19 output pixels on (H200; 400+ below): not tried.
  const bool big = out.dim(1) * out.dim(2) >= (int64_t(1) << 19);
  for (int i = 0; i < 3; ++i) {
    if ((big && cands[i] == ConvPath::Cudnn) ||
        !run_path(cands[i], x, w, bias, pad, stride, out, bias_done)) {  // also the warm-up (plans, Find)
      ms[i] = -1;
      continue;
    }
    ZI_CUDA(cudaEventRecord(e0, stream()));
    run_path(cands[i], x, w, bias, pad, stride, out, bias_done);
    ZI_CUDA(cudaEventRecord(e1, stream()));
    ZI_CUDA(cudaEventSynchronize(e1));
    ZI_CUDA(cudaEventElapsedTime(&ms[i], e0, e1));
    if (ms[best] < 0 || ms[i] < ms[best]) best = i;
  }
  ZI_CUDA(cudaEventDestroy(e0));
  ZI_CUDA(cudaEventDestroy(e1));
  if (std::getenv("ZI_CUDA_PROFILE"))
    std::fprintf(stderr,
                 "[cuda] profile: conv %lldx%lldx%lld -> %lld k%lld s%d: im2col %.3f cudnn %.3f nhwc %.3f ms\n",
                 (long long)x.dim(0), (long long)x.dim(1), (long long)x.dim(2), (long long)w.dim(0),
                 (long long)w.dim(2), stride, ms[0], ms[1], ms[2]);
  g_picked[key] = cands[best];
  tuning().put(path_key(x, w, pad, stride), path_name(cands[best]));
  if (best != 2) run_path(cands[best], x, w, bias, pad, stride, out, bias_done);
  return cands[best];
}

}  // namespace

void conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride, Tensor& out) {
  const int64_t Cin = x.dim(0), H = x.dim(1), W = x.dim(2), Cout = w.dim(0), Ho = out.dim(1), Wo = out.dim(2);
  if (!out.numel()) return;
  ConvPath path = g_path;
  bool done = false, bias_done = false;
  if (path == ConvPath::Auto) {
    if (w.dim(2) * w.dim(3) == 1 || x.dtype() != DType::BF16) {
      path = ConvPath::Cudnn;
    } else {
      const ShapeKey key{x.dim(0), x.dim(1), x.dim(2), w.dim(0), w.dim(2), pad, stride};
      auto it = g_picked.find(key);
      if (it == g_picked.end()) {  // measured by an earlier process?
        if (const auto v = tuning().get(path_key(x, w, pad, stride)))
          for (ConvPath p : {ConvPath::Im2col, ConvPath::Cudnn, ConvPath::CudnnNhwc})
            if (*v == path_name(p) && (p == ConvPath::Im2col || cudnn_available())) it = g_picked.emplace(key, p).first;
      }
      if (it != g_picked.end()) {
        path = it->second;
      } else {
        pick_and_run(x, w, bias, pad, stride, out, bias_done);
        done = true;
      }
    }
  }
  if (!done) done = run_path(path, x, w, bias, pad, stride, out, bias_done);
  if (!done) {
    Tensor wf = f32_vector(w);
    ZI_DISPATCH_ACT(x.dtype(), conv_direct<T><<<grid_for(out.numel(), 256, 65536), 256, 0, stream()>>>(
                                   x.data<T>(), wf.data<float>(), out.data<T>(), Cin, H, W, Cout, int(w.dim(2)),
                                   int(w.dim(3)), pad, stride, Ho, Wo));
    ZI_CUDA_LAUNCHED();
  }
  if (bias && !bias_done) {
    Tensor b = f32_vector(*bias);
    ZI_DISPATCH_ACT(x.dtype(), add_channel_bias<T><<<grid_for(out.numel(), 256, 65536), 256, 0, stream()>>>(
                                   out.data<T>(), b.data<float>(), Cout, Ho * Wo));
    ZI_CUDA_LAUNCHED();
  }
}

void dnn_warm_up() { (void)cudnn(); }

}  // namespace zi::cuda
