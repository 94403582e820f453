// Z-Image DiT: weight binding (spec §3.2) and the forward pass (§3.4–§3.10), one function
// per stage, in the order the forward pass runs them. Everything is computed in f32;
// weight matrices may be bf16/f16 and are widened by the ops.
//
// Memory: at real size (1024², 10-token caption) the unified sequence is [4128, 3840] f32
// (63 MB). Temporaries are released as soon as the next stage has consumed them, and the
// FFN runs in row chunks so its [rows, 10240] hidden never exists for the whole sequence.
#include "models/zimage_dit.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/check.h"
#include "core/env.h"
#include "core/parallel.h"
#include "models/controlnet.h"
#include "core/quant.h"
#include "ops/ops.h"

namespace zi {
namespace {

constexpr int64_t kSeqMultiple = 32;      // SEQ_MULTI_OF: both streams are padded to a multiple of this
constexpr int kAdalnEmbedDim = 256;       // ADALN_EMBED_DIM
constexpr int kTimeFreqDim = 256;         // size of the sinusoidal timestep features
constexpr int kTimeMidDim = 1024;         // hidden size of the timestep MLP
constexpr double kTimeMaxPeriod = 10000.0;
constexpr float kQkNormEps = 1e-5f;       // fixed in the reference's attention, not norm_eps
constexpr float kFinalNormEps = 1e-6f;    // the final LayerNorm
// FFN row chunk: the hidden is [1024, 10240] f32 = 42 MB per tensor instead of 169 MB for
// the whole 4128-row sequence, and 1024 rows still keep the GEMMs efficient.
constexpr int64_t kFfnChunkRows = 1024;

using Pos = std::array<int64_t, 3>;  // (caption/frame index, row h, column w)

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
int64_t patch_dim(const DitConfig& c) {
  return int64_t(c.f_patch_size) * c.patch_size * c.patch_size * c.in_channels;
}
// "2-1": the key of the only patch size in all_x_embedder / all_final_layer.
std::string patch_key(const DitConfig& c) { return str_cat(c.patch_size, "-", c.f_patch_size); }

// The shape facts the forward pass relies on; a config that breaks them cannot be run.
void check_config(const DitConfig& c) {
  ZI_CHECK(c.n_heads > 0 && c.dim % c.n_heads == 0, "[zimage_dit] dim ", c.dim, " is not a multiple of n_heads ",
           c.n_heads);
  ZI_CHECK(c.axes_dims.size() == 3 && c.axes_lens.size() == 3, "[zimage_dit] axes_dims/axes_lens need 3 entries");
  int sum = 0;
  for (int d : c.axes_dims) {
    ZI_CHECK(d > 0 && d % 2 == 0, "[zimage_dit] axes_dims entries must be positive and even, got ", d);
    sum += d;
  }
  ZI_CHECK(sum == c.head_dim(), "[zimage_dit] axes_dims sum to ", sum, " but head_dim is ", c.head_dim());
  ZI_CHECK(c.f_patch_size == 1, "[zimage_dit] only f_patch_size 1 (still images) is supported, got ",
           c.f_patch_size);
  ZI_CHECK(c.patch_size >= 1, "[zimage_dit] bad patch_size ", c.patch_size);
}

// ---------------------------------------------------------------------------------------
// Loading (§3.2)

// The fused Q/K/V and w1/w3 projections (one GEMM each). Off by default on the CPU: there they
// gain nothing measurable (real size, 256², 1 step: bf16 19.76 → 19.77 s, q8_0 20.51 → 19.99 s)
// and they break the batched path's bit-identity with one-at-a-time runs (a server batch against
// the CLI's image): OpenBLAS's sgemm is not row-consistent across M except in its small-matrix
// path, which the tiny model's unfused shapes stay in and the fused ones leave. On the GPU they
// are off by default too until their speed is measured (issue 19; they pass the GPU tests).
// ZI_FUSED_PROJECTIONS=1 / =0 turns them on / off anywhere (A/B runs); a context's
// fused_projections (tests) wins over both.
bool fuse_projections(const PhaseContext& ctx) {
  if (ctx.fused_projections >= 0) return ctx.fused_projections == 1;
  return env_flag("ZI_FUSED_PROJECTIONS", false);
}

// A block's attention residual and its FFN's pre-norm as one op (ops::rms_norm_add_norm_: x is
// read once, one launch less; the same results — on the GPU the same bits — as the two ops), where
// the FFN runs as one chunk. Off by default until measured on a GPU (issue 19); ZI_FUSED_ADD_NORM=1
// / =0 turns it on / off; a context's fused_add_norm (tests) wins.
bool fuse_add_norm(const PhaseContext& ctx) {
  if (ctx.fused_add_norm >= 0) return ctx.fused_add_norm == 1;
  return env_flag("ZI_FUSED_ADD_NORM", false);
}

DitBlock load_block(WeightLoader& ld, const std::string& p, const DitConfig& c, DType wdt, bool modulated) {
  const int64_t D = c.dim, F = dit_ffn_hidden(c), hd = c.head_dim(), A = dit_adaln_dim(c);
  const DType f32 = DType::F32;
  DitBlock b;
  std::vector<Tensor> parts;
  const bool fuse = fuse_projections(ld.context());
  if (fuse) {
    b.qkv = ld.load_matrix_rows({p + "attention.to_q.weight", p + "attention.to_k.weight", p + "attention.to_v.weight"},
                                {{D, D}, {D, D}, {D, D}}, wdt, &parts);
    if (!parts.empty()) b.to_q = parts[0], b.to_k = parts[1], b.to_v = parts[2];
  } else {
    b.to_q = ld.load_matrix(p + "attention.to_q.weight", {D, D}, wdt);
    b.to_k = ld.load_matrix(p + "attention.to_k.weight", {D, D}, wdt);
    b.to_v = ld.load_matrix(p + "attention.to_v.weight", {D, D}, wdt);
  }
  b.to_out = ld.load_matrix(p + "attention.to_out.0.weight", {D, D}, wdt);
  if (c.qk_norm) {
    b.norm_q = ld.load(p + "attention.norm_q.weight", {hd}, f32);
    b.norm_k = ld.load(p + "attention.norm_k.weight", {hd}, f32);
  }
  b.attention_norm1 = ld.load(p + "attention_norm1.weight", {D}, f32);
  b.attention_norm2 = ld.load(p + "attention_norm2.weight", {D}, f32);
  b.ffn_norm1 = ld.load(p + "ffn_norm1.weight", {D}, f32);
  b.ffn_norm2 = ld.load(p + "ffn_norm2.weight", {D}, f32);
  if (fuse) {
    b.w13 = ld.load_matrix_rows({p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"}, {{F, D}, {F, D}}, wdt,
                                &parts);
    if (!parts.empty()) b.w1 = parts[0], b.w3 = parts[1];
  } else {
    b.w1 = ld.load_matrix(p + "feed_forward.w1.weight", {F, D}, wdt);
    b.w3 = ld.load_matrix(p + "feed_forward.w3.weight", {F, D}, wdt);
  }
  b.w2 = ld.load_matrix(p + "feed_forward.w2.weight", {D, F}, wdt);
  if (modulated) {
    b.adaln_w = ld.load_matrix(p + "adaLN_modulation.0.weight", {4 * D, A}, wdt);
    b.adaln_b = ld.load(p + "adaLN_modulation.0.bias", {4 * D}, f32);
  }
  return b;
}

// ---------------------------------------------------------------------------------------
// Forward stages

// Token counts of one item (§3.6).
struct Geometry {
  int64_t ht = 0, wt = 0;  // token grid (latent size / patch size)
  int64_t n = 0, nx = 0;   // image tokens, and padded to a multiple of 32
  int64_t l = 0, lc = 0;   // caption tokens, and padded to a multiple of 32
};

Geometry geometry(const DitConfig& c, const Tensor& latent, const Tensor& cap) {
  ZI_CHECK(latent.ndim() == 4 && latent.dim(0) == c.in_channels && latent.dim(1) == 1,
           "[dit_forward] latent must be [", c.in_channels, ", 1, H, W], got ", latent.desc());
  ZI_CHECK(latent.dim(2) % c.patch_size == 0 && latent.dim(3) % c.patch_size == 0 && latent.dim(2) > 0 &&
               latent.dim(3) > 0,
           "[dit_forward] latent size ", latent.desc(), " is not a multiple of the patch size ", c.patch_size);
  ZI_CHECK(cap.ndim() == 2 && cap.dim(1) == c.cap_feat_dim && cap.dim(0) > 0,
           "[dit_forward] cap_feats must be [L > 0, ", c.cap_feat_dim, "], got ", cap.desc());
  Geometry g;
  g.ht = latent.dim(2) / c.patch_size;
  g.wt = latent.dim(3) / c.patch_size;
  g.n = g.ht * g.wt;
  g.nx = round_up(g.n, kSeqMultiple);
  g.l = cap.dim(0);
  g.lc = round_up(g.l, kSeqMultiple);
  return g;
}

// [1, 256] f32 on the host: the sinusoid of t · t_scale (§3.4), in f32 like the reference's
// autocast-free sinusoid.
Tensor timestep_sinusoid(const ZImageDit& m, float t) {
  const int half = kTimeFreqDim / 2;
  const float tau = t * float(m.cfg.t_scale);
  const float neg_log_period = float(-std::log(kTimeMaxPeriod));
  std::vector<float> e(kTimeFreqDim);
  for (int k = 0; k < half; ++k) {
    const float freq = std::exp(float(k) * neg_log_period / float(half));  // divisor half, not half − 1
    e[size_t(k)] = std::cos(tau * freq);                                     // cosine half first
    e[size_t(half + k)] = std::sin(tau * freq);
  }
  return Tensor::from_vector(e, {1, kTimeFreqDim});
}

// [1, A]: c = mlp.2(SiLU(mlp.0(sinusoid))) from the sinusoid on the phase's device. Shared by
// every modulated block and the final layer.
Tensor embed_time(const ZImageDit& m, const Tensor& sinusoid) {
  Tensor h = ops::linear(sinusoid, m.t_mlp0_w, &m.t_mlp0_b);  // [1, 1024]
  ops::silu_(h);
  return ops::linear(h, m.t_mlp2_w, &m.t_mlp2_b);  // [1, A]
}

Tensor embed_timestep(const ZImageDit& m, float t) {
  return embed_time(m, ops::to_compute(m.ctx, timestep_sinusoid(m, t)));
}

// [N, p·p·C]: token (h, w) holds latent[c, 0, p·h + ph, p·w + pw] at feature (ph·p + pw)·C + c,
// tokens row-major over (h, w) (§3.5).
Tensor patchify(const Tensor& latent, const Geometry& g, int p) {
  Tensor src = ops::to_host_f32(latent);  // [C, 1, Hl, Wl], contiguous
  const int64_t C = src.dim(0), Wl = src.dim(3), Hl = src.dim(2);
  Tensor out = Tensor::empty({g.n, int64_t(p) * p * C}, DType::F32);  // [N, p·p·C]
  const float* s = src.f32();
  float* d = out.f32();
  for (int64_t h = 0; h < g.ht; ++h)
    for (int64_t w = 0; w < g.wt; ++w)
      for (int64_t ph = 0; ph < p; ++ph)
        for (int64_t pw = 0; pw < p; ++pw)
          for (int64_t c = 0; c < C; ++c)
            d[((h * g.wt + w) * p * p + ph * p + pw) * C + c] = s[(c * Hl + h * p + ph) * Wl + w * p + pw];
  return out;
}

// [C, 1, Hl, Wl]: the exact inverse of patchify on tokens [N, p·p·C].
Tensor unpatchify(const Tensor& tokens, const Geometry& g, int p, int64_t C) {
  const int64_t Hl = g.ht * p, Wl = g.wt * p;
  Tensor out = Tensor::empty({C, 1, Hl, Wl}, DType::F32);
  const float* s = tokens.f32();
  float* d = out.f32();
  for (int64_t h = 0; h < g.ht; ++h)
    for (int64_t w = 0; w < g.wt; ++w)
      for (int64_t ph = 0; ph < p; ++ph)
        for (int64_t pw = 0; pw < p; ++pw)
          for (int64_t c = 0; c < C; ++c)
            d[(c * Hl + h * p + ph) * Wl + w * p + pw] = s[((h * g.wt + w) * p * p + ph * p + pw) * C + c];
  return out;
}

// [total, D]: the rows of x [n, D] followed by copies of pad_token [1, D]. The reference fills
// pad slots with copies of the last input row and then overwrites their embeddings with the
// pad token, so embedding only the real rows and appending the token is the same result.
Tensor append_pad_rows(Tensor x, const Tensor& pad_token, int64_t total) {
  if (x.dim(0) == total) return x;
  const Tensor pad = pad_token.dtype() == x.dtype() ? pad_token : pad_token.to(x.dtype());
  std::vector<Tensor> parts{std::move(x)};
  parts.insert(parts.end(), size_t(total - parts[0].dim(0)), pad);
  return ops::concat0(parts);
}

// [Nx, D]: patch embedding of the patchified latent on the phase's device (`tokens` [N, p·p·C]),
// then x_pad_token in the Nx − N pad slots (§3.10 step 2).
Tensor embed_tokens(const ZImageDit& m, const Tensor& tokens, const Geometry& g) {
  Tensor x = ops::linear(tokens, m.x_embed_w, &m.x_embed_b);  // [N, D]
  return append_pad_rows(std::move(x), m.x_pad_token, g.nx);
}

Tensor embed_image(const ZImageDit& m, const Tensor& latent, const Geometry& g) {
  return embed_tokens(m, ops::to_compute(m.ctx, patchify(latent, g, m.cfg.patch_size)), g);
}

// [Lc, D]: RMSNorm (norm_eps) → Linear on the L real rows, then cap_pad_token (step 4).
Tensor embed_caption(const ZImageDit& m, const Tensor& cap_feats, const Geometry& g) {
  Tensor y = ops::to_compute(m.ctx, cap_feats, /*fresh=*/true);  // [L, cap_feat_dim], a copy normalised in place
  ops::rms_norm_(y, m.cap_norm, float(m.cfg.norm_eps));
  Tensor x = ops::linear(y, m.cap_w, &m.cap_b);  // [L, D]
  return append_pad_rows(std::move(x), m.cap_pad_token, g.lc);
}

// Position ids (§3.6). Image: real token (h, w) → (Lc + 1, h, w); pad slots → (0, 0, 0),
// which is the identity rotation.
std::vector<Pos> image_positions(const Geometry& g) {
  std::vector<Pos> pos(size_t(g.nx), Pos{0, 0, 0});
  for (int64_t h = 0; h < g.ht; ++h)
    for (int64_t w = 0; w < g.wt; ++w) pos[size_t(h * g.wt + w)] = {g.lc + 1, h, w};
  return pos;
}

// Caption slot j, pad slots included → (1 + j, 0, 0).
std::vector<Pos> caption_positions(const Geometry& g) {
  std::vector<Pos> pos(size_t(g.lc));
  for (int64_t j = 0; j < g.lc; ++j) pos[size_t(j)] = {1 + j, 0, 0};
  return pos;
}

// Rotation factors per (token, complex slot): cos, sin [S, head_dim/2] each. Slots are the
// axes' frequencies concatenated in axis order.
struct Rope {
  Tensor cos, sin;
};

// §3.7, matching torch's table: ω = 1/θ^(2k/d) and the angle p·ω in float64, the angle rounded
// to f32, then cos/sin evaluated in f32 on the rounded angle (torch.polar on complex64).
Rope make_rope(const PhaseContext& ctx, const DitConfig& c, const std::vector<Pos>& pos) {
  std::vector<double> omega;
  std::vector<int> axis;
  for (int a = 0; a < 3; ++a)
    for (int k = 0; k < c.axes_dims[size_t(a)] / 2; ++k) {
      omega.push_back(1.0 / std::pow(c.rope_theta, double(2 * k) / double(c.axes_dims[size_t(a)])));
      axis.push_back(a);
    }
  const int64_t S = int64_t(pos.size()), half = int64_t(omega.size());
  Rope r{Tensor::empty({S, half}, DType::F32), Tensor::empty({S, half}, DType::F32)};
  float* cs = r.cos.f32();
  float* sn = r.sin.f32();
  for (int64_t s = 0; s < S; ++s)
    for (int a = 0; a < 3; ++a)
      ZI_CHECK(pos[size_t(s)][size_t(a)] < c.axes_lens[size_t(a)], "[dit_forward] position ",
               pos[size_t(s)][size_t(a)], " on RoPE axis ", a, " exceeds axes_lens ", c.axes_lens[size_t(a)],
               " (image or caption too large)");
  parallel_for(S, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t j = 0; j < half; ++j) {
        const float angle = float(double(pos[size_t(s)][size_t(axis[size_t(j)])]) * omega[size_t(j)]);
        cs[s * half + j] = std::cos(angle);
        sn[s * half + j] = std::sin(angle);
      }
  });
  return Rope{ops::to_device(ctx, r.cos), ops::to_device(ctx, r.sin)};  // where the phase computes
}

// The four modulation vectors of a block, each [D]: scale = 1 + s, gate = tanh(g), split in
// the order (scale_msa, gate_msa, scale_mlp, gate_mlp). No SiLU precedes the linear (§3.4).
struct Modulation {
  Tensor scale_msa, gate_msa, scale_mlp, gate_mlp;
};

Modulation modulation(const DitBlock& b, const Tensor& c) {
  const int64_t D = b.adaln_b.dim(0) / 4;
  Tensor mod = ops::linear(c, b.adaln_w, &b.adaln_b).reshape({4, D});  // [4, D]
  ops::scale_gate_rows_(mod);  // rows (scale_msa, gate_msa, scale_mlp, gate_mlp): 1 + s, tanh(g)
  // The norms read their scale and gate vectors in f32 (cuda's f32_vector): converted here once
  // (exactly: bf16 values), not once per use — on the GPU 1 conversion launch a block instead of 4.
  if (mod.dtype() != DType::F32) mod = mod.to(DType::F32);
  auto part = [&](int i) { return mod.slice(0, i, i + 1).reshape({D}); };
  return Modulation{part(0), part(1), part(2), part(3)};
}

// [S, D] → [S, D]: self-attention with per-head qk RMSNorm and RoPE (§3.8). `h` is taken by
// value so its buffer is freed once q, k, v exist. No mask: at batch 1 the pad slots are
// ordinary keys and queries, as in the reference. `segs` (batches, dit_forward_batch): the rows
// are several items' sequences one after another, of these lengths; each attends to itself
// only, while the projections run as one GEMM over all rows.
Tensor self_attention(const DitBlock& b, const DitConfig& c, Tensor h, const Rope& rope,
                      const std::vector<int64_t>* segs = nullptr) {
  const int64_t S = h.dim(0), H = c.n_heads, hd = c.head_dim();
  // y: one projection's [S, H, hd], rows possibly strided (a third of the fused output) → a
  // contiguous normalised and rotated copy; or in place when y is its own contiguous tensor.
  auto finish = [&](Tensor y, const Tensor& norm, bool rotate) {
    if (norm.defined() && rotate) {  // every head vector normalised on its own, then rotated
      if (!y.is_contiguous()) return ops::rms_norm_rope_pairs(y, norm, kQkNormEps, rope.cos, rope.sin);
      ops::rms_norm_rope_pairs_(y, norm, kQkNormEps, rope.cos, rope.sin);
      return y;
    }
    y = y.contiguous();
    if (norm.defined()) {
      Tensor rows = y.reshape({S * H, hd});  // every head vector normalised on its own
      ops::rms_norm_(rows, norm, kQkNormEps);
    }
    if (rotate) ops::rope_pairs_(y, rope.cos, rope.sin);
    return y;
  };
  Tensor q, k, v;
  if (b.qkv.defined()) {
    // One GEMM reads h once: [S, 3·D] = [q | k | v] per row, viewed [S, 3·H, hd] and split by heads.
    Tensor y = ops::linear(h, b.qkv).reshape({S, 3 * H, hd});
    h = Tensor();
    q = finish(y.slice(1, 0, H), b.norm_q, true);
    k = finish(y.slice(1, H, 2 * H), b.norm_k, true);
    v = y.slice(1, 2 * H, 3 * H).contiguous();
  } else {
    q = finish(ops::linear(h, b.to_q).reshape({S, H, hd}), b.norm_q, true);
    k = finish(ops::linear(h, b.to_k).reshape({S, H, hd}), b.norm_k, true);
    v = ops::linear(h, b.to_v).reshape({S, H, hd});
    h = Tensor();
  }
  Tensor o;
  if (!segs || segs->size() <= 1) {
    o = ops::attention(q, k, v, 1.0f / std::sqrt(float(hd)));  // [S, H, hd]
  } else {
    std::vector<Tensor> parts;
    int64_t r0 = 0;
    for (int64_t len : *segs) {
      parts.push_back(ops::attention(q.slice(0, r0, r0 + len), k.slice(0, r0, r0 + len), v.slice(0, r0, r0 + len),
                                     1.0f / std::sqrt(float(hd))));
      r0 += len;
    }
    ZI_CHECK(r0 == S, "[dit_forward_batch] segments cover ", r0, " of ", S, " rows");
    o = ops::concat0(parts);
  }
  q = k = v = Tensor();
  return ops::linear(o.reshape({S, H * hd}), b.to_out);  // [S, D]
}

// Two weights of one format and shape (the linears on them read a producer's e4m3 copy alike).
bool same_format(const Tensor& a, const Tensor& b) { return a.dtype() == b.dtype() && a.shape() == b.shape(); }

// The FFN's input (its pre-norm's result): the weight of the linear that reads it, and whether
// linears of that weight's format are its only readers (its producer's e4m3_for / e4m3_only).
const Tensor* ffn_input_weight(const DitBlock& b) { return b.w13.defined() ? &b.w13 : &b.w1; }
bool ffn_input_copy_only(const DitBlock& b) { return b.w13.defined() || same_format(b.w1, b.w3); }

// [R, D] → [R, D]: w2(SiLU(w1·y) ⊙ w3·y), y = ffn_norm1(x) (⊙ scale_mlp) (§3.9); the caller
// applies ffn_norm2 fused with the residual add.
Tensor feed_forward(const DitBlock& b, float eps, const Tensor& x_rows, const Tensor* scale, Tensor y = Tensor()) {
  // Each producer is told its consumer's weight: fp8 weights on the GPU get their input's e4m3
  // copy from it (ops::rms_norm), no separate quantization pass.
  // Each linear here is its input's only reader: the producer may write the e4m3 copy alone.
  // y: the pre-norm already made (block_forward's fused residual + pre-norm).
  const bool fused = b.w13.defined();
  if (!y.defined())
    y = ops::rms_norm(x_rows, b.ffn_norm1, eps, scale, ffn_input_weight(b), ffn_input_copy_only(b));  // [R, D]
  Tensor act;
  if (fused) {
    Tensor gu = ops::linear(y, b.w13);  // [R, 2F]: [w1·y | w3·y] per row, one GEMM
    y = Tensor();
    act = ops::silu_mul_halves(gu, &b.w2, true);  // [R, F]
  } else {
    Tensor gate = ops::linear(y, b.w1);  // [R, F]
    Tensor up = ops::linear(y, b.w3);    // [R, F]
    y = Tensor();
    act = ops::silu_mul(gate, up, &b.w2, true);  // [R, F]
  }
  Tensor out = ops::linear(act, b.w2);  // [R, D]
  act = Tensor();
  return out;
}

// How block_forward runs a block's FFN: rows per chunk (0: one chunk) and whether the attention
// residual and the FFN's pre-norm fuse (fuse_add_norm; only where the FFN is one chunk).
struct BlockRun {
  int64_t ffn_chunk = 0;
  bool fuse_add_norm = false;
  static BlockRun of(const PhaseContext& ctx) { return {dit_ffn_chunk_rows(ctx), zi::fuse_add_norm(ctx)}; }
};

// x [S, D] updated in place by one block (§3.9): sandwich-normalised attention and FFN, each
// added through a tanh gate when the block is modulated by c [1, A], plainly otherwise.
void block_forward(const DitBlock& b, const DitConfig& cfg, Tensor& x, const Tensor& c, const Rope& rope,
                   const BlockRun& run, const std::vector<int64_t>* segs = nullptr) {
  const float eps = float(cfg.norm_eps);
  const bool mod = b.modulated();
  const Modulation md = mod ? modulation(b, c) : Modulation{};

  // The q/k/v projections are h's only readers.
  Tensor h = ops::rms_norm(x, b.attention_norm1, eps, mod ? &md.scale_msa : nullptr, b.qkv.defined() ? &b.qkv : &b.to_q,
                           b.qkv.defined() || (same_format(b.to_q, b.to_k) && same_format(b.to_q, b.to_v)));  // [S, D]
  Tensor a = self_attention(b, cfg, std::move(h), rope, segs);                         // [S, D]
  // The FFN is row-wise, so row chunks bound its hidden without changing the result
  // (ffn_chunk 0: the whole sequence in one chunk).
  const int64_t S = x.dim(0), chunk = run.ffn_chunk > 0 ? run.ffn_chunk : std::max<int64_t>(S, 1);
  if (chunk >= S && run.fuse_add_norm) {
    // x += gate ⊙ norm2(a), then the FFN's pre-norm of x, in one op.
    Tensor y = ops::rms_norm_add_norm_(x, a, b.attention_norm2, mod ? &md.gate_msa : nullptr, b.ffn_norm1,
                                       mod ? &md.scale_mlp : nullptr, eps, ffn_input_weight(b), ffn_input_copy_only(b));
    a = Tensor();
    Tensor f = feed_forward(b, eps, x, mod ? &md.scale_mlp : nullptr, std::move(y));
    ops::rms_norm_add_(x, f, b.ffn_norm2, eps, mod ? &md.gate_mlp : nullptr);  // x += gate ⊙ norm2(f)
    return;
  }
  ops::rms_norm_add_(x, a, b.attention_norm2, eps, mod ? &md.gate_msa : nullptr);    // x += gate ⊙ norm2(a)
  a = Tensor();
  for (int64_t r0 = 0; r0 < S; r0 += chunk) {
    Tensor rows = x.slice(0, r0, std::min(S, r0 + chunk));  // a view into x
    Tensor f = feed_forward(b, eps, rows, mod ? &md.scale_mlp : nullptr);
    ops::rms_norm_add_(rows, f, b.ffn_norm2, eps, mod ? &md.gate_mlp : nullptr);  // rows += gate ⊙ norm2(f)
  }
}

// [n, p·p·C]: LayerNorm(x) ⊙ (1 + W·SiLU(c) + b), then the output linear (§3.10 step 8). Only
// the first n rows (the real image tokens) are computed: the layer is row-wise and the
// reference discards the other rows.
Tensor final_layer(const ZImageDit& m, const Tensor& x, const Tensor& c, int64_t n) {
  Tensor sc = c.clone();  // [1, A]
  ops::silu_(sc);         // unlike the blocks, the final layer applies SiLU to c
  Tensor scale = ops::linear(sc, m.final_adaln_w, &m.final_adaln_b).reshape({m.cfg.dim});  // [D]
  ops::add_scalar_(scale, 1.0f);
  Tensor y = x.slice(0, 0, n).clone();  // [n, D]
  ops::layer_norm_(y, kFinalNormEps);
  ops::mul_rows_(y, scale);
  return ops::linear(y, m.final_w, &m.final_b);  // [n, p·p·C]
}

}  // namespace

