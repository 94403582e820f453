// Small inline math for the CPU kernels, written so that GCC vectorises the loops that call it.
#pragma once
#include <cstdint>
#include <cstring>

namespace zi::cpu {

// exp(x) for f32, relative error ~2 ulp over the whole range (Cephes expf polynomial).
// std::exp does not vectorise without -ffast-math; softmax and SiLU need hundreds of millions.
inline float exp_fast(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by adding and removing 1.5·2²³ (floorf does not vectorise without
  // -fno-trapping-math; this does, and is exact for |x·log2 e| < 2²²).
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for exactness
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace zi::cpu
