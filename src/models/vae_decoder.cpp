// AutoencoderKL decoder: binding table, forward (spec §5.2–5.3), tiled decode and the peak
// estimate the memory plan uses. Memory is the design constraint here: at 1024² the last stage
// holds [128, 1024, 1024] f32 tensors of 512 MB each, so every block takes its input by value
// and drops each activation as soon as its last reader is done.
#include "models/vae_decoder.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/parallel.h"
#include "ops/ops.h"

namespace zi {

namespace {

constexpr float kNormEps = 1e-6f;  // every GroupNorm of the decoder (spec §5.2)

// Output channels of each up block: block_out_channels reversed (spec §5.3).
std::vector<int> up_channels(const VaeConfig& cfg) {
  return {cfg.block_out_channels.rbegin(), cfg.block_out_channels.rend()};
}

// ---- binding ----------------------------------------------------------------------------------

ResnetBlock bind_resnet(const VaeTensorSource& src, const std::string& p, int64_t in, int64_t out) {
  ResnetBlock b;
  b.norm1_w = src(p + "norm1.weight", {in}, false);
  b.norm1_b = src(p + "norm1.bias", {in}, false);
  b.conv1_w = src(p + "conv1.weight", {out, in, 3, 3}, true);
  b.conv1_b = src(p + "conv1.bias", {out}, false);
  b.norm2_w = src(p + "norm2.weight", {out}, false);
  b.norm2_b = src(p + "norm2.bias", {out}, false);
  b.conv2_w = src(p + "conv2.weight", {out, out, 3, 3}, true);
  b.conv2_b = src(p + "conv2.bias", {out}, false);
  if (in != out) {
    b.shortcut_w = src(p + "conv_shortcut.weight", {out, in, 1, 1}, true);
    b.shortcut_b = src(p + "conv_shortcut.bias", {out}, false);
  }
  return b;
}

MidAttention bind_attention(const VaeTensorSource& src, const std::string& p, int64_t c) {
  MidAttention a;
  a.group_norm_w = src(p + "group_norm.weight", {c}, false);
  a.group_norm_b = src(p + "group_norm.bias", {c}, false);
  a.to_q_w = src(p + "to_q.weight", {c, c}, true);
  a.to_q_b = src(p + "to_q.bias", {c}, false);
  a.to_k_w = src(p + "to_k.weight", {c, c}, true);
  a.to_k_b = src(p + "to_k.bias", {c}, false);
  a.to_v_w = src(p + "to_v.weight", {c, c}, true);
  a.to_v_b = src(p + "to_v.bias", {c}, false);
  a.to_out_w = src(p + "to_out.0.weight", {c, c}, true);
  a.to_out_b = src(p + "to_out.0.bias", {c}, false);
  return a;
}

}  // namespace

VaeDecoder bind_vae_decoder(const VaeConfig& cfg, const VaeTensorSource& src) {
  ZI_CHECK(!cfg.block_out_channels.empty() && cfg.layers_per_block >= 0 && cfg.norm_num_groups > 0,
           "[vae] bad config: block_out_channels must be non-empty, layers_per_block >= 0, groups > 0");
  ZI_CHECK(cfg.act_fn == "silu", "[vae] act_fn '", cfg.act_fn, "' is not supported (only silu)");
  VaeDecoder m;
  m.cfg = cfg;
  const std::vector<int> ch = up_channels(cfg);
  const int64_t L = cfg.latent_channels, c0 = ch.front();
  if (cfg.use_post_quant_conv) {
    m.post_quant_conv_w = src("post_quant_conv.weight", {L, L, 1, 1}, true);
    m.post_quant_conv_b = src("post_quant_conv.bias", {L}, false);
  }
  const std::string d = "decoder.";
  m.conv_in_w = src(d + "conv_in.weight", {c0, L, 3, 3}, true);
  m.conv_in_b = src(d + "conv_in.bias", {c0}, false);
  m.mid_res0 = bind_resnet(src, d + "mid_block.resnets.0.", c0, c0);
  if (cfg.mid_block_add_attention) m.mid_attn = bind_attention(src, d + "mid_block.attentions.0.", c0);
  m.mid_res1 = bind_resnet(src, d + "mid_block.resnets.1.", c0, c0);
  int64_t prev = c0;
  for (size_t i = 0; i < ch.size(); ++i) {
    UpBlock u;
    const std::string p = str_cat(d, "up_blocks.", i, ".");
    for (int j = 0; j <= cfg.layers_per_block; ++j) {
      u.resnets.push_back(bind_resnet(src, str_cat(p, "resnets.", j, "."), j == 0 ? prev : ch[i], ch[i]));
    }
    if (i + 1 < ch.size()) {  // every block but the last doubles the resolution
      u.upsample_w = src(p + "upsamplers.0.conv.weight", {ch[i], ch[i], 3, 3}, true);
      u.upsample_b = src(p + "upsamplers.0.conv.bias", {ch[i]}, false);
    }
    m.up_blocks.push_back(std::move(u));
    prev = ch[i];
  }
  m.norm_out_w = src(d + "conv_norm_out.weight", {prev}, false);
  m.norm_out_b = src(d + "conv_norm_out.bias", {prev}, false);
  m.conv_out_w = src(d + "conv_out.weight", {cfg.out_channels, prev, 3, 3}, true);
  m.conv_out_b = src(d + "conv_out.bias", {cfg.out_channels}, false);
  return m;
}

VaeDecoder load_vae_decoder(WeightLoader& loader, const VaeConfig& cfg, DType wdt) {
  ZI_CHECK(wdt == DType::F32 || wdt == DType::BF16 || wdt == DType::F16,
           "[vae] weight dtype must be f32, bf16 or f16, got ", dtype_name(wdt));
  // Decoding never touches the encoder; quant_conv belongs to encode() too (diffusers applies it
  // to the encoder's moments), so it is skipped whatever the config says.
  loader.ignore_prefix("encoder.");
  loader.ignore_prefix("quant_conv.");
  if (!cfg.use_post_quant_conv) loader.ignore_prefix("post_quant_conv.");
  return bind_vae_decoder(cfg, [&](const std::string& name, const Shape& shape, bool is_matrix) {
    return loader.load(name, shape, is_matrix ? wdt : DType::F32);
  });
}

// ---- forward ----------------------------------------------------------------------------------

namespace {

// ResnetBlock2D: conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x). Takes x by value so
// that x is freed as soon as nothing needs it: at most three activations of the block are alive.
Tensor resnet_forward(const ResnetBlock& b, Tensor x, int groups) {  // x [in, H, W] → [out, H, W]
  Tensor skip, h;
  if (b.shortcut_w.defined()) {
    // The 1×1 shortcut is the only other reader of x, so x is normalised in place after it.
    skip = ops::conv2d(x, b.shortcut_w, &b.shortcut_b, 0);  // [out, H, W]
    h = std::move(x);
  } else {
    skip = std::move(x);  // the residual is x itself
    h = skip.clone();
  }
  ops::group_norm_(h, groups, b.norm1_w, b.norm1_b, kNormEps);
  ops::silu_(h);
  Tensor c1 = ops::conv2d(h, b.conv1_w, &b.conv1_b, 1);  // [out, H, W]
  h = Tensor();
  ops::group_norm_(c1, groups, b.norm2_w, b.norm2_b, kNormEps);
  ops::silu_(c1);
  Tensor c2 = ops::conv2d(c1, b.conv2_w, &b.conv2_b, 1);  // [out, H, W]
  c1 = Tensor();
  ops::add_(c2, skip);
  return c2;
}

// Single-head self-attention over the H·W positions, with a residual; x is updated in place.
void attention_forward(const MidAttention& a, Tensor& x, int groups) {  // x [C, H, W]
  const int64_t C = x.dim(0), S = x.dim(1) * x.dim(2);
  Tensor t;  // tokens [S, C], token index y·W + x
  {
    Tensor n = x.clone();
    ops::group_norm_(n, groups, a.group_norm_w, a.group_norm_b, kNormEps);
    t = n.reshape({C, S}).permute({1, 0}).contiguous();
  }
  Tensor q = ops::linear(t, a.to_q_w, &a.to_q_b).reshape({S, 1, C});
  Tensor k = ops::linear(t, a.to_k_w, &a.to_k_b).reshape({S, 1, C});
  Tensor v = ops::linear(t, a.to_v_w, &a.to_v_b).reshape({S, 1, C});
  t = Tensor();
  Tensor o = ops::attention(q, k, v, 1.0f / std::sqrt(float(C)));  // [S, 1, C]
  q = k = v = Tensor();
  o = ops::linear(o.reshape({S, C}), a.to_out_w, &a.to_out_b);  // [S, C]
  ops::add_(x, o.permute({1, 0}).contiguous().reshape(x.shape()));
}

// Nearest ×2 then a 3×3 conv (Upsample2D). x is freed before the conv allocates its output.
Tensor upsample_forward(const UpBlock& u, Tensor x) {  // [C, H, W] → [C, 2H, 2W]
  Tensor up = ops::upsample_nearest2x(x);
  x = Tensor();
  return ops::conv2d(up, u.upsample_w, &u.upsample_b, 1);
}

void check_latent(const VaeDecoder& m, const Tensor& z, const char* fn) {
  ZI_CHECK(z.ndim() == 3 && z.dim(0) == m.cfg.latent_channels && z.dtype() == DType::F32,
           "[", fn, "] expects an f32 latent [", m.cfg.latent_channels, ", h, w], got ", z.desc());
  ZI_CHECK(z.dim(1) > 0 && z.dim(2) > 0, "[", fn, "] empty latent ", z.desc());
}

}  // namespace

Tensor vae_decode(const VaeDecoder& m, const Tensor& z) {
  check_latent(m, z, "vae_decode");
  const int groups = m.cfg.norm_num_groups;
  Tensor x;
  if (m.post_quant_conv_w.defined()) {
    Tensor zq = ops::conv2d(z.contiguous(), m.post_quant_conv_w, &m.post_quant_conv_b, 0);  // [L, h, w]
    x = ops::conv2d(zq, m.conv_in_w, &m.conv_in_b, 1);                                       // [C0, h, w]
  } else {
    x = ops::conv2d(z.contiguous(), m.conv_in_w, &m.conv_in_b, 1);  // [C0, h, w]
  }
  x = resnet_forward(m.mid_res0, std::move(x), groups);
  if (m.mid_attn.to_q_w.defined()) attention_forward(m.mid_attn, x, groups);
  x = resnet_forward(m.mid_res1, std::move(x), groups);
  for (const UpBlock& u : m.up_blocks) {
    for (const ResnetBlock& r : u.resnets) x = resnet_forward(r, std::move(x), groups);
    if (u.upsample_w.defined()) x = upsample_forward(u, std::move(x));
  }
  ops::group_norm_(x, groups, m.norm_out_w, m.norm_out_b, kNormEps);
  ops::silu_(x);
  return ops::conv2d(x, m.conv_out_w, &m.conv_out_b, 1);  // [out_channels, 8h, 8w]
}

// ---- tiled decode -----------------------------------------------------------------------------

namespace {

struct Span {
  int64_t begin, end;  // latent pixels
};

// Tiles covering [0, len): as few as keep every neighbour overlap >= `overlap`, all of size
// `tile` (so the peak is one tile's), spread evenly so the overlaps are nearly equal.
std::vector<Span> tile_spans(int64_t len, int64_t tile, int64_t overlap) {
  if (len <= tile) return {{0, len}};
  const int64_t stride = tile - overlap;
  const int64_t n = (len - overlap + stride - 1) / stride;
  std::vector<Span> s;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = (i * (len - tile) + (n - 1) / 2) / (n - 1);  // rounded i·(len − tile)/(n − 1)
    s.push_back({b, b + tile});
  }
  return s;
}

// Per-tile blend weights along one axis, in image pixels, normalised so they sum to 1 at every
// pixel. Tile i ramps linearly across the whole region it shares with each neighbour; where two
// tiles overlap these ramps are complementary, so the blend is linear across the overlap.
std::vector<std::vector<float>> blend_weights(const std::vector<Span>& spans, int64_t scale, int64_t len_px) {
  std::vector<std::vector<float>> w(spans.size());
  std::vector<double> total(size_t(len_px), 0.0);
  for (size_t i = 0; i < spans.size(); ++i) {
    const int64_t b = spans[i].begin * scale, e = spans[i].end * scale;
    const int64_t lo = i > 0 ? spans[i - 1].end * scale - b : 0;                  // shared with the left
    const int64_t hi = i + 1 < spans.size() ? e - spans[i + 1].begin * scale : 0;  // shared with the right
    w[i].resize(size_t(e - b));
    for (int64_t p = 0; p < e - b; ++p) {
      double v = 1.0;
      if (lo > 0) v = std::min(v, (double(p) + 0.5) / double(lo));
      if (hi > 0) v = std::min(v, (double(e - b - p) - 0.5) / double(hi));
      w[i][size_t(p)] = float(v);
      total[size_t(b + p)] += v;
    }
  }
  for (size_t i = 0; i < spans.size(); ++i)
    for (size_t p = 0; p < w[i].size(); ++p) w[i][p] = float(w[i][p] / total[size_t(spans[i].begin * scale) + p]);
  return w;
}

}  // namespace

