// Linked when ZIMAGE_CUDA=OFF: every CUDA entry point reports that CUDA is not built in.
#include "core/check.h"
#include "core/tensor.h"

namespace zi {

void* cuda_device_alloc(size_t, Tag) { fail("this zimage was built without CUDA (rebuild with -DZIMAGE_CUDA=ON)"); }
void cuda_device_free(void*, size_t, Tag) {}

}  // namespace zi
