// Scalar reference quantizers/dequantizers of the weight formats (core/quant.h). The
// arithmetic follows ggml's reference code operation by operation (f32, no fused multiply-add:
// this file is compiled for the baseline x86-64, where the compiler cannot contract), which is
// also what gguf.quants computes in NumPy, so dequantized values are bit-identical.
#include "core/quant.h"


#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/check.h"
#include "core/parallel.h"

namespace zi::quant {
namespace {

inline float f16at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}
inline void put_f16(uint8_t* p, float f) {
  uint16_t h = f32_to_f16(f);
  std::memcpy(p, &h, 2);
}

std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) v = std::nanf("");
    else if (e == 0) v = std::ldexp(float(m) / 8.0f, -6);
    else v = std::ldexp(1.0f + float(m) / 8.0f, e - 7);
    t[size_t(b)] = s ? -v : v;
  }
  return t;
}
const std::array<float, 256> kE4m3 = make_e4m3_table();

// ---- block quantizers (ggml quantize_row_*_ref) ---------------------------------------------

// roundf for |v| < 2³¹ without the libm call (the baseline x86-64 build cannot inline it): the
// truncation, then one step away from zero when the dropped fraction is at least one half
// (v − trunc(v) is exact in float).
inline int round_half_away(float v) {
  int q = int(v);
  const float f = v - float(q);
  if (f >= 0.5f) ++q;
  else if (f <= -0.5f) --q;
  return q;
}

void quant_q8_0(const float* x, uint8_t* y) {
  float amax = 0;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(y, d);
  for (int j = 0; j < 32; ++j) y[2 + j] = uint8_t(int8_t(round_half_away(x[j] * id)));
}

// Q4_0 / Q5_0: d = (the value of largest magnitude, first on ties) / −2^(bits−1).
void quant_q4_0(const float* x, uint8_t* y) {
  float amax = 0, max = 0;
  for (int j = 0; j < 32; ++j)
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  const float d = max / -8;
  const float id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(y, d);
  for (int j = 0; j < 16; ++j) {
    const uint8_t a = uint8_t(std::min(15, int(int8_t(x[j] * id + 8.5f))));
    const uint8_t b = uint8_t(std::min(15, int(int8_t(x[16 + j] * id + 8.5f))));
    y[2 + j] = uint8_t(a | (b << 4));
  }
}

void quant_q5_0(const float* x, uint8_t* y) {
  float amax = 0, max = 0;
  for (int j = 0; j < 32; ++j)
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  const float d = max / -16;
  const float id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(y, d);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t a = uint8_t(std::min(31, int(int8_t(x[j] * id + 16.5f))));
    const uint8_t b = uint8_t(std::min(31, int(int8_t(x[16 + j] * id + 16.5f))));
    y[6 + j] = uint8_t((a & 0x0F) | ((b & 0x0F) << 4));
    qh |= uint32_t((a & 0x10) >> 4) << j;
    qh |= uint32_t((b & 0x10) >> 4) << (j + 16);
  }
  std::memcpy(y + 2, &qh, 4);
}

// ---- block dequantizers (ggml dequantize_row_*) ----------------------------------------------

void deq_q8_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  for (int j = 0; j < 32; ++j) y[j] = float(int8_t(b[2 + j])) * d;
}

void deq_q4_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = float(int(b[2 + j] & 0x0F) - 8) * d;
    y[16 + j] = float(int(b[2 + j] >> 4) - 8) * d;
  }
}

