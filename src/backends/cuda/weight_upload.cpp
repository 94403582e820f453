// Streamed weight upload: mapped file → pinned staging ring → device, converted to the final
// dtype on the device. The ring has kSlots pinned buffers of kSlotBytes; while the DMA engine
// moves slot i (and a kernel converts it), the CPU threads copy the next chunk of the mapping
// into slot i + 1. Only kSlots × kSlotBytes of pinned host memory exist at any time, however
// large the model, and a tensor never exists whole in host memory.
#include <chrono>
#include <cstring>
#include <mutex>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "core/parallel.h"

namespace zi::cuda {
namespace {

constexpr int kSlots = 3;
constexpr size_t kSlotBytes = size_t(16) << 20;

struct Ring {
  void* pinned[kSlots] = {};
  void* device[kSlots] = {};  // the chunk in its source dtype, before conversion
  cudaEvent_t done[kSlots] = {};
  int next = 0;
  UploadStats stats;
  std::mutex mu;
};

Ring& ring() {
  static Ring* r = [] {
    auto* g = new Ring;  // lives for the process
    ensure_init();
    for (int i = 0; i < kSlots; ++i) {
      ZI_CUDA(cudaHostAlloc(&g->pinned[i], kSlotBytes, cudaHostAllocDefault));
      // Fixed backend infrastructure (48 MiB, like cuBLASLt's workspace): outside the
      // accounted pool, so a phase's figures are its own.
      ZI_CUDA(cudaMalloc(&g->device[i], kSlotBytes));
      ZI_CUDA(cudaEventCreateWithFlags(&g->done[i], cudaEventDisableTiming));
    }
    return g;
  }();
  return *r;
}

}  // namespace

void upload_convert(const void* src, DType st, int64_t n, Tensor& dst) {
  const char* s = static_cast<const char*>(src);
  upload_convert_read([s](void* d, size_t off, size_t bytes) { parallel_copy(d, s + off, bytes); }, st, n, dst);
}

void upload_convert_read(const device::HostReader& read, DType st, int64_t n, Tensor& dst) {
  const auto t0 = std::chrono::steady_clock::now();
  Ring& r = ring();
  std::lock_guard<std::mutex> lk(r.mu);
  const DType dt = dst.dtype();
  const size_t es = dtype_size(st), ed = dtype_size(dt);
  const int64_t per_chunk = int64_t(kSlotBytes / es);
  char* d = static_cast<char*>(dst.raw());
  for (int64_t off = 0; off < n; off += per_chunk) {
    const int64_t cnt = std::min(per_chunk, n - off);
    const int slot = r.next;
    r.next = (r.next + 1) % kSlots;
    const auto w0 = std::chrono::steady_clock::now();
    ZI_CUDA(cudaEventSynchronize(r.done[slot]));  // the slot's previous chunk has left it
    const auto c0 = std::chrono::steady_clock::now();
    read(r.pinned[slot], size_t(off) * es, size_t(cnt) * es);
    r.stats.wait_seconds += std::chrono::duration<double>(c0 - w0).count();
    r.stats.copy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
    if (st == dt) {
      ZI_CUDA(cudaMemcpyAsync(d + size_t(off) * ed, r.pinned[slot], size_t(cnt) * es, cudaMemcpyHostToDevice,
                              stream()));
    } else {
      ZI_CUDA(cudaMemcpyAsync(r.device[slot], r.pinned[slot], size_t(cnt) * es, cudaMemcpyHostToDevice, stream()));
      convert_device(r.device[slot], st, d + size_t(off) * ed, dt, cnt);
    }
    ZI_CUDA(cudaEventRecord(r.done[slot], stream()));
  }
  r.stats.bytes += n * int64_t(es);
  r.stats.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

UploadStats upload_stats() {
  Ring& r = ring();
  std::lock_guard<std::mutex> lk(r.mu);
  return r.stats;
}

}  // namespace zi::cuda
