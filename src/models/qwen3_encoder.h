// Qwen3 text encoder (Qwen3-4B used as Qwen3Model, no LM head): weights and forward.
// Spec §2.2–2.5, key prefixes §6.4. Z-Image uses hidden_states[-2], the raw output of the
// second-to-last decoder layer, so the last layer, model.norm and lm_head are never loaded.
#pragma once
#include <cstdint>
#include <string>
#include <array>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/weight_loader.h"
#include "io/weight_stream.h"

namespace zi {

// One decoder layer; prefix `[model.]layers.{i}.`. Shapes for Qwen3-4B
// (hidden 2560, 32 q heads, 8 kv heads, head_dim 128, intermediate 9728).
struct Qwen3Layer {
  Tensor input_layernorm;           // input_layernorm.weight             [hidden]        f32
  Tensor q_proj;                    // self_attn.q_proj.weight            [Hq·D, hidden]  wdt
  Tensor k_proj;                    // self_attn.k_proj.weight            [Hkv·D, hidden] wdt
  Tensor v_proj;                    // self_attn.v_proj.weight            [Hkv·D, hidden] wdt
  Tensor o_proj;                    // self_attn.o_proj.weight            [hidden, Hq·D]  wdt
  Tensor q_norm;                    // self_attn.q_norm.weight            [D]             f32
  Tensor k_norm;                    // self_attn.k_norm.weight            [D]             f32
  Tensor post_attention_layernorm;  // post_attention_layernorm.weight    [hidden]        f32
  Tensor gate_proj;                 // mlp.gate_proj.weight               [inter, hidden] wdt
  Tensor up_proj;                   // mlp.up_proj.weight                 [inter, hidden] wdt
  Tensor down_proj;                 // mlp.down_proj.weight               [hidden, inter] wdt
};
// Every tensor of a layer (what streams when the layer does).
std::vector<Tensor*> qwen3_layer_tensors(Qwen3Layer& l);

struct Qwen3Encoder {
  Qwen3Config cfg;
  PhaseContext ctx;  // where it was loaded and computes (the WeightLoader's)
  Tensor embed_tokens;             // [model.]embed_tokens.weight [vocab, hidden] wdt
  std::vector<Qwen3Layer> layers;  // layers 0 .. num_hidden_layers−2 (what hidden_states[-2] needs)
  // Precision of the RoPE inverse frequencies (not a checkpoint tensor). transformers computes
  // them in f32 and from_pretrained(torch_dtype=bf16) keeps them f32: use F32 for that. A module
  // cast with .to(torch.bfloat16) rounds this buffer to bf16, even if cast back to f32 later;
  // BF16 reproduces such runs (the bundled fixtures were made that way).
  DType rope_freq_dtype = DType::F32;
  // The layers the --vram plan streams (null: all resident); layer i is block i.
  std::shared_ptr<WeightStreamer> streamer;
};

// Loads embed_tokens and layers 0..num_hidden_layers−2 through `loader`. Keys may carry a
// "model." prefix or not (detected from embed_tokens). Matrices and the embedding table are
// converted to `wdt` (bf16/f16/f32), norm weights to f32. The last layer, the final norm and
// lm_head are marked ignored, never read. The caller calls loader.finish().
Qwen3Encoder load_qwen3_encoder(WeightLoader& loader, const Qwen3Config& cfg, DType wdt);
// The distinct matrix shapes {N, K} of a layer's linears (q, k/v, o, gate/up, down), for
// ops::warm_up_linears before the weights exist.
std::vector<std::array<int64_t, 2>> qwen3_linear_shapes(const Qwen3Config& cfg);

// hidden_states[-2] for `ids`: [L, hidden] f32. Positions 0..L−1 and plain causal attention
// (right padding never changes the rows of real tokens, spec §2.5). ids must be non-empty.
Tensor qwen3_encode(const Qwen3Encoder& m, const std::vector<int32_t>& ids);

// Rotate-half RoPE tables for positions 0..len−1: cos/sin [len, head_dim/2] f32, with
// inv_freq and the angles computed in f32 like transformers (spec §2.4); inv_freq is then
// rounded to `freq_dtype` (F32: unchanged; BF16/F16: see Qwen3Encoder::rope_freq_dtype).
void qwen3_rope_tables(int64_t len, int head_dim, double theta, DType freq_dtype, Tensor* cos, Tensor* sin);

}  // namespace zi
