// AutoencoderKL decoder: binding table, forward (spec §5.2–5.3), tiled decode and the peak
// estimate the memory plan uses. Memory is the design constraint here: at 1024² the last stage
// holds [128, 1024, 1024] f32 tensors of 512 MB each, so every block takes its input by value
// and drops each activation as soon as its last reader is done.
#include "models/vae_decoder.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/parallel.h"
#include "models/vae_tiled.h"
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

// Where a GroupNorm gets its statistics. Without a hook (nullptr) each norm computes its own over
// the whole tensor (ops::group_norm_). The tiled decode passes one that applies statistics of
// the whole image gathered beforehand, or gathers them and stops the forward there: apply()
// returns false, and every forward below then returns an undefined tensor at once.
struct NormHook {
  virtual ~NormHook() = default;
  virtual bool apply(Tensor& x, const Tensor& weight, const Tensor& bias) = 0;
};

// GroupNorm then SiLU; without a hook one fused op (one pass over x on the GPU).
bool norm_silu_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, NormHook* hook) {
  if (!hook) {
    ops::group_norm_silu_(x, groups, weight, bias, kNormEps);
    return true;
  }
  if (!hook->apply(x, weight, bias)) return false;
  ops::silu_(x);
  return true;
}

// ResnetBlock2D: conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x). Takes x by value so
// that x is freed as soon as nothing needs it: at most three activations of the block are alive.
Tensor resnet_forward(const ResnetBlock& b, Tensor x, int groups, NormHook* hook = nullptr) {  // [in, H, W] → [out, H, W]
  Tensor skip, h;
  if (b.shortcut_w.defined()) {
    // The 1×1 shortcut is the only other reader of x, so x is normalised in place after it.
    skip = ops::conv2d(x, b.shortcut_w, &b.shortcut_b, 0);  // [out, H, W]
    h = std::move(x);
  } else {
    skip = std::move(x);  // the residual is x itself
    h = skip.clone();
  }
  if (!norm_silu_(h, groups, b.norm1_w, b.norm1_b, hook)) return Tensor();
  Tensor c1 = ops::conv2d(h, b.conv1_w, &b.conv1_b, 1);  // [out, H, W]
  h = Tensor();
  if (!norm_silu_(c1, groups, b.norm2_w, b.norm2_b, hook)) return Tensor();
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

// The decoder is split where the tiled decode splits it. The head is everything at latent
// resolution (conv_in, the mid block, up_blocks.0's resnets): z [L, h, w] → [C0, h, w]. Its
// activations are as small as the latent's and the mid attention needs every token, so it
// always runs whole.
Tensor head_forward(const VaeDecoder& m, const Tensor& z) {
  const int groups = m.cfg.norm_num_groups;
  const Tensor zc = ops::to_compute(z.contiguous());  // on the weights' device
  Tensor x;
  if (m.post_quant_conv_w.defined()) {
    Tensor zq = ops::conv2d(zc, m.post_quant_conv_w, &m.post_quant_conv_b, 0);  // [L, h, w]
    x = ops::conv2d(zq, m.conv_in_w, &m.conv_in_b, 1);                           // [C0, h, w]
  } else {
    x = ops::conv2d(zc, m.conv_in_w, &m.conv_in_b, 1);  // [C0, h, w]
  }
  x = resnet_forward(m.mid_res0, std::move(x), groups);
  if (m.mid_attn.to_q_w.defined()) attention_forward(m.mid_attn, x, groups);
  x = resnet_forward(m.mid_res1, std::move(x), groups);
  for (const ResnetBlock& r : m.up_blocks.front().resnets) x = resnet_forward(r, std::move(x), groups);
  return x;
}

// A segment of the rest, from the output of up_blocks[from]'s resnets to the output of
// up_blocks[to]'s resnets (to < n, n = number of up blocks) or to the image (to == n):
// up_blocks[from]'s upsampler, then each later block's resnets and (before `to`) upsampler, and
// for the image norm_out, SiLU, conv_out. Only convs, pointwise ops and GroupNorms, so a tile of
// it is exact given the GroupNorm statistics and a wide enough margin (segment_layout).
// Undefined when `hook` stopped it.
Tensor segment_forward(const VaeDecoder& m, Tensor x, size_t from, size_t to, NormHook* hook) {
  const int groups = m.cfg.norm_num_groups;
  const size_t n = m.up_blocks.size();
  for (size_t i = from; i <= std::min(to, n - 1); ++i) {
    const UpBlock& u = m.up_blocks[i];
    if (i > from) {
      for (const ResnetBlock& r : u.resnets) {
        x = resnet_forward(r, std::move(x), groups, hook);
        if (!x.defined()) return x;
      }
    }
    if (i < to && u.upsample_w.defined()) x = upsample_forward(u, std::move(x));
  }
  if (to < n) return x;
  if (!norm_silu_(x, groups, m.norm_out_w, m.norm_out_b, hook)) return Tensor();
  return ops::conv2d(x, m.conv_out_w, &m.conv_out_b, 1);
}

}  // namespace

Tensor vae_decode(const VaeDecoder& m, const Tensor& z) {
  check_latent(m, z, "vae_decode");
  return ops::to_host_f32(segment_forward(m, head_forward(m, z), 0, m.up_blocks.size(), nullptr));  // [out_channels, 8h, 8w]
}

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

struct Span {
  int64_t begin, end;  // pixels
};

// Interiors covering [0, len): ceil(len / tile) spans of nearly equal length (<= tile).
std::vector<Span> tile_spans(int64_t len, int64_t tile) {
  const int64_t n = (len + tile - 1) / tile;
  std::vector<Span> s;
  for (int64_t i = 0; i < n; ++i) s.push_back({i * len / n, (i + 1) * len / n});
  return s;
}

Span scaled(Span s, int64_t f) { return {s.begin * f, s.end * f}; }
Span widen(Span s, int64_t halo, int64_t len) { return {std::max<int64_t>(0, s.begin - halo), std::min(len, s.end + halo)}; }

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

SegmentLayout segment_layout(const VaeConfig& cfg, size_t from, size_t to) {
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

// The up blocks whose outputs a tiled decode keeps whole: 0 (the head's output) and maybe more,
// ascending, each before the last block. Defined with the estimates below.
using Checkpoints = std::vector<size_t>;
Checkpoints choose_checkpoints(const VaeConfig& cfg, int h, int w, int tile);

}  // namespace

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

Tensor vae_decode_tiled(const VaeDecoder& m, const Tensor& z, int tile, int /*overlap: unused*/) {
  check_latent(m, z, "vae_decode_tiled");
  ZI_CHECK(tile >= 1, "[vae_decode_tiled] tile must be >= 1 latent pixel, got ", tile);
  const Checkpoints cps = choose_checkpoints(m.cfg, int(z.dim(1)), int(z.dim(2)), tile);
  return vae_decode_tiled_with(m, z, tile, std::vector<int>(cps.begin(), cps.end()));
}

// ---- peak estimate ----------------------------------------------------------------------------

namespace {

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

}  // namespace zi
