// Qwen3 text encoder forward. Spec §2.3 (layer), §2.4 (rotate-half RoPE), §2.5 (which output).
// Ref: transformers src/transformers/models/qwen3/modeling_qwen3.py
#include "models/qwen3_encoder.h"

#include <cmath>

#include "core/check.h"
#include "core/quant.h"
#include "ops/ops.h"

namespace zi {
namespace {

// "model." when the checkpoint was saved from the causal-LM wrapper (spec §6.4), else "".
std::string detect_prefix(const WeightLoader& loader) {
  if (loader.has("model.embed_tokens.weight")) return "model.";
  if (loader.has("embed_tokens.weight")) return "";
  // No embedding at all: guess from the layers so finish() names the right missing key.
  for (const std::string& n : loader.store().names())
    if (n.starts_with("model.layers.")) return "model.";
  return "";
}

Qwen3Layer load_layer(WeightLoader& ld, const std::string& p, const Qwen3Config& c, DType wdt) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t QD = int64_t(c.num_attention_heads) * D, KD = int64_t(c.num_key_value_heads) * D;
  Qwen3Layer l;
  l.input_layernorm = ld.load(p + "input_layernorm.weight", {H}, DType::F32);
  l.q_proj = ld.load_matrix(p + "self_attn.q_proj.weight", {QD, H}, wdt);
  l.k_proj = ld.load_matrix(p + "self_attn.k_proj.weight", {KD, H}, wdt);
  l.v_proj = ld.load_matrix(p + "self_attn.v_proj.weight", {KD, H}, wdt);
  l.o_proj = ld.load_matrix(p + "self_attn.o_proj.weight", {H, QD}, wdt);
  l.q_norm = ld.load(p + "self_attn.q_norm.weight", {D}, DType::F32);
  l.k_norm = ld.load(p + "self_attn.k_norm.weight", {D}, DType::F32);
  l.post_attention_layernorm = ld.load(p + "post_attention_layernorm.weight", {H}, DType::F32);
  l.gate_proj = ld.load_matrix(p + "mlp.gate_proj.weight", {I, H}, wdt);
  l.up_proj = ld.load_matrix(p + "mlp.up_proj.weight", {I, H}, wdt);
  l.down_proj = ld.load_matrix(p + "mlp.down_proj.weight", {H, I}, wdt);
  return l;
}

// Projects `a` [S, hidden] to heads [S, n_heads, D], applies the per-head RMSNorm (before
// RoPE, spec §2.3 step 3) and the rotation.
Tensor project_heads(const Tensor& a, const Tensor& proj, const Tensor& norm, int n_heads, int64_t D, float eps,
                     const Tensor& cos, const Tensor& sin) {
  const int64_t S = a.dim(0);
  Tensor x = ops::linear(a, proj).reshape({S * n_heads, D});
  ops::rms_norm_(x, norm, eps);
  x = x.reshape({S, n_heads, D});
  ops::rope_halves_(x, cos, sin);
  return x;
}

// Self-attention of one layer on the normed input `a` [S, hidden] → o_proj output [S, hidden].
Tensor self_attention(const Qwen3Config& c, const Qwen3Layer& w, const Tensor& a, const Tensor& cos,
                      const Tensor& sin) {
  const int64_t S = a.dim(0), D = c.head_dim;
  const float eps = float(c.rms_norm_eps);
  Tensor o;
  {
    Tensor q = project_heads(a, w.q_proj, w.q_norm, c.num_attention_heads, D, eps, cos, sin);  // [S, Hq, D]
    Tensor k = project_heads(a, w.k_proj, w.k_norm, c.num_key_value_heads, D, eps, cos, sin);  // [S, Hkv, D]
    Tensor v = ops::linear(a, w.v_proj).reshape({S, c.num_key_value_heads, D});              // [S, Hkv, D]
    // transformers: scaling = head_dim ** -0.5 (a Python double, used as f32).
    o = ops::attention(q, k, v, float(1.0 / std::sqrt(double(D))), /*causal=*/true);  // [S, Hq, D]
  }
  return ops::linear(o.reshape({S, int64_t(c.num_attention_heads) * D}), w.o_proj);
}

// One pre-norm decoder layer, updating the residual stream h [S, hidden] in place.
void decoder_layer(const Qwen3Config& c, const Qwen3Layer& w, Tensor& h, const Tensor& cos, const Tensor& sin) {
  const float eps = float(c.rms_norm_eps);
  {
    Tensor a = h.clone();
    ops::rms_norm_(a, w.input_layernorm, eps);
    Tensor out = self_attention(c, w, a, cos, sin);
    ops::add_(h, out);
  }
  Tensor m = h.clone();
  ops::rms_norm_(m, w.post_attention_layernorm, eps);
  Tensor act;
  {
    Tensor gate = ops::linear(m, w.gate_proj);  // [S, inter]
    Tensor up = ops::linear(m, w.up_proj);      // [S, inter]
    act = ops::silu_mul(gate, up);
  }
  m = Tensor();
  ops::add_(h, ops::linear(act, w.down_proj));
}

}  // namespace

