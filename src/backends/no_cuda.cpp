// Linked when ZIMAGE_CUDA=OFF: every CUDA entry point reports that CUDA is not built in.
// No tensor can live on the GPU in such a build (its allocation fails first), so the op
// stubs are unreachable from ops.cpp; they exist so that it links.
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
OpTimer::OpTimer(const char*) {}
OpTimer::~OpTimer() {}
std::string profile_report() { return ""; }
std::string device_description() { return "none (built without CUDA)"; }
int64_t memory_free_bytes() { return 0; }
void synchronize() {}
void set_cache_limit(size_t) {}
void trim_cache() {}
PoolStats pool_stats() { return {}; }
void reset_pool_peaks() {}
void upload_convert(const void*, DType, int64_t, Tensor&) { no_cuda(); }
UploadStats upload_stats() { return {}; }
void linear(const Tensor&, const Tensor&, const Tensor*, Tensor&) { no_cuda(); }
void linear_quant(const Tensor&, const Tensor&, const Tensor*, Tensor&) { no_cuda(); }
void gemm_nn(int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t, void*, int64_t, DType) { no_cuda(); }
void rms_norm_(Tensor&, const Tensor&, float) { no_cuda(); }
void layer_norm_(Tensor&, float) { no_cuda(); }
void rms_norm(const Tensor&, const Tensor&, float, const Tensor*, Tensor&) { no_cuda(); }
void rms_norm_add_(Tensor&, Tensor&, const Tensor&, float, const Tensor*) { no_cuda(); }
void rms_norm_rope_pairs_(Tensor&, const Tensor&, float, const Tensor&, const Tensor&) { no_cuda(); }
void group_norm_(Tensor&, int, const Tensor&, const Tensor&, float, bool) { no_cuda(); }
void group_region_sums(const Tensor&, int, int64_t, int64_t, int64_t, int64_t, const std::vector<double>&,
                       std::vector<double>&) {
  no_cuda();
}
void group_norm_given_(Tensor&, int, const std::vector<float>&, const std::vector<float>&, const Tensor&,
                       const Tensor&) {
  no_cuda();
}
void paste_(Tensor&, const Tensor&, int64_t, int64_t) { no_cuda(); }
void silu_(Tensor&) { no_cuda(); }
void tanh_(Tensor&) { no_cuda(); }
void silu_mul(const Tensor&, const Tensor&, Tensor&) { no_cuda(); }
void add_(Tensor&, const Tensor&) { no_cuda(); }
void mul_(Tensor&, const Tensor&) { no_cuda(); }
void scale_(Tensor&, float) { no_cuda(); }
void add_scalar_(Tensor&, float) { no_cuda(); }
void mul_rows_(Tensor&, const Tensor&) { no_cuda(); }
void add_gated_(Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void rope_halves_(Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void rope_pairs_(Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void upsample_nearest2x(const Tensor&, Tensor&) { no_cuda(); }
void concat0(const std::vector<Tensor>&, Tensor&) { no_cuda(); }
void embedding(const Tensor&, const std::vector<int32_t>&, Tensor&) { no_cuda(); }
void attention(const Tensor&, const Tensor&, const Tensor&, float, bool, int64_t, Tensor&) { no_cuda(); }
const char* attention_path(const Tensor&, const Tensor&) { return "none"; }
void set_force_blocked_attention(bool) {}
void set_flash_variant(int) {}
void conv2d(const Tensor&, const Tensor&, const Tensor*, int, Tensor&) { no_cuda(); }
bool cudnn_available() { return false; }
void set_conv_path(ConvPath) {}

}  // namespace cuda
}  // namespace zi
