// The device runtime: the one API through which everything above the backends (core's Tensor,
// io's weight loader, the pipeline, the CLI) touches a device. Memory (allocate, free, copy,
// convert, zero), the streamed weight upload (host mapping → pinned ring → device, converted),
// synchronisation, memory information and trimming, and the GPU's presence. Three
// implementations: the CPU (device.cpp, inline), CUDA (backends/cuda/runtime.cu,
// weight_upload.cpp) and no-CUDA (backends/no_cuda.cpp: the GPU is never available, and says why).
// Nothing outside backends/ includes a backends/cuda header (scripts/check_layers.sh).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/dtype.h"

namespace zi {
class Tensor;
}

namespace zi::device {

// ---- presence ----
bool gpu_available();              // a usable GPU and its libraries are present (never throws)
std::string gpu_unavailable_reason();  // why not, one line ("" when available)
std::string description(Device d);     // "NVIDIA H100 80GB HBM3, 132 SMs, 79.1 GiB, sm_90" / "CPU"
// Starts the GPU's first-use work (the context, the cuBLASLt and cuDNN handles) on a thread of
// its own and returns at once; device calls that need it wait for it. The CLI calls it as soon as
// it knows a phase runs on the GPU, so that work overlaps the checks and the tokenizer's parse.
// Nothing on the CPU or without a GPU; never throws.
void warm_up_async(Device d);

// ---- memory (accounted in memory_stats(d) under `tag`) ----
void* alloc(Device d, size_t bytes, Tag tag);
void free(Device d, void* p, size_t bytes, Tag tag);
// Copies between host and device are complete when they return.
void copy(void* dst, Device dd, const void* src, Device sd, size_t bytes);
void zero(Device d, void* p, size_t bytes);
// dst[0..n) = src[0..n) converted (f32/bf16/f16), both on device d.
void convert(Device d, const void* src, DType st, void* dst, DType dt, size_t n);
// dst = src as a contiguous copy on src's device (same dtype; src may be strided, GPU only).
void copy_strided_gpu(const Tensor& src, const Tensor& dst);
// n elements of type st in host memory (a mapping) into `dst`, a GPU tensor of its own dtype,
// through a ring of pinned staging buffers, converted on the GPU.
void upload_convert(const void* src, DType st, int64_t n, Tensor& dst);
// The same from a reader instead of a mapping: read(dst, offset, bytes) puts bytes
// [offset, offset+bytes) of the source (n elements of st) into the pinned buffer dst.
using HostReader = std::function<void(void* dst, size_t offset, size_t bytes)>;
void upload_convert_read(const HostReader& read, DType st, int64_t n, Tensor& dst);
struct UploadStats {
  int64_t bytes = 0;          // bytes read from the host
  double seconds = 0;         // wall time spent in upload_convert
  double copy_seconds = 0;    //   of which copying the mapping into the pinned ring (page faults included)
  double wait_seconds = 0;    //   of which waiting for a ring slot's previous copy to the device
};
UploadStats upload_stats();
// Where the device runtime's own time goes (the load report): creating the context (once per
// process, the first call that needs the GPU) and allocating device memory (stream-ordered
// allocations that grow the pool map new memory). Zeros on the CPU.
struct RuntimeTimes {
  double init_seconds = 0;
  double alloc_seconds = 0;
  int64_t allocs = 0;
  double probe_seconds = 0;  // the first availability check: the driver asked, cuBLAS/cuBLASLt opened
};
RuntimeTimes runtime_times(Device d);

// ---- block streaming (--vram, io/weight_stream.h) ----
// Host memory the device copies from at full speed: page-locked on CUDA, plain on the CPU;
// accounted in memory_stats(Device::CPU) under `tag`. On CUDA a freed block is kept (accounted
// as Tag::PinnedCache) for the next request of its size; a request of another size first gives
// all kept blocks back, so at most one plan's pinned bytes are held.
void* alloc_pinned(Device d, size_t bytes, Tag tag);
void free_pinned(Device d, void* p, size_t bytes, Tag tag);
int64_t pinned_blocks_reused();  // requests alloc_pinned served from kept blocks (process total)
// Pinned host → device bytes per second, measured once per process with a copy of `bytes`
// (later calls return the first measurement); 0 on the CPU.
double measure_h2d_rate(Device d, size_t bytes = size_t(256) << 20);

// A ring of `slots` device buffers of `slot_bytes` (accounted under `tag`), filled from pinned
// host memory on a copy stream of their own and ordered against the compute stream by events:
// fill(i) first waits until the compute stream has passed the last release(i), acquire(i)
// makes the compute stream wait until fill(i) has landed. So block k+1's copy runs while block
// k computes. On the CPU the slots are host memory and the copies plain memcpy, so the
// streaming logic above it runs (and is tested) without a GPU.
class SlotRing {
 public:
  SlotRing(Device d, int slots, size_t slot_bytes, Tag tag);
  ~SlotRing();
  SlotRing(const SlotRing&) = delete;
  SlotRing& operator=(const SlotRing&) = delete;
  Device device() const { return dev_; }
  int slots() const { return int(slot_.size()); }
  size_t slot_bytes() const { return bytes_; }
  void* slot(int i) const { return slot_[size_t(i)]; }
  // Queues the copy of host[0, bytes) (pinned) to the start of slot i; returns at once on CUDA.
  void fill(int i, const void* host, size_t bytes);
  void acquire(int i);  // the compute stream waits for slot i's last fill
  void release(int i);  // slot i's reader has been queued on the compute stream
  void drain();         // waits for every queued fill
  int64_t bytes_copied() const { return copied_; }

