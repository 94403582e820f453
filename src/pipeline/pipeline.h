// The whole pipeline: encode the prompt → free the encoder → denoise → free the DiT →
// decode → free the VAE. Each phase is a PhaseScope, so its weights, peak and end bytes
// are measured by the allocator's accounting. Spec §0.1, §4.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/check.h"
#include "core/tensor.h"

namespace zi {

// Thrown when the caller's cancel flag is raised (SIGINT); nothing is written.
struct Cancelled : Error {
  Cancelled() : Error("cancelled") {}
};

struct GenerateOptions {
  std::string model_dir;
  std::string prompt;
  std::string negative_prompt;  // used only with guidance > 0 ("" like the reference)
  int width = 1024, height = 1024;
  int steps = 8;
  float guidance = 0.0f;           // CFG when > 0: pred = pos + g·(pos − neg)
  float cfg_normalization = 0.0f;  // 0: off; r > 0 caps ‖pred‖ at r·‖pos‖
  float cfg_truncation = 1.0f;     // CFG off at steps whose t_norm exceeds this
  uint64_t seed = 0;
  int max_sequence_length = 512;
  DType text_encoder_dtype = DType::BF16;  // weight storage; activations are f32 on the CPU
  DType transformer_dtype = DType::BF16;
  DType vae_dtype = DType::BF16;
  int vae_tile = 0;  // latent pixels per tile; 0: untiled; -1: pick from available memory
  int vae_tile_overlap = 4;
  std::vector<std::pair<std::string, float>> loras;  // (file, scale)
  std::string transformer_override;
};

struct GenerateHooks {
  std::function<void(const std::string& phase)> on_phase_start;
  std::function<void(int step, int steps, double elapsed_seconds)> on_step;  // after each step
  std::function<void(int step, const Tensor& latents)> on_latents;          // [16, h, w] after step
  const std::atomic<bool>* cancel = nullptr;
};

struct GenerateResult {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;          // height·width·3, HWC
  Tensor decoded;                    // [3, H, W] f32, the decoder output in ≈[-1, 1]
  std::vector<int32_t> prompt_ids;   // the tokenized, templated prompt
  std::vector<PhaseRecord> phases;   // encode, denoise, decode
  int64_t peak_bytes = 0;            // max over the phases (accounted, CPU)
  int64_t peak_rss_bytes = 0;
};

// Checks sizes, steps and guidance before anything is allocated; throws zi::UsageError
// with the flag name (and, for absurd sizes, the memory that size would need).
void validate_generate_options(const GenerateOptions& o);

// Activation bytes the denoise phase needs at its peak for a size (the DiT's largest
// temporaries), used for the absurd-size check and the memory plan.
int64_t estimate_denoise_activation_bytes(int64_t dim, int64_t ffn_hidden, int64_t heads, int width, int height,
                                          int caption_len);

GenerateResult generate(const GenerateOptions& o, const GenerateHooks& hooks = {});

}  // namespace zi
