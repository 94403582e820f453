// The device runtime (backends/device.h): the CPU inline, the GPU through the CUDA backend's
// runtime (or the no-CUDA stubs, which say why there is no GPU).
#include "backends/device.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <fstream>
#include <mutex>
#include <thread>

#include "backends/cuda/cuda_ops.h"
#include "core/check.h"
#include "core/tensor.h"

namespace zi::device {

bool gpu_available() { return cuda::available(); }
std::string gpu_unavailable_reason() { return cuda::available() ? std::string() : cuda::unavailable_reason(); }
std::string description(Device d) { return d == Device::CUDA ? cuda::device_description() : std::string("CPU"); }

namespace {
// The warm-up's thread, waited for at exit (a thread inside the driver must not outlive main).
struct WarmUp {
  std::thread t;
  ~WarmUp() {
    if (t.joinable()) t.join();
  }
};
}  // namespace

void warm_up_async(Device d) {
  if (d != Device::CUDA || !cuda::available()) return;
  static WarmUp w;
  static std::once_flag once;
  std::call_once(once, [] { w.t = std::thread([] { cuda::warm_up(); }); });
}

void* alloc(Device d, size_t bytes, Tag tag) {
  return d == Device::CPU ? host_alloc(bytes, tag) : cuda_device_alloc(bytes, tag);
}

void free(Device d, void* p, size_t bytes, Tag tag) {
  if (d == Device::CPU) host_free(p, bytes, tag);
  else cuda_device_free(p, bytes, tag);
}

void copy(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  if (dd == Device::CPU && sd == Device::CPU) std::memcpy(dst, src, bytes);
  else cuda_memcpy(dst, dd, src, sd, bytes);
}

void zero(Device d, void* p, size_t bytes) {
  if (d == Device::CPU) std::memset(p, 0, bytes);
  else cuda_memset0(p, bytes);
}

void convert(Device d, const void* src, DType st, void* dst, DType dt, size_t n) {
  if (d == Device::CPU) zi::convert(src, st, dst, dt, n);
  else cuda_convert(src, st, dst, dt, n);
}

void copy_strided_gpu(const Tensor& src, const Tensor& dst) { cuda_copy_strided(src, dst); }
void upload_convert(const void* src, DType st, int64_t n, Tensor& dst) { cuda::upload_convert(src, st, n, dst); }
void upload_convert_read(const HostReader& read, DType st, int64_t n, Tensor& dst) {
  cuda::upload_convert_read(read, st, n, dst);
}
UploadStats upload_stats() { return cuda::upload_stats(); }
RuntimeTimes runtime_times(Device d) { return d == Device::CUDA ? cuda::runtime_times() : RuntimeTimes{}; }

// ---- block streaming ----

namespace {
// Pinned blocks given back are kept for the next alloc_pinned of the same size (the next image of
// --count, a model loaded again under the same plan, the server's next request): pinning and
// unpinning cost about a second per 6 GB each way. While kept they are accounted under
// Tag::PinnedCache. A request of another size first gives every kept block back to the driver,
// so the pinned bytes never exceed what one plan needs (issue 13's host-memory bound); the rest
// go at exit with the process.
struct PinnedCache {
  std::mutex mu;
  std::multimap<size_t, void*> blocks;
  int64_t reused = 0;  // requests served from the kept blocks
};
PinnedCache& pinned_cache() {
  static auto* c = new PinnedCache;  // never destroyed: the driver may be gone at static destruction
  return *c;
}
}  // namespace

void* alloc_pinned(Device d, size_t bytes, Tag tag) {
  if (d == Device::CPU) return host_alloc(bytes, tag);
  PinnedCache& c = pinned_cache();
  {
    std::lock_guard<std::mutex> lk(c.mu);
    if (auto it = c.blocks.find(bytes); it != c.blocks.end()) {
      void* p = it->second;
      c.blocks.erase(it);
      ++c.reused;
      memory_stats(Device::CPU).on_free(bytes, Tag::PinnedCache);
      memory_stats(Device::CPU).on_alloc(bytes, tag);
      return p;
    }
    for (const auto& [n, p] : c.blocks) {
      cuda::pinned_free(p);
      memory_stats(Device::CPU).on_free(n, Tag::PinnedCache);
    }
    c.blocks.clear();
  }
  void* p = cuda::pinned_alloc(bytes);
  memory_stats(Device::CPU).on_alloc(bytes, tag);
  return p;
}

int64_t pinned_blocks_reused() {
  PinnedCache& c = pinned_cache();
  std::lock_guard<std::mutex> lk(c.mu);
  return c.reused;
}

void free_pinned(Device d, void* p, size_t bytes, Tag tag) {
  if (!p) return;
  if (d == Device::CPU) return host_free(p, bytes, tag);
  PinnedCache& c = pinned_cache();
  std::lock_guard<std::mutex> lk(c.mu);
  c.blocks.emplace(bytes, p);
  memory_stats(Device::CPU).on_free(bytes, tag);
  memory_stats(Device::CPU).on_alloc(bytes, Tag::PinnedCache);
}

double measure_h2d_rate(Device d, size_t bytes) {
  if (d == Device::CPU) return 0;
  static const double rate = cuda::measure_h2d_rate(bytes);
  return rate;
}

SlotRing::SlotRing(Device d, int slots, size_t slot_bytes, Tag tag) : dev_(d), bytes_(slot_bytes), tag_(tag) {
  ZI_CHECK(slots >= 1 && slot_bytes > 0, "[SlotRing] needs at least one slot of some bytes");
  for (int i = 0; i < slots; ++i) slot_.push_back(alloc(d, slot_bytes, tag));
  if (d == Device::CUDA) {
    impl_ = cuda::ring_create(slots);
    cuda::synchronize();  // the slots' stream-ordered allocations are usable by the copy stream
  }
}

SlotRing::~SlotRing() {
  if (impl_) {
    cuda::ring_drain(impl_);
    cuda::synchronize();  // no kernel still reads a slot
    cuda::ring_destroy(impl_);
  }
  for (void* p : slot_) free(dev_, p, bytes_, tag_);
}

void SlotRing::fill(int i, const void* host, size_t bytes) {
  ZI_CHECK(i >= 0 && i < slots() && bytes <= bytes_, "[SlotRing] fill of ", bytes, " bytes into slot ", i, " of ",
           slots(), " x ", bytes_);
  if (dev_ == Device::CPU) std::memcpy(slot_[size_t(i)], host, bytes);
  else cuda::ring_fill(impl_, i, slot_[size_t(i)], host, bytes);
  copied_ += int64_t(bytes);
}

void SlotRing::acquire(int i) {
  if (impl_) cuda::ring_acquire(impl_, i);
}

void SlotRing::release(int i) {
  if (impl_) cuda::ring_release(impl_, i);
}

void SlotRing::drain() {
  if (impl_) cuda::ring_drain(impl_);
}

void synchronize(Device d) {
  if (d == Device::CUDA) cuda::synchronize();
}

namespace {
int64_t host_available_bytes() {
  std::ifstream is("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (is >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return int64_t(4) << 30;
}
}  // namespace

int64_t memory_total_bytes(Device d) { return d == Device::CUDA ? cuda::memory_total_bytes() : 0; }

int64_t memory_free_bytes(Device d) { return d == Device::CUDA ? cuda::memory_free_bytes() : host_available_bytes(); }

void set_cache_limit(Device d, size_t bytes) {
  if (d == Device::CUDA) cuda::set_cache_limit(bytes);
  else set_host_cache_limit(bytes);
}

void trim(Device d) {
  if (d == Device::CUDA) cuda::trim_cache();
}

PoolStats pool_stats(Device d) { return d == Device::CUDA ? cuda::pool_stats() : PoolStats{}; }
void reset_pool_peaks(Device d) {
  if (d == Device::CUDA) cuda::reset_pool_peaks();
}

Graph::~Graph() { cuda::graph_destroy(exec_); }
void Graph::launch() const { cuda::graph_launch(exec_); }
bool profiling(Device d) { return d == Device::CUDA && cuda::profiling(); }

SideStream::SideStream(Device d) {
  if (d == Device::CUDA) impl_ = cuda::side_stream_begin();
}
SideStream::~SideStream() {
  try {
    finish();
  } catch (...) {  // an exception is already on its way, or finish() reported it
  }
}
void SideStream::finish() {
  void* s = impl_;
  impl_ = nullptr;
  cuda::side_stream_end(s);
}

bool can_record(Device d) { return d == Device::CUDA && cuda::can_record(); }
std::unique_ptr<Graph> record(Device d, const std::function<void()>& work, std::string* why) {
  if (!can_record(d)) {
    if (why) *why = d == Device::CUDA ? "ZI_CUDA_PROFILE is on" : "only the GPU records graphs";
    return nullptr;
  }
  void* exec = cuda::graph_record(work, why);
  return exec ? std::make_unique<Graph>(exec) : nullptr;
}

std::string profile_report(Device d) { return d == Device::CUDA ? cuda::profile_report() : std::string(); }

}  // namespace zi::device
