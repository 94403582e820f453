// Internals of the VAE decoder shared by its three files: the forward (vae_decoder.cpp), the
// tiled decode (vae_tiled.cpp) and the peak estimates of the memory plan
// (pipeline/memory_plan.cpp), which replays the forward's allocations. Not for other callers.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "models/vae_decoder.h"

namespace zi::vae_detail {

constexpr float kNormEps = 1e-6f;  // every GroupNorm of the decoder (spec §5.2)

// Output channels of each up block: block_out_channels reversed (spec §5.3).
inline std::vector<int> up_channels(const VaeConfig& cfg) {
  return {cfg.block_out_channels.rbegin(), cfg.block_out_channels.rend()};
}

// The up blocks whose outputs a tiled decode keeps whole: 0 (the head's output) and maybe more,
// ascending, each before the last block.
using Checkpoints = std::vector<size_t>;

// Where a GroupNorm gets its statistics. Without a hook (nullptr) each norm computes its own over
// the whole tensor (ops::group_norm_). The tiled decode passes one that applies statistics of
// the whole image gathered beforehand, or gathers them and stops the forward there: apply()
// returns false, and every forward below then returns an undefined tensor at once.
struct NormHook {
  virtual ~NormHook() = default;
  virtual bool apply(Tensor& x, const Tensor& weight, const Tensor& bias) = 0;
};


// The forward's pieces (vae_decoder.cpp), split where the tiled decode splits the decoder.
void check_latent(const VaeDecoder& m, const Tensor& z, const char* fn);
// Everything at latent resolution (conv_in, the mid block, up_blocks.0's resnets): z [L, h, w] → [C0, h, w].
Tensor head_forward(const VaeDecoder& m, const Tensor& z);
// From the output of up_blocks[from]'s resnets to that of up_blocks[to]'s (to < n) or to the
// image (to == n). Undefined when `hook` stopped it.
Tensor segment_forward(const VaeDecoder& m, Tensor x, size_t from, size_t to, NormHook* hook);

// ---- the tiled decode's geometry (vae_tiled.cpp and the memory plan) ----

struct Span {
  int64_t begin, end;  // pixels
};

// Interiors covering [0, len): ceil(len / tile) spans of nearly equal length (<= tile).
inline std::vector<Span> tile_spans(int64_t len, int64_t tile) {
  const int64_t n = (len + tile - 1) / tile;
  std::vector<Span> s;
  for (int64_t i = 0; i < n; ++i) s.push_back({i * len / n, (i + 1) * len / n});
  return s;
}

inline Span scaled(Span s, int64_t f) { return {s.begin * f, s.end * f}; }
inline Span widen(Span s, int64_t halo, int64_t len) { return {std::max<int64_t>(0, s.begin - halo), std::min(len, s.end + halo)}; }

// The margins of a segment, mirroring segment_forward. A 3×3 conv spreads a cut's error by one
// pixel of its resolution, which is `step` output pixels of the segment; nearest upsampling
// keeps it on the same output pixels. reach[k]: the error's width in output pixels at the input
// of the segment's k-th GroupNorm (forward order); reach.back(): at its output. halo(k): the
// same in input pixels, rounded up.
struct SegmentLayout {
  int64_t scale = 1;           // output pixels per input pixel
  std::vector<int64_t> reach;  // number of norms in the segment + 1
  int64_t halo(size_t k) const { return (reach[k] + scale - 1) / scale; }
  size_t norms() const { return reach.size() - 1; }
};

inline SegmentLayout segment_layout(const VaeConfig& cfg, size_t from, size_t to) {
  const size_t n = cfg.block_out_channels.size();
  SegmentLayout t;
  for (size_t i = from; i <= std::min(to, n - 1); ++i)
    if (i < to && i + 1 < n) t.scale *= 2;  // an upsampler (every block but the last has one)
  int64_t step = t.scale, r = 0;            // step: output pixels per pixel of the current resolution
  for (size_t i = from; i <= std::min(to, n - 1); ++i) {
    if (i > from) {
      for (int j = 0; j <= cfg.layers_per_block; ++j) {
        t.reach.push_back(r);  // norm1
        r += step;             // conv1
        t.reach.push_back(r);  // norm2
        r += step;             // conv2 (the 1×1 shortcut does not spread)
      }
    }
    if (i < to && i + 1 < n) {
      step /= 2;
      r += step;  // the upsampler's conv, at the doubled resolution
    }
  }
  if (to == n) {
    t.reach.push_back(r);  // norm_out
    r += step;             // conv_out
  }
  t.reach.push_back(r);
  return t;
}

}  // namespace zi::vae_detail
