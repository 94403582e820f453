// Shared helpers for the tests: fixture paths and error measures.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "io/safetensors.h"

namespace zi::test {

inline std::string data_path(const std::string& rel) { return std::string(ZI_TEST_DATA) + "/" + rel; }
inline std::string tiny_model() { return ZI_TINY_MODEL; }

// ‖a − b‖₂ / ‖b‖₂ over all elements (both f32, same numel).
inline double rel_l2(const Tensor& a, const Tensor& b) {
  Tensor ac = a.contiguous(), bc = b.contiguous();
  const float* x = ac.f32();
  const float* y = bc.f32();
  double num = 0, den = 0;
  for (int64_t i = 0; i < bc.numel(); ++i) {
    double d = double(x[i]) - double(y[i]);
    num += d * d;
    den += double(y[i]) * double(y[i]);
  }
  if (std::isnan(num)) return INFINITY;
  return std::sqrt(num / (den > 0 ? den : 1e-30));
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  Tensor ac = a.contiguous(), bc = b.contiguous();
  const float* x = ac.f32();
  const float* y = bc.f32();
  double m = 0;
  for (int64_t i = 0; i < bc.numel(); ++i) {
    double d = std::fabs(double(x[i]) - double(y[i]));
    if (std::isnan(d)) return INFINITY;
    m = d > m ? d : m;
  }
  return m;
}

}  // namespace zi::test
