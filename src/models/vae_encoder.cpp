// AutoencoderKL encoder: binding and forward (diffusers Encoder: conv_in, DownEncoderBlock2D ×
// n with a stride-2 downsample after every block but the last, the mid block with its
// attention, GroupNorm + SiLU + conv_out; then quant_conv when configured).
//
// The stride-2 downsample (Downsample2D with padding 0: zero-pad right and bottom by one, 3×3
// conv, stride 2) is ops::pad2d then ops::conv2d with stride 2, both on the phase's device: the
// whole encoder runs there, from the image's upload to the moments' download.
#include "models/vae_encoder.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "ops/ops.h"

namespace zi {

namespace {

constexpr float kNormEps = 1e-6f;  // every GroupNorm of the encoder

ResnetBlock load_resnet(WeightLoader& ld, const std::string& p, int64_t in, int64_t out, DType wdt) {
  const DType f32 = DType::F32;
  ResnetBlock b;
  b.norm1_w = ld.load(p + "norm1.weight", {in}, f32);
  b.norm1_b = ld.load(p + "norm1.bias", {in}, f32);
  b.conv1_w = ld.load(p + "conv1.weight", {out, in, 3, 3}, wdt);
  b.conv1_b = ld.load(p + "conv1.bias", {out}, f32);
  b.norm2_w = ld.load(p + "norm2.weight", {out}, f32);
  b.norm2_b = ld.load(p + "norm2.bias", {out}, f32);
  b.conv2_w = ld.load(p + "conv2.weight", {out, out, 3, 3}, wdt);
  b.conv2_b = ld.load(p + "conv2.bias", {out}, f32);
  if (in != out) {
    b.shortcut_w = ld.load(p + "conv_shortcut.weight", {out, in, 1, 1}, wdt);
    b.shortcut_b = ld.load(p + "conv_shortcut.bias", {out}, f32);
  }
  return b;
}

MidAttention load_attention(WeightLoader& ld, const std::string& p, int64_t c, DType wdt) {
  const DType f32 = DType::F32;
  MidAttention a;
  a.group_norm_w = ld.load(p + "group_norm.weight", {c}, f32);
  a.group_norm_b = ld.load(p + "group_norm.bias", {c}, f32);
  a.to_q_w = ld.load(p + "to_q.weight", {c, c}, wdt);
  a.to_q_b = ld.load(p + "to_q.bias", {c}, f32);
  a.to_k_w = ld.load(p + "to_k.weight", {c, c}, wdt);
  a.to_k_b = ld.load(p + "to_k.bias", {c}, f32);
  a.to_v_w = ld.load(p + "to_v.weight", {c, c}, wdt);
  a.to_v_b = ld.load(p + "to_v.bias", {c}, f32);
  a.to_out_w = ld.load(p + "to_out.0.weight", {c, c}, wdt);
  a.to_out_b = ld.load(p + "to_out.0.bias", {c}, f32);
  return a;
}

// ResnetBlock2D (the decoder's block, same math): conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x).
Tensor resnet(const ResnetBlock& b, Tensor x, int groups) {
  Tensor skip, h;
  if (b.shortcut_w.defined()) {
    skip = ops::conv2d(x, b.shortcut_w, &b.shortcut_b, 0);
    h = std::move(x);
  } else {
    skip = std::move(x);
    h = skip.clone();
  }
  ops::group_norm_silu_(h, groups, b.norm1_w, b.norm1_b, kNormEps);
  Tensor c1 = ops::conv2d(h, b.conv1_w, &b.conv1_b, 1);
  h = Tensor();
  ops::group_norm_silu_(c1, groups, b.norm2_w, b.norm2_b, kNormEps);
  Tensor c2 = ops::conv2d(c1, b.conv2_w, &b.conv2_b, 1);
  c1 = Tensor();
  ops::add_(c2, skip);
  return c2;
}

// Single-head self-attention over the H·W positions with a residual, in place.
void attention(const MidAttention& a, Tensor& x, int groups) {
  const int64_t C = x.dim(0), S = x.dim(1) * x.dim(2);
  Tensor t;
  {
    Tensor n = x.clone();
    ops::group_norm_(n, groups, a.group_norm_w, a.group_norm_b, kNormEps);
    t = n.reshape({C, S}).permute({1, 0}).contiguous();
  }
  Tensor q = ops::linear(t, a.to_q_w, &a.to_q_b).reshape({S, 1, C});
  Tensor k = ops::linear(t, a.to_k_w, &a.to_k_b).reshape({S, 1, C});
  Tensor v = ops::linear(t, a.to_v_w, &a.to_v_b).reshape({S, 1, C});
  t = Tensor();
  Tensor o = ops::attention(q, k, v, 1.0f / std::sqrt(float(C)));
  q = k = v = Tensor();
  o = ops::linear(o.reshape({S, C}), a.to_out_w, &a.to_out_b);
  ops::add_(x, o.permute({1, 0}).contiguous().reshape(x.shape()));
}

// Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)) then a 3×3 conv with stride 2.
// [C, H, W] → [C, H/2, W/2] (H, W even). x is released once padded.
Tensor downsample(const DownBlock& d, Tensor x) {
  Tensor padded = ops::pad2d(x, 0, 1, 0, 1);  // [C, H + 1, W + 1]
  x = Tensor();
  return ops::conv2d(padded, d.downsample_w, &d.downsample_b, 0, 2);  // (H + 1 − 3) / 2 + 1 = H/2
}

}  // namespace

VaeEncoder load_vae_encoder(WeightLoader& ld, const VaeConfig& cfg, DType wdt) {
  ZI_CHECK(wdt == DType::F32 || wdt == DType::BF16 || wdt == DType::F16,
           "[vae encoder] weight dtype must be f32, bf16 or f16, got ", dtype_name(wdt));
  ZI_CHECK(!cfg.block_out_channels.empty() && cfg.layers_per_block >= 1 && cfg.norm_num_groups > 0,
           "[vae encoder] bad config: block_out_channels must be non-empty, layers_per_block >= 1, groups > 0");
  ld.ignore_prefix("decoder.");
  ld.ignore_prefix("post_quant_conv.");
  if (!cfg.use_quant_conv) ld.ignore_prefix("quant_conv.");
  const DType f32 = DType::F32;
  const std::vector<int>& ch = cfg.block_out_channels;
  const int64_t L2 = 2 * int64_t(cfg.latent_channels);
  const std::string e = "encoder.";
  VaeEncoder m;
  m.ctx = ld.context();
  m.cfg = cfg;
  m.conv_in_w = ld.load(e + "conv_in.weight", {ch[0], cfg.in_channels, 3, 3}, wdt);
  m.conv_in_b = ld.load(e + "conv_in.bias", {ch[0]}, f32);
  int64_t prev = ch[0];
  for (size_t i = 0; i < ch.size(); ++i) {
    DownBlock d;
    const std::string p = str_cat(e, "down_blocks.", i, ".");
    for (int j = 0; j < cfg.layers_per_block; ++j)
      d.resnets.push_back(load_resnet(ld, str_cat(p, "resnets.", j, "."), j == 0 ? prev : ch[i], ch[i], wdt));
    if (i + 1 < ch.size()) {
      d.downsample_w = ld.load(p + "downsamplers.0.conv.weight", {ch[i], ch[i], 3, 3}, wdt);
      d.downsample_b = ld.load(p + "downsamplers.0.conv.bias", {ch[i]}, f32);
    }
    m.down_blocks.push_back(std::move(d));
    prev = ch[i];
  }
  m.mid_res0 = load_resnet(ld, e + "mid_block.resnets.0.", prev, prev, wdt);
  if (cfg.mid_block_add_attention) m.mid_attn = load_attention(ld, e + "mid_block.attentions.0.", prev, wdt);
  m.mid_res1 = load_resnet(ld, e + "mid_block.resnets.1.", prev, prev, wdt);
  m.norm_out_w = ld.load(e + "conv_norm_out.weight", {prev}, f32);
  m.norm_out_b = ld.load(e + "conv_norm_out.bias", {prev}, f32);
  m.conv_out_w = ld.load(e + "conv_out.weight", {L2, prev, 3, 3}, wdt);
  m.conv_out_b = ld.load(e + "conv_out.bias", {L2}, f32);
  if (cfg.use_quant_conv) {
    m.quant_conv_w = ld.load("quant_conv.weight", {L2, L2, 1, 1}, wdt);
    m.quant_conv_b = ld.load("quant_conv.bias", {L2}, f32);
  }
  return m;
}

Tensor vae_encode_moments(const VaeEncoder& m, const Tensor& image) {
  const int sf = m.cfg.scale_factor();
  ZI_CHECK(image.ndim() == 3 && image.dim(0) == m.cfg.in_channels && image.dtype() == DType::F32,
           "[vae_encode] expects an f32 image [", m.cfg.in_channels, ", H, W], got ", image.desc());
  ZI_CHECK(image.dim(1) > 0 && image.dim(2) > 0 && image.dim(1) % sf == 0 && image.dim(2) % sf == 0,
           "[vae_encode] image size ", image.desc(), " is not a multiple of ", sf);
  const int groups = m.cfg.norm_num_groups;
  Tensor x = ops::conv2d(ops::to_compute(m.ctx, image.contiguous()), m.conv_in_w, &m.conv_in_b, 1);
  for (const DownBlock& d : m.down_blocks) {
    for (const ResnetBlock& r : d.resnets) x = resnet(r, std::move(x), groups);
    if (d.downsample_w.defined()) x = downsample(d, std::move(x));
  }
  x = resnet(m.mid_res0, std::move(x), groups);
  if (m.mid_attn.to_q_w.defined()) attention(m.mid_attn, x, groups);
  x = resnet(m.mid_res1, std::move(x), groups);
  ops::group_norm_silu_(x, groups, m.norm_out_w, m.norm_out_b, kNormEps);
  x = ops::conv2d(x, m.conv_out_w, &m.conv_out_b, 1);
  if (m.quant_conv_w.defined()) x = ops::conv2d(x, m.quant_conv_w, &m.quant_conv_b, 0);
  return ops::to_host_f32(x);
}

Tensor vae_latents_from_moments(const Tensor& moments, const VaeConfig& cfg, const float* noise) {
  const int64_t L = cfg.latent_channels;
  ZI_CHECK(moments.ndim() == 3 && moments.dim(0) == 2 * L && moments.dtype() == DType::F32,
           "[vae_latents] expects moments [", 2 * L, ", h, w] f32, got ", moments.desc());
  const int64_t n = L * moments.dim(1) * moments.dim(2);
  Tensor z = Tensor::empty({L, moments.dim(1), moments.dim(2)}, DType::F32);
  const float* mean = moments.f32();
  const float* logvar = mean + n;
  float* o = z.f32();
  const float shift = float(cfg.shift_factor), scale = float(cfg.scaling_factor);
  for (int64_t i = 0; i < n; ++i) {
    float v = mean[i];
    if (noise) {
      const float lv = std::min(20.0f, std::max(-30.0f, logvar[i]));
      const float sd = std::exp(0.5f * lv);
      const float prod = sd * noise[i];
      v = v + prod;
    }
    const float d = v - shift;
    o[i] = d * scale;
  }
  return z;
}

}  // namespace zi
