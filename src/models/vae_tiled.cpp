// Host GroupNorm pieces of the exact tiled VAE decode (see vae_tiled.h). Same arithmetic as
// backends/cpu/norm.cpp: statistics in double, two passes; normalisation in f32 as
// (x − mean) · (rstd · w) + b.
#include "models/vae_tiled.h"

#include <cmath>

#include "core/check.h"
#include "core/parallel.h"

namespace zi::vae_tiled {

void GroupMoments::merge(const GroupMoments& o) {
  if (o.n == 0) return;
  if (n == 0) {
    *this = o;
    return;
  }
  const double tot = n + o.n, d = o.mean - mean;
  mean += d * (o.n / tot);
  m2 += o.m2 + d * d * (n * o.n / tot);
  n = tot;
}

namespace {

void check_chw(const Tensor& x, int groups, const char* fn) {
  ZI_CHECK(x.ndim() == 3 && x.dtype() == DType::F32 && x.device() == Device::CPU && x.is_contiguous(), "[", fn,
           "] expects a contiguous host f32 [C, H, W] tensor, got ", x.desc());
  ZI_CHECK(groups > 0 && x.dim(0) % groups == 0, "[", fn, "] ", x.dim(0), " channels do not split into ", groups,
           " groups");
}

// Sum (and sum of squared deviations from `mean`) of one channel plane's sub-rectangle.
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

void accumulate_group_moments(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                              std::vector<GroupMoments>& acc) {
  check_chw(x, groups, "accumulate_group_moments");
  const int64_t C = x.dim(0), H = x.dim(1), W = x.dim(2), cpg = C / groups;
  ZI_CHECK(0 <= y0 && y0 <= y1 && y1 <= H && 0 <= x0 && x0 <= x1 && x1 <= W && acc.size() == size_t(groups),
           "[accumulate_group_moments] bad region rows [", y0, ", ", y1, ") cols [", x0, ", ", x1, ") of ", x.desc());
  const int64_t n = cpg * (y1 - y0) * (x1 - x0);
  if (n == 0) return;
  const float* xp = x.f32();
  parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      double s = 0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += plane_sum(xp + c * H * W, W, y0, y1, x0, x1);
      GroupMoments part;
      part.n = double(n);
      part.mean = s / double(n);
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
        part.m2 += plane_sq_dev(xp + c * H * W, W, y0, y1, x0, x1, part.mean);
      acc[size_t(g)].merge(part);  // each group has its own slot: no race
    }
  });
}

GroupStats finish_group_stats(const std::vector<GroupMoments>& acc, float eps) {
  GroupStats s;
  for (const GroupMoments& m : acc) {
    ZI_CHECK(m.n > 0, "[finish_group_stats] a group saw no values");
    s.mean.push_back(float(m.mean));
    s.rstd.push_back(float(1.0 / std::sqrt(m.m2 / m.n + double(eps))));
  }
  return s;
}

void group_norm_given_(Tensor& x, int groups, const GroupStats& s, const Tensor& weight, const Tensor& bias) {
  check_chw(x, groups, "group_norm_given_");
  const int64_t C = x.dim(0), HW = x.dim(1) * x.dim(2), cpg = C / groups;
  ZI_CHECK(weight.numel() == C && bias.numel() == C && s.mean.size() == size_t(groups) &&
               s.rstd.size() == size_t(groups),
           "[group_norm_given_] weight ", weight.desc(), ", bias ", bias.desc(), " or ", s.mean.size(),
           " statistics do not match ", x.desc(), " in ", groups, " groups");
  std::vector<float> w(static_cast<size_t>(C)), b(static_cast<size_t>(C));
  const Tensor wc = weight.contiguous(), bc = bias.contiguous();
  convert(wc.raw(), wc.dtype(), w.data(), DType::F32, size_t(C));
  convert(bc.raw(), bc.dtype(), b.data(), DType::F32, size_t(C));
  float* xp = x.f32();
  parallel_for(C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = c / cpg;
      const float m = s.mean[size_t(g)], a = s.rstd[size_t(g)] * w[size_t(c)], bb = b[size_t(c)];
      float* p = xp + c * HW;
      for (int64_t i = 0; i < HW; ++i) p[i] = (p[i] - m) * a + bb;
    }
  });
}

}  // namespace zi::vae_tiled
