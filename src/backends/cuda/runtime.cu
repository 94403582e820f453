// The CUDA runtime side: one device, one compute stream, and a stream-ordered memory pool
// (cudaMallocAsync) whose release threshold is --cache-limit. Every allocation is counted in
// memory_stats(Device::CUDA) under its tag, exactly like host_alloc does for the CPU, so the
// pipeline's phase scopes measure GPU memory the same way. Also: host↔device copies, dtype
// conversion and strided (permuted) copies on the device.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>
#include <cstring>
#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "core/env.h"

namespace zi {

namespace cuda {
namespace {

struct Runtime {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaMemPool_t pool = nullptr;
  cudaDeviceProp prop{};
};

Runtime* g_rt = nullptr;
std::once_flag g_once;
size_t g_cache_limit = SIZE_MAX;
// A graph is being recorded on the compute stream by this thread (the capture is thread-local:
// another thread's work, a model prefetching on its side stream, is not part of it).
thread_local bool g_recording = false;
// This thread's stream when a device::SideStream is active on it (null: the compute stream).
thread_local cudaStream_t t_side = nullptr;

std::atomic<double> g_init_seconds{0};
std::mutex g_times_mu;
double g_alloc_seconds = 0;
int64_t g_allocs = 0;

void init_runtime() {
  const auto t0 = std::chrono::steady_clock::now();
  auto* rt = new Runtime;
  int n = 0;
  ZI_CUDA(cudaGetDeviceCount(&n));
  ZI_CHECK(n > 0, "[cuda] no CUDA device found");
  ZI_CUDA(cudaSetDevice(rt->device));
  ZI_CUDA(cudaGetDeviceProperties(&rt->prop, rt->device));
  ZI_CUDA(cudaStreamCreateWithFlags(&rt->stream, cudaStreamNonBlocking));
  ZI_CUDA(cudaDeviceGetDefaultMemPool(&rt->pool, rt->device));
  uint64_t thr = g_cache_limit == SIZE_MAX ? UINT64_MAX : uint64_t(g_cache_limit);
  ZI_CUDA(cudaMemPoolSetAttribute(rt->pool, cudaMemPoolAttrReleaseThreshold, &thr));
  ZI_CUDA(cudaFree(nullptr));  // the context exists now (cudaSetDevice alone may defer it)
  g_rt = rt;
  g_init_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

[[noreturn]] void cuda_fail(cudaError_t e, const char* what, const char* file, int line) {
  const char* f = std::strrchr(file, '/');
  fail(str_cat("[cuda] ", cudaGetErrorString(e), " in ", what, " (", f ? f + 1 : file, ":", line, ")"));
}

void ensure_init() { std::call_once(g_once, init_runtime); }

cudaStream_t stream() {
  ensure_init();
  return t_side ? t_side : g_rt->stream;
}

void* side_stream_begin() {
  ensure_init();
  ZI_CHECK(!t_side, "[cuda] a side stream is already active on this thread");
  cudaStream_t s = nullptr;
  ZI_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  t_side = s;
  return s;
}

void side_stream_end(void* s) {
  if (!s) return;
  const cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(s));
  t_side = nullptr;
  (void)cudaStreamDestroy(static_cast<cudaStream_t>(s));
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail(str_cat("[cuda] ", cudaGetErrorString(e), " in the work of a side stream"));
  }
}

void warm_up() {
  try {
    if (!available()) return;
    ensure_init();
    blas_warm_up();
    dnn_warm_up();
  } catch (...) {  // the first real use reports it
  }
}

int sm_count() {
  ensure_init();
  return g_rt->prop.multiProcessorCount;
}

namespace {
std::string g_unavailable;  // why available() is false
std::atomic<double> g_probe_seconds{0};  // available()'s first call: the driver asked, cuBLAS and cuBLASLt opened
}  // namespace

bool available() {
  static int ok = -1;
  if (ok < 0) {
    const auto t0 = std::chrono::steady_clock::now();
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    ok = e == cudaSuccess && n > 0 ? 1 : 0;
    if (!ok) {
      (void)cudaGetLastError();
      g_unavailable = e != cudaSuccess ? str_cat("no usable CUDA driver or device (", cudaGetErrorString(e), ")")
                                       : std::string("no CUDA device found");
    } else if (const std::string why = blas_unavailable_reason(); !why.empty()) {
      ok = 0;
      g_unavailable = why;
    }
    g_probe_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return ok == 1;
}

std::string unavailable_reason() {
  (void)available();
  return g_unavailable;
}

int64_t memory_free_bytes() {
  ensure_init();
  size_t free = 0, total = 0;
  ZI_CUDA(cudaMemGetInfo(&free, &total));
  return int64_t(free) + pool_stats().reserved_now - memory_stats(Device::CUDA).total().current;
}

int64_t memory_total_bytes() {
  ensure_init();
  size_t free = 0, total = 0;
  ZI_CUDA(cudaMemGetInfo(&free, &total));
  return int64_t(total);
}

std::string device_description() {
  ensure_init();
  const cudaDeviceProp& p = g_rt->prop;
  return str_cat(p.name, ", ", p.multiProcessorCount, " SMs, ", double(p.totalGlobalMem) / double(1 << 30),
                 " GiB, sm_", p.major, p.minor);
}

void synchronize() { ZI_CUDA(cudaStreamSynchronize(stream())); }

device::RuntimeTimes runtime_times() {
  std::lock_guard<std::mutex> lk(g_times_mu);
  return {g_init_seconds.load(), g_alloc_seconds, g_allocs, g_probe_seconds.load()};
}

void set_cache_limit(size_t bytes) {
  g_cache_limit = bytes;
  if (!g_rt) return;
  uint64_t thr = uint64_t(bytes);
  ZI_CUDA(cudaMemPoolSetAttribute(g_rt->pool, cudaMemPoolAttrReleaseThreshold, &thr));
}

void trim_cache() {
  if (!g_rt) return;
  ZI_CUDA(cudaStreamSynchronize(g_rt->stream));
  ZI_CUDA(cudaMemPoolTrimTo(g_rt->pool, 0));
}

PoolStats pool_stats() {
  PoolStats s;
  if (!g_rt) return s;
  uint64_t v = 0;
  ZI_CUDA(cudaMemPoolGetAttribute(g_rt->pool, cudaMemPoolAttrUsedMemHigh, &v));
  s.used_high = int64_t(v);
  ZI_CUDA(cudaMemPoolGetAttribute(g_rt->pool, cudaMemPoolAttrReservedMemHigh, &v));
  s.reserved_high = int64_t(v);
  ZI_CUDA(cudaMemPoolGetAttribute(g_rt->pool, cudaMemPoolAttrReservedMemCurrent, &v));
  s.reserved_now = int64_t(v);
  return s;
}

void reset_pool_peaks() {
  if (!g_rt) return;
  uint64_t zero = 0;
  ZI_CUDA(cudaMemPoolSetAttribute(g_rt->pool, cudaMemPoolAttrUsedMemHigh, &zero));
  ZI_CUDA(cudaMemPoolSetAttribute(g_rt->pool, cudaMemPoolAttrReservedMemHigh, &zero));
}

Tensor scratch(int64_t bytes) { return Tensor::empty({bytes < 1 ? 1 : bytes}, DType::U8, Tag::Workspace, Device::CUDA); }

bool env_switch(std::atomic<int>& v, const char* name, bool dflt) {
  int x = v.load();
  if (x < 0) {
    x = env_flag(name, dflt) ? 1 : 0;
    v.store(x);
  }
  return x == 1;
}

Tensor f32_vector(const Tensor& v) {
  ZI_CHECK(v.device() == Device::CUDA, "[cuda] operand ", v.desc(), " is not on the GPU");
  Tensor c = v.contiguous(Tag::Workspace);
  return c.dtype() == DType::F32 ? c : c.to(DType::F32, Tag::Workspace);
}

// ---- per-op profile ---------------------------------------------------------------------------

namespace {
struct ProfEntry {
  const char* name;
  cudaEvent_t a, b;
};
struct Profile {
  bool on = false;
  std::vector<ProfEntry> entries;
  std::mutex mu;
};
Profile& profile() {
  static Profile* p = [] {
    auto* q = new Profile;
    const char* e = std::getenv("ZI_CUDA_PROFILE");
    q->on = e && *e && *e != '0';
    return q;
  }();
  return *p;
}
}  // namespace

OpTimer::OpTimer(const char* name) {
  Profile& p = profile();
  if (!p.on) return;
  ProfEntry e{name, nullptr, nullptr};
  ZI_CUDA(cudaEventCreate(&e.a));
  ZI_CUDA(cudaEventCreate(&e.b));
  ZI_CUDA(cudaEventRecord(e.a, stream()));
  std::lock_guard<std::mutex> lk(p.mu);
  slot_ = int(p.entries.size());
  p.entries.push_back(e);
}

OpTimer::~OpTimer() {
  if (slot_ < 0) return;
  Profile& p = profile();
  std::lock_guard<std::mutex> lk(p.mu);
  (void)cudaEventRecord(p.entries[size_t(slot_)].b, stream());
}

std::string profile_report() {
  Profile& p = profile();
  if (!p.on) return "";
  synchronize();
  std::lock_guard<std::mutex> lk(p.mu);
  std::map<std::string, std::pair<double, int>> sum;
  double total = 0;
  for (const ProfEntry& e : p.entries) {
    float ms = 0;
    ZI_CUDA(cudaEventElapsedTime(&ms, e.a, e.b));
    auto& v = sum[e.name];
    v.first += ms;
    v.second += 1;
    total += ms;
    cudaEventDestroy(e.a);
    cudaEventDestroy(e.b);
  }
  p.entries.clear();
  std::vector<std::pair<std::string, std::pair<double, int>>> rows(sum.begin(), sum.end());
  std::sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) { return x.second.first > y.second.first; });
  std::string out = str_cat("cuda op profile (GPU ms inside ops; total ", total, " ms)\n");
  for (const auto& [name, v] : rows)
    out += str_cat("  PROF ", name, " ", v.first, " ms ", v.second, " calls\n");
  return out;
}

// ---- recorded graphs ------------------------------------------------------------------------

namespace {
std::mutex g_graph_mu;
int64_t g_graph_accounted = 0;  // graph memory counted in memory_stats(CUDA) so far

// memory_stats(CUDA) follows the driver's reservation for graph allocations (all graphs of the
// process share it), under Tag::Activations. Never throws (called from destructors).
void sync_graph_accounting() {
  uint64_t v = 0;
  if (cudaDeviceGetGraphMemAttribute(g_rt->device, cudaGraphMemAttrReservedMemCurrent, &v) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  std::lock_guard<std::mutex> lk(g_graph_mu);
  const int64_t d = int64_t(v) - g_graph_accounted;
  if (d > 0) memory_stats(Device::CUDA).on_alloc(size_t(d), Tag::Activations);
  if (d < 0) memory_stats(Device::CUDA).on_free(size_t(-d), Tag::Activations);
  g_graph_accounted = int64_t(v);
}
}  // namespace

bool can_record() { return available() && !profile().on; }
bool profiling() { return profile().on; }

void* graph_record(const std::function<void()>& work, std::string* why) {
  ensure_init();
  cudaStream_t s = g_rt->stream;
  ZI_CUDA(cudaStreamSynchronize(s));  // nothing of the eager work is left in flight
  ZI_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  g_recording = true;
  std::string err;
  try {
    work();
  } catch (const std::exception& e) {
    err = e.what();
  }
  g_recording = false;
  cudaGraph_t g = nullptr;
  const cudaError_t ec = cudaStreamEndCapture(s, &g);
  if (err.empty() && ec != cudaSuccess) err = str_cat("the recording was invalidated (", cudaGetErrorString(ec), ")");
  (void)cudaGetLastError();
  cudaGraphExec_t x = nullptr;
  if (err.empty()) {
    const cudaError_t ei = cudaGraphInstantiate(&x, g, 0);
    if (ei != cudaSuccess) err = str_cat("cudaGraphInstantiate: ", cudaGetErrorString(ei));
  }
  if (g) (void)cudaGraphDestroy(g);
  if (err.empty()) {
    const cudaError_t eu = cudaGraphUpload(x, s);  // the driver reserves the graph's memory now
    if (eu != cudaSuccess) err = str_cat("cudaGraphUpload: ", cudaGetErrorString(eu));
  }
  if (!err.empty()) {
    (void)cudaGetLastError();
    if (x) (void)cudaGraphExecDestroy(x);
    if (why) *why = err;
    return nullptr;
  }
  ZI_CUDA(cudaStreamSynchronize(s));
  sync_graph_accounting();
  return x;
}

void graph_launch(void* exec) {
  ZI_CUDA(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), stream()));
  sync_graph_accounting();  // (a launch may grow the reservation)
}

