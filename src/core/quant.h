// Weight formats (DType Q8_0 … Q3_K, F8_E4M3): quantization made at load time and
// dequantization, scalar reference code. Byte layouts are ggml's (ggml-common.h), so GGUF
// tensors are used in place; every dequantizer is checked against the gguf Python package
// (tests/test_quant.cpp, tests/data/gguf). The quantizers of Q8_0, Q4_0 and Q5_0 give the
// bytes of ggml's reference quantizer (quantize_row_*_ref, = gguf.quants.quantize); the
// K-quants are read only (their quantizers search scales; zimage makes Q4_0 for 4 bits).
//
// F8_E4M3 (fp8, float8_e4m3fn: bias 7, 3 mantissa bits, max 448, no infinities, S.1111.111 is
// NaN): weights made here are scaled per output row, scale = max|row| / 448 (1 for a zero row),
// byte = round-to-nearest-even(w / scale), value = e4m3 · scale. ComfyUI's fp8 files hold raw
// e4m3 weights, optionally with one `scale_weight` per tensor (value = e4m3 · scale_weight).
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace zi::quant {

// float8 element conversions (exact decode; encode rounds to nearest even, saturating at ±448).
float e4m3_to_f32(uint8_t b);
uint8_t f32_to_e4m3(float f);
float e5m2_to_f32(uint8_t b);

// One row of k values (k a multiple of the block) to/from a block type.
void quantize_row(DType t, const float* x, void* y, int64_t k);    // Q8_0, Q4_0, Q5_0
void dequantize_row(DType t, const void* x, float* y, int64_t k);  // every block type
// Integer form of one block of a format whose values are scale · q − offset with an unsigned q
// per value and a (scale, offset) per 16 values: Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, Q3_K (the CPU's
// int8 GEMM; not Q8_0, whose q is signed). q gets dtype_block(t) values in order (q ≤ 63), scale
// and offset dtype_block(t) / 16 each. The values equal dequantize_row's up to f32 rounding
// (Q4_K, Q5_K: exactly). Returns false for other formats.
bool unpack_block_unsigned(DType t, const uint8_t* block, uint8_t* q, float* scale, float* offset);
// True when zimage can make this format at load time.
bool can_quantize(DType t);

// A 2-D [N, K] float tensor (f32/bf16/f16, host) in weight format `t` (Q8_0/Q4_0/Q5_0/F8_E4M3):
// rows in parallel, one f32 row of scratch per thread. K must be a multiple of the block.
Tensor quantize(const Tensor& w, DType t, Tag tag);
// rows [r0, r1) of a quantized [N, K] tensor (host) into dst [(r1 − r0) · K] f32.
void dequantize_rows(const Tensor& w, int64_t r0, int64_t r1, float* dst);
// The whole tensor as a new f32 (or, via convert, bf16/f16) host tensor.
Tensor dequantize(const Tensor& w, DType to = DType::F32, Tag tag = Tag::Workspace);

}  // namespace zi::quant
