// Flash attention for Hopper (sm_90a, wgmma): see attention_sm90a.cu. Only built for sm_90a;
// attention.cu runs it wherever it applies (flash_sm90w_available(), head_dim 128, no causal mask).
#pragma once
#include "core/tensor.h"

namespace zi::cuda {

// The GPU is compute capability 9.0 (H100/H200), so the sm_90a kernel can run.
bool flash_sm90_available();
// q [Sq, Hq, 128], k/v [Skv, Hkv, 128] bf16, non-causal, keys [0, kv) with kv >= 1.
// Variant W: a producer warp (TMA) and two consumer warpgroups taking turns; needs the driver's
// cuTensorMapEncodeTiled (flash_sm90w_available).
bool flash_sm90w_available();
void flash_sm90w(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int kv, Tensor& out);

}  // namespace zi::cuda