int64_t dit_ffn_chunk_rows(const PhaseContext& ctx) {
  // On the GPU the whole sequence is one chunk: the hidden is small next to device memory and
  // larger GEMMs run faster.
  if (ctx.ffn_chunk_rows > 0) return ctx.ffn_chunk_rows;
  return ctx.device == Device::CPU ? kFfnChunkRows : 0;
}

int dit_ffn_hidden(const DitConfig& cfg) { return int(double(cfg.dim) / 3.0 * 8.0); }

std::vector<Tensor*> dit_block_tensors(DitBlock& b) {
  return {&b.qkv,       &b.to_q,      &b.to_k, &b.to_v, &b.to_out, &b.norm_q, &b.norm_k, &b.attention_norm1,
          &b.attention_norm2, &b.ffn_norm1, &b.ffn_norm2, &b.w13, &b.w1, &b.w3, &b.w2, &b.adaln_w, &b.adaln_b};
}

DitBlock load_dit_block(WeightLoader& ld, const std::string& prefix, const DitConfig& cfg, DType wdt, bool modulated) {
  return load_block(ld, prefix, cfg, wdt, modulated);
}
int dit_adaln_dim(const DitConfig& cfg) { return std::min(cfg.dim, kAdalnEmbedDim); }

// The learned pad embeddings [1, D]. Fine-tuned single files sometimes lack them or store them
// empty: zeros then, as diffusers initialises them, with a notice.
Tensor load_pad_token(WeightLoader& ld, const std::string& name, int64_t D) {
  Tensor t = ld.load_optional(name, {1, D}, DType::F32);
  if (t.defined()) return t;
  const TensorStore::Entry e = ld.store().find(name);
  if (e.file && e.info->numel() > 0) return t;  // present; a check-only load reads nothing
  ld.note(str_cat(name, " is missing from ", ld.store().where(), ": using zeros (as diffusers initialises it)"));
  return Tensor::zeros({1, D}, DType::F32, Tag::DitWeights, ld.device());
}

