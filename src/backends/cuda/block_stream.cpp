// device::SlotRing's CUDA side: a copy stream of its own and, per slot, an event recorded when
// its fill has landed (the compute stream waits on it) and one recorded on the compute stream
// when its reader has been queued (the next fill waits on it). Pinned host memory and the
// measured pinned host → device rate (the --memory-report's prediction) live here too.
//
// ZI_STREAM_TRACE=1 times every fill on the copy stream and every block on the compute stream
// (timing events; off by default) and prints, when the ring goes, how busy the copy engine was,
// the rate it reached, how long copies waited for a free slot and how long the compute stream
// waited for a block (bench/gpu reads it to tell copy-bound from serialized).
//
// Two experiments for the copy rate (bench/gpu/run_all.sh trace; off by default):
// ZI_STREAM_COPY_STREAMS=2 splits every fill between two copy streams (two DMA engines may
// together move more than one), and ZI_PINNED_HUGE=1 backs the pinned blocks with transparent
// huge pages (mmap + MADV_HUGEPAGE + cudaHostRegister: fewer, larger pages for the IOMMU to map).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "core/env.h"

namespace zi::cuda {
namespace {

struct TraceRow {
  int slot = 0;
  size_t bytes = 0;
  cudaEvent_t copy_begin = nullptr, copy_end = nullptr, use_begin = nullptr, use_end = nullptr;
};

struct Ring {
  cudaStream_t copy = nullptr;
  cudaStream_t copy2 = nullptr;  // ZI_STREAM_COPY_STREAMS=2: the second half of every fill
  std::vector<cudaEvent_t> filled, released, half_done;
  // ZI_STREAM_TRACE: one row per fill, in fill order; per slot, the row its next acquire closes.
  bool trace = false;
  std::vector<TraceRow> rows;
  std::vector<size_t> pending;  // per slot: index into rows of the fill its acquire consumes
  std::vector<size_t> in_use;   // per slot: the row being read
};

cudaEvent_t timing_event() {
  cudaEvent_t e = nullptr;
  ZI_CUDA(cudaEventCreate(&e));
  return e;
}

float ms_between(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  if (!a || !b || cudaEventElapsedTime(&ms, a, b) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return ms;
}

// The summary of a traced ring (all its work has finished).
void print_trace(Ring& r) {
  if (r.rows.empty()) return;
  const cudaEvent_t t0 = r.rows.front().copy_begin;
  double busy = 0, copy_wait = 0, bytes = 0, span = 0;
  int used = 0;
  for (size_t i = 0; i < r.rows.size(); ++i) {
    const TraceRow& w = r.rows[i];
    busy += ms_between(w.copy_begin, w.copy_end);
    bytes += double(w.bytes);
    if (i) copy_wait += std::max(0.0f, ms_between(r.rows[i - 1].copy_end, w.copy_begin));
    if (w.use_begin) {
      ++used;
      span = std::max<double>(span, ms_between(t0, w.use_end ? w.use_end : w.use_begin));
    }
  }
  // Compute stalls: between releasing block k and starting block k+1 on the compute stream.
  double stall = 0, copy_late = 0;
  const TraceRow* prev = nullptr;
  for (const TraceRow& w : r.rows) {
    if (!w.use_begin) continue;
    if (prev && prev->use_end) {
      const float gap = ms_between(prev->use_end, w.use_begin);
      stall += std::max(0.0f, gap);
      // The part of the gap the copy explains: the block landed after the previous one was done.
      copy_late += std::max(0.0f, std::min(gap, ms_between(prev->use_end, w.copy_end)));
    }
    prev = &w;
  }
  std::fprintf(stderr,
               "stream trace: %zu fills (%d used), %.1f MiB, span %.1f ms; copy engine busy %.1f ms (%.1f GB/s "
               "while busy), copies waited for a free slot %.1f ms; compute stream between blocks %.1f ms, of which "
               "waiting for a copy %.1f ms\n",
               r.rows.size(), used, bytes / 1048576.0, span, busy, busy > 0 ? bytes / (busy * 1e-3) / 1e9 : 0.0,
               copy_wait, stall, copy_late);
  if (const char* path = std::getenv("ZI_STREAM_TRACE_CSV")) {
    if (FILE* f = std::fopen(path, "w")) {
      std::fprintf(f, "fill,slot,bytes,copy_begin_ms,copy_end_ms,use_begin_ms,use_end_ms\n");
      for (size_t i = 0; i < r.rows.size(); ++i) {
        const TraceRow& w = r.rows[i];
        std::fprintf(f, "%zu,%d,%zu,%.3f,%.3f,%.3f,%.3f\n", i, w.slot, w.bytes, ms_between(t0, w.copy_begin),
                     ms_between(t0, w.copy_end), w.use_begin ? ms_between(t0, w.use_begin) : -1.0f,
                     w.use_end ? ms_between(t0, w.use_end) : -1.0f);
      }
      std::fclose(f);
    }
  }
  for (TraceRow& w : r.rows)
    for (cudaEvent_t e : {w.copy_begin, w.copy_end, w.use_begin, w.use_end})
      if (e) (void)cudaEventDestroy(e);
  r.rows.clear();
}

// ZI_PINNED_HUGE: the mappings made here (pointer → bytes), unregistered and unmapped on free.
std::mutex g_huge_mu;
std::unordered_map<void*, size_t> g_huge;

}  // namespace

void* pinned_alloc(size_t bytes) {
  ensure_init();
  static const bool huge = env_flag("ZI_PINNED_HUGE", false);
  void* p = nullptr;
  if (huge && bytes >= (size_t(2) << 20)) {
    const size_t n = (bytes + (size_t(2) << 20) - 1) & ~((size_t(2) << 20) - 1);
    void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m != MAP_FAILED) {
      (void)madvise(m, n, MADV_HUGEPAGE);
      if (cudaHostRegister(m, n, cudaHostRegisterDefault) == cudaSuccess) {
        std::lock_guard<std::mutex> lk(g_huge_mu);
        g_huge.emplace(m, n);
        return m;
      }
      (void)cudaGetLastError();
      munmap(m, n);
    }
  }
  ZI_CUDA(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
  return p;
}

void pinned_free(void* p) {
  if (!p) return;
  {
    std::lock_guard<std::mutex> lk(g_huge_mu);
    if (auto it = g_huge.find(p); it != g_huge.end()) {
      if (cudaHostUnregister(p) != cudaSuccess) (void)cudaGetLastError();
      munmap(p, it->second);
      g_huge.erase(it);
      return;
    }
  }
  if (cudaFreeHost(p) != cudaSuccess) (void)cudaGetLastError();  // never throw here
}

void* ring_create(int slots) {
  ensure_init();
  auto* r = new Ring;
  ZI_CUDA(cudaStreamCreateWithFlags(&r->copy, cudaStreamNonBlocking));
  if (const char* e = std::getenv("ZI_STREAM_COPY_STREAMS"); e && std::atoi(e) >= 2) {
    ZI_CUDA(cudaStreamCreateWithFlags(&r->copy2, cudaStreamNonBlocking));
    r->half_done.resize(size_t(slots));
    for (cudaEvent_t& ev : r->half_done) ZI_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  }
  r->filled.resize(size_t(slots));
  r->released.resize(size_t(slots));
  r->trace = env_flag("ZI_STREAM_TRACE", false);
  r->pending.assign(size_t(slots), SIZE_MAX);
  r->in_use.assign(size_t(slots), SIZE_MAX);
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
  if (r->trace) {
    (void)cudaDeviceSynchronize();
    print_trace(*r);
  }
  for (cudaEvent_t e : r->filled) (void)cudaEventDestroy(e);
  for (cudaEvent_t e : r->released) (void)cudaEventDestroy(e);
  for (cudaEvent_t e : r->half_done) (void)cudaEventDestroy(e);
  if (r->copy2) {
    (void)cudaStreamSynchronize(r->copy2);
    (void)cudaStreamDestroy(r->copy2);
  }
  (void)cudaStreamDestroy(r->copy);
  (void)cudaGetLastError();
  delete r;
}

void ring_fill(void* ring, int slot, void* dst, const void* host, size_t bytes) {
  auto* r = static_cast<Ring*>(ring);
  // An event never recorded is complete: the first fill of a slot does not wait.
  ZI_CUDA(cudaStreamWaitEvent(r->copy, r->released[size_t(slot)], 0));
  TraceRow* row = nullptr;
  if (r->trace) {
    r->rows.push_back({slot, bytes, timing_event(), timing_event(), nullptr, nullptr});
    r->pending[size_t(slot)] = r->rows.size() - 1;
    row = &r->rows.back();
    ZI_CUDA(cudaEventRecord(row->copy_begin, r->copy));
  }
  // ZI_STREAM_CHUNK_MB (experiment): the block in pieces of that many MiB, so that a small copy
  // queued on the compute stream meanwhile need not wait behind a whole block on the copy engine.
  static const size_t chunk = [] {
    const char* e = std::getenv("ZI_STREAM_CHUNK_MB");
    return e ? size_t(std::max(0, std::atoi(e))) << 20 : size_t(0);
  }();
  auto copy_range = [&](size_t from, size_t to, cudaStream_t s) {
    for (size_t off = from; off < to;) {
      const size_t n = chunk ? std::min(chunk, to - off) : to - off;
      ZI_CUDA(cudaMemcpyAsync(static_cast<char*>(dst) + off, static_cast<const char*>(host) + off, n,
                              cudaMemcpyHostToDevice, s));
      off += n;
    }
  };
  if (r->copy2) {
    // The second half on the second stream, after the same release.
    ZI_CUDA(cudaStreamWaitEvent(r->copy2, r->released[size_t(slot)], 0));
    const size_t half = (bytes / 2 + 255) & ~size_t(255);
    copy_range(0, std::min(half, bytes), r->copy);
    copy_range(std::min(half, bytes), bytes, r->copy2);
    ZI_CUDA(cudaEventRecord(r->half_done[size_t(slot)], r->copy2));
    ZI_CUDA(cudaStreamWaitEvent(r->copy, r->half_done[size_t(slot)], 0));
  } else {
    copy_range(0, bytes, r->copy);
  }
  if (row) ZI_CUDA(cudaEventRecord(row->copy_end, r->copy));
  ZI_CUDA(cudaEventRecord(r->filled[size_t(slot)], r->copy));
}

void ring_acquire(void* ring, int slot) {
  auto* r = static_cast<Ring*>(ring);
  ZI_CUDA(cudaStreamWaitEvent(stream(), r->filled[size_t(slot)], 0));
  if (r->trace && r->pending[size_t(slot)] != SIZE_MAX) {
    TraceRow& row = r->rows[r->pending[size_t(slot)]];
    row.use_begin = timing_event();
    ZI_CUDA(cudaEventRecord(row.use_begin, stream()));
    r->in_use[size_t(slot)] = r->pending[size_t(slot)];
    r->pending[size_t(slot)] = SIZE_MAX;
  }
}

void ring_release(void* ring, int slot) {
  auto* r = static_cast<Ring*>(ring);
  ZI_CUDA(cudaEventRecord(r->released[size_t(slot)], stream()));
  if (r->trace && r->in_use[size_t(slot)] != SIZE_MAX) {
    TraceRow& row = r->rows[r->in_use[size_t(slot)]];
    row.use_end = timing_event();
    ZI_CUDA(cudaEventRecord(row.use_end, stream()));
    r->in_use[size_t(slot)] = SIZE_MAX;
  }
}

void ring_drain(void* ring) {
  auto* r = static_cast<Ring*>(ring);
  if (r->copy2) ZI_CUDA(cudaStreamSynchronize(r->copy2));
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
