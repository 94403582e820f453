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
// W's tiles: 128 queries × 128 keys in 2 stages (the default), 128 × 176 keys (FlashAttention-3's
// choice for head_dim 128), or 128 × 128 in 3 stages. Each is exact against the reference within
// the attention tolerances; they differ in the bits (another key order in the online softmax).
// ZI_FLASH_W=176 or 128x3 in the environment picks one; set_flash_sm90w_variant (tests, bench).
enum class FlashW { N128 = 0, N176 = 1, N128x3 = 2 };
FlashW flash_sm90w_variant();
void set_flash_sm90w_variant(FlashW v);
const char* flash_sm90w_name(FlashW v);
void flash_sm90w(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int kv, Tensor& out);

}  // namespace zi::cuda
