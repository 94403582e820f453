// The memory plan: every peak estimate of the engine in one place (the VAE decode's, whole and
// tiled, by replaying its allocations; the denoising phase's activations), and the choices made
// from them (the tiled decode's checkpoints, the tile that fits a budget). The --vram budget
// planner extends this file.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "models/vae_decoder.h"

namespace zi {

// Activation bytes of one denoising step at width × height with a caption of caption_len
// tokens: the residual stream, normed copy, q, k, v, attention output (~6 × [S, dim]) and the
// FFN (3 × [S, ffn]), f32.
int64_t estimate_denoise_activation_bytes(int64_t dim, int64_t ffn_hidden, int width, int height, int caption_len);

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
