// The text phase of the pipeline: prompt → chat template → ids → Qwen3 hidden_states[-2].
// Spec §1 (tokenization, truncation) and §2 (encoder). Phase-agnostic: the pipeline owns the
// PhaseScope and the memory report; these functions only allocate and free.
#pragma once
#include "pipeline/memory_plan.h"
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "models/qwen3_encoder.h"
#include "text/bpe_tokenizer.h"

namespace zi {

// Opens mf.text_encoder_dir, loads the encoder (tagged Tag::TextWeights, matrices in `wdt`)
// and checks that the checkpoint holds exactly the expected tensors. For --keep-models.
// `rope_freq_dtype`: see Qwen3Encoder::rope_freq_dtype (BF16 reproduces the bundled fixtures).
// `ctx`: the phase's device and activation dtype (the CPU by default).
Qwen3Encoder load_text_encoder(const ModelFolder& mf, DType wdt, DType rope_freq_dtype = DType::F32,
                               const PhaseContext& ctx = {});
// The same from any store (a single file through io/layouts.h). `stream`: the --vram plan's
// layers to stream (pipeline/memory_plan.h; null or no ring: all resident).
Qwen3Encoder load_text_encoder(const TensorStore& store, const Qwen3Config& cfg, DType wdt,
                               DType rope_freq_dtype = DType::F32, const PhaseContext& ctx = {},
                               const ComponentPlan* stream = nullptr);

// Prompt embeddings with an already loaded encoder and tokenizer: [L, hidden] f32, where
// L ≤ max_sequence_length is the number of real (unpadded) tokens. `ids_out` receives the ids.
Tensor encode_prompt(const Qwen3Encoder& enc, const BpeTokenizer& tok, const std::string& prompt,
                     int max_sequence_length, std::vector<int32_t>* ids_out = nullptr);

// The whole text phase: tokenizer and encoder are loaded, used and released; only the
// returned [L, hidden] f32 embeddings remain allocated when it returns.
Tensor encode_prompt(const ModelFolder& mf, const std::string& prompt, int max_sequence_length, DType wdt,
                     std::vector<int32_t>* ids_out = nullptr, DType rope_freq_dtype = DType::F32);

}  // namespace zi