std::vector<Tensor*> qwen3_layer_tensors(Qwen3Layer& l) {
  return {&l.input_layernorm, &l.q_proj,   &l.k_proj,  &l.v_proj,    &l.o_proj,
          &l.q_norm,          &l.k_norm,   &l.post_attention_layernorm, &l.gate_proj, &l.up_proj, &l.down_proj};
}

std::vector<std::array<int64_t, 2>> qwen3_linear_shapes(const Qwen3Config& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t QD = int64_t(c.num_attention_heads) * D, KD = int64_t(c.num_key_value_heads) * D;
  return {{QD, H}, {KD, H}, {H, QD}, {I, H}, {H, I}};
}

Qwen3Encoder load_qwen3_encoder(WeightLoader& loader, const Qwen3Config& cfg, DType wdt) {
  ZI_CHECK(is_float_dtype(wdt) || quant::can_quantize(wdt),
           "[load_qwen3_encoder] weight dtype must be f32, bf16, f16, q8_0, q4_0, q5_0 or fp8, got ", dtype_name(wdt));
  ZI_CHECK(cfg.num_hidden_layers >= 1, "[load_qwen3_encoder] num_hidden_layers must be >= 1, got ",
           cfg.num_hidden_layers);
  ZI_CHECK(cfg.num_key_value_heads > 0 && cfg.num_attention_heads % cfg.num_key_value_heads == 0,
           "[load_qwen3_encoder] num_attention_heads (", cfg.num_attention_heads,
           ") must be a multiple of num_key_value_heads (", cfg.num_key_value_heads, ")");
  ZI_CHECK(cfg.head_dim > 0 && cfg.head_dim % 2 == 0, "[load_qwen3_encoder] head_dim must be even, got ",
           cfg.head_dim);
  const std::string p = detect_prefix(loader);
  Qwen3Encoder m;
  m.cfg = cfg;
  m.ctx = loader.context();
  // The embedding is a matrix like ggml's token_embd: kept or made in the weight format on the
  // CPU (rows dequantized at lookup). In a GPU phase it stays on the host in storage_dtype(wdt)
  // (the values the GPU held before: bf16 for the weight formats), a view of the file where it is
  // stored so: a prompt reads a few hundred of its 151k rows, and the device keeps its 0.78 GB
  // (bf16) for the layers — qwen3_encode gathers the rows on the host and uploads them.
  if (loader.device() == Device::CPU)
    m.embed_tokens = loader.load_matrix(p + "embed_tokens.weight", {cfg.vocab_size, cfg.hidden_size}, wdt);
  else
    m.embed_tokens = loader.load_table(p + "embed_tokens.weight", {cfg.vocab_size, cfg.hidden_size}, storage_dtype(wdt));
  const int n_used = cfg.num_hidden_layers - 1;  // hidden_states[-2] = output of layer N−2
  m.layers.reserve(size_t(n_used));
  // Layers the --vram plan streams load on the host and move to the streamer's pinned memory.
  StreamedBlockLoader streamed(loader);
  m.streamer = streamed.streamer();
  for (int i = 0; i < n_used; ++i)
    m.layers.push_back(streamed.load(
        size_t(i), [&] { return load_layer(loader, str_cat(p, "layers.", i, "."), cfg, wdt); },
        [](Qwen3Layer& l) { return qwen3_layer_tensors(l); }));
  streamed.done();
  // Present in the checkpoint, never needed (spec §2.5).
  loader.ignore_prefix(str_cat(p, "layers.", n_used, "."));
  loader.ignore_prefix(p + "norm.");
  loader.ignore_prefix("lm_head.");
  return m;
}

