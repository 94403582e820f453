// The device runtime (backends/device.h): the CPU inline, the GPU through the CUDA backend's
// runtime (or the no-CUDA stubs, which say why there is no GPU).
#include "backends/device.h"

#include <cstring>
#include <fstream>

#include "backends/cuda/cuda_ops.h"
#include "core/tensor.h"

namespace zi::device {

bool gpu_available() { return cuda::available(); }
std::string gpu_unavailable_reason() { return cuda::available() ? std::string() : cuda::unavailable_reason(); }
std::string description(Device d) { return d == Device::CUDA ? cuda::device_description() : std::string("CPU"); }

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
UploadStats upload_stats() { return cuda::upload_stats(); }

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

std::string profile_report(Device d) { return d == Device::CUDA ? cuda::profile_report() : std::string(); }

}  // namespace zi::device
