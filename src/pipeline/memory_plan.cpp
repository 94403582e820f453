// The memory plan (memory_plan.h): peak estimates and the choices made from them.
#include "pipeline/memory_plan.h"

#include <algorithm>
#include <cstdint>

#include "core/check.h"
#include "core/parallel.h"
#include "models/vae_internal.h"

namespace zi {

int64_t estimate_denoise_activation_bytes(int64_t dim, int64_t ffn_hidden, int width, int height,
                                          int caption_len) {
  const int64_t tokens = int64_t(width / 16) * int64_t(height / 16) + 32 + caption_len + 32;
  // Residual stream, normed copy, q, k, v, attention output: ~6 × [S, dim]; FFN: 3 × [S, ffn].
  return 4 * tokens * (8 * dim + 3 * ffn_hidden);
}

// ---- the VAE decode ----------------------------------------------------------------------------

namespace {

using namespace vae_detail;

// Replays the decode's allocations and frees (same order as the code above) on byte counts, and
// counts the convolutions' multiply-adds. `stop`: the norm of a segment at which a gathering
// pass stops (-1: none); nothing after it counts (the forward only frees from there on).
struct PeakSim {
  int64_t live = 0, peak = 0;
  double macs = 0;
  int stop = -1, norms = 0;
  bool stopped = false;
  void alloc(int64_t b) {
    if (stopped) return;
    live += b;
    peak = std::max(peak, live);
  }
  void free(int64_t b) {
    if (!stopped) live -= b;
  }
  // An op: its output stays, its workspace lives only during the op.
  void op(int64_t out, int64_t workspace) {
    alloc(out);
    alloc(workspace);
    free(workspace);
  }
};

constexpr int64_t kF32 = 4;

// The workspaces below mirror the CPU backend (backends/cpu/*.cpp) with `T` threads; the test
// PeakEstimateBoundsTheMeasuredPeak fails if they drift from it.

// ops::conv2d on x [cin, H, W] with a k×k kernel (output of the same H, W): the kernel and bias
// widened to f32, plus im2col column buffers for one block of output rows per thread (at most
// 8 MB a thread unless a single row is larger); a 1×1 conv multiplies x as it lies.
int64_t conv_workspace(int64_t cin, int64_t cout, int64_t k, int64_t H, int64_t W, int64_t T) {
  const int64_t widened = (cout * cin * k * k + cout) * kF32;
  if (k == 1) return widened;
  constexpr int64_t kColBytesPerThread = int64_t(8) << 20;  // backends/cpu/conv.cpp
  const int64_t ckk = cin * k * k, row_bytes = ckk * W * kF32;
  const int64_t max_rows = std::max<int64_t>(1, kColBytesPerThread / row_bytes);
  int64_t blocks = std::max<int64_t>((H + max_rows - 1) / max_rows, 16);  // not T: see conv_im2col
  blocks = std::min(blocks, H);
  const int64_t rows = (H + blocks - 1) / blocks;
  blocks = (H + rows - 1) / rows;
  return widened + std::min(T, blocks) * rows * row_bytes;
}

void sim_conv(PeakSim& s, int64_t cin, int64_t cout, int64_t k, int64_t H, int64_t W, int64_t T) {
  if (!s.stopped) s.macs += double(cin * cout * k * k) * double(H * W);
  s.op(cout * H * W * kF32, conv_workspace(cin, cout, k, H, W, T));
}

// group_norm_ widens its weight and bias; it works in place otherwise. (The tiled decode's
// group_norm_given_ widens into unaccounted vectors: counting it too keeps a bound.) In a
// segment a norm may be where a gathering pass stops.
void sim_group_norm(PeakSim& s, int64_t C, bool in_segment) {
  if (in_segment && s.norms++ == s.stop) s.stopped = true;
  s.op(0, 2 * C * kF32);
}

// resnet_forward: on entry the input x is held, on return only the output is.
void sim_resnet(PeakSim& s, int64_t in, int64_t out, int64_t H, int64_t W, int64_t T, bool in_segment) {
  const int64_t P = H * W * kF32;
  if (in != out) {
    sim_conv(s, in, out, 1, H, W, T);  // skip; x becomes h
  } else {
    s.alloc(in * P);  // h = copy of x, x is the skip
  }
  sim_group_norm(s, in, in_segment);
  sim_conv(s, in, out, 3, H, W, T);  // c1
  s.free(in * P);                    // h
  sim_group_norm(s, out, in_segment);
  sim_conv(s, out, out, 3, H, W, T);  // c2
  s.free(out * P);                    // c1
  s.free(out * P);                    // skip
}

// attention_forward on x [C, H, W] (held throughout).
void sim_attention(PeakSim& s, int64_t C, int64_t H, int64_t W, int64_t T) {
  const int64_t S = H * W, A = C * S * kF32;
  const int64_t lin_ws = (T * C * C + C) * kF32;  // per-thread widened weight panels + bias
  s.alloc(A);  // n
  sim_group_norm(s, C, false);
  s.alloc(A);  // t
  s.free(A);   // n
  for (int i = 0; i < 3; ++i) s.op(A, lin_ws);  // q, k, v
  s.free(A);                                    // t
  const int64_t threads = std::min(T, (S + 63) / 64);
  s.op(A, threads * 64 * S * kF32);  // attention output + one [64, S] score block per thread
  s.free(3 * A);                     // q, k, v
  s.op(A, lin_ws);                   // to_out
  s.free(A);                         // attention output
  s.alloc(A);                        // transposed back to [C, S]
  s.free(2 * A);
}

// head_forward on an [L, h, w] latent; on return its output [C0, h, w] is held.
void sim_head(PeakSim& s, const VaeConfig& cfg, int64_t H, int64_t W, int64_t T) {
  const std::vector<int> ch = up_channels(cfg);
  const int64_t L = cfg.latent_channels, c = ch.front();
  if (cfg.use_post_quant_conv) {
    sim_conv(s, L, L, 1, H, W, T);  // zq
    sim_conv(s, L, c, 3, H, W, T);  // conv_in
    s.free(L * H * W * kF32);
  } else {
    sim_conv(s, L, c, 3, H, W, T);  // conv_in
  }
  sim_resnet(s, c, c, H, W, T, false);
  if (cfg.mid_block_add_attention) sim_attention(s, c, H, W, T);
  sim_resnet(s, c, c, H, W, T, false);
  for (int j = 0; j <= cfg.layers_per_block; ++j) sim_resnet(s, c, ch[0], H, W, T, false);  // ch[0] == c
}

// segment_forward on its input [ch[from], H, W] (held on entry); on return its output is held.
void sim_segment(PeakSim& s, const VaeConfig& cfg, size_t from, size_t to, int64_t H, int64_t W, int64_t T) {
  const std::vector<int> ch = up_channels(cfg);
  const size_t n = ch.size();
  int64_t c = ch[from];
  for (size_t i = from; i <= std::min(to, n - 1); ++i) {
    if (i > from) {
      for (int j = 0; j <= cfg.layers_per_block; ++j) {
        sim_resnet(s, c, ch[i], H, W, T, true);
        c = ch[i];
      }
    }
    if (i < to && i + 1 < n) {
      s.alloc(c * 4 * H * W * kF32);  // upsampled
      s.free(c * H * W * kF32);       // x
      H *= 2;
      W *= 2;
      sim_conv(s, c, c, 3, H, W, T);
      s.free(c * H * W * kF32);  // upsampled
    }
  }
  if (to < n) return;
  sim_group_norm(s, c, true);
  sim_conv(s, c, cfg.out_channels, 3, H, W, T);  // conv_out
}

// One tile of one pass over segment [from, to): `held` (checkpoints, output) + the tile's input
// (cloned from the checkpoint) + the segment up to the pass's stop.
PeakSim sim_tile_pass(const VaeConfig& cfg, size_t from, size_t to, int64_t rows, int64_t cols, int stop,
                      int64_t held, int64_t T) {
  PeakSim s;
  s.live = s.peak = held;
  s.stop = stop;
  s.alloc(int64_t(up_channels(cfg)[from]) * rows * cols * kF32);  // the tile's input
  sim_segment(s, cfg, from, to, rows, cols, T);
  return s;
}

struct PlanEstimate {
  int64_t peak = 0;  // bytes
  double macs = 0;   // the convolutions' multiply-adds, margins and repeated passes included
};

// The estimate of a tiled decode of an [L, h, w] latent with `tile` and checkpoints `cps`,
// replaying vae_decode_tiled and run_segment.
PlanEstimate estimate_plan(const VaeConfig& cfg, int64_t h, int64_t w, int64_t tile, const Checkpoints& cps) {
  const int64_t T = std::max(1, num_threads());
  const std::vector<int> ch = up_channels(cfg);
  const size_t n = ch.size();
  PeakSim head;
  sim_head(head, cfg, h, w, T);
  PlanEstimate e{head.peak, head.macs};
  int64_t held = head.live;  // the current checkpoint
  const std::vector<Span> ys_lat = tile_spans(h, tile), xs_lat = tile_spans(w, tile);
  for (size_t si = 0; si < cps.size(); ++si) {
    const size_t from = cps[si], to = si + 1 < cps.size() ? cps[si + 1] : n;
    const SegmentLayout lay = segment_layout(cfg, from, to);
    const int64_t in = int64_t(1) << from, H = h * in, W = w * in;
    const int64_t out_bytes = (to < n ? ch[to] : cfg.out_channels) * H * lay.scale * W * lay.scale * kF32;
    for (size_t k = 0; k <= lay.norms(); ++k) {
      const bool last = k == lay.norms();
      // The tile sizes of this pass and how many tiles have each.
      auto sizes = [&](const std::vector<Span>& spans, int64_t len) {
        std::vector<std::pair<int64_t, int>> v;
        for (const Span& s : spans) {
          const Span r = widen(scaled(s, in), lay.halo(k), len);
          auto it = std::find_if(v.begin(), v.end(), [&](const auto& p) { return p.first == r.end - r.begin; });
          if (it == v.end()) v.push_back({r.end - r.begin, 1});
          else ++it->second;
        }
        return v;
      };
      for (const auto& [r, nr] : sizes(ys_lat, H))
        for (const auto& [c, nc] : sizes(xs_lat, W)) {
          const PeakSim s = sim_tile_pass(cfg, from, to, r, c, last ? -1 : int(k), held + (last ? out_bytes : 0), T);
          e.peak = std::max(e.peak, s.peak);
          e.macs += s.macs * nr * nc;
        }
    }
    held = out_bytes;  // the next checkpoint replaces this one
  }
  return e;
}

// Every plan: checkpoint 0 and any subset of 1 … n − 2 (a checkpoint at the last block would be
// the full-resolution activation).
std::vector<Checkpoints> all_plans(const VaeConfig& cfg) {
  const size_t n = cfg.block_out_channels.size(), extra = n >= 2 ? n - 2 : 0;
  std::vector<Checkpoints> plans;
  for (uint32_t mask = 0; mask < (1u << extra); ++mask) {
    Checkpoints c = {0};
    for (size_t b = 1; b <= extra; ++b)
      if (mask >> (b - 1) & 1) c.push_back(b);
    plans.push_back(c);
  }
  return plans;
}

// How much more than the lowest-peak plan's peak a faster plan may hold. A checkpoint halves
// the compute or better (bench_vae, vae_tile_plans) and often costs nothing: the smaller margins
// after it save about what it holds, and at 2048² the whole mid attention outweighs both.
constexpr double kPlanPeakSlack = 1.10;

Checkpoints choose_checkpoints(const VaeConfig& cfg, int h, int w, int tile) {
  // Among the plans within kPlanPeakSlack of the lowest peak, the least compute.
  const std::vector<Checkpoints> plans = all_plans(cfg);
  std::vector<PlanEstimate> est;
  int64_t best_peak = INT64_MAX;
  for (const Checkpoints& p : plans) {
    est.push_back(estimate_plan(cfg, h, w, tile, p));
    best_peak = std::min(best_peak, est.back().peak);
  }
  size_t best = 0;
  bool found = false;
  for (size_t i = 0; i < plans.size(); ++i)
    if (double(est[i].peak) <= kPlanPeakSlack * double(best_peak) && (!found || est[i].macs < est[best].macs)) {
      best = i;
      found = true;
    }
  return plans[best];
}

}  // namespace

int64_t vae_decode_peak_bytes(const VaeConfig& cfg, int h, int w) {
  const int64_t T = std::max(1, num_threads());
  PeakSim s;
  sim_head(s, cfg, h, w, T);
  sim_segment(s, cfg, 0, cfg.block_out_channels.size(), h, w, T);
  return s.peak;
}

double vae_decode_macs(const VaeConfig& cfg, int h, int w) {
  PeakSim s;
  sim_head(s, cfg, h, w, 1);
  sim_segment(s, cfg, 0, cfg.block_out_channels.size(), h, w, 1);
  return s.macs;
}

int64_t vae_decode_tiled_peak_bytes(const VaeConfig& cfg, int h, int w, int tile) {
  ZI_CHECK(tile >= 1 && h > 0 && w > 0, "[vae_decode_tiled_peak_bytes] bad size ", h, "x", w, " / tile ", tile);
  if (tile >= h && tile >= w) return vae_decode_peak_bytes(cfg, h, w);
  return estimate_plan(cfg, h, w, tile, choose_checkpoints(cfg, h, w, tile)).peak;
}

int64_t vae_tile_peak_bytes(const VaeConfig& cfg, int tile) {
  ZI_CHECK(tile >= 1, "[vae_tile_peak_bytes] tile must be >= 1, got ", tile);
  const int64_t T = std::max(1, num_threads());
  int64_t peak = 0;
  for (const Checkpoints& cps : all_plans(cfg))
    for (size_t si = 0; si < cps.size(); ++si) {
      const size_t from = cps[si], to = si + 1 < cps.size() ? cps[si + 1] : cfg.block_out_channels.size();
      const SegmentLayout lay = segment_layout(cfg, from, to);
      for (size_t k = 0; k <= lay.norms(); ++k) {
        const int64_t side = (int64_t(tile) << from) + 2 * lay.halo(k);
        peak = std::max(peak, sim_tile_pass(cfg, from, to, side, side, k == lay.norms() ? -1 : int(k), 0, T).peak);
      }
    }
  return peak;
}

namespace {
// Past 512 latent pixels (4096 image pixels) a tile is larger than any image this engine makes.
constexpr int kMaxTile = 512;
}  // namespace

int vae_pick_tile(const VaeConfig& cfg, int64_t budget_bytes) {
  int best = 16;
  for (int t = 16; t <= kMaxTile; t += 8)
    if (vae_tile_peak_bytes(cfg, t) <= budget_bytes) best = t;
  return best;
}

int vae_pick_tile(const VaeConfig& cfg, int h, int w, int64_t budget_bytes) {
  int best = 16;
  for (int t = 16; t <= std::min(kMaxTile, std::max(h, w) + 7); t += 8)
    if (vae_decode_tiled_peak_bytes(cfg, h, w, t) <= budget_bytes) best = t;
  return best;
}

// For tests and benchmarks: the plans vae_decode_tiled weighs, with their estimates.
std::vector<VaeTilePlan> vae_tile_plans(const VaeConfig& cfg, int h, int w, int tile) {
  const Checkpoints chosen = choose_checkpoints(cfg, h, w, tile);
  std::vector<VaeTilePlan> out;
  for (const Checkpoints& p : all_plans(cfg)) {
    const PlanEstimate e = estimate_plan(cfg, h, w, tile, p);
    VaeTilePlan v;
    for (size_t b : p) v.checkpoints.push_back(int(b));
    v.peak_bytes = e.peak;
    v.macs = e.macs;
    v.chosen = p == chosen;
    out.push_back(v);
  }
  return out;
}


// The tiled decode with the plan chosen above.
Tensor vae_decode_tiled(const VaeDecoder& m, const Tensor& z, int tile, int /*overlap: unused*/) {
  vae_detail::check_latent(m, z, "vae_decode_tiled");
  ZI_CHECK(tile >= 1, "[vae_decode_tiled] tile must be >= 1 latent pixel, got ", tile);
  const vae_detail::Checkpoints cps = choose_checkpoints(m.cfg, int(z.dim(1)), int(z.dim(2)), tile);
  return vae_decode_tiled_with(m, z, tile, std::vector<int>(cps.begin(), cps.end()));
}


}  // namespace zi
