// The AutoencoderKL decoder (latents → image), whole or in tiles, and its memory estimate.
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

// vae_decode with a peak bounded by the tile size, equal to it up to f32 rounding (seams
// included; no blending). The part at latent resolution (conv_in, the mid block with its
// attention over all tokens, up_blocks.0's resnets) runs whole; the rest runs on tiles of at
// most `tile` latent pixels a side, each decoded with a margin wide enough for the receptive
// field of its layers and cropped, and every GroupNorm there uses the whole image's statistics,
// gathered beforehand one norm per pass over all tiles (19 norms for the Z-Image VAE, so 20
// passes, each running the tiles only as far as its norm). That is several times vae_decode's
// compute; to cut it, the output of up_blocks.1 (and .2) may be kept whole as a checkpoint the
// later passes start from, when that raises the estimated peak by 10% at most (vae_tile_plans).
// `overlap` is unused: it stays for the callers. tile >= h and >= w: exactly vae_decode.
Tensor vae_decode_tiled(const VaeDecoder& m, const Tensor& z, int tile, int overlap = 0);

// vae_decode_tiled with the given plan: the up blocks whose outputs are kept whole, ascending,
// starting at 0 and below the last block (VaeTilePlan::checkpoints). For tests and benchmarks.
Tensor vae_decode_tiled_with(const VaeDecoder& m, const Tensor& z, int tile, const std::vector<int>& checkpoints);

// Upper bound of the activation bytes (incl. op workspaces, excl. a contiguous input z) that
// vae_decode of an [latent_channels, h, w] latent holds at its peak. It replays the decode's
// allocations with the CPU backend's workspaces at the current thread count.
int64_t vae_decode_peak_bytes(const VaeConfig& cfg, int h, int w);

// Upper bound of the activation bytes vae_decode_tiled holds at its peak (the chosen plan's),
// the larger of: the whole latent-resolution part (its peak grows with h·w like the latent,
// ~11 KB per latent pixel for the Z-Image VAE, mostly the mid attention), and the tiled passes:
// the current checkpoint (per latent pixel: 2 KB for the head's output, 8 KB for up_blocks.1's,
// 16 KB for up_blocks.2's), the output image (0.75 KB) in the last pass, and one tile's decode
// with its margins.
int64_t vae_decode_tiled_peak_bytes(const VaeConfig& cfg, int h, int w, int tile);

// The part of vae_decode_tiled's peak that depends on the tile alone: the most one tile of
// `tile` latent pixels with its full margins holds in any pass of any plan.
int64_t vae_tile_peak_bytes(const VaeConfig& cfg, int tile);

// A plan of vae_decode_tiled: the up blocks whose output it keeps whole (0 always), its
// estimated peak (as vae_decode_tiled_peak_bytes) and the multiply-adds of its convolutions
// (margins and repeated passes included). vae_decode_tiled runs the `chosen` one: the least
// compute among the plans whose peak is within 10% of the lowest.
struct VaeTilePlan {
  std::vector<int> checkpoints;
  int64_t peak_bytes = 0;
  double macs = 0;
  bool chosen = false;
};
std::vector<VaeTilePlan> vae_tile_plans(const VaeConfig& cfg, int h, int w, int tile);

// The multiply-adds of vae_decode's convolutions (for comparing with VaeTilePlan::macs).
double vae_decode_macs(const VaeConfig& cfg, int h, int w);

// Largest square tile (latent pixels, a multiple of 8, >= 16) whose vae_tile_peak_bytes fits
// `budget_bytes`; 16 when even that does not fit (the caller reports the shortfall). What
// grows with the image (see vae_decode_tiled_peak_bytes) is not included: prefer the overload
// below, which includes it.
int vae_pick_tile(const VaeConfig& cfg, int64_t budget_bytes);

// Largest square tile (a multiple of 8, >= 16) whose vae_decode_tiled_peak_bytes for an
// [latent_channels, h, w] latent fits `budget_bytes`, output image included; 16 when none
// fits. A tile >= h and >= w means the untiled decode fits.
int vae_pick_tile(const VaeConfig& cfg, int h, int w, int64_t budget_bytes);

}  // namespace zi