ZImageDit load_zimage_dit(WeightLoader& ld, const DitConfig& cfg, DType wdt) {
  check_config(cfg);
  ZI_CHECK(is_float_dtype(wdt) || quant::can_quantize(wdt),
           "[load_zimage_dit] weight dtype must be f32, bf16, f16, q8_0, q4_0, q5_0 or fp8, got ", dtype_name(wdt));
  // Weight formats apply to the blocks' matrices; the embedders and the final layer stay float.
  const DType bdt = wdt;
  wdt = storage_dtype(wdt);
  const int64_t D = cfg.dim, A = dit_adaln_dim(cfg), P = patch_dim(cfg), Cf = cfg.cap_feat_dim;
  const DType f32 = DType::F32;
  const std::string xe = "all_x_embedder." + patch_key(cfg) + ".";
  const std::string fl = "all_final_layer." + patch_key(cfg) + ".";
  ZImageDit m;
  m.cfg = cfg;
  m.ctx = ld.context();
  m.x_embed_w = ld.load(xe + "weight", {D, P}, wdt);
  m.x_embed_b = ld.load(xe + "bias", {D}, f32);
  m.t_mlp0_w = ld.load("t_embedder.mlp.0.weight", {kTimeMidDim, kTimeFreqDim}, wdt);
  m.t_mlp0_b = ld.load("t_embedder.mlp.0.bias", {kTimeMidDim}, f32);
  m.t_mlp2_w = ld.load("t_embedder.mlp.2.weight", {A, kTimeMidDim}, wdt);
  m.t_mlp2_b = ld.load("t_embedder.mlp.2.bias", {A}, f32);
  m.cap_norm = ld.load("cap_embedder.0.weight", {Cf}, f32);
  m.cap_w = ld.load("cap_embedder.1.weight", {D, Cf}, wdt);
  m.cap_b = ld.load("cap_embedder.1.bias", {D}, f32);
  m.x_pad_token = load_pad_token(ld, "x_pad_token", D);
  m.cap_pad_token = load_pad_token(ld, "cap_pad_token", D);
  m.final_adaln_w = ld.load(fl + "adaLN_modulation.1.weight", {D, A}, wdt);
  m.final_adaln_b = ld.load(fl + "adaLN_modulation.1.bias", {D}, f32);
  m.final_w = ld.load(fl + "linear.weight", {P, D}, wdt);
  m.final_b = ld.load(fl + "linear.bias", {P}, f32);
  // Blocks the --vram plan streams load on the host and move to the streamer's pinned memory.
  StreamedBlockLoader streamed(ld);
  m.streamer = streamed.streamer();
  size_t index = 0;
  auto block = [&](const std::string& prefix, bool modulated) {
    return streamed.load(
        index++, [&] { return load_block(ld, prefix, cfg, bdt, modulated); },
        [](DitBlock& b) { return dit_block_tensors(b); });
  };
  for (int i = 0; i < cfg.n_refiner_layers; ++i) m.noise_refiner.push_back(block(str_cat("noise_refiner.", i, "."), true));
  for (int i = 0; i < cfg.n_refiner_layers; ++i)
    m.context_refiner.push_back(block(str_cat("context_refiner.", i, "."), false));
  for (int i = 0; i < cfg.n_layers; ++i) m.layers.push_back(block(str_cat("layers.", i, "."), true));
  streamed.done();
  return m;
}

