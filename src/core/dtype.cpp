#include "core/dtype.h"

#include <cctype>
#include <string>

#include "core/check.h"

namespace zi {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::U8: return 1;
    case DType::F8_E4M3: return 1;
    default: return 0;
  }
}

int64_t dtype_block(DType t) {
  switch (t) {
    case DType::Q8_0: case DType::Q4_0: case DType::Q5_0: return 32;
    case DType::Q4_K: case DType::Q5_K: case DType::Q6_K: case DType::Q3_K: return 256;
    default: return 1;
  }
}

size_t dtype_block_bytes(DType t) {
  switch (t) {
    case DType::Q8_0: return 34;   // f16 d, 32 × int8
    case DType::Q4_0: return 18;   // f16 d, 16 bytes of nibbles
    case DType::Q5_0: return 22;   // f16 d, 4 bytes high bits, 16 bytes of nibbles
    case DType::Q4_K: return 144;  // f16 d, f16 dmin, 12 bytes scales, 128 bytes nibbles
    case DType::Q5_K: return 176;  // + 32 bytes high bits
    case DType::Q6_K: return 210;  // 128 ql, 64 qh, 16 scales, f16 d
    case DType::Q3_K: return 110;  // 32 hmask, 64 qs, 12 scales, f16 d
    default: return dtype_size(t);
  }
}

size_t dtype_bytes(DType t, int64_t n) {
  const int64_t b = dtype_block(t);
  return size_t(n / b) * dtype_block_bytes(t);
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::I32: return "i32";
    case DType::U8: return "u8";
    case DType::Q8_0: return "q8_0";
    case DType::Q4_0: return "q4_0";
    case DType::Q5_0: return "q5_0";
    case DType::Q4_K: return "q4_K";
    case DType::Q5_K: return "q5_K";
    case DType::Q6_K: return "q6_K";
    case DType::Q3_K: return "q3_K";
    case DType::F8_E4M3: return "fp8";
  }
  return "?";
}

bool parse_dtype(std::string_view s, DType* out) {
  std::string l;
  for (char c : s) l += char(std::tolower(static_cast<unsigned char>(c)));
  if (l == "f32" || l == "fp32" || l == "float32") *out = DType::F32;
  else if (l == "bf16" || l == "bfloat16") *out = DType::BF16;
  else if (l == "f16" || l == "fp16" || l == "float16") *out = DType::F16;
  else return false;
  return true;
}

bool parse_weight_dtype(std::string_view s, DType* out) {
  if (parse_dtype(s, out)) return true;
  std::string l;
  for (char c : s) l += char(std::tolower(static_cast<unsigned char>(c)));
  if (l == "q8_0" || l == "int8" || l == "q8") *out = DType::Q8_0;
  else if (l == "q4_0" || l == "q4" || l == "int4") *out = DType::Q4_0;
  else if (l == "q5_0") *out = DType::Q5_0;
  else if (l == "fp8" || l == "f8" || l == "f8_e4m3" || l == "fp8_e4m3") *out = DType::F8_E4M3;
  else return false;
  return true;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow (incl. rounding up) -> inf
  if (a < 0x38800000u) {                                   // subnormal or zero in f16
    if (a < 0x33000000u) return uint16_t(sign);            // < half of smallest subnormal
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 - (e - 127) + 13 ... bits to drop
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

void convert(const void* src, DType st, void* dst, DType dt, size_t n) {
  if (st == dt) {
    if (src != dst) std::memcpy(dst, src, n * dtype_size(st));
    return;
  }
  auto load = [&](size_t i) -> float {
    switch (st) {
      case DType::F32: return static_cast<const float*>(src)[i];
      case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
      case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
      default: fail(str_cat("[convert] unsupported source dtype ", dtype_name(st)));
    }
  };
  switch (dt) {
    case DType::F32: {
      float* d = static_cast<float*>(dst);
      if (st == DType::BF16) {
        const uint16_t* s = static_cast<const uint16_t*>(src);
        for (size_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
      } else {
        for (size_t i = 0; i < n; ++i) d[i] = load(i);
      }
      return;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(load(i));
      return;
    }
    case DType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(load(i));
      return;
    }
    default: fail(str_cat("[convert] unsupported target dtype ", dtype_name(dt)));
  }
}

}  // namespace zi