Tensor vae_decode_tiled(const VaeDecoder& m, const Tensor& z, int tile, int overlap) {
  check_latent(m, z, "vae_decode_tiled");
  ZI_CHECK(tile >= 1 && overlap >= 0 && overlap < tile, "[vae_decode_tiled] need 0 <= overlap < tile, got tile ",
           tile, ", overlap ", overlap);
  const int64_t h = z.dim(1), w = z.dim(2);
  if (tile >= h && tile >= w) return vae_decode(m, z);
  const int64_t f = m.cfg.scale_factor(), C = m.cfg.out_channels, H = h * f, W = w * f;
  const std::vector<Span> ys = tile_spans(h, tile, overlap), xs = tile_spans(w, tile, overlap);
  const auto wy = blend_weights(ys, f, H), wx = blend_weights(xs, f, W);
  Tensor out = Tensor::zeros({C, H, W}, DType::F32);
  float* o = out.f32();
  for (size_t i = 0; i < ys.size(); ++i) {
    for (size_t j = 0; j < xs.size(); ++j) {
      Tensor zt = z.slice(1, ys[i].begin, ys[i].end).slice(2, xs[j].begin, xs[j].end).contiguous();
      Tensor img = vae_decode(m, zt);  // [C, th·f, tw·f]
      zt = Tensor();
      const int64_t th = img.dim(1), tw = img.dim(2), y0 = ys[i].begin * f, x0 = xs[j].begin * f;
      const float* t = img.f32();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t y = 0; y < th; ++y) {
          float* orow = o + (c * H + y0 + y) * W + x0;
          const float* trow = t + (c * th + y) * tw;
          const float a = wy[i][size_t(y)];
          for (int64_t x = 0; x < tw; ++x) orow[x] += a * wx[j][size_t(x)] * trow[x];
        }
    }
  }
  return out;
}