// The three RoPE tables of one geometry: image tokens, caption tokens, and both (unified).
struct ZImageDit::RopeCache {
  // One geometry's tables: the image's, the caption's and the unified sequence's.
  struct Tables {
    int64_t ht = -1, wt = -1, nx = -1, lc = -1;
    Device device = Device::CPU;
    Rope x, cap, u;
  };
  // The last two geometries, the most recent last: a CFG step's two captions may differ in
  // padded length, and one set of tables would be remade on the host twice per step.
  std::vector<std::shared_ptr<const Tables>> recent;
  // The last batch's tables, its items' rows stacked (dit_forward_batch): one batch runs all its
  // steps with the same captions, so they are made once per batch.
  struct Stacked {
    int64_t ht = -1, wt = -1;
    std::vector<int64_t> lcs;
    Device device = Device::CPU;
    Rope x, cap, u;
  };
  std::shared_ptr<Stacked> stacked;
};

namespace {

std::shared_ptr<const ZImageDit::RopeCache::Tables> rope_tables_shared(const ZImageDit& m, const Geometry& g) {
  using Tables = ZImageDit::RopeCache::Tables;
  const Device dev = m.ctx.device;
  auto& rc = m.rope_cache;
  if (!rc) rc = std::make_shared<ZImageDit::RopeCache>();
  auto& recent = rc->recent;
  for (size_t i = 0; i < recent.size(); ++i) {
    const Tables& t = *recent[i];
    if (t.ht == g.ht && t.wt == g.wt && t.nx == g.nx && t.lc == g.lc && t.device == dev) {
      std::shared_ptr<const Tables> hit = recent[i];
      recent.erase(recent.begin() + std::ptrdiff_t(i));
      recent.push_back(hit);
      return hit;
    }
  }
  if (recent.size() >= 2) recent.erase(recent.begin());  // the oldest goes before the new ones are made
  auto n = std::make_shared<Tables>();
  n->ht = g.ht, n->wt = g.wt, n->nx = g.nx, n->lc = g.lc, n->device = dev;
  n->x = make_rope(m.ctx, m.cfg, image_positions(g));
  n->cap = make_rope(m.ctx, m.cfg, caption_positions(g));
  n->u = Rope{ops::concat0({n->x.cos, n->cap.cos}), ops::concat0({n->x.sin, n->cap.sin})};
  recent.push_back(n);
  return n;
}

const ZImageDit::RopeCache::Tables& rope_tables(const ZImageDit& m, const Geometry& g) {
  return *rope_tables_shared(m, g);  // the cache holds it until two newer geometries come
}

// The RoPE tables of a batch: each item's image, caption and unified tables, stacked in item
// order (items differ in caption length, hence in positions).
const ZImageDit::RopeCache::Stacked& stacked_rope_tables(const ZImageDit& m, const std::vector<Geometry>& gs) {
  const Device dev = m.ctx.device;
  std::vector<int64_t> lcs;
  for (const Geometry& g : gs) lcs.push_back(g.lc);
  auto& rc = m.rope_cache;
  if (!rc) rc = std::make_shared<ZImageDit::RopeCache>();
  auto& st = rc->stacked;
  if (!st || st->ht != gs[0].ht || st->wt != gs[0].wt || st->lcs != lcs || st->device != dev) {
    st.reset();
    auto n = std::make_shared<ZImageDit::RopeCache::Stacked>();
    n->ht = gs[0].ht, n->wt = gs[0].wt, n->lcs = lcs, n->device = dev;
    std::vector<Tensor> xc, xs, cc, cs, uc, us;
    for (const Geometry& g : gs) {
      Rope x = make_rope(m.ctx, m.cfg, image_positions(g));
      Rope cap = make_rope(m.ctx, m.cfg, caption_positions(g));
      xc.push_back(x.cos), xs.push_back(x.sin), cc.push_back(cap.cos), cs.push_back(cap.sin);
      uc.push_back(x.cos), uc.push_back(cap.cos), us.push_back(x.sin), us.push_back(cap.sin);
    }
    n->x = Rope{ops::concat0(xc), ops::concat0(xs)};
    n->cap = Rope{ops::concat0(cc), ops::concat0(cs)};
    n->u = Rope{ops::concat0(uc), ops::concat0(us)};
    st = std::move(n);
  }
  return *st;
}

}  // namespace