 private:
  Device dev_;
  size_t bytes_;
  Tag tag_;
  std::vector<void*> slot_;
  void* impl_ = nullptr;  // the CUDA side's streams and events
  int64_t copied_ = 0;
};

// ---- synchronisation, memory information, trimming ----
void synchronize(Device d);            // waits for all queued work of the device
int64_t memory_free_bytes(Device d);   // GPU: free memory plus the pool's cache; CPU: MemAvailable
int64_t memory_total_bytes(Device d);  // GPU: the card's memory; CPU: 0 (unknown)
// Bytes the device's allocator may keep cached after frees (--cache-limit).
void set_cache_limit(Device d, size_t bytes);
void trim(Device d);  // returns every cached block to the system / driver
struct PoolStats {
  int64_t used_high = 0;      // most bytes handed out by the pool at once (since reset)
  int64_t reserved_high = 0;  // most bytes the pool held from the driver at once
  int64_t reserved_now = 0;
};
PoolStats pool_stats(Device d);  // zeros on the CPU
void reset_pool_peaks(Device d);

// ---- recorded work (CUDA graphs; issue 19) ----
// The work `work` queues on the GPU's compute stream, recorded without running it and replayed
// by launch() in one submission with the same kernels, pointers and scalars (so the same bits).
// Memory the work allocates becomes the graph's own: the driver reserves it while the graph
// lives (shared by the graphs of this process, launched one after another), and
// memory_stats(CUDA) accounts it under Tag::Activations at the driver's measured reservation.
// Only device work may be recorded: a host synchronisation, a copy to or from pageable host
// memory or an exception inside `work` makes record() return null with the reason in *why,
// and the stream works as before. The work must not free memory it did not allocate.
class Graph {
 public:
  explicit Graph(void* exec) : exec_(exec) {}
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void launch() const;  // queued on the compute stream, after the work queued before it

 private:
  void* exec_;
};
// Whether `d` can record: the GPU, unless ZI_CUDA_PROFILE times each op (its events would be
// recorded once, not per launch).
bool can_record(Device d);
std::unique_ptr<Graph> record(Device d, const std::function<void()>& work, std::string* why);

// Per-op GPU time when ZI_CUDA_PROFILE=1 (empty otherwise); clears what it reports.
std::string profile_report(Device d);
bool profiling(Device d);  // that profile is on (GPU only)

// ---- work beside the compute stream (the next phase's model loading: issue 19) ----
// While a SideStream lives, the device work its thread queues on `d` (allocations, uploads,
// conversions, copies) goes to a stream of that thread's own instead of the compute stream, so
// it runs beside what another thread computes. finish() (or the destructor, which never throws)
// waits for that work; its results may be used on any stream after that. Nothing on the CPU.
class SideStream {
 public:
  explicit SideStream(Device d);
  ~SideStream();
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  void finish();  // waits for the stream's work; throws if it failed

 private:
  void* impl_ = nullptr;
};

}  // namespace zi::device