void graph_destroy(void* exec) {
  if (!exec || !g_rt) return;
  if (cudaStreamSynchronize(g_rt->stream) != cudaSuccess) (void)cudaGetLastError();
  if (cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec)) != cudaSuccess) (void)cudaGetLastError();
  if (cudaDeviceGraphMemTrim(g_rt->device) != cudaSuccess) (void)cudaGetLastError();
  sync_graph_accounting();
}

// ---- kernels ----------------------------------------------------------------------------------

namespace {

template <class S, class D>
__global__ void convert_kernel(const S* __restrict__ s, D* __restrict__ d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    st<D>(d, i, ld<S>(s, i));
}

template <class S>
void convert_from(const S* s, void* d, DType dt, int64_t n) {
  const unsigned g = grid_for(n, 256, 65536);
  switch (dt) {
    case DType::F32: convert_kernel<S, float><<<g, 256, 0, stream()>>>(s, static_cast<float*>(d), n); break;
    case DType::BF16: convert_kernel<S, bf16><<<g, 256, 0, stream()>>>(s, static_cast<bf16*>(d), n); break;
    case DType::F16: convert_kernel<S, __half><<<g, 256, 0, stream()>>>(s, static_cast<__half*>(d), n); break;
    default: fail(str_cat("[cuda convert] unsupported target dtype ", dtype_name(dt)));
  }
  ZI_CUDA_LAUNCHED();
}

constexpr int kMaxDims = 8;
struct StridedDesc {
  int nd;
  int64_t shape[kMaxDims];
  int64_t stride[kMaxDims];  // elements
};

// dst[i] (contiguous) = src at the multi-index of i.
template <class E>
__global__ void strided_copy_kernel(const E* __restrict__ src, E* __restrict__ dst, StridedDesc d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t r = i, off = 0;
    for (int k = d.nd - 1; k >= 0; --k) {
      const int64_t q = r / d.shape[k];
      off += (r - q * d.shape[k]) * d.stride[k];
      r = q;
    }
    dst[i] = src[off];
  }
}

}  // namespace