namespace {
// The blocks' indices for the streamer: noise_refiner, context_refiner, layers, in load order.
size_t noise_refiner_index(const ZImageDit&, size_t i) { return i; }
size_t context_refiner_index(const ZImageDit& m, size_t i) { return m.noise_refiner.size() + i; }
size_t layer_index(const ZImageDit& m, size_t i) { return m.noise_refiner.size() + m.context_refiner.size() + i; }
}  // namespace

namespace {

// The forward on the phase's device from the patchified latent `tokens` [N, p·p·C] and the
// timestep's sinusoid [1, 256] (both already there) to the output tokens [N, p·p·C]. Device
// ops only (cap_feats may be host data: it is copied in), so that it can be recorded.
Tensor dit_core(const ZImageDit& m, const Geometry& g, const ZImageDit::RopeCache::Tables& rope,
                const Tensor& tokens, const Tensor& sinusoid, const Tensor& cap_feats) {
  const DitConfig& cfg = m.cfg;
  const Tensor c = embed_time(m, sinusoid);  // [1, A]
  const BlockRun run = BlockRun::of(m.ctx);

  // Image stream, refined alone with modulation (§3.10 steps 2–3).
  Tensor x = embed_tokens(m, tokens, g);  // [Nx, D]
  for (size_t i = 0; i < m.noise_refiner.size(); ++i) {
    BlockUse in(m.streamer.get(), noise_refiner_index(m, i));
    block_forward(m.noise_refiner[i], cfg, x, c, rope.x, run);
  }

  // Caption stream, refined alone without modulation (steps 4–5).
  Tensor cap = embed_caption(m, cap_feats, g);  // [Lc, D]
  for (size_t i = 0; i < m.context_refiner.size(); ++i) {
    BlockUse in(m.streamer.get(), context_refiner_index(m, i));
    block_forward(m.context_refiner[i], cfg, cap, c, rope.cap, run);
  }

  // Unified sequence, image tokens first, then caption tokens (step 6).
  Tensor u = ops::concat0({x, cap});  // [Nx + Lc, D]
  x = cap = Tensor();
  for (size_t i = 0; i < m.layers.size(); ++i) {  // step 7
    BlockUse in(m.streamer.get(), layer_index(m, i));
    block_forward(m.layers[i], cfg, u, c, rope.u, run);
  }
  return final_layer(m, u, c, g.n);  // [N, p·p·C]  (steps 8–9)
}

}  // namespace

