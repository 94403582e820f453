// The AutoencoderKL decoder (latents → image), whole or in tiles (vae_decode_tiled_with; the
// tiled decode that picks its own plan and the memory estimates are in pipeline/memory_plan.h).
// Spec §5 (VAE decoder) and §4.8 (what the pipeline feeds it). Activations are [C, H, W] f32;
// conv kernels and attention matrices keep the load dtype, norms and biases are f32.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/weight_loader.h"

namespace zi {

// ResnetBlock2D (in → out channels), prefix `...resnets.{j}.`.
struct ResnetBlock {
  Tensor norm1_w, norm1_b;        // norm1.{weight,bias}                 [in]
  Tensor conv1_w, conv1_b;        // conv1.{weight,bias}                 [out, in, 3, 3] / [out]
  Tensor norm2_w, norm2_b;        // norm2.{weight,bias}                 [out]
  Tensor conv2_w, conv2_b;        // conv2.{weight,bias}                 [out, out, 3, 3] / [out]
  Tensor shortcut_w, shortcut_b;  // conv_shortcut.{weight,bias}         [out, in, 1, 1] / [out]; empty when in == out
};

// The mid block's single-head self-attention, prefix `mid_block.attentions.0.`.
struct MidAttention {
  Tensor group_norm_w, group_norm_b;  // group_norm.{weight,bias}  [C]
  Tensor to_q_w, to_q_b;              // to_q.{weight,bias}        [C, C] / [C]
  Tensor to_k_w, to_k_b;              // to_k.{weight,bias}        [C, C] / [C]
  Tensor to_v_w, to_v_b;              // to_v.{weight,bias}        [C, C] / [C]
  Tensor to_out_w, to_out_b;          // to_out.0.{weight,bias}    [C, C] / [C]
};

// UpDecoderBlock2D, prefix `up_blocks.{i}.`.
struct UpBlock {
  std::vector<ResnetBlock> resnets;  // layers_per_block + 1 of them
  Tensor upsample_w, upsample_b;     // upsamplers.0.conv.{weight,bias} [C, C, 3, 3] / [C]; empty for the last block
};

// Every field is named after its key under `decoder.` (spec §5.4).
struct VaeDecoder {
  VaeConfig cfg;
  PhaseContext ctx;  // where it was loaded and computes (the WeightLoader's; CPU for bind_vae_decoder)
  Tensor post_quant_conv_w, post_quant_conv_b;  // post_quant_conv.* (no prefix) [L, L, 1, 1]; empty unless cfg asks
  Tensor conv_in_w, conv_in_b;                  // [C0, L, 3, 3] / [C0], C0 = block_out_channels.back()
  ResnetBlock mid_res0, mid_res1;               // mid_block.resnets.{0,1}, C0 → C0
  MidAttention mid_attn;                        // empty when !cfg.mid_block_add_attention
  std::vector<UpBlock> up_blocks;               // block_out_channels reversed
  Tensor norm_out_w, norm_out_b;                // conv_norm_out.*  [C_last]
  Tensor conv_out_w, conv_out_b;                // conv_out.*       [out_channels, C_last, 3, 3] / [out_channels]
};

// Where the tensors come from: (checkpoint name, shape, is_matrix) → tensor. `is_matrix` is true
// for conv kernels and attention matrices (kept in the weight dtype), false for norms and biases.
using VaeTensorSource = std::function<Tensor(const std::string& name, const Shape& shape, bool is_matrix)>;

// The binding table: walks every decoder tensor of `cfg` in checkpoint order and asks `src`.
// Used by load_vae_decoder, and by benchmarks that make random weights of a real-size config.
VaeDecoder bind_vae_decoder(const VaeConfig& cfg, const VaeTensorSource& src);

// Binds the decoder.* keys from `loader` (matrices in `wdt` = f32/bf16/f16, norms and biases in
// f32). The encoder (and quant_conv, which only the encoder uses) is declared ignored and never
// read. The caller calls loader.finish(), which names any missing or wrong-shape tensor.
VaeDecoder load_vae_decoder(WeightLoader& loader, const VaeConfig& cfg, DType wdt);

// z [latent_channels, h, w] f32, already scaled (latents / scaling_factor + shift_factor)
// → image [out_channels, 8h, 8w] f32 in about [-1, 1].
Tensor vae_decode(const VaeDecoder& m, const Tensor& z);

// Runs vae_decode once on ctx's device with zero weights of cfg's shapes (matrices in `wdt`) and a
// zero latent [L, h, w]: the first use of every kernel, convolution plan and path pick that a
// decode of that size makes, paid ahead of the real decode (the pipeline runs it while the text
// encoder loads, where the --vram plan has room: VramPlan::vae_warm_up()). Holds what such a
// decode holds, all freed (Tag::Workspace) on return.
void vae_warm_up(const PhaseContext& ctx, const VaeConfig& cfg, DType wdt, int h, int w);
int64_t vae_warm_ups_run();  // how many vae_warm_up calls finished in this process (tests)

// vae_decode_tiled with the given plan: the up blocks whose outputs are kept whole, ascending,
// starting at 0 and below the last block (VaeTilePlan::checkpoints). For tests and benchmarks.
Tensor vae_decode_tiled_with(const VaeDecoder& m, const Tensor& z, int tile, const std::vector<int>& checkpoints);

}  // namespace zi
