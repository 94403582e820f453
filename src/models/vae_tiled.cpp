// The exact tiled VAE decode (vae_decode_tiled_with, vae_decoder.h) and its GroupNorm pieces
// (vae_tiled.h): the moments of disjoint regions, merged; the per-region sums and the
// normalisation are ops (ops::group_region_sums, ops::group_norm_given_), so a tile on the GPU
// stays there. Its plan (which checkpoints) comes from pipeline/memory_plan.cpp.
#include "models/vae_tiled.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "models/vae_internal.h"
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

namespace zi {

// ---- tiled decode -----------------------------------------------------------------------------
//
// The head runs whole; the rest runs tile by tile. A tile decodes its rectangle of the latent
// (its "interior") plus a margin ("halo") wide enough that the zero padding at a cut never
// reaches the interior, and keeps only the interior. What a tile cannot see are the GroupNorm
// statistics of the whole image, so they are gathered first, one norm at a time in forward
// order: pass k runs every tile up to norm k (normalising the norms before it with the
// statistics already gathered) and merges the moments of norm k's input over the tile's
// interior; interiors partition the image, so the merged moments are the whole image's. Each
// norm's input depends on the previous norm's statistics, so no two norms can share a pass.
// A last pass decodes the output.
//
// Pass k recomputes everything before norm k, so its cost grows along the decoder. The tiled
// part is therefore cut into segments at "checkpoints": the output of an up block's resnets,
// kept whole once its segment's passes are done (the head's output is the first). A later
// segment's passes start there instead of at the head's output, and need a margin only for
// their own layers (3 latent pixels from up_blocks.1 on instead of 7). A checkpoint costs memory
// that grows with the image (up_blocks.1's: 4× the head's output), the smaller margins save
// some on every tile: choose_checkpoints keeps the plan with the lowest estimated peak.

namespace {

using namespace vae_detail;

// The tiled decode's NormHook for one tile of one pass. The tile's region is rows × cols input
// pixels of its segment, of which [iy0, iy1) × [ix0, ix1) are its interior.
struct TileNorms final : NormHook {
  int groups = 0;
  const std::vector<vae_tiled::GroupStats>* stats = nullptr;  // of the norms before `stop`
  int stop = -1;                                               // norm to gather (-1: none)
  std::vector<vae_tiled::GroupMoments>* acc = nullptr;         // where norm `stop`'s moments go
  int64_t rows = 0, cols = 0, iy0 = 0, iy1 = 0, ix0 = 0, ix1 = 0;
  int next = 0;