// ---- the step recorded (issue 19) ----
// dit_core's device work recorded once per geometry and replayed: one submission per forward
// instead of ~20 kernel launches per block, and no launch gaps. The first forward of a geometry
// runs eagerly (first-use costs: kernel picks, cuBLASLt plans, module loads), the second
// records and replays, later ones replay. The recording reads fixed device buffers (the
// tokens, the sinusoid, the caption features) that each forward refills, and writes a fixed
// output; its RoPE tables are held with it. Same kernels on the same values: the same bits.
struct ZImageDit::StepRecordings {
  struct Entry {
    int64_t ht = -1, wt = -1, nx = -1, l = -1, lc = -1;
    std::shared_ptr<const RopeCache::Tables> rope;
    Tensor tokens, sinusoid, cap, out;
    ops::Recording rec;
  };
  std::vector<std::unique_ptr<Entry>> entries;  // up to two (a CFG step's captions), the most recent last
  std::string failed;                           // why recording failed: every forward runs eagerly then
  int64_t replays = 0;
};

bool dit_records_steps(const ZImageDit& m) {
  if (m.streamer) return false;  // (the ring's copy stream is not recorded)
  int on = m.ctx.cuda_graphs;
  if (on < 0) on = env_flag("ZI_CUDA_GRAPHS", false) ? 1 : 0;
  return on == 1 && ops::can_record(m.ctx);
}

