// Per-row e4m3 quantization of bf16 activations, one arithmetic for every kernel that writes it:
// quant.cu's separate pass before an fp8 GEMM and the norm and SwiGLU kernels that write an e4m3
// copy of their own output (so a GEMM on either gets the same bytes and scales). Over the bf16
// values of a row: scale = max|v| / 448 (1 for a zero row), byte = rne-satfinite(v / scale).
#pragma once

#include <cuda_fp8.h>

#include "backends/cuda/common.cuh"

namespace zi::cuda {

// Max of non-negative values over the whole block; every thread gets it.
__device__ __forceinline__ float block_max(float v) { return block_reduce<WarpMax>(v); }

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

// One row's e4m3 copy, by a block whose thread holds its vectors f[i] (8 values each, at element
// (threadIdx.x + i · threads) · 8; vectors past K hold 0): the values rounded to bf16 (what the
// bf16 output holds), the row's scale written to *scale by thread 0, the bytes to qrow.
template <int VPT>
__device__ __forceinline__ void quantize_row_e4m3(float (&f)[VPT][8], int threads, int64_t K, uint8_t* qrow,
                                                  float* scale) {
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      f[i][e] = bf16_rounded(f[i][e]);
      m = fmaxf(m, fabsf(f[i][e]));
    }
  const float s = e4m3_row_scale(block_max(m));
  if (threadIdx.x == 0) *scale = s;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t j = (threadIdx.x + int64_t(i) * threads) * 8;
    if (j < K) store_e4m3x8(f[i], s, qrow + j);
  }
}

}  // namespace zi::cuda
