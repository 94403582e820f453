// Element types and conversions (f32 <-> bf16/f16, round-to-nearest-even).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace zi {

// Room is left after U8 for quantized block types.
enum class DType : uint8_t { F32, BF16, F16, I32, U8 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // "f32", "bf16", ...
// Parses "f32" | "bf16" | "f16" (case-insensitive); returns false if unknown.
bool parse_dtype(std::string_view s, DType* out);

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