int64_t dit_step_replays(const ZImageDit& m) { return m.recordings ? m.recordings->replays : 0; }
std::string dit_recording_failure(const ZImageDit& m) { return m.recordings ? m.recordings->failed : std::string(); }

void dit_release_recordings(const ZImageDit& m) {
  if (!m.recordings) return;
  for (auto& e : m.recordings->entries) {
    e->rec = ops::Recording();
    e->rope.reset();
    e->tokens = e->sinusoid = e->cap = e->out = Tensor();
  }
}

namespace {

// The forward's output tokens through a recording, or an undefined tensor when this forward
// runs eagerly (recording off, the geometry's first forward, or recording failed).
Tensor recorded_forward(const ZImageDit& m, const Geometry& g, const Tensor& tokens, const Tensor& sinusoid,
                        const Tensor& cap_feats) {
  if (!dit_records_steps(m)) return Tensor();
  auto& sr = m.recordings;
  if (!sr) sr = std::make_shared<ZImageDit::StepRecordings>();
  if (!sr->failed.empty()) return Tensor();
  using Entry = ZImageDit::StepRecordings::Entry;
  auto& es = sr->entries;
  Entry* e = nullptr;
  for (size_t i = 0; i < es.size(); ++i)
    if (es[i]->ht == g.ht && es[i]->wt == g.wt && es[i]->nx == g.nx && es[i]->l == g.l && es[i]->lc == g.lc) {
      std::unique_ptr<Entry> hit = std::move(es[i]);
      es.erase(es.begin() + std::ptrdiff_t(i));
      es.push_back(std::move(hit));
      e = es.back().get();
      break;
    }
  if (!e) {  // first forward of this geometry: eager
    if (es.size() >= 2) es.erase(es.begin());
    auto n = std::make_unique<Entry>();
    n->ht = g.ht, n->wt = g.wt, n->nx = g.nx, n->l = g.l, n->lc = g.lc;
    es.push_back(std::move(n));
    return Tensor();
  }
  if (!e->rec.defined()) {
    e->rope = rope_tables_shared(m, g);
    e->tokens = ops::to_compute(m.ctx, tokens, /*fresh=*/true);
    e->sinusoid = ops::to_compute(m.ctx, sinusoid, /*fresh=*/true);
    e->cap = ops::to_compute(m.ctx, cap_feats, /*fresh=*/true);
    e->out = Tensor::empty({g.n, patch_dim(m.cfg)}, e->tokens.dtype(), Tag::Activations, m.ctx.device);
    std::string why;
    e->rec = ops::record(
        m.ctx,
        [&] {
          const Tensor o = dit_core(m, g, *e->rope, e->tokens, e->sinusoid, e->cap);
          e->out.copy_from(o);
        },
        &why);
    if (!e->rec.defined()) {
      sr->failed = why.empty() ? std::string("unknown reason") : why;
      es.clear();
      return Tensor();
    }
  } else {
    e->tokens.copy_from(ops::to_compute(m.ctx, tokens));
    e->sinusoid.copy_from(ops::to_compute(m.ctx, sinusoid));
    e->cap.copy_from(ops::to_compute(m.ctx, cap_feats));
  }
  e->rec.replay();
  ++sr->replays;
  return e->out;
}

}  // namespace

Tensor dit_forward(const ZImageDit& m, const Tensor& latent, float t, const Tensor& cap_feats) {
  const DitConfig& cfg = m.cfg;
  const Geometry g = geometry(cfg, latent, cap_feats);
  const Tensor tokens = patchify(latent, g, cfg.patch_size);  // [N, p·p·C] on the host
  const Tensor sinusoid = timestep_sinusoid(m, t);            // [1, 256] on the host
  Tensor out = recorded_forward(m, g, tokens, sinusoid, cap_feats);
  if (!out.defined())
    out = dit_core(m, g, rope_tables(m, g), ops::to_compute(m.ctx, tokens), ops::to_compute(m.ctx, sinusoid),
                   cap_feats);
  return unpatchify(ops::to_host_f32(out), g, cfg.patch_size, cfg.in_channels);  // [C, 1, Hl, Wl] on the host
}

// ---------------------------------------------------------------------------------------
// ControlNet (diffusers ZImageControlNetModel.forward, then the transformer with
// controlnet_block_samples). Batch 1, so no masks; the pad slots are attended as in dit_forward.

namespace {

// One control block on its running state `c` [S, D]: the first block starts from
// before_proj(c) + x; returns the hint after_proj(c).
Tensor control_block(const ControlBlock& cb, const DitConfig& cfg, Tensor& c, const Tensor* x, const Tensor& temb,
                     const Rope& rope, const BlockRun& run) {
  if (cb.before_w.defined()) {
    Tensor y = ops::linear(c, cb.before_w, &cb.before_b);
    ops::add_(y, *x);
    c = std::move(y);
  }
  block_forward(cb.b, cfg, c, temb, rope, run);
  if (!cb.after_w.defined()) return Tensor();
  return ops::linear(c, cb.after_w, &cb.after_b);
}

}  // namespace

