// Shared helpers for the tests: fixture paths, temporary folders, random tensors, error messages
// and error measures.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <algorithm>
#include <vector>
#include <string>

#include "core/allocator.h"
#include "core/check.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace zi::test {

inline std::string data_path(const std::string& rel) { return std::string(ZI_TEST_DATA) + "/" + rel; }
inline std::string tiny_model() { return ZI_TINY_MODEL; }

// A fresh directory under /tmp, removed with everything in it when the object dies.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/zimage_test_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string sub(const std::string& n) const { return (path / n).string(); }
  std::string operator/(const std::string& n) const { return sub(n); }
};

// The message of the zi::Error that f throws ("" when it throws none).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// f32 values of random sign with magnitudes uniform in [lo, hi), reproducible from the seed.
inline Tensor rnd(const Shape& shape, uint32_t seed, float lo = 0.05f, float hi = 1.0f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = (g() & 1 ? 1.0f : -1.0f) * u(g);
  return t;
}

// f32 values drawn from N(0, 1) · scale, reproducible from the seed.
inline Tensor randn(const Shape& shape, float scale, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = nd(g) * scale;
  return t;
}

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

// Per-channel-value differences of two 8-bit images of the same size: the largest and the mean.
struct PixelDiff {
  int max = 0;
  double mean = 0;
};
inline PixelDiff pixel_diff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  PixelDiff p;
  double sum = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const int d = std::abs(int(a[i]) - int(b[i]));
    p.max = std::max(p.max, d);
    sum += d;
  }
  p.mean = a.empty() ? 0 : sum / double(a.size());
  return p;
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

// Activation bytes `fn` holds at its CPU peak beyond what was held before (weights, inputs), by the
// allocator's accounting.
template <class F>
int64_t measured_peak(F&& fn) {
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t before = ms.total().current;
  ms.reset_peaks();
  fn();
  return ms.total().peak - before;
}

}  // namespace zi::test
