// Two GroupNorm pieces the exact tiled VAE decode needs (vae_decode_tiled in vae_decoder.cpp):
// per-group moments of a sub-rectangle, merged across tiles into the whole image's statistics,
// and a GroupNorm that applies given statistics instead of computing its own.
// Both run where x lives (CPU or CUDA), through ops.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace zi::vae_tiled {

// Count, mean and sum of squared deviations from the mean of one group's values. Partial
// moments of disjoint regions merge exactly (Chan et al.), so the merged mean and m2 / n are
// those of the union up to double rounding, whatever the tile order.
struct GroupMoments {
  double n = 0, mean = 0, m2 = 0;
  void merge(const GroupMoments& o);
};

// For each of `groups` groups of x [C, H, W] (a contiguous activation; a group is C/groups
// consecutive channels), the moments over rows [y0, y1) × columns [x0, x1) of its channels,
// two-pass in double, merged into acc[g] (acc.size() == groups).
void accumulate_group_moments(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                              std::vector<GroupMoments>& acc);

// The mean and 1/sqrt(var + eps) of each group, rounded to f32 as ops::group_norm_ rounds its own.
struct GroupStats {
  std::vector<float> mean, rstd;  // [groups]
};
GroupStats finish_group_stats(const std::vector<GroupMoments>& acc, float eps);

// x [C, H, W] ← (x − mean[g]) · (rstd[g] · weight[c]) + bias[c], g = c / (C / groups): the
// normalisation step of ops::group_norm_ with `s` in place of x's own statistics. weight and bias
// [C] may be f32, bf16 or f16.
void group_norm_given_(Tensor& x, int groups, const GroupStats& s, const Tensor& weight, const Tensor& bias);

}  // namespace zi::vae_tiled