  bool apply(Tensor& x, const Tensor& weight, const Tensor& bias) override {
    const int k = next++;
    if (k == stop) {
      const int64_t s = x.dim(1) / rows;  // this norm's pixels per input pixel
      ZI_CHECK(x.dim(1) == s * rows && x.dim(2) == s * cols, "[vae_decode_tiled] tile ", x.desc(),
               " is not a multiple of its region ", rows, "x", cols);
      vae_tiled::accumulate_group_moments(x, groups, iy0 * s, iy1 * s, ix0 * s, ix1 * s, *acc);
      return false;
    }
    vae_tiled::group_norm_given_(x, groups, (*stats)[size_t(k)], weight, bias);
    return true;
  }
};

// Runs segment [from, to) tile by tile on its input x [C, H, W] (a checkpoint): one pass per norm,
// then the output pass, which returns the segment's whole output. ys, xs: the interiors in
// latent pixels.
Tensor run_segment(const VaeDecoder& m, const Tensor& x, size_t from, size_t to, const std::vector<Span>& ys_lat,
                   const std::vector<Span>& xs_lat) {
  const int groups = m.cfg.norm_num_groups;
  const SegmentLayout lay = segment_layout(m.cfg, from, to);
  const size_t K = lay.norms();
  const int64_t H = x.dim(1), W = x.dim(2), in_scale = int64_t(1) << from;  // input pixels per latent pixel
  std::vector<Span> ys, xs;
  for (const Span& s : ys_lat) ys.push_back(scaled(s, in_scale));
  for (const Span& s : xs_lat) xs.push_back(scaled(s, in_scale));

  // Runs the segment on tile (i, j) with a margin of `halo`; the hook's region is filled in here.
  auto run_tile = [&](size_t i, size_t j, int64_t halo, TileNorms& hook, Span& ry, Span& rx) {
    ry = widen(ys[i], halo, H);
    rx = widen(xs[j], halo, W);
    hook.groups = groups;
    hook.rows = ry.end - ry.begin;
    hook.cols = rx.end - rx.begin;
    hook.iy0 = ys[i].begin - ry.begin;
    hook.iy1 = ys[i].end - ry.begin;
    hook.ix0 = xs[j].begin - rx.begin;
    hook.ix1 = xs[j].end - rx.begin;
    // clone, not contiguous: the segment may normalise its input in place, and x must survive.
    Tensor xt = x.slice(1, ry.begin, ry.end).slice(2, rx.begin, rx.end).clone();
    return segment_forward(m, std::move(xt), from, to, &hook);
  };

  std::vector<vae_tiled::GroupStats> stats;
  for (size_t k = 0; k < K; ++k) {
    std::vector<vae_tiled::GroupMoments> acc(static_cast<size_t>(groups));
    for (size_t i = 0; i < ys.size(); ++i)
      for (size_t j = 0; j < xs.size(); ++j) {
        TileNorms hook;
        hook.stats = &stats;
        hook.stop = int(k);
        hook.acc = &acc;
        Span ry, rx;
        Tensor none = run_tile(i, j, lay.halo(k), hook, ry, rx);
        ZI_CHECK(!none.defined() && hook.next == int(k) + 1, "[vae_decode_tiled] pass ", k, " did not stop at its norm");
      }
    stats.push_back(vae_tiled::finish_group_stats(acc, kNormEps));
  }

  const int64_t f = lay.scale, C = to < m.up_blocks.size() ? m.up_blocks[to].resnets.back().conv2_w.dim(0)
                                                            : m.cfg.out_channels;
  const int64_t HO = H * f, WO = W * f;
  Tensor out;  // on the tiles' device, in their dtype
  for (size_t i = 0; i < ys.size(); ++i)
    for (size_t j = 0; j < xs.size(); ++j) {
      TileNorms hook;
      hook.stats = &stats;
      Span ry, rx;
      Tensor t = run_tile(i, j, lay.halo(K), hook, ry, rx);  // [C, rows·f, cols·f]
      ZI_CHECK(t.defined() && t.dim(0) == C && hook.next == int(K), "[vae_decode_tiled] the output pass met ",
               hook.next, " norms, expected ", K);
      if (!out.defined()) out = Tensor::empty({C, HO, WO}, t.dtype(), Tag::Activations, t.device());
      const int64_t oy = ry.begin * f, ox = rx.begin * f;  // the tile's origin
      const int64_t y0 = ys[i].begin * f, y1 = ys[i].end * f, x0 = xs[j].begin * f, x1 = xs[j].end * f;
      ops::paste_(out, t.slice(1, y0 - oy, y1 - oy).slice(2, x0 - ox, x1 - ox), y0, x0);  // its interior
    }
  return out;
}

}  // namespace

using namespace vae_detail;

Tensor vae_decode_tiled_with(const VaeDecoder& m, const Tensor& z, int tile, const std::vector<int>& checkpoints) {
  check_latent(m, z, "vae_decode_tiled");
  ZI_CHECK(tile >= 1, "[vae_decode_tiled] tile must be >= 1 latent pixel, got ", tile);
  const size_t n = m.up_blocks.size();
  ZI_CHECK(!checkpoints.empty() && checkpoints.front() == 0, "[vae_decode_tiled] the first checkpoint must be 0");
  for (size_t i = 1; i < checkpoints.size(); ++i)
    ZI_CHECK(checkpoints[i] > checkpoints[i - 1] && size_t(checkpoints[i]) + 1 < n, "[vae_decode_tiled] checkpoints ",
             "must ascend and stay below the last up block (", n - 1, ")");
  const int64_t h = z.dim(1), w = z.dim(2);
  if (tile >= h && tile >= w) return vae_decode(m, z);
  const std::vector<Span> ys = tile_spans(h, tile), xs = tile_spans(w, tile);
  Tensor x = head_forward(m, z);  // [C0, h, w]
  for (size_t s = 0; s < checkpoints.size(); ++s) {
    const size_t from = size_t(checkpoints[s]), to = s + 1 < checkpoints.size() ? size_t(checkpoints[s + 1]) : n;
    x = run_segment(m, x, from, to, ys, xs);  // the next checkpoint (the previous one is freed), or the image
  }
  return ops::to_host_f32(x);  // [out_channels, 8h, 8w], like vae_decode
}


}  // namespace zi
