// The memory plan (memory_plan.h): peak estimates and the choices made from them.
#include "pipeline/memory_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "core/check.h"
#include "core/dtype.h"
#include "core/parallel.h"
#include "io/weight_loader.h"
#include "models/qwen3_encoder.h"
#include "models/vae_internal.h"

namespace zi {

int64_t denoise_tokens_bound(int width, int height, int caption_len) {
  return int64_t(width / 16) * int64_t(height / 16) + 32 + caption_len + 32;
}

int64_t estimate_denoise_activation_bytes(int64_t dim, int64_t ffn_hidden, int width, int height, int caption_len,
                                          int elem_bytes) {
  const int64_t tokens = denoise_tokens_bound(width, height, caption_len);
  // Attention's peak (models/zimage_dit.cpp self_attention): the residual stream, the fused q/k/v
  // projection [S, 3·dim] and q, k, v split from it = 7 × [S, dim] (8 counted: the normed input
  // and the modulation/RoPE tables besides). FFN: the fused w1/w3 output [S, 2·ffn] and the
  // SwiGLU result [S, ffn] = 3 × [S, ffn] (as with separate w1/w3: gate, up, and their product).
  return int64_t(elem_bytes) * tokens * (8 * dim + 3 * ffn_hidden);
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

// ops::conv2d on x [cin, H, W] with a k×k kernel, stride 1 (output of the same H, W: every conv of
// the decoder): the kernel and bias widened to f32, plus im2col column buffers for one block of
// output rows per thread (at most 8 MB a thread unless a single row is larger); a 1×1 conv
// multiplies x as it lies. A strided conv (the VAE encoder's downsample, which no estimate here
// covers) has Ho < H and Wo < W, so its output and column rows are smaller than this counts.
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

int64_t vae_encode_peak_bytes(const VaeConfig& cfg, int height, int width) {
  const int64_t T = std::max(1, num_threads());
  const std::vector<int>& ch = cfg.block_out_channels;
  int64_t H = height, W = width, c = ch.front();
  PeakSim s;
  s.alloc(int64_t(cfg.in_channels) * H * W * kF32);  // the image where the encoder computes
  sim_conv(s, cfg.in_channels, c, 3, H, W, T);      // conv_in
  s.free(int64_t(cfg.in_channels) * H * W * kF32);
  for (size_t i = 0; i < ch.size(); ++i) {
    for (int j = 0; j < cfg.layers_per_block; ++j) {
      sim_resnet(s, c, ch[i], H, W, T, false);
      c = ch[i];
    }
    if (i + 1 < ch.size()) {  // downsample: pad (0, 1, 0, 1), then a 3×3 conv of stride 2
      s.alloc(c * (H + 1) * (W + 1) * kF32);
      s.free(c * H * W * kF32);
      sim_conv(s, c, c, 3, H / 2, W / 2, T);
      s.free(c * (H + 1) * (W + 1) * kF32);
      H /= 2;
      W /= 2;
    }
  }
  sim_resnet(s, c, c, H, W, T, false);
  if (cfg.mid_block_add_attention) sim_attention(s, c, H, W, T);
  sim_resnet(s, c, c, H, W, T, false);
  sim_group_norm(s, c, false);
  const int64_t L2 = 2 * int64_t(cfg.latent_channels);
  sim_conv(s, c, L2, 3, H, W, T);  // conv_out
  s.free(c * H * W * kF32);
  if (cfg.use_quant_conv) sim_conv(s, L2, L2, 1, H, W, T);
  return s.peak;
}

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

// ---- the --vram budget planner -----------------------------------------------------------------

int ComponentPlan::streamed_blocks() const {
  return int(std::count(resident.begin(), resident.end(), false));
}

namespace {

// A matrix of `rows × cols` in `wdt` (block formats included), and f32 vectors.
int64_t mat_bytes(int64_t rows, int64_t cols, DType wdt) { return int64_t(dtype_bytes(wdt, rows * cols)); }
int64_t f32_bytes(int64_t n) { return 4 * n; }

int64_t dit_block_bytes(const DitConfig& cfg, DType wdt, bool modulated) {
  const int64_t D = cfg.dim, hd = cfg.head_dim(), kv = int64_t(cfg.n_kv_heads) * hd, F = cfg.ffn_hidden();
  const int64_t A = std::min(cfg.dim, 256);
  int64_t b = mat_bytes(D, D, wdt) + 2 * mat_bytes(kv, D, wdt) + mat_bytes(D, D, wdt);  // q, k, v, out
  b += 2 * mat_bytes(F, D, wdt) + mat_bytes(D, F, wdt);                                  // w1, w3, w2
  b += f32_bytes(2 * hd + 4 * D);                                                        // norms
  if (modulated) b += mat_bytes(4 * D, A, wdt) + f32_bytes(4 * D);                       // adaLN
  return b;
}

double gib(int64_t b) { return double(b) / double(int64_t(1) << 30); }

// GiB with two decimals; below 0.1 GiB in MiB (a tiny model's budgets would all read 0.00 GiB).
std::string gib_str(int64_t b) {
  char buf[32];
  if (b < (int64_t(1) << 30) / 10) std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / double(1 << 20));
  else std::snprintf(buf, sizeof buf, "%.2f GiB", gib(b));
  return buf;
}

// Marks `k` of the n blocks resident, the streamed ones spread evenly between them, so each
// streamed block's copy overlaps the compute of the resident blocks before it.
std::vector<bool> spread_resident(size_t n, size_t k) {
  std::vector<bool> r(n, true);
  const size_t s = n - k;
  for (size_t i = 0; i < n; ++i)
    if ((i + 1) * s / n > i * s / n) r[i] = false;
  return r;
}

// The component's plan under `budget` (-1: everything resident). Throws nothing: the caller
// compares minimum_bytes with the budget.
ComponentPlan plan_component(const StreamableComponent& c, int64_t budget, double rate) {
  ComponentPlan p;
  p.name = c.name;
  const size_t n = c.block_bytes.size();
  p.resident.assign(n, true);
  int64_t blocks = 0, largest = 0;
  for (int64_t b : c.block_bytes) {
    blocks += b;
    largest = std::max(largest, b);
  }
  const int64_t whole = c.fixed_bytes + blocks + c.activation_bytes;
  p.minimum_bytes = n >= 2 ? c.fixed_bytes + c.activation_bytes + 2 * largest : whole;
  p.resident_bytes = c.fixed_bytes + blocks;
  p.predicted_peak_bytes = whole;
  if (budget < 0 || whole <= budget || n < 2) return p;
  // Streaming: a ring of 3 slots (two blocks in flight while one computes) when it leaves room
  // for at least as much as a slot of resident blocks, else 2.
  const int64_t room3 = budget - c.fixed_bytes - c.activation_bytes - 3 * largest;
  p.ring_slots = room3 >= largest ? 3 : 2;
  p.prefetch = p.ring_slots - 1;
  p.slot_bytes = largest;
  const int64_t room = std::max<int64_t>(0, budget - c.fixed_bytes - c.activation_bytes - p.ring_slots * largest);
  // The most blocks that fit, spread evenly.
  for (size_t k = n - 1;; --k) {
    std::vector<bool> r = spread_resident(n, k);
    int64_t kept = 0;
    for (size_t i = 0; i < n; ++i)
      if (r[i]) kept += c.block_bytes[i];
    if (kept <= room || k == 0) {
      p.resident = r;
      break;
    }
  }
  p.resident_bytes = c.fixed_bytes;
  p.streamed_bytes_per_pass = 0;
  for (size_t i = 0; i < n; ++i) (p.resident[i] ? p.resident_bytes : p.streamed_bytes_per_pass) += c.block_bytes[i];
  p.host_pinned_bytes = p.streamed_bytes_per_pass;
  p.streamed_bytes_phase = p.streamed_bytes_per_pass * std::max<int64_t>(1, c.passes);
  p.predicted_peak_bytes = p.resident_bytes + p.ring_slots * p.slot_bytes + c.activation_bytes;
  if (rate > 0) p.predicted_copy_seconds_per_pass = double(p.streamed_bytes_per_pass) / rate;
  return p;
}

// The decode under `budget` (-1: as --vae-tile says, so 0 here): tile and peak.
void plan_vae(const VramPlanInput& in, int64_t budget, VramPlan& p) {
  p.vae_tile = 0;
  if (!in.vae_on_device || in.latent_h <= 0 || in.latent_w <= 0) return;
  const int64_t whole = in.vae_weight_bytes + vae_decode_peak_bytes(in.vae, in.latent_h, in.latent_w);
  p.vae_peak_bytes = whole;
  if (budget < 0 || whole <= budget) return;
  const int t = vae_pick_tile(in.vae, in.latent_h, in.latent_w, budget - in.vae_weight_bytes);
  p.vae_tile = t >= in.latent_h && t >= in.latent_w ? 0 : t;
  p.vae_peak_bytes = in.vae_weight_bytes + vae_decode_tiled_peak_bytes(in.vae, in.latent_h, in.latent_w, t);
}

int64_t vae_encode_bytes(const VramPlanInput& in) {
  if (!in.vae_on_device || in.encode_width <= 0 || in.encode_height <= 0) return 0;
  return in.vae_encoder_weight_bytes + vae_encode_peak_bytes(in.vae, in.encode_height, in.encode_width);
}

int64_t vae_minimum_bytes(const VramPlanInput& in) {
  if (!in.vae_on_device || in.latent_h <= 0 || in.latent_w <= 0) return 0;
  return in.vae_weight_bytes + vae_decode_tiled_peak_bytes(in.vae, in.latent_h, in.latent_w, 16);
}

}  // namespace

int64_t vram_auto_margin(int64_t free_bytes) {
  return std::max<int64_t>(int64_t(256) << 20, free_bytes / 20);
}

std::vector<int64_t> dit_block_weight_bytes(const DitConfig& cfg, DType wdt) {
  std::vector<int64_t> v;
  for (int i = 0; i < cfg.n_refiner_layers; ++i) v.push_back(dit_block_bytes(cfg, wdt, true));   // noise_refiner
  for (int i = 0; i < cfg.n_refiner_layers; ++i) v.push_back(dit_block_bytes(cfg, wdt, false));  // context_refiner
  for (int i = 0; i < cfg.n_layers; ++i) v.push_back(dit_block_bytes(cfg, wdt, true));
  return v;
}

int64_t dit_fixed_weight_bytes(const DitConfig& cfg, DType wdt) {
  const int64_t D = cfg.dim, A = std::min(cfg.dim, 256), Cf = cfg.cap_feat_dim;
  const int64_t P = int64_t(cfg.patch_size) * cfg.patch_size * cfg.f_patch_size * cfg.in_channels;
  return mat_bytes(D, P, wdt) + f32_bytes(D)                            // x_embedder
         + mat_bytes(1024, 256, wdt) + f32_bytes(1024)                  // t_embedder.mlp.0
         + mat_bytes(A, 1024, wdt) + f32_bytes(A)                       // t_embedder.mlp.2
         + f32_bytes(Cf) + mat_bytes(D, Cf, wdt) + f32_bytes(D)         // cap_embedder
         + f32_bytes(2 * D)                                             // pad tokens
         + mat_bytes(D, A, wdt) + f32_bytes(D) + mat_bytes(P, D, wdt) + f32_bytes(P);  // final layer
}

std::vector<int64_t> qwen3_block_weight_bytes(const Qwen3Config& cfg, DType wdt) {
  const int64_t H = cfg.hidden_size, q = int64_t(cfg.num_attention_heads) * cfg.head_dim,
                kv = int64_t(cfg.num_key_value_heads) * cfg.head_dim, I = cfg.intermediate_size;
  const int64_t b = mat_bytes(q, H, wdt) + 2 * mat_bytes(kv, H, wdt) + mat_bytes(H, q, wdt) +
                    3 * mat_bytes(I, H, wdt) + f32_bytes(2 * H + 2 * cfg.head_dim);
  return std::vector<int64_t>(size_t(std::max(0, cfg.num_hidden_layers - 1)), b);
}

int64_t estimate_text_activation_bytes(const Qwen3Config& cfg, int tokens) {
  const int64_t S = tokens;
  return 4 * S * (6 * int64_t(cfg.hidden_size) + 3 * int64_t(cfg.intermediate_size)) +
         4 * int64_t(cfg.num_attention_heads) * S * S;
}

int64_t qwen3_warm_up_bytes(const Qwen3Config& cfg, int tokens) {
  int64_t most = 0;
  for (const auto& [N, K] : qwen3_linear_shapes(cfg)) most = std::max(most, 4 * (int64_t(tokens) * K + N * K + int64_t(tokens) * N));
  return most;
}

VramPlan plan_vram(const VramPlanInput& in) {
  VramPlan p;
  p.h2d_bytes_per_second = in.h2d_bytes_per_second;
  p.vae_weight_bytes = in.vae_on_device ? in.vae_weight_bytes : 0;
  const StreamableComponent* comps[2] = {&in.text, &in.dit};
  // The least budget this image size can run under, and what everything resident needs.
  const int64_t encode = vae_encode_bytes(in);
  int64_t minimum = vae_minimum_bytes(in), resident_need = encode;
  for (const StreamableComponent* c : comps) {
    const ComponentPlan whole = plan_component(*c, -1, 0);
    minimum = std::max(minimum, whole.minimum_bytes);
    resident_need = std::max(resident_need, whole.predicted_peak_bytes);
  }
  const bool encoder_bound = encode > minimum;  // the VAE encoder (untiled) sets the minimum
  minimum = std::max(minimum, encode);
  p.vae_encode_peak_bytes = encode;
  p.minimum_bytes = minimum;
  const std::string size = str_cat(in.width, "x", in.height);
  int64_t budget = in.budget_bytes;
  if (budget >= 0) {
    if (in.card_bytes > 0 && budget > in.card_bytes) {
      p.clamped = true;
      p.notices.push_back(str_cat("--vram ", gib_str(budget), " is more than the card's ", gib_str(in.card_bytes),
                                  ": using ", gib_str(in.card_bytes)));
      budget = in.card_bytes;
    }
    if (budget < minimum)
      throw UsageError(str_cat("--vram ", gib_str(budget), " is below the minimum of ", gib_str(minimum), " for ", size,
                               encoder_bound ? " (the VAE encoder on the input image: it runs untiled)"
                                             : " (the largest phase with two blocks streaming and the smallest VAE tile)"));
  } else if (in.free_bytes > 0 && std::max(resident_need, vae_minimum_bytes(in)) > in.free_bytes) {
    budget = in.free_bytes - vram_auto_margin(in.free_bytes);
    p.automatic = true;
    if (budget < minimum)
      throw UsageError(str_cat("the model needs ", gib_str(resident_need), " of device memory at ", size, ", ",
                               gib_str(in.free_bytes), " is free, and streaming needs at least ", gib_str(minimum),
                               " (--vram; free memory less a margin of ", gib_str(vram_auto_margin(in.free_bytes)), ")"));
    p.notices.push_back(str_cat("the model does not fit the ", gib_str(in.free_bytes),
                                " of free device memory: streaming under a budget of ", gib_str(budget),
                                " (free memory less a margin; set it with --vram)"));
  }
  p.budget_bytes = budget;
  p.text = plan_component(in.text, budget, in.h2d_bytes_per_second);
  p.dit = plan_component(in.dit, budget, in.h2d_bytes_per_second);
  plan_vae(in, budget, p);
  return p;
}

void set_streamed_blocks(WeightLoader& loader, const ComponentPlan* plan) {
  if (!plan || plan->ring_slots == 0 || loader.device() == Device::CPU) return;
  std::vector<bool> streamed;
  for (bool r : plan->resident) streamed.push_back(!r);
  loader.set_streamed_blocks(std::move(streamed), plan->ring_slots);
}

VaeWarmUpSize plan_vae_warm_up(const VaeConfig& cfg, int64_t weight_bytes, int h, int w, int64_t room, bool smaller) {
  for (int hh = h, ww = w; hh >= 16 && ww >= 16; hh /= 2, ww /= 2) {
    const int64_t bytes = weight_bytes + vae_decode_peak_bytes(cfg, hh, ww);
    if (bytes <= room) return {hh, ww, bytes};
    if (!smaller) break;
  }
  return {};
}

std::string format_vram_plan(const VramPlan& p) {
  auto mib = [](int64_t b) { return double(b) / (1 << 20); };
  std::string s;
  char buf[512];
  if (p.budget_bytes < 0) {
    s += "plan        no device budget: every weight resident\n";
  } else {
    std::snprintf(buf, sizeof buf, "plan        budget %.1f MiB%s (minimum for this size %.1f MiB)\n", mib(p.budget_bytes),
                  p.clamped ? " (clamped to the card)" : p.automatic ? " (from free memory)" : "", mib(p.minimum_bytes));
    s += buf;
  }
  for (const ComponentPlan* c : {&p.text, &p.dit}) {
    if (c->resident.empty()) continue;
    std::snprintf(buf, sizeof buf,
                  "  %-12s resident %.1f MiB, %d of %zu blocks streamed (ring %d x %.1f MiB, prefetch %d), "
                  "streamed %.1f MiB/pass, host pinned %.1f MiB, predicted peak %.1f MiB",
                  c->name.c_str(), mib(c->resident_bytes), c->streamed_blocks(), c->resident.size(), c->ring_slots,
                  mib(c->slot_bytes), c->prefetch, mib(c->streamed_bytes_per_pass), mib(c->host_pinned_bytes),
                  mib(c->predicted_peak_bytes));
    s += buf;
    if (c == &p.text && p.vae_warm_up())
      s += str_cat(" (the VAE's warm-up included, ", p.vae_warm_up_w * 8, "x", p.vae_warm_up_h * 8, ")");
    if (c->ring_slots > 0 && p.h2d_bytes_per_second > 0) {
      std::snprintf(buf, sizeof buf, ", copy floor %.3f s/pass at %.1f GB/s", c->predicted_copy_seconds_per_pass,
                    p.h2d_bytes_per_second / 1e9);
      s += buf;
    }
    s += "\n";
  }
  if (p.vae_encode_peak_bytes > 0) {
    std::snprintf(buf, sizeof buf, "  %-12s untiled, predicted peak %.1f MiB\n", "vae encoder", mib(p.vae_encode_peak_bytes));
    s += buf;
  }
  if (p.vae_peak_bytes > 0) {
    std::snprintf(buf, sizeof buf, "  %-12s %s, predicted peak %.1f MiB\n", "vae",
                  p.vae_tile ? str_cat("tile ", p.vae_tile * 8, " px").c_str() : "untiled", mib(p.vae_peak_bytes));
    s += buf;
  }
  return s;
}

}  // namespace zi