void deq_q5_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  for (int j = 0; j < 16; ++j) {
    const int x0 = int((b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
    const int x1 = int((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
    y[j] = float(x0) * d;
    y[16 + j] = float(x1) * d;
  }
}

// The 6-bit scales and mins of Q4_K / Q5_K (12 bytes for 8 sub-blocks).
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = uint8_t((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q4_K / Q5_K: their integer form's scale · q − offset is the reference's own expression
// (d · sc) · q − dmin · m, so the values are bit-exact (unpack_block_unsigned, below).
template <DType T>
void deq_k_min(const uint8_t* b, float* y) {
  uint8_t q[256];
  float sc[16], off[16];
  unpack_block_unsigned(T, b, q, sc, off);
  for (int j = 0; j < 256; ++j) y[j] = sc[j / 16] * float(q[j]) - off[j / 16];
}

// Q6_K / Q3_K: value = scale · (q − zero), the reference's own expression, from the same
// integer form (bit-exact).
template <DType T, int Zero>
void deq_k_sym(const uint8_t* b, float* y) {
  uint8_t q[256];
  float sc[16], off[16];
  unpack_block_unsigned(T, b, q, sc, off);
  for (int j = 0; j < 256; ++j) y[j] = sc[j / 16] * float(int(q[j]) - Zero);
}

}  // namespace

bool unpack_block_unsigned(DType t, const uint8_t* b, uint8_t* q, float* scale, float* offset) {
  switch (t) {
    case DType::Q4_0: {
      const float d = f16at(b);
      for (int j = 0; j < 16; ++j) {
        q[j] = b[2 + j] & 0x0F;
        q[16 + j] = b[2 + j] >> 4;
      }
      for (int h = 0; h < 2; ++h) scale[h] = d, offset[h] = 8 * d;
      return true;
    }
    case DType::Q5_0: {
      const float d = f16at(b);
      uint32_t qh;
      std::memcpy(&qh, b + 2, 4);
      for (int j = 0; j < 16; ++j) {
        q[j] = uint8_t((b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4));
        q[16 + j] = uint8_t((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
      }
      for (int h = 0; h < 2; ++h) scale[h] = d, offset[h] = 16 * d;
      return true;
    }
    case DType::Q4_K:
    case DType::Q5_K: {
      const bool five = t == DType::Q5_K;
      const float d = f16at(b), dmin = f16at(b + 2);
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;                 // Q5_K only
      const uint8_t* ql = b + (five ? 48 : 16);
      for (int s = 0; s < 8; ++s) {  // sub-blocks of 32: the low nibbles of 32 bytes, then the high
        uint8_t sc, m;
        scale_min_k4(s, scales, &sc, &m);
        const int g = s / 2, shift = 4 * (s % 2);
        for (int l = 0; l < 32; ++l) {
          int v = (ql[32 * g + l] >> shift) & 0x0F;
          if (five) v |= ((qh[l] >> s) & 1) << 4;
          q[32 * s + l] = uint8_t(v);
        }
        for (int h = 0; h < 2; ++h) scale[2 * s + h] = d * float(sc), offset[2 * s + h] = dmin * float(m);
      }
      return true;
    }
    case DType::Q6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16at(b + 208);
      for (int c = 0; c < 8; ++c) {
        const int g = c / 4, r = c % 4;
        const int shift_l = 4 * (r / 2), off_l = 64 * g + 32 * (r % 2), shift_h = 2 * r;
        for (int l = 0; l < 32; ++l)
          q[32 * c + l] = uint8_t(((ql[off_l + l] >> shift_l) & 0x0F) | (((qh[32 * g + l] >> shift_h) & 3) << 4));
      }
      for (int i = 0; i < 16; ++i) scale[i] = d * float(sc[i]), offset[i] = 32 * scale[i];
      return true;
    }
    case DType::Q3_K: {
      const uint8_t* hm = b;
      const uint8_t* qs = b + 32;
      const uint8_t* s = b + 96;
      const float d = f16at(b + 108);
      for (int i = 0; i < 16; ++i) {
        const int lo = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
        const int hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
        scale[i] = d * float(int8_t(uint8_t(lo | (hi << 4))) - 32);
        offset[i] = 4 * scale[i];
      }
      for (int c = 0; c < 8; ++c) {
        const int g = c / 4, shift = 2 * (c % 4);
        for (int l = 0; l < 32; ++l)
          q[32 * c + l] = uint8_t(((qs[32 * g + l] >> shift) & 3) + (((hm[l] >> c) & 1) ? 4 : 0));
      }
      return true;
    }
    default:
      return false;
  }
}

float e4m3_to_f32(uint8_t b) { return kE4m3[b]; }

uint8_t f32_to_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7F;       // NaN
  if (a < 0x3c800000u) {                  // below 2^-6: subnormal steps of 2^-9
    float v;
    std::memcpy(&v, &a, 4);
    const float q = std::nearbyint(v * 512.0f);  // exact scaling; round to nearest even
    return uint8_t(sign | uint8_t(q));           // q = 8 is the smallest normal, code 0x08
  }
  uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);  // round to 3 mantissa bits, nearest even
  const int e = int(r >> 23) - 127 + 7;
  uint32_t code = (uint32_t(e) << 3) | ((r >> 20) & 7u);
  if (e > 15 || code > 0x7E) code = 0x7E;  // saturate at 448
  return uint8_t(sign | code);
}

float e5m2_to_f32(uint8_t b) { return f16_to_f32(uint16_t(uint16_t(b) << 8)); }

bool can_quantize(DType t) {
  return t == DType::Q8_0 || t == DType::Q4_0 || t == DType::Q5_0 || t == DType::F8_E4M3;
}

void quantize_row(DType t, const float* x, void* yv, int64_t k) {
  uint8_t* y = static_cast<uint8_t*>(yv);
  const int64_t nb = k / dtype_block(t);
  const size_t bb = dtype_block_bytes(t);
  for (int64_t i = 0; i < nb; ++i) {
    const float* xb = x + i * 32;
    uint8_t* yb = y + size_t(i) * bb;
    switch (t) {
      case DType::Q8_0: quant_q8_0(xb, yb); break;
      case DType::Q4_0: quant_q4_0(xb, yb); break;
      case DType::Q5_0: quant_q5_0(xb, yb); break;
      default: fail(str_cat("[quantize] zimage cannot make ", dtype_name(t), " weights"));
    }
  }
}

void dequantize_row(DType t, const void* xv, float* y, int64_t k) {
  const uint8_t* x = static_cast<const uint8_t*>(xv);
  const int64_t bs = dtype_block(t), nb = k / bs;
  const size_t bb = dtype_block_bytes(t);
  void (*f)(const uint8_t*, float*) = nullptr;
  switch (t) {
    case DType::Q8_0: f = deq_q8_0; break;
    case DType::Q4_0: f = deq_q4_0; break;
    case DType::Q5_0: f = deq_q5_0; break;
    case DType::Q4_K: f = deq_k_min<DType::Q4_K>; break;
    case DType::Q5_K: f = deq_k_min<DType::Q5_K>; break;
    case DType::Q6_K: f = deq_k_sym<DType::Q6_K, 32>; break;
    case DType::Q3_K: f = deq_k_sym<DType::Q3_K, 4>; break;
    default: fail(str_cat("[dequantize] ", dtype_name(t), " is not a block format"));
  }
  for (int64_t i = 0; i < nb; ++i) f(x + size_t(i) * bb, y + i * bs);
}

Tensor quantize(const Tensor& w, DType t, Tag tag) {
  ZI_CHECK(can_quantize(t), "[quantize] zimage cannot make ", dtype_name(t), " weights");
  ZI_CHECK(w.ndim() == 2 && w.device() == Device::CPU && w.is_contiguous() && is_float_dtype(w.dtype()),
           "[quantize] needs a contiguous 2-D host float tensor, got ", w.desc());
  const int64_t N = w.dim(0), K = w.dim(1);
  ZI_CHECK(K % dtype_block(t) == 0, "[quantize] ", w.desc(), ": rows of ", K, " are not a multiple of ",
           dtype_name(t), "'s block of ", dtype_block(t));
  Tensor out = Tensor::empty({N, K}, t, tag);
  Tensor scale = t == DType::F8_E4M3 ? Tensor::empty({N}, DType::F32, tag) : Tensor();
  const size_t es = dtype_size(w.dtype()), rb = dtype_bytes(t, K);
  const char* src = static_cast<const char*>(w.raw());
  char* dst = static_cast<char*>(out.raw());
  parallel_for(N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
      convert(src + size_t(r * K) * es, w.dtype(), row.data(), DType::F32, size_t(K));
      if (t == DType::F8_E4M3) {
        float amax = 0;
        for (float v : row) amax = std::max(amax, std::fabs(v));
        const float s = amax > 0 ? amax / 448.0f : 1.0f;
        scale.data<float>()[r] = s;
        uint8_t* q = reinterpret_cast<uint8_t*>(dst + size_t(r) * rb);
        for (int64_t j = 0; j < K; ++j) q[j] = f32_to_e4m3(row[size_t(j)] / s);
      } else {
        quantize_row(t, row.data(), dst + size_t(r) * rb, K);
      }
    }
  });
  if (t == DType::F8_E4M3) out.set_row_scale(std::move(scale));
  return out;
}

void dequantize_rows(const Tensor& w, int64_t r0, int64_t r1, float* dst) {
  const DType t = w.dtype();
  const int64_t K = w.dim(1);
  const size_t rb = dtype_bytes(t, K);
  const uint8_t* src = static_cast<const uint8_t*>(w.raw());
  for (int64_t r = r0; r < r1; ++r) {
    float* y = dst + (r - r0) * K;
    const uint8_t* x = src + size_t(r) * rb;
    if (t == DType::F8_E4M3) {
      const float s = w.row_scale() ? w.row_scale()->data<float>()[r] : 1.0f;
      for (int64_t j = 0; j < K; ++j) y[j] = kE4m3[x[j]] * s;
    } else {
      dequantize_row(t, x, y, K);
    }
  }
}

Tensor dequantize(const Tensor& w, DType to, Tag tag) {
  ZI_CHECK(is_quantized(w.dtype()) && w.ndim() == 2 && w.device() == Device::CPU && w.is_contiguous(),
           "[dequantize] needs a 2-D host weight-format tensor, got ", w.desc());
  Tensor f = Tensor::empty(w.shape(), DType::F32, to == DType::F32 ? tag : Tag::Workspace);
  parallel_for(w.dim(0), 16, [&](int64_t r0, int64_t r1) { dequantize_rows(w, r0, r1, f.data<float>() + r0 * w.dim(1)); });
  return to == DType::F32 ? f : f.to(to, tag);
}

}  // namespace zi::quant