void qwen3_rope_tables(int64_t len, int head_dim, double theta, DType freq_dtype, Tensor* cos, Tensor* sin) {
  ZI_CHECK(freq_dtype == DType::F32 || freq_dtype == DType::BF16 || freq_dtype == DType::F16,
           "[qwen3_rope_tables] frequency dtype must be f32, bf16 or f16, got ", dtype_name(freq_dtype));
  const int64_t half = head_dim / 2;
  // transformers: inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
  std::vector<float> inv_freq(static_cast<size_t>(half));
  const float base = float(theta);
  for (int64_t i = 0; i < half; ++i) {
    const float expo = float(2 * i) / float(head_dim);
    const float powed = float(std::pow(double(base), double(expo)));
    inv_freq[size_t(i)] = 1.0f / powed;
  }
  if (freq_dtype != DType::F32) {  // round trip through the narrower type, like buffer.to(dt).to(f32)
    std::vector<uint16_t> narrow(inv_freq.size());
    convert(inv_freq.data(), DType::F32, narrow.data(), freq_dtype, inv_freq.size());
    convert(narrow.data(), freq_dtype, inv_freq.data(), DType::F32, inv_freq.size());
  }
  *cos = Tensor::empty({len, half}, DType::F32);
  *sin = Tensor::empty({len, half}, DType::F32);
  float* c = cos->f32();
  float* s = sin->f32();
  for (int64_t p = 0; p < len; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * inv_freq[size_t(i)];  // f32 product, like the f32 matmul
      c[p * half + i] = float(std::cos(double(angle)));
      s[p * half + i] = float(std::sin(double(angle)));
    }
  }
}

Tensor qwen3_encode(const Qwen3Encoder& m, const std::vector<int32_t>& ids) {
  const Qwen3Config& c = m.cfg;
  ZI_CHECK(!ids.empty(), "[qwen3_encode] no token ids");
  ZI_CHECK(m.embed_tokens.defined(), "[qwen3_encode] the encoder weights are not loaded");
  for (size_t i = 0; i < ids.size(); ++i)
    ZI_CHECK(ids[i] >= 0 && ids[i] < c.vocab_size, "[qwen3_encode] token id ", ids[i], " at position ", i,
             " is outside the vocabulary [0, ", c.vocab_size, ")");
  const int64_t S = int64_t(ids.size());
  Tensor cos, sin;
  qwen3_rope_tables(S, c.head_dim, c.rope_theta, m.rope_freq_dtype, &cos, &sin);  // [S, D/2]
  cos = ops::to_device(m.ctx, cos);  // where the phase computes (the weights' device)
  sin = ops::to_device(m.ctx, sin);
  // [S, hidden]: gathered where the table is (the host in a GPU phase: f32 rows, exactly the
  // table's values, then uploaded in the phase's activation dtype).
  Tensor h = ops::to_compute(m.ctx, ops::embedding(m.embed_tokens, ids, m.ctx.act));
  for (size_t i = 0; i < m.layers.size(); ++i) {
    BlockUse in(m.streamer.get(), i);
    decoder_layer(c, m.layers[i], h, cos, sin);
  }
  return h;
}

}  // namespace zi
