// The AutoencoderKL encoder (image → latent distribution), loaded only by the modes that need
// it (img2img, inpainting, ControlNet conditions); text-to-image never reads its tensors.
// diffusers models/autoencoders/vae.py (Encoder, DiagonalGaussianDistribution) and
// autoencoder_kl.py (encode: encoder, then quant_conv when the config asks).
// Activations are [C, H, W] f32; conv kernels and attention matrices keep the load dtype.
// No tiled encode: the encoder runs whole (its peak at 1024² is ~1 GB in f32 on the CPU,
// about half the untiled decode's); --vae-tile applies to the decoder only.
#pragma once
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/weight_loader.h"
#include "models/vae_decoder.h"

namespace zi {

// DownEncoderBlock2D, prefix `encoder.down_blocks.{i}.`.
struct DownBlock {
  std::vector<ResnetBlock> resnets;  // layers_per_block of them
  Tensor downsample_w, downsample_b; // downsamplers.0.conv.{weight,bias} [C, C, 3, 3] / [C]; empty for the last block
};

struct VaeEncoder {
  VaeConfig cfg;
  PhaseContext ctx;  // where it was loaded and computes (the WeightLoader's)
  Tensor conv_in_w, conv_in_b;      // encoder.conv_in.*      [C0, in_channels, 3, 3] / [C0]
  std::vector<DownBlock> down_blocks;
  ResnetBlock mid_res0, mid_res1;   // encoder.mid_block.resnets.{0,1}
  MidAttention mid_attn;            // encoder.mid_block.attentions.0; empty without mid_block_add_attention
  Tensor norm_out_w, norm_out_b;    // encoder.conv_norm_out.*  [C_last]
  Tensor conv_out_w, conv_out_b;    // encoder.conv_out.*       [2·L, C_last, 3, 3] / [2·L]
  Tensor quant_conv_w, quant_conv_b;  // quant_conv.*  [2·L, 2·L, 1, 1]; empty unless use_quant_conv
};

// Binds the encoder.* (and quant_conv.*) keys; decoder tensors are declared ignored. Weights are
// tagged by the loader (Tag::VaeEncoderWeights in the pipeline).
VaeEncoder load_vae_encoder(WeightLoader& loader, const VaeConfig& cfg, DType wdt);

// image [in_channels, H, W] f32 in [-1, 1] (H, W multiples of the scale factor)
// → the posterior's parameters [2·L, H/8, W/8]: mean in channels [0, L), logvar in [L, 2L)
// (not yet clamped), on the host in f32.
Tensor vae_encode_moments(const VaeEncoder& m, const Tensor& image);

// Latents the pipelines feed the transformer, (z − shift) · scale, from the moments:
// `noise` null → the mode (mean; diffusers' sample_mode="argmax");
// else z = mean + exp(0.5 · clamp(logvar, −30, 20)) · noise (latent_dist.sample(generator)).
// Returns [L, h, w] f32 on the host.
Tensor vae_latents_from_moments(const Tensor& moments, const VaeConfig& cfg, const float* noise);

}  // namespace zi
