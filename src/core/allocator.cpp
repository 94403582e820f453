#include "core/allocator.h"

#include <malloc.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>

#include "core/check.h"

namespace zi {

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

const char* tag_name(Tag t) {
  switch (t) {
    case Tag::TextWeights: return "weights/text_encoder";
    case Tag::DitWeights: return "weights/transformer";
    case Tag::VaeWeights: return "weights/vae";
    case Tag::VaeEncoderWeights: return "weights/vae_encoder";
    case Tag::ControlNetWeights: return "weights/controlnet";
    case Tag::Activations: return "activations";
    case Tag::Workspace: return "workspace";
    case Tag::PinnedCache: return "pinned_cache";
    case Tag::Count_: break;
  }
  return "?";
}

bool is_weights(Tag t) {
  return t == Tag::TextWeights || t == Tag::DitWeights || t == Tag::VaeWeights || t == Tag::VaeEncoderWeights ||
         t == Tag::ControlNetWeights;
}

static double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

void MemoryStats::on_alloc(size_t bytes, Tag tag) {
  std::lock_guard<std::mutex> lk(mu_);
  total_.add(int64_t(bytes));
  tags_[size_t(tag)].add(int64_t(bytes));
  int64_t w = 0;
  for (int i = 0; i < kTagCount; ++i)
    if (is_weights(Tag(i))) w += tags_[i].current;
  for (auto& o : open_) {
    if (total_.current > o.rec.peak_bytes) o.rec.peak_bytes = total_.current;
    if (w > o.rec.weights_bytes) o.rec.weights_bytes = w;
  }
}

void MemoryStats::on_free(size_t bytes, Tag tag) {
  std::lock_guard<std::mutex> lk(mu_);
  total_.sub(int64_t(bytes));
  tags_[size_t(tag)].sub(int64_t(bytes));
}

Stat MemoryStats::total() const {
  std::lock_guard<std::mutex> lk(mu_);
  return total_;
}

Stat MemoryStats::tag(Tag t) const {
  std::lock_guard<std::mutex> lk(mu_);
  return tags_[size_t(t)];
}

int64_t MemoryStats::weights_current() const {
  std::lock_guard<std::mutex> lk(mu_);
  int64_t w = 0;
  for (int i = 0; i < kTagCount; ++i)
    if (is_weights(Tag(i))) w += tags_[i].current;
  return w;
}

void MemoryStats::reset_peaks() {
  std::lock_guard<std::mutex> lk(mu_);
  total_.peak = total_.current;
  for (auto& s : tags_) s.peak = s.current;
}

void MemoryStats::begin_phase(const std::string& name) {
  std::lock_guard<std::mutex> lk(mu_);
  Open o;
  o.rec.name = name;
  o.rec.device = device_;
  o.rec.start_bytes = total_.current;
  o.rec.peak_bytes = total_.current;
  int64_t w = 0;
  for (int i = 0; i < kTagCount; ++i)
    if (is_weights(Tag(i))) w += tags_[i].current;
  o.rec.weights_bytes = w;
  o.t0 = now_seconds();
  open_.push_back(o);
}

PhaseRecord MemoryStats::end_phase() {
  std::lock_guard<std::mutex> lk(mu_);
  ZI_CHECK(!open_.empty(), "[memory] end_phase without begin_phase");
  Open o = open_.back();
  open_.pop_back();
  o.rec.end_bytes = total_.current;
  o.rec.seconds = now_seconds() - o.t0;
  done_.push_back(o.rec);
  return o.rec;
}

std::vector<PhaseRecord> MemoryStats::finished_phases() const {
  std::lock_guard<std::mutex> lk(mu_);
  return done_;
}

void MemoryStats::clear_phases() {
  std::lock_guard<std::mutex> lk(mu_);
  done_.clear();
}

MemoryStats& memory_stats(Device d) {
  static MemoryStats cpu(Device::CPU);
  static MemoryStats cuda(Device::CUDA);
  return d == Device::CPU ? cpu : cuda;
}

PhaseScope::PhaseScope(const std::string& name, Device d) : d_(d) { memory_stats(d).begin_phase(name); }
PhaseScope::~PhaseScope() {
  if (open_) memory_stats(d_).end_phase();
}
PhaseRecord PhaseScope::end() {
  ZI_CHECK(open_, "[memory] phase already ended");
  open_ = false;
  return memory_stats(d_).end_phase();
}

namespace {

// The buffers a HostReuseScope keeps, by rounded size: each still accounted as `bytes` of `tag`.
struct KeptBuffer {
  void* p;
  size_t bytes;
  Tag tag;
};
struct HostReuse {
  std::multimap<size_t, KeptBuffer> kept;
};
thread_local HostReuse* t_reuse = nullptr;
constexpr size_t kReuseMinBytes = 4096;  // a page: smaller ones share pages malloc keeps anyway
std::atomic<int64_t> g_reused{0};

size_t host_round(size_t bytes) {
  const size_t n = (bytes + 63) & ~size_t(63);
  return n == 0 ? 64 : n;
}

}  // namespace

HostReuseScope::HostReuseScope() {
  if (!t_reuse) {
    t_reuse = new HostReuse;
    owner_ = true;
  }
}

HostReuseScope::~HostReuseScope() {
  if (!owner_) return;
  for (const auto& [n, k] : t_reuse->kept) {
    std::free(k.p);
    memory_stats(Device::CPU).on_free(k.bytes, k.tag);
  }
  delete t_reuse;
  t_reuse = nullptr;
}

int64_t host_buffers_reused() { return g_reused.load(); }

void* host_alloc(size_t bytes, Tag tag) {
  const size_t n = host_round(bytes);
  if (t_reuse && n >= kReuseMinBytes) {
    if (auto it = t_reuse->kept.find(n); it != t_reuse->kept.end()) {
      const KeptBuffer k = it->second;
      t_reuse->kept.erase(it);
      memory_stats(Device::CPU).on_free(k.bytes, k.tag);
      memory_stats(Device::CPU).on_alloc(bytes, tag);
      g_reused.fetch_add(1);
      return k.p;
    }
  }
  void* p = std::aligned_alloc(64, n);
  if (!p) fail(str_cat("out of host memory allocating ", bytes, " bytes for ", tag_name(tag)));
  memory_stats(Device::CPU).on_alloc(bytes, tag);
  return p;
}

void host_free(void* p, size_t bytes, Tag tag) {
  if (!p) return;
  if (const size_t n = host_round(bytes); t_reuse && n >= kReuseMinBytes) {
    t_reuse->kept.emplace(n, KeptBuffer{p, bytes, tag});  // still accounted until reused or the scope ends
    return;
  }
  std::free(p);
  memory_stats(Device::CPU).on_free(bytes, tag);
}

void set_host_cache_limit(size_t bytes) {
  // glibc keeps freed memory below the trim threshold; large blocks are mmap'ed and
  // returned at once. Bound both by the limit.
  int v = bytes > size_t(1) << 30 ? 1 << 30 : int(bytes);
  mallopt(M_TRIM_THRESHOLD, v);
  mallopt(M_MMAP_THRESHOLD, v < (1 << 20) ? v : (1 << 20));
  malloc_trim(0);
}

static int64_t read_status_kb(const char* key) {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  int64_t v = 0;
  size_t kl = std::strlen(key);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, kl) == 0) {
      v = std::atoll(line + kl);
      break;
    }
  }
  std::fclose(f);
  return v * 1024;
}

int64_t current_rss_bytes() { return read_status_kb("VmRSS:"); }
int64_t peak_rss_bytes() { return read_status_kb("VmHWM:"); }

}  // namespace zi
