#include "core/torch_random.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "core/check.h"

// Every rounding below must happen exactly where PyTorch's compiled kernel rounds: no
// contraction of a*b+c into FMA except where std::fma is written out.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace zi {

// ---- engine -------------------------------------------------------------------------------

TorchMt19937::TorchMt19937(uint64_t seed) {
  state_[0] = uint32_t(seed & 0xffffffffu);
  for (int i = 1; i < 624; ++i)
    state_[i] = 1812433253u * (state_[i - 1] ^ (state_[i - 1] >> 30)) + uint32_t(i);
  index_ = 624;
}

void TorchMt19937::twist() {
  for (int i = 0; i < 624; ++i) {
    uint32_t y = (state_[i] & 0x80000000u) | (state_[(i + 1) % 624] & 0x7fffffffu);
    state_[i] = state_[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
  }
  index_ = 0;
}

uint32_t TorchMt19937::next_u32() {
  if (index_ >= 624) twist();
  uint32_t y = state_[index_++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

uint64_t TorchMt19937::next_u64() {
  uint64_t hi = next_u32();
  uint64_t lo = next_u32();
  return (hi << 32) | lo;
}

namespace {

inline float bits_f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// at::uniform_real_distribution<float>(0, 1): 24 random bits / 2^24 (exact).
inline float uniform_f32(TorchMt19937& g) { return float(double(g.next_u32() & 0xffffffu) * (1.0 / 16777216.0)); }
// at::uniform_real_distribution<double>(0, 1): 53 random bits of random64 / 2^53.
inline double uniform_f64(TorchMt19937& g) {
  return double(g.next_u64() & ((uint64_t(1) << 53) - 1)) * (1.0 / 9007199254740992.0);
}

// Cephes-style float32 log of avx_mathfun.h (log256_ps), for x in (0, 1]. The FMAs mirror
// the contractions GCC makes in the PyTorch binary: each `acc*x + c` Horner step, e*q1 is
// added to the y*z product inside one FMA, and `- z*0.5` is folded into an FMA.
inline float cephes_logf(float x) {
  x = std::max(x, bits_f(0x00800000u));  // cut off denormals
  int32_t e_int = int32_t(f_bits(x) >> 23) - 0x7f;
  x = bits_f((f_bits(x) & ~0x7f800000u) | 0x3f000000u);  // mantissa in [0.5, 1)
  float e = float(e_int) + 1.0f;
  const bool small = x < 0.707106781186547524f;
  const float tmp = small ? x : 0.0f;
  x = x - 1.0f;
  e = e - (small ? 1.0f : 0.0f);
  x = x + tmp;
  const float z = x * x;
  float y = 7.0376836292E-2f;
  y = std::fma(y, x, -1.1514610310E-1f);
  y = std::fma(y, x, 1.1676998740E-1f);
  y = std::fma(y, x, -1.2420140846E-1f);
  y = std::fma(y, x, 1.4249322787E-1f);
  y = std::fma(y, x, -1.6668057665E-1f);
  y = std::fma(y, x, 2.0000714765E-1f);
  y = std::fma(y, x, -2.4999993993E-1f);
  y = std::fma(y, x, 3.3333331174E-1f);
  y = y * x;
  y = std::fma(y, z, e * -2.12194440e-4f);
  y = std::fma(z, -0.5f, y);
  x = x + y;
  x = std::fma(e, 0.693359375f, x);
  return x;
}

// Cephes-style float32 sincos of avx_mathfun.h (sincos256_ps), same contraction pattern.
inline void cephes_sincosf(float x, float* s, float* c) {
  uint32_t sign_sin = f_bits(x) & 0x80000000u;
  x = bits_f(f_bits(x) & 0x7fffffffu);
  int32_t j = int32_t(x * 1.27323954473516f);  // 4/π, truncation
  j = (j + 1) & ~1;
  const float y = float(j);
  const uint32_t swap_sign_sin = uint32_t(j & 4) << 29;
  const bool poly_sin_first = (j & 2) == 0;
  x = std::fma(y, -0.78515625f, x);
  x = std::fma(y, -2.4187564849853515625e-4f, x);
  x = std::fma(y, -3.77489497744594108e-8f, x);
  const uint32_t sign_cos = uint32_t(~(j - 2) & 4) << 29;
  sign_sin ^= swap_sign_sin;
  const float z = x * x;
  float yc = 2.443315711809948E-005f;
  yc = std::fma(yc, z, -1.388731625493765E-003f);
  yc = std::fma(yc, z, 4.166664568298827E-002f);
  yc = yc * z;
  yc = std::fma(yc, z, -(z * 0.5f));
  yc = yc + 1.0f;
  float ys = -1.9515295891E-4f;
  ys = std::fma(ys, z, 8.3321608736E-3f);
  ys = std::fma(ys, z, -1.6666654611E-1f);
  ys = ys * z;
  ys = std::fma(ys, x, x);
  // The kernel selects with masks and adds +0.0f to the chosen value (turns -0 into +0).
  const float sv = (poly_sin_first ? ys : yc) + 0.0f;
  const float cv = (poly_sin_first ? yc : ys) + 0.0f;
  *s = bits_f(f_bits(sv) ^ sign_sin);
  *c = bits_f(f_bits(cv) ^ sign_cos);
}

// normal_fill_16_AVX2 with mean 0, std 1 (the final fmadd(n, 1, 0) is exact).
void normal_fill_16(float* d) {
  const float two_pi = float(2.0 * 3.14159265358979323846);
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1.0f - d[j];
    const float u2 = d[j + 8];
    const float radius = std::sqrt(-2.0f * cephes_logf(u1));
    const float theta = two_pi * u2;
    float s, c;
    cephes_sincosf(theta, &s, &c);
    d[j] = radius * c;
    d[j + 8] = radius * s;
  }
}

}  // namespace

void TorchGenerator::randn(float* out, int64_t numel) {
  ZI_CHECK(numel >= 0, "[torch_randn] negative element count ", numel);
  TorchMt19937& g = g_;
  if (numel >= 16) {
    for (int64_t i = 0; i < numel; ++i) out[i] = uniform_f32(g);
    for (int64_t i = 0; i + 16 <= numel; i += 16) normal_fill_16(out + i);
    if (numel % 16 != 0) {
      float* tail = out + numel - 16;
      for (int i = 0; i < 16; ++i) tail[i] = uniform_f32(g);
      normal_fill_16(tail);
    }
    return;
  }
  // at::normal_distribution<double> with the generator's cached second sample.
  for (int64_t i = 0; i < numel; ++i) {
    if (have_cached_) {
      out[i] = float(cached_);
      have_cached_ = false;
      continue;
    }
    const double u1 = uniform_f64(g);
    const double u2 = uniform_f64(g);
    const double r = std::sqrt(-2.0 * std::log1p(-u2));
    const double theta = 2.0 * 3.14159265358979323846 * u1;
    cached_ = r * std::sin(theta);
    have_cached_ = true;
    out[i] = float(r * std::cos(theta));
  }
}

void torch_randn(uint64_t seed, float* out, int64_t numel) {
  TorchGenerator g(seed);
  g.randn(out, numel);
}

std::vector<float> torch_randn(uint64_t seed, int64_t numel) {
  ZI_CHECK(numel >= 0, "[torch_randn] negative element count ", numel);
  std::vector<float> v(static_cast<size_t>(numel));
  torch_randn(seed, v.data(), numel);
  return v;
}

uint64_t random_seed() {
  std::random_device rd;
  uint64_t s = (uint64_t(rd()) << 32) ^ uint64_t(rd());
  return s & ((uint64_t(1) << 53) - 1);
}

}  // namespace zi