void convert_device(const void* src, DType st_, void* dst, DType dt, int64_t n) {
  if (n <= 0) return;
  switch (st_) {
    case DType::F32: convert_from(static_cast<const float*>(src), dst, dt, n); break;
    case DType::BF16: convert_from(static_cast<const bf16*>(src), dst, dt, n); break;
    case DType::F16: convert_from(static_cast<const __half*>(src), dst, dt, n); break;
    default: fail(str_cat("[cuda convert] unsupported source dtype ", dtype_name(st_)));
  }
}

}  // namespace cuda

// ---- the hooks core/tensor.cpp calls ----------------------------------------------------------

void* cuda_device_alloc(size_t bytes, Tag tag) {
  cuda::ensure_init();
  void* p = nullptr;
  const size_t n = bytes ? bytes : 1;
  // While a graph records, the allocation becomes one of its nodes (the graph's own memory,
  // from the device's current pool, which is g_rt->pool), and nothing may synchronise.
  const auto t0 = std::chrono::steady_clock::now();
  // On this thread's stream (a side stream's allocation is ordered after its own work; the pool
  // orders reuse across streams by the frees' events).
  const bool rec = cuda::g_recording;
  const cudaStream_t s = cuda::stream();
  cudaError_t e = rec ? cudaMallocAsync(&p, n, s) : cudaMallocAsync(&p, n, cuda::g_rt->pool, s);
  if (e == cudaErrorMemoryAllocation && !rec) {
    (void)cudaGetLastError();
    cuda::trim_cache();  // cached blocks of other sizes may be what is missing
    e = cudaMallocAsync(&p, n, cuda::g_rt->pool, s);
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    fail(str_cat("out of GPU memory allocating ", bytes, " bytes for ", tag_name(tag), " (", free_b >> 20,
                 " MiB free of ", total_b >> 20, " MiB; accounted in use ",
                 memory_stats(Device::CUDA).total().current >> 20, " MiB)"));
  }
  memory_stats(Device::CUDA).on_alloc(bytes, tag);
  {
    std::lock_guard<std::mutex> lk(cuda::g_times_mu);
    cuda::g_alloc_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++cuda::g_allocs;
  }
  return p;
}

