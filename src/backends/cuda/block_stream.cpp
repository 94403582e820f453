// device::SlotRing's CUDA side: a copy stream of its own and, per slot, an event recorded when
// its fill has landed (the compute stream waits on it) and one recorded on the compute stream
// when its reader has been queued (the next fill waits on it). Pinned host memory and the
// measured pinned host → device rate (the --memory-report's prediction) live here too.
#include <chrono>
#include <vector>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"

namespace zi::cuda {
namespace {

struct Ring {
  cudaStream_t copy = nullptr;
  std::vector<cudaEvent_t> filled, released;
};

}  // namespace

void* pinned_alloc(size_t bytes) {
  ensure_init();
  void* p = nullptr;
  ZI_CUDA(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
  return p;
}

void pinned_free(void* p) {
  if (p && cudaFreeHost(p) != cudaSuccess) (void)cudaGetLastError();  // never throw here
}

void* ring_create(int slots) {
  ensure_init();
  auto* r = new Ring;
  ZI_CUDA(cudaStreamCreateWithFlags(&r->copy, cudaStreamNonBlocking));
  r->filled.resize(size_t(slots));
  r->released.resize(size_t(slots));
  for (int i = 0; i < slots; ++i) {
    ZI_CUDA(cudaEventCreateWithFlags(&r->filled[size_t(i)], cudaEventDisableTiming));
    ZI_CUDA(cudaEventCreateWithFlags(&r->released[size_t(i)], cudaEventDisableTiming));
  }
  return r;
}

void ring_destroy(void* ring) {
  auto* r = static_cast<Ring*>(ring);
  if (!r) return;
  (void)cudaStreamSynchronize(r->copy);
  for (cudaEvent_t e : r->filled) (void)cudaEventDestroy(e);
  for (cudaEvent_t e : r->released) (void)cudaEventDestroy(e);
  (void)cudaStreamDestroy(r->copy);
  (void)cudaGetLastError();
  delete r;
}

void ring_fill(void* ring, int slot, void* dst, const void* host, size_t bytes) {
  auto* r = static_cast<Ring*>(ring);
  // An event never recorded is complete: the first fill of a slot does not wait.
  ZI_CUDA(cudaStreamWaitEvent(r->copy, r->released[size_t(slot)], 0));
  ZI_CUDA(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, r->copy));
  ZI_CUDA(cudaEventRecord(r->filled[size_t(slot)], r->copy));
}

void ring_acquire(void* ring, int slot) {
  auto* r = static_cast<Ring*>(ring);
  ZI_CUDA(cudaStreamWaitEvent(stream(), r->filled[size_t(slot)], 0));
}

void ring_release(void* ring, int slot) {
  auto* r = static_cast<Ring*>(ring);
  ZI_CUDA(cudaEventRecord(r->released[size_t(slot)], stream()));
}

void ring_drain(void* ring) {
  auto* r = static_cast<Ring*>(ring);
  ZI_CUDA(cudaStreamSynchronize(r->copy));
}

double measure_h2d_rate(size_t bytes) {
  ensure_init();
  void* host = nullptr;
  void* dev = nullptr;
  ZI_CUDA(cudaHostAlloc(&host, bytes, cudaHostAllocDefault));
  // Outside the accounted pool, freed at once (like the upload ring's fixed buffers).
  if (cudaMalloc(&dev, bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaFreeHost(host);
    return 0;
  }
  cudaStream_t s = nullptr;
  cudaEvent_t a = nullptr, b = nullptr;
  ZI_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  ZI_CUDA(cudaEventCreate(&a));
  ZI_CUDA(cudaEventCreate(&b));
  ZI_CUDA(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, s));  // warm-up
  constexpr int kReps = 3;
  ZI_CUDA(cudaEventRecord(a, s));
  for (int i = 0; i < kReps; ++i) ZI_CUDA(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, s));
  ZI_CUDA(cudaEventRecord(b, s));
  ZI_CUDA(cudaEventSynchronize(b));
  float ms = 0;
  ZI_CUDA(cudaEventElapsedTime(&ms, a, b));
  (void)cudaEventDestroy(a);
  (void)cudaEventDestroy(b);
  (void)cudaStreamDestroy(s);
  (void)cudaFree(dev);
  (void)cudaFreeHost(host);
  return ms > 0 ? double(bytes) * kReps / (double(ms) * 1e-3) : 0;
}

}  // namespace zi::cuda
