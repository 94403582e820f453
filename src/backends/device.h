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
#include <string>

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
struct UploadStats {
  int64_t bytes = 0;   // bytes read from the host
  double seconds = 0;  // wall time spent in upload_convert
};
UploadStats upload_stats();

// ---- synchronisation, memory information, trimming ----
void synchronize(Device d);            // waits for all queued work of the device
int64_t memory_free_bytes(Device d);   // GPU: free memory plus the pool's cache; CPU: MemAvailable
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

// Per-op GPU time when ZI_CUDA_PROFILE=1 (empty otherwise); clears what it reports.
std::string profile_report(Device d);

}  // namespace zi::device
