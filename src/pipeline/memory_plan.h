// The memory plan: every peak estimate of the engine in one place (the VAE decode's, whole and
// tiled, by replaying its allocations; the denoising phase's activations), and the choices made
// from them (the tiled decode's checkpoints, the tile that fits a budget), and the --vram
// budget planner (plan_vram).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "models/vae_decoder.h"

namespace zi {

// Activation bytes of one denoising step at width × height with a caption of caption_len
// tokens: the residual stream, normed copy, q, k, v, attention output (~6 × [S, dim]) and the
// FFN (3 × [S, ffn]), in elements of `elem_bytes` (4: f32; a bf16 run's activations are 2 bytes —
// measured at 1024² on an H100, 2026-12-07: 279 MiB against 492 MiB estimated at 2 bytes). fp8
// weights add the e4m3 copies of the GEMM inputs (1 byte per element of [S, dim] and [S, ffn],
// in place of the quantization scratch they save), inside that margin.
int64_t estimate_denoise_activation_bytes(int64_t dim, int64_t ffn_hidden, int width, int height, int caption_len,
                                          int elem_bytes = 4);
// The unified sequence's length at most: image tokens and caption, each with a pad block.
int64_t denoise_tokens_bound(int width, int height, int caption_len);

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

// Activation bytes vae_encode_moments holds at its peak for an image of height × width pixels
// (the encoder always runs whole: no tiled encode), replayed like vae_decode_peak_bytes.
int64_t vae_encode_peak_bytes(const VaeConfig& cfg, int height, int width);

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

// ---- the --vram budget planner -----------------------------------------------------------------
// A budget for everything zimage allocates on the device in a phase (weights, activations,
// workspaces, the streaming ring; the CUDA context is apart). The phases run one after another
// and each frees its component, so each phase's plan must fit the budget on its own. Within a
// component, the weights outside the repeated blocks (embeddings, final layers) stay resident;
// of the blocks, as many as fit stay resident and the rest stream from a pinned host copy
// through a ring of device slots (each as large as the largest block), the copy of the next
// blocks overlapping the compute of the current one.

// A component whose repeated blocks may stream, blocks in the order the forward runs them.
struct StreamableComponent {
  std::string name;                  // "text_encoder", "transformer"
  int64_t fixed_bytes = 0;           // weights outside the blocks: always resident
  std::vector<int64_t> block_bytes;  // each block's weights in their compute dtype
  int64_t activation_bytes = 0;      // activations and workspaces at the phase's peak
  int64_t passes = 1;                // forward passes over the blocks in the phase (steps × (1 + cfg))
};

// How one component runs under the budget.
struct ComponentPlan {
  std::string name;
  std::vector<bool> resident;          // per block; all true when nothing streams
  int ring_slots = 0;                  // device slots of the streaming ring (0: nothing streams)
  int prefetch = 0;                    // blocks copied ahead of the one computing (ring_slots − 1)
  int64_t slot_bytes = 0;              // bytes of one slot: the largest streamed block
  int64_t resident_bytes = 0;          // fixed weights + resident blocks
  int64_t streamed_bytes_per_pass = 0; // bytes copied host → device in one forward pass
  int64_t streamed_bytes_phase = 0;    // in the whole phase (× passes)
  int64_t host_pinned_bytes = 0;       // the streamed blocks' pinned host copy (the only host copy)
  int64_t predicted_peak_bytes = 0;    // resident + ring + activations
  int64_t minimum_bytes = 0;           // the least budget it can run under (2 slots, nothing resident)
  double predicted_copy_seconds_per_pass = 0;  // streamed bytes ÷ the measured host → device rate
  int streamed_blocks() const;
};

struct VramPlanInput {
  int64_t budget_bytes = -1;  // --vram; -1: none (planned from free memory when the model does not fit)
  int64_t card_bytes = 0;     // the device's total memory (a larger budget is clamped to it); 0: unknown
  int64_t free_bytes = 0;     // free device memory now (the budget without --vram); 0: unknown
  StreamableComponent text, dit;  // text.block_bytes empty: the encode phase does not run on the device
  bool vae_on_device = true;
  VaeConfig vae;
  int64_t vae_weight_bytes = 0;
  int latent_h = 0, latent_w = 0;  // the decode's latent size
  // The image-conditioned modes' VAE-encode phase (on the VAE's device): the encoder's weights and
  // the size of the images it encodes (0: no such phase). It runs whole, so its peak is a floor.
  int64_t vae_encoder_weight_bytes = 0;
  int encode_width = 0, encode_height = 0;
  int width = 0, height = 0;       // the image size (for messages)
  double h2d_bytes_per_second = 0; // measured pinned host → device rate; 0: unknown (no prediction)
};

struct VramPlan {
  int64_t budget_bytes = -1;     // the budget applied; -1: none (everything resident)
  bool clamped = false;          // --vram was above the card and was clamped to it
  bool automatic = false;        // no --vram, the model did not fit the free memory: budget from it
  std::vector<std::string> notices;  // one line each (clamping, automatic budget)
  ComponentPlan text, dit;
  int vae_tile = 0;              // decode tile in latent pixels (0: untiled)
  int64_t vae_peak_bytes = 0;    // the decode's weights + estimated peak with that tile
  int64_t vae_weight_bytes = 0;  // the decoder's weights on the device (0: the VAE is on the CPU)
  int64_t vae_encode_peak_bytes = 0;  // the VAE-encode phase's weights + estimated peak (0: none)
  int64_t minimum_bytes = 0;     // the least budget for this image size (max over the phases)
  double h2d_bytes_per_second = 0;
  // The text phase also runs the VAE's warm-up (a decode with zero weights while the encoder
  // loads; pipeline.cpp) at this latent size (the image's, or with ZI_WARM_VAE_SMALL=1 a smaller
  // one that fits; 0: no warm-up): its peak is in text.predicted_peak_bytes.
  int vae_warm_up_h = 0, vae_warm_up_w = 0;
  bool vae_warm_up() const { return vae_warm_up_h > 0; }
  bool streams() const { return text.ring_slots > 0 || dit.ring_slots > 0; }
};

// Margin kept free when the budget is chosen from free memory (no --vram): 5 % of the free
// memory, at least 256 MiB.
int64_t vram_auto_margin(int64_t free_bytes);

// Plans the three phases under in.budget_bytes. Throws zi::UsageError naming --vram and the
// minimum for the image size when the budget is below it; a budget above in.card_bytes is
// clamped to it with a notice. Without a budget, everything stays resident when it fits
// in.free_bytes (or free memory is unknown), else the budget is the free memory less
// vram_auto_margin (an error naming the minimum when even that is too small).
VramPlan plan_vram(const VramPlanInput& in);

// The weight bytes of the transformer's blocks in forward order (noise_refiner, context_refiner,
// layers) and of the rest, matrices in `wdt`, norms and biases f32 (as load_zimage_dit binds them).
std::vector<int64_t> dit_block_weight_bytes(const DitConfig& cfg, DType wdt);
int64_t dit_fixed_weight_bytes(const DitConfig& cfg, DType wdt);
// The same for the text encoder's layers 0 … n−2 (its one other weight, the embedding table,
// stays on the host in a GPU phase: the device plan has no fixed text-encoder bytes).
std::vector<int64_t> qwen3_block_weight_bytes(const Qwen3Config& cfg, DType wdt);
// Activation bytes of the text encoder over `tokens` tokens: ~6 × [S, hidden] and 3 × [S, inter]
// f32, and one head's attention scores per head ([heads, S, S] f32).
int64_t estimate_text_activation_bytes(const Qwen3Config& cfg, int tokens);
// The encoder's GEMM warm-up (ops::warm_up_linears over qwen3_linear_shapes, before the encode's
// activations exist) for prompts of up to `tokens` tokens: its largest shape's input, weight and
// output at 4 bytes an element. The text phase plans the larger of this and the activations.
int64_t qwen3_warm_up_bytes(const Qwen3Config& cfg, int tokens);

// Hands a component's plan to its loader: the blocks it streams and the ring's slots (nothing
// when `plan` is null or streams nothing, or the loader's device is the CPU).
class WeightLoader;
void set_streamed_blocks(WeightLoader& loader, const ComponentPlan* plan);

// The plan as text, one phase a line, for --memory-report.
std::string format_vram_plan(const VramPlan& p);

// The VAE warm-up's latent size and bytes (weights + the decode's peak) within `room`: the
// image's h × w when its decode fits, else with `smaller` the largest halving of it that fits
// (at least 16 per side); h = w = 0 when none does.
struct VaeWarmUpSize {
  int h = 0, w = 0;
  int64_t bytes = 0;
};
VaeWarmUpSize plan_vae_warm_up(const VaeConfig& cfg, int64_t weight_bytes, int h, int w, int64_t room, bool smaller);

}  // namespace zi
