// Per-row e4m3 quantization of bf16 activations, one arithmetic for every kernel that writes it:
// quant.cu's separate pass before an fp8 GEMM and the norm and SwiGLU kernels that write an e4m3
// copy of their own output (so a GEMM on either gets the same bytes and scales). Over the bf16
// values of a row: scale = max|v| / 448 (1 for a zero row), byte = rne-satfinite(v / scale).
#pragma once

#include <cuda_fp8.h>

#include "backends/cuda/common.cuh"

namespace zi::cuda {

// Max over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float part[32];
  __syncthreads();  // the buffer may still be read by a previous call
  v = warp_max(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (l == 0) part[w] = v;
  __syncthreads();
  return warp_max(l < nw ? part[l] : 0.0f);
}

__device__ __forceinline__ float e4m3_row_scale(float row_max) {
  return row_max > 0.0f ? __fdiv_rn(row_max, 448.0f) : 1.0f;
}

// The value a bf16 store of v keeps (round to nearest even, as store_vec and st<bf16>).
__device__ __forceinline__ float bf16_rounded(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// 8 values (already bf16-exact) → rne-satfinite(f / s) as e4m3 bytes at q (8-byte aligned).
__device__ __forceinline__ void store_e4m3x8(const float (&f)[8], float s, uint8_t* q) {
  uint32_t w[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t b = __nv_cvt_float_to_fp8(__fdiv_rn(f[i], s), __NV_SATFINITE, __NV_E4M3);
    w[i / 4] |= (b & 0xffu) << (8 * (i % 4));
  }
  *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
}

}  // namespace zi::cuda
