// RMSNorm, LayerNorm (no affine) and GroupNorm. Statistics accumulate in double with two
// passes (mean, then squared deviations) so they match a double reference to ~1e-7
// however long the row or group is; the normalisation itself runs in f32.
#include <cmath>

#include "backends/cpu/cpu_ops.h"
#include "core/parallel.h"

namespace zi::cpu {
namespace {

ZI_CPU_CLONES double sum_sq(const float* x, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * double(x[i]);
  return s;
}

ZI_CPU_CLONES double sum(const float* x, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += double(x[i]);
  return s;
}

ZI_CPU_CLONES double sum_sq_dev(const float* x, int64_t n, double mean) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    double d = double(x[i]) - mean;
    s += d * d;
  }
  return s;
}

// x ← (x − m) · a · w + b  (w, b optional: null means 1 and 0).
ZI_CPU_CLONES void normalize(float* x, int64_t n, float m, float a, const float* w, float b) {
  if (w) {
    for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - m) * a * w[i] + b;
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - m) * a + b;
  }
}

}  // namespace

void rms_norm_(Tensor& x, const Tensor& weight, float eps) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  Tensor wt = widen_vector(weight);  // [D]
  const float* w = wt.data<float>();
  float* xp = x.data<float>();
  parallel_for(R, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = xp + r * D;
      const float inv = float(1.0 / std::sqrt(sum_sq(row, D) / double(D) + double(eps)));
      normalize(row, D, 0.0f, inv, w, 0.0f);
    }
  });
}

void layer_norm_(Tensor& x, float eps) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  float* xp = x.data<float>();
  parallel_for(R, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = xp + r * D;
      const double mean = sum(row, D) / double(D);
      const double var = sum_sq_dev(row, D, mean) / double(D);
      normalize(row, D, float(mean), float(1.0 / std::sqrt(var + double(eps))), nullptr, 0.0f);
    }
  });
}

void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps) {
  const int64_t C = x.dim(0), HW = x.numel() / C, cpg = C / groups;
  Tensor wt = widen_vector(weight), bt = widen_vector(bias);  // [C]
  const float* w = wt.data<float>();
  const float* b = bt.data<float>();
  float* xp = x.data<float>();
  // [groups, 2]: mean and 1/std of each group; a group is cpg contiguous channels.
  std::vector<float> stats(size_t(groups) * 2);
  parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const float* gp = xp + g * cpg * HW;
      const int64_t n = cpg * HW;
      const double mean = sum(gp, n) / double(n);
      const double var = sum_sq_dev(gp, n, mean) / double(n);
      stats[size_t(2 * g)] = float(mean);
      stats[size_t(2 * g + 1)] = float(1.0 / std::sqrt(var + double(eps)));
    }
  });
  parallel_for(C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = c / cpg;
      normalize(xp + c * HW, HW, stats[size_t(2 * g)], stats[size_t(2 * g + 1)] * w[c], nullptr, b[c]);
    }
  });
}

namespace {

// Σ (or Σ of squared deviations from `mean`) over one channel plane's sub-rectangle, in double.
double plane_sum(const float* p, int64_t W, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  double s = 0;
  for (int64_t y = y0; y < y1; ++y) {
    const float* row = p + y * W;
    for (int64_t x = x0; x < x1; ++x) s += double(row[x]);
  }
  return s;
}

double plane_sq_dev(const float* p, int64_t W, int64_t y0, int64_t y1, int64_t x0, int64_t x1, double mean) {
  double s = 0;
  for (int64_t y = y0; y < y1; ++y) {
    const float* row = p + y * W;
    for (int64_t x = x0; x < x1; ++x) {
      const double d = double(row[x]) - mean;
      s += d * d;
    }
  }
  return s;
}

}  // namespace

void group_region_sums(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                       const std::vector<double>& mean, std::vector<double>& out) {
  const int64_t C = x.dim(0), H = x.dim(1), W = x.dim(2), cpg = C / groups;
  const float* xp = x.data<float>();
  out.assign(size_t(groups), 0.0);
  parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      double s = 0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
        s += mean.empty() ? plane_sum(xp + c * H * W, W, y0, y1, x0, x1)
                          : plane_sq_dev(xp + c * H * W, W, y0, y1, x0, x1, mean[size_t(g)]);
      out[size_t(g)] = s;
    }
  });
}

void group_norm_given_(Tensor& x, int groups, const std::vector<float>& mean, const std::vector<float>& rstd,
                       const Tensor& weight, const Tensor& bias) {
  const int64_t C = x.dim(0), HW = x.dim(1) * x.dim(2), cpg = C / groups;
  Tensor wt = widen_vector(weight), bt = widen_vector(bias);  // [C]
  const float* w = wt.data<float>();
  const float* b = bt.data<float>();
  float* xp = x.data<float>();
  parallel_for(C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = c / cpg;
      const float m = mean[size_t(g)], a = rstd[size_t(g)] * w[c], bb = b[c];
      float* p = xp + c * HW;
      for (int64_t i = 0; i < HW; ++i) p[i] = (p[i] - m) * a + bb;
    }
  });
}

}  // namespace zi::cpu
