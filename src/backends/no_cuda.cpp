// Linked when ZIMAGE_CUDA=OFF: the CUDA side of the device runtime (backends/device.cpp) says
// that CUDA is not built in. No tensor can live on the GPU in such a build (its allocation fails
// first), and ops.cpp's ZI_OP calls only the CPU backend then, so there are no op stubs.
#include "backends/cuda/cuda_ops.h"
#include "core/check.h"
#include "core/tensor.h"

namespace zi {

namespace {
[[noreturn]] void no_cuda() { fail("this zimage was built without CUDA (rebuild with -DZIMAGE_CUDA=ON)"); }
}  // namespace

void* cuda_device_alloc(size_t, Tag) { no_cuda(); }
void cuda_device_free(void*, size_t, Tag) {}
void cuda_memcpy(void*, Device, const void*, Device, size_t) { no_cuda(); }
void cuda_memset0(void*, size_t) { no_cuda(); }
void cuda_copy_strided(const Tensor&, const Tensor&) { no_cuda(); }
void cuda_convert(const void*, DType, void*, DType, size_t) { no_cuda(); }

namespace cuda {

bool available() { return false; }
bool e4m3_copies_enabled() { return false; }  // so ops.cpp never asks for the fused producers below
bool e4m3_only_enabled() { return false; }
bool fp8_reads_copy(int64_t, const Tensor&) { return false; }
bool rms_norm_e4m3(const Tensor&, const Tensor&, float, const Tensor*, Tensor&, Tensor&) { return false; }
bool silu_mul_e4m3(const Tensor&, const Tensor&, Tensor&, Tensor&) { return false; }
bool rms_norm_add_norm_e4m3(Tensor&, Tensor&, const Tensor&, const Tensor*, const Tensor&, const Tensor*, float, Tensor&,
                            Tensor&) {
  return false;
}
bool silu_mul_halves_e4m3(const Tensor&, Tensor&, Tensor&) { return false; }
std::string unavailable_reason() { return "this zimage was built without CUDA (rebuild with -DZIMAGE_CUDA=ON)"; }
std::string profile_report() { return ""; }
std::string device_description() { return "none (built without CUDA)"; }
int64_t memory_free_bytes() { return 0; }
int64_t memory_total_bytes() { return 0; }
void synchronize() {}
void set_cache_limit(size_t) {}
void trim_cache() {}
PoolStats pool_stats() { return {}; }
void reset_pool_peaks() {}
void upload_convert(const void*, DType, int64_t, Tensor&) { no_cuda(); }
void upload_convert_read(const device::HostReader&, DType, int64_t, Tensor&) { no_cuda(); }
UploadStats upload_stats() { return {}; }
device::RuntimeTimes runtime_times() { return {}; }
void* pinned_alloc(size_t) { no_cuda(); }
void pinned_free(void*) {}
void* ring_create(int) { no_cuda(); }
void ring_destroy(void*) {}
void ring_fill(void*, int, void*, const void*, size_t) { no_cuda(); }
void ring_acquire(void*, int) { no_cuda(); }
void ring_release(void*, int) { no_cuda(); }
void ring_drain(void*) {}
double measure_h2d_rate(size_t) { return 0; }
bool can_record() { return false; }
bool profiling() { return false; }
void warm_up() {}
void blas_warm_up() {}
void dnn_warm_up() {}
void* side_stream_begin() { no_cuda(); }
void side_stream_end(void*) {}
void* graph_record(const std::function<void()>&, std::string* why) {
  if (why) *why = "this zimage was built without CUDA";
  return nullptr;
}
void graph_launch(void*) { no_cuda(); }
void graph_destroy(void*) {}
}  // namespace cuda
}  // namespace zi
