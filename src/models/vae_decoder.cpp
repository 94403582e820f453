// AutoencoderKL decoder: binding table and forward (spec §5.2–5.3). The tiled decode is in
// vae_tiled.cpp, the peak estimates in pipeline/memory_plan.cpp. Memory is the design constraint here: at 1024² the last stage
// holds [128, 1024, 1024] f32 tensors of 512 MB each, so every block takes its input by value
// and drops each activation as soon as its last reader is done.
#include "models/vae_decoder.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "core/check.h"
#include "models/vae_internal.h"
#include "ops/ops.h"

namespace zi {

namespace {

using vae_detail::kNormEps;
using vae_detail::up_channels;

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
  VaeDecoder m = bind_vae_decoder(cfg, [&](const std::string& name, const Shape& shape, bool is_matrix) {
    return loader.load(name, shape, is_matrix ? wdt : DType::F32);
  });
  m.ctx = loader.context();
  return m;
}

// ---- forward ----------------------------------------------------------------------------------

namespace vae_detail {

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
  const Tensor zc = ops::to_compute(m.ctx, z.contiguous());  // on the weights' device
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

}  // namespace vae_detail

using namespace vae_detail;

namespace {
std::atomic<int64_t> g_warm_ups{0};
}  // namespace

void vae_warm_up(const PhaseContext& ctx, const VaeConfig& cfg, DType wdt, int h, int w) {
  VaeDecoder m = bind_vae_decoder(cfg, [&](const std::string&, const Shape& shape, bool is_matrix) {
    return Tensor::zeros(shape, is_matrix ? wdt : DType::F32, Tag::Workspace, ctx.device);
  });
  m.ctx = ctx;
  (void)vae_decode(m, Tensor::zeros({cfg.latent_channels, h, w}, DType::F32, Tag::Workspace));
  g_warm_ups.fetch_add(1);
}

int64_t vae_warm_ups_run() { return g_warm_ups.load(); }

Tensor vae_decode(const VaeDecoder& m, const Tensor& z) {
  check_latent(m, z, "vae_decode");
  return ops::to_host_f32(segment_forward(m, head_forward(m, z), 0, m.up_blocks.size(), nullptr));  // [out_channels, 8h, 8w]
}


}  // namespace zi
