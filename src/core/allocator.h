// Memory accounting. Every buffer is tagged; a MemoryStats per device keeps a
// Stat {current, peak, allocated, freed} per tag and in total, plus named phase scopes
// so a caller can read the peak of a phase and what is still held when it ends.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace zi {

enum class Device : uint8_t { CPU, CUDA };
const char* device_name(Device d);

// What a buffer holds. Weights are tagged per component so the memory plan can prove
// that a component is gone before the next one loads.
enum class Tag : uint8_t {
  TextWeights,
  DitWeights,
  VaeWeights,
  VaeEncoderWeights,  // the VAE encoder (img2img, inpainting, ControlNet conditions)
  ControlNetWeights,
  Activations,
  Workspace,
  PinnedCache,  // pinned host blocks kept for reuse after their weights were freed (device.cpp)
  Count_
};
constexpr int kTagCount = int(Tag::Count_);
const char* tag_name(Tag t);
bool is_weights(Tag t);

struct Stat {
  int64_t current = 0;    // bytes held now
  int64_t peak = 0;       // most bytes held at once since the last reset
  int64_t allocated = 0;  // bytes allocated in total
  int64_t freed = 0;      // bytes freed in total
  void add(int64_t n) {
    current += n;
    allocated += n;
    if (current > peak) peak = current;
  }
  void sub(int64_t n) {
    current -= n;
    freed += n;
  }
};

// The figures of one finished (or running) phase.
struct PhaseRecord {
  std::string name;
  Device device = Device::CPU;
  int64_t start_bytes = 0;    // held when the phase began
  int64_t weights_bytes = 0;  // most weight bytes held during the phase
  int64_t peak_bytes = 0;     // most bytes held during the phase (weights + activations + temps)
  int64_t end_bytes = 0;      // held when the phase ended
  double seconds = 0;
};

class MemoryStats {
 public:
  explicit MemoryStats(Device d) : device_(d) {}
  void on_alloc(size_t bytes, Tag tag);
  void on_free(size_t bytes, Tag tag);

  Stat total() const;
  Stat tag(Tag t) const;
  int64_t weights_current() const;
  void reset_peaks();

  // Phases nest; figures of the innermost and every enclosing phase are updated.
  void begin_phase(const std::string& name);
  PhaseRecord end_phase();
  std::vector<PhaseRecord> finished_phases() const;
  void clear_phases();
  Device device() const { return device_; }

 private:
  struct Open {
    PhaseRecord rec;
    double t0;
  };
  Device device_;
  mutable std::mutex mu_;
  Stat total_;
  std::array<Stat, kTagCount> tags_{};
  std::vector<Open> open_;
  std::vector<PhaseRecord> done_;
};

// The accounting of each device (process-wide).
MemoryStats& memory_stats(Device d = Device::CPU);

// RAII phase scope: MemoryStats::begin_phase / end_phase.
class PhaseScope {
 public:
  PhaseScope(const std::string& name, Device d = Device::CPU);
  ~PhaseScope();
  PhaseRecord end();  // ends early and returns the record
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  Device d_;
  bool open_ = true;
};

// Host allocation with accounting. 64-byte aligned. Never returns null (throws zi::Error).
void* host_alloc(size_t bytes, Tag tag);
void host_free(void* p, size_t bytes, Tag tag);

// Inside a HostReuseScope, a host buffer of a page (4 KiB) or more freed on this thread is kept
// (still accounted under its tag) and the next host_alloc of the same rounded size on this thread
// takes it, its pages already faulted in; the scope's end frees what is left. For loops that
// allocate, fill and free buffers of the same sizes again and again: the blocks a --vram plan
// streams are loaded on the host, copied into their pinned block and freed, block after block
// (a fresh 345 MB host tensor costs more in page faults than its copies). Scopes nest (the
// outermost one keeps and frees).
class HostReuseScope {
 public:
  HostReuseScope();
  ~HostReuseScope();
  HostReuseScope(const HostReuseScope&) = delete;
  HostReuseScope& operator=(const HostReuseScope&) = delete;

 private:
  bool owner_ = false;
};
int64_t host_buffers_reused();  // host_alloc calls served by a HostReuseScope (tests)

// Bytes the host allocator may keep cached after frees (the CPU side of --cache-limit).
// The CPU allocator returns large blocks to the OS at once, so this only bounds malloc's
// own trim threshold.
void set_host_cache_limit(size_t bytes);

// Resident set size of this process, now and at its peak (from /proc/self/status).
int64_t current_rss_bytes();
int64_t peak_rss_bytes();

}  // namespace zi