Tensor dit_forward_control(const ZImageDit& m, const Tensor& latent, float t, const Tensor& cap_feats,
                           const ZImageControlNet& cn, const Tensor& control, float scale) {
  const DitConfig& cfg = m.cfg;
  const ControlNetConfig& cc = cn.cfg;
  const Geometry g = geometry(cfg, latent, cap_feats);
  ZI_CHECK(control.ndim() == 4 && control.dim(0) == cc.control_in_dim && control.dim(1) == 1 &&
               control.dim(2) == latent.dim(2) && control.dim(3) == latent.dim(3),
           "[dit_forward_control] control context must be [", cc.control_in_dim, ", 1, ", latent.dim(2), ", ",
           latent.dim(3), "], got ", control.desc());
  const Tensor c = embed_timestep(m, t);  // [1, A], shared with the ControlNet (from_transformer)
  const auto& rope = rope_tables(m, g);
  const BlockRun run = BlockRun::of(m.ctx);

  Tensor x = embed_image(m, latent, g);  // [Nx, D]
  // Control context: patch embedding with the ControlNet's embedder, x_pad_token in the pad slots.
  Tensor ctx = append_pad_rows(ops::linear(ops::to_compute(m.ctx, patchify(control, g, cfg.patch_size)), cn.x_embed_w, &cn.x_embed_b),
                               m.x_pad_token, g.nx);  // [Nx, D]

  // 2.0 / 2.1: control blocks on the image tokens give the noise refiner's hints; 1.0: plain
  // refiner blocks on the control context.
  std::vector<Tensor> refiner_hints;
  if (cc.layout == ControlNetLayout::V1) {
    for (const ControlBlock& b : cn.refiner) block_forward(b.b, cfg, ctx, c, rope.x, run);
  } else {
    const std::vector<ControlBlock>& blocks = cc.layout == ControlNetLayout::V2_0 ? cn.layers : cn.refiner;
    for (const ControlBlock& b : blocks) {
      Tensor h = control_block(b, cfg, ctx, &x, c, rope.x, run);
      if (refiner_hints.size() < cc.refiner_places.size()) {
        ops::scale_(h, scale);
        refiner_hints.push_back(std::move(h));
      }
    }
  }

  // Caption stream: the same for the transformer and the ControlNet.
  Tensor cap = embed_caption(m, cap_feats, g);  // [Lc, D]
  for (size_t i = 0; i < m.context_refiner.size(); ++i) {
    BlockUse in(m.streamer.get(), context_refiner_index(m, i));
    block_forward(m.context_refiner[i], cfg, cap, c, rope.cap, run);
  }

  // The ControlNet's own image stream: the transformer's noise refiner with the hints added
  // (the transformer's stream gets none of them).
  Tensor xc;
  if (!refiner_hints.empty()) xc = x.clone();
  for (size_t i = 0; i < m.noise_refiner.size(); ++i) {
    BlockUse in(m.streamer.get(), noise_refiner_index(m, i));
    block_forward(m.noise_refiner[i], cfg, x, c, rope.x, run);
    if (xc.defined()) {
      block_forward(m.noise_refiner[i], cfg, xc, c, rope.x, run);
      for (size_t k = 0; k < cc.refiner_places.size(); ++k)
        if (size_t(cc.refiner_places[k]) == i) ops::add_(xc, refiner_hints[k]);
    }
  }
  refiner_hints.clear();
  Tensor uc = ops::concat0({xc.defined() ? xc : x, cap});  // the ControlNet's unified sequence
  xc = Tensor();
  Tensor cu = ops::concat0({ctx, cap});  // the control context, unified with the captions
  ctx = Tensor();
  Tensor u = ops::concat0({x, cap});
  x = cap = Tensor();

  // Main layers; the control layer whose place is i runs just before its hint is needed.
  size_t k = 0;
  for (size_t i = 0; i < m.layers.size(); ++i) {
    {
      BlockUse in(m.streamer.get(), layer_index(m, i));
      block_forward(m.layers[i], cfg, u, c, rope.u, run);
    }
    if (k < cn.layers.size() && size_t(cc.layers_places[k]) == i) {
      Tensor h = control_block(cn.layers[k], cfg, cu, &uc, c, rope.u, run);
      if (k == 0) uc = Tensor();  // only the first control block reads it
      ops::scale_(h, scale);
      ops::add_(u, h);
      ++k;
    }
  }
  cu = Tensor();
  Tensor out = final_layer(m, u, c, g.n);
  u = Tensor();
  return unpatchify(ops::to_host_f32(out), g, cfg.patch_size, cfg.in_channels);
}

std::vector<Tensor> dit_forward_batch(const ZImageDit& m, const std::vector<Tensor>& latents,
                                      const std::vector<float>& t, const std::vector<Tensor>& caps, BatchMode mode) {
  ZI_CHECK(latents.size() == t.size() && latents.size() == caps.size(), "[dit_forward_batch] ", latents.size(),
           " latents, ", t.size(), " timesteps and ", caps.size(), " captions: counts must match");
  const size_t B = latents.size();
  if (mode == BatchMode::Auto) mode = m.ctx.device == Device::CPU ? BatchMode::OneByOne : BatchMode::Stacked;
  bool stack = B > 1 && mode == BatchMode::Stacked;
  for (size_t i = 1; i < B && stack; ++i)
    stack = t[i] == t[0] && latents[i].shape() == latents[0].shape();
  std::vector<Tensor> out;
  out.reserve(B);
  if (!stack) {  // different timesteps or sizes: one item at a time
    for (size_t i = 0; i < B; ++i) out.push_back(dit_forward(m, latents[i], t[i], caps[i]));
    return out;
  }
  // One timestep and one image size: the items' token sequences are stacked, so every linear
  // layer, norm and modulation runs once over all rows (one GEMM per weight), and attention runs
  // per item on its own rows. Every op involved is row-wise, so each item's result equals
  // dit_forward's for it (up to the GEMMs' summation order).
  const DitConfig& cfg = m.cfg;
  std::vector<Geometry> gs;
  for (size_t i = 0; i < B; ++i) gs.push_back(geometry(cfg, latents[i], caps[i]));
  const Tensor c = embed_timestep(m, t[0]);  // [1, A], shared
  const ZImageDit::RopeCache::Stacked& rope = stacked_rope_tables(m, gs);
  const BlockRun run = BlockRun::of(m.ctx);  // the FFN is row-wise: chunks may span items
  std::vector<int64_t> seg_x(B, gs[0].nx), seg_cap, seg_u;
  for (const Geometry& g : gs) seg_cap.push_back(g.lc), seg_u.push_back(g.nx + g.lc);

  std::vector<Tensor> parts;
  for (size_t i = 0; i < B; ++i) parts.push_back(embed_image(m, latents[i], gs[i]));
  Tensor x = ops::concat0(parts);  // [B·Nx, D]
  parts.clear();
  for (size_t i = 0; i < m.noise_refiner.size(); ++i) {
    BlockUse in(m.streamer.get(), noise_refiner_index(m, i));
    block_forward(m.noise_refiner[i], cfg, x, c, rope.x, run, &seg_x);
  }

  for (size_t i = 0; i < B; ++i) parts.push_back(embed_caption(m, caps[i], gs[i]));
  Tensor cap = ops::concat0(parts);  // [Σ Lc, D]
  parts.clear();
  for (size_t i = 0; i < m.context_refiner.size(); ++i) {
    BlockUse in(m.streamer.get(), context_refiner_index(m, i));
    block_forward(m.context_refiner[i], cfg, cap, c, rope.cap, run, &seg_cap);
  }

  // Each item's unified sequence [image; caption], items one after another.
  int64_t cap0 = 0;
  for (size_t i = 0; i < B; ++i) {
    parts.push_back(x.slice(0, int64_t(i) * gs[0].nx, int64_t(i + 1) * gs[0].nx));
    parts.push_back(cap.slice(0, cap0, cap0 + gs[i].lc));
    cap0 += gs[i].lc;
  }
  Tensor u = ops::concat0(parts);  // [Σ (Nx + Lc), D]
  parts.clear();
  x = cap = Tensor();
  for (size_t i = 0; i < m.layers.size(); ++i) {
    BlockUse in(m.streamer.get(), layer_index(m, i));
    block_forward(m.layers[i], cfg, u, c, rope.u, run, &seg_u);
  }

  int64_t r0 = 0;
  for (size_t i = 0; i < B; ++i) {
    Tensor o = final_layer(m, u.slice(0, r0, r0 + seg_u[i]), c, gs[i].n);  // [N, p·p·C]
    out.push_back(unpatchify(ops::to_host_f32(o), gs[i], cfg.patch_size, cfg.in_channels));
    r0 += seg_u[i];
  }
  return out;
}

}  // namespace zi
