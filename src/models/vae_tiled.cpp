// GroupNorm pieces of the exact tiled VAE decode (see vae_tiled.h): the moments of disjoint
// regions, merged; the per-region sums and the normalisation are ops (ops::group_region_sums,
// ops::group_norm_given_), so a tile on the GPU stays there.
#include "models/vae_tiled.h"

#include <cmath>

#include "core/check.h"
#include "ops/ops.h"

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

void accumulate_group_moments(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                              std::vector<GroupMoments>& acc) {
  ZI_CHECK(acc.size() == size_t(groups), "[accumulate_group_moments] ", acc.size(), " accumulators for ", groups,
           " groups");
  ZI_CHECK(x.ndim() == 3 && groups > 0 && x.dim(0) % groups == 0, "[accumulate_group_moments] ", x.desc(),
           " does not split into ", groups, " groups");
  const int64_t n = x.dim(0) / groups * (y1 - y0) * (x1 - x0);
  const std::vector<double> sums = ops::group_region_sums(x, groups, y0, y1, x0, x1);  // checks the region
  if (n == 0) return;
  std::vector<double> mean(static_cast<size_t>(groups));
  for (size_t g = 0; g < mean.size(); ++g) mean[g] = sums[g] / double(n);
  const std::vector<double> m2 = ops::group_region_sums(x, groups, y0, y1, x0, x1, mean);
  for (size_t g = 0; g < mean.size(); ++g) {
    GroupMoments part;
    part.n = double(n);
    part.mean = mean[g];
    part.m2 = m2[g];
    acc[g].merge(part);
  }
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
  ops::group_norm_given_(x, groups, s.mean, s.rstd, weight, bias);
}

}  // namespace zi::vae_tiled