void cuda_device_free(void* p, size_t bytes, Tag tag) {
  if (!p || !cuda::g_rt) return;
  // Stream-ordered: the block returns to the pool once the work queued so far is done.
  if (cudaFreeAsync(p, cuda::stream()) != cudaSuccess) (void)cudaGetLastError();  // never throw here
  memory_stats(Device::CUDA).on_free(bytes, tag);
}

void cuda_memcpy(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  if (!bytes) return;
  cudaStream_t s = cuda::stream();
  if (dd == Device::CUDA && sd == Device::CUDA) {
    ZI_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
  } else if (dd == Device::CUDA) {
    ZI_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
    ZI_CUDA(cudaStreamSynchronize(s));  // the host buffer may be freed as soon as we return
  } else if (sd == Device::CUDA) {
    ZI_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    ZI_CUDA(cudaStreamSynchronize(s));
  } else {
    std::memcpy(dst, src, bytes);
  }
}

void cuda_memset0(void* p, size_t bytes) {
  if (bytes) ZI_CUDA(cudaMemsetAsync(p, 0, bytes, cuda::stream()));
}

void cuda_convert(const void* src, DType st, void* dst, DType dt, size_t n) {
  cuda::convert_device(src, st, dst, dt, int64_t(n));
}

void cuda_copy_strided(const Tensor& src, const Tensor& dst) {
  using namespace cuda;
  ZI_CHECK(src.ndim() <= kMaxDims, "[cuda copy] too many dimensions in ", src.desc());
  StridedDesc d{};
  d.nd = src.ndim();
  for (int i = 0; i < d.nd; ++i) {
    d.shape[i] = src.shape()[size_t(i)];
    d.stride[i] = src.strides()[size_t(i)];
  }
  const int64_t n = src.numel();
  if (n == 0) return;
  // Rows of contiguous data at a pitch (a column slice of a matrix, e.g. v out of the DiT's fused
  // [S, 3·D] q/k/v projection): one 2-D copy instead of per-element index math.
  if (d.nd >= 2) {
    int64_t inner = 1;
    bool rows = true;
    for (int i = d.nd - 1; i >= 1; --i) {
      rows = rows && (d.shape[i] == 1 || d.stride[i] == inner);
      inner *= d.shape[i];
    }
    if (rows && inner > 0 && d.stride[0] >= inner) {
      const size_t es = dtype_size(src.dtype()), width = size_t(inner) * es;
      ZI_CUDA(cudaMemcpy2DAsync(dst.raw(), width, src.raw(), size_t(d.stride[0]) * es, width, size_t(d.shape[0]),
                                cudaMemcpyDeviceToDevice, stream()));
      return;
    }
  }
  const unsigned g = grid_for(n, 256, 65536);
  switch (dtype_size(src.dtype())) {
    case 1: strided_copy_kernel<uint8_t><<<g, 256, 0, stream()>>>(static_cast<const uint8_t*>(src.raw()), static_cast<uint8_t*>(dst.raw()), d, n); break;
    case 2: strided_copy_kernel<uint16_t><<<g, 256, 0, stream()>>>(static_cast<const uint16_t*>(src.raw()), static_cast<uint16_t*>(dst.raw()), d, n); break;
    case 4: strided_copy_kernel<uint32_t><<<g, 256, 0, stream()>>>(static_cast<const uint32_t*>(src.raw()), static_cast<uint32_t*>(dst.raw()), d, n); break;
    default: fail(str_cat("[cuda copy] unsupported element size in ", src.desc()));
  }
  ZI_CUDA_LAUNCHED();
}

}  // namespace zi