// ---- peak estimate ----------------------------------------------------------------------------

namespace {

// Replays vae_decode's allocations and frees (same order as the code above) on byte counts.
struct PeakSim {
  int64_t live = 0, peak = 0;
  void alloc(int64_t b) {
    live += b;
    peak = std::max(peak, live);
  }
  void free(int64_t b) { live -= b; }
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
// 64 MB in all unless a single row is larger); a 1×1 conv multiplies x as it lies.
int64_t conv_workspace(int64_t cin, int64_t cout, int64_t k, int64_t H, int64_t W, int64_t T) {
  const int64_t widened = (cout * cin * k * k + cout) * kF32;
  if (k == 1) return widened;
  constexpr int64_t kColBudget = int64_t(64) << 20;
  const int64_t ckk = cin * k * k, row_bytes = ckk * W * kF32;
  const int64_t max_rows = std::max<int64_t>(1, kColBudget / T / row_bytes);
  int64_t blocks = std::max<int64_t>((H + max_rows - 1) / max_rows, T);
  blocks = std::min((blocks + T - 1) / T * T, H);
  const int64_t rows = (H + blocks - 1) / blocks;
  blocks = (H + rows - 1) / rows;
  return widened + std::min(T, blocks) * rows * row_bytes;
}

void sim_conv(PeakSim& s, int64_t cin, int64_t cout, int64_t k, int64_t H, int64_t W, int64_t T) {
  s.op(cout * H * W * kF32, conv_workspace(cin, cout, k, H, W, T));
}

// group_norm_ widens its weight and bias; it works in place otherwise.
void sim_group_norm(PeakSim& s, int64_t C) { s.op(0, 2 * C * kF32); }

// resnet_forward: on entry the input x is held, on return only the output is.
void sim_resnet(PeakSim& s, int64_t in, int64_t out, int64_t H, int64_t W, int64_t T) {
  const int64_t P = H * W * kF32;
  if (in != out) {
    sim_conv(s, in, out, 1, H, W, T);  // skip; x becomes h
  } else {
    s.alloc(in * P);  // h = copy of x, x is the skip
  }
  sim_group_norm(s, in);
  sim_conv(s, in, out, 3, H, W, T);  // c1
  s.free(in * P);                    // h
  sim_group_norm(s, out);
  sim_conv(s, out, out, 3, H, W, T);  // c2
  s.free(out * P);                    // c1
  s.free(out * P);                    // skip
}

// attention_forward on x [C, H, W] (held throughout).
void sim_attention(PeakSim& s, int64_t C, int64_t H, int64_t W, int64_t T) {
  const int64_t S = H * W, A = C * S * kF32;
  const int64_t lin_ws = (T * C * C + C) * kF32;  // per-thread widened weight panels + bias
  s.alloc(A);  // n
  sim_group_norm(s, C);
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

}  // namespace

int64_t vae_decode_peak_bytes(const VaeConfig& cfg, int h, int w) {
  const std::vector<int> ch = up_channels(cfg);
  const int64_t L = cfg.latent_channels, T = std::max(1, num_threads());
  int64_t H = h, W = w, c = ch.front();
  PeakSim s;
  if (cfg.use_post_quant_conv) {
    sim_conv(s, L, L, 1, H, W, T);  // zq
    sim_conv(s, L, c, 3, H, W, T);  // conv_in
    s.free(L * H * W * kF32);
  } else {
    sim_conv(s, L, c, 3, H, W, T);  // conv_in
  }
  sim_resnet(s, c, c, H, W, T);
  if (cfg.mid_block_add_attention) sim_attention(s, c, H, W, T);
  sim_resnet(s, c, c, H, W, T);
  for (size_t i = 0; i < ch.size(); ++i) {
    for (int j = 0; j <= cfg.layers_per_block; ++j) {
      sim_resnet(s, c, ch[i], H, W, T);
      c = ch[i];
    }
    if (i + 1 < ch.size()) {
      s.alloc(c * 4 * H * W * kF32);  // upsampled
      s.free(c * H * W * kF32);       // x
      H *= 2;
      W *= 2;
      sim_conv(s, c, c, 3, H, W, T);
      s.free(c * H * W * kF32);  // upsampled
    }
  }
  sim_group_norm(s, c);
  sim_conv(s, c, cfg.out_channels, 3, H, W, T);  // conv_out
  return s.peak;
}

int64_t vae_decode_tiled_peak_bytes(const VaeConfig& cfg, int h, int w, int tile) {
  const int th = std::min(tile, h), tw = std::min(tile, w), f = cfg.scale_factor();
  if (th == h && tw == w) return vae_decode_peak_bytes(cfg, h, w);
  const int64_t image = int64_t(cfg.out_channels) * h * f * w * f * kF32;
  const int64_t slice = int64_t(cfg.latent_channels) * th * tw * kF32;
  return vae_decode_peak_bytes(cfg, th, tw) + image + slice;
}

int vae_pick_tile(const VaeConfig& cfg, int64_t budget_bytes) {
  // Past 512 latent pixels (4096 image pixels) a tile is larger than any image this engine makes.
  constexpr int kMaxTile = 512;
  int best = 16;
  for (int t = 16; t <= kMaxTile; t += 8)
    if (vae_decode_peak_bytes(cfg, t, t) <= budget_bytes) best = t;
  return best;
}

}  // namespace zi
