// Element types and conversions (f32 <-> bf16/f16, round-to-nearest-even).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace zi {

// F32 … U8 are element types. The rest are weight formats (core/quant.h): ggml's block
// formats (Q8_0 … Q3_K, byte layouts identical to ggml/GGUF: a row of K values is K / block
// blocks of block_bytes), and F8_E4M3 (one e4m3 byte per value, with per-output-row f32 scales
// held by the tensor, Tensor::row_scale()). Quantized tensors are 2-D weights [N, K] used by
// ops::linear (and dequantized by quant::dequantize); their K is a multiple of the block.
enum class DType : uint8_t { F32, BF16, F16, I32, U8, Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, Q3_K, F8_E4M3 };

// Bytes per element of an element type (F32 … U8, F8_E4M3: 1); 0 for block types.
size_t dtype_size(DType t);
// Elements per block (1 for element types) and bytes per block.
int64_t dtype_block(DType t);
size_t dtype_block_bytes(DType t);
// Bytes of n elements (n a multiple of the block; checked by the callers that build tensors).
size_t dtype_bytes(DType t, int64_t n);
inline bool is_block_quant(DType t) { return t >= DType::Q8_0 && t <= DType::Q3_K; }
inline bool is_quantized(DType t) { return t >= DType::Q8_0; }
inline bool is_float_dtype(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }
const char* dtype_name(DType t);  // "f32", "bf16", ...
// Parses "f32" | "bf16" | "f16" (case-insensitive); returns false if unknown.
bool parse_dtype(std::string_view s, DType* out);
// parse_dtype plus the weight formats made at load time: "q8_0", "q5_0", "q4_0", "fp8" (e4m3).
bool parse_weight_dtype(std::string_view s, DType* out);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                          // round to nearest even
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements between float types (F32/BF16/F16). src and dst must not overlap
// unless they are the same type.
void convert(const void* src, DType src_type, void* dst, DType dst_type, size_t n);

}  // namespace zi
