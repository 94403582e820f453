// The Z-Image Fun ControlNet Union (diffusers ZImageControlNetModel): config, loading from a
// diffusers folder or the published single file, and the checks against the transformer.
// Its forward pass shares the transformer's embedders and refiners, so it lives beside the
// DiT's (dit_forward_control in models/zimage_dit.h).
//
// Ref: diffusers models/controlnets/controlnet_z_image.py, loaders/single_file_utils.py
// (infer_diffusers_model_type, convert_z_image_controlnet_checkpoint_to_diffusers).
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/weight_loader.h"
#include "models/zimage_dit.h"

namespace zi {

// add_control_noise_refiner: null (the first Union release), "control_layers" (Union 2.0: the
// control layers also run on the image tokens and feed the noise refiner), or
// "control_noise_refiner" (Union 2.1: dedicated control noise-refiner blocks do that).
enum class ControlNetLayout { V1, V2_0, V2_1 };
const char* controlnet_layout_name(ControlNetLayout l);

struct ControlNetConfig {
  std::vector<int> layers_places;   // control_layers_places: transformer layers that get a hint
  std::vector<int> refiner_places;  // control_refiner_layers_places (2.x): noise-refiner layers that get one
  int control_in_dim = 33;          // channels of the control context (16 latent + 1 mask + 16 masked image)
  ControlNetLayout layout = ControlNetLayout::V2_1;
  int dim = 3840, n_refiner_layers = 2, n_heads = 30;
  double norm_eps = 1e-5;
  bool qk_norm = true;
  int patch_size = 2, f_patch_size = 1;
  std::string path;       // the folder or file it came from
  bool single_file = false;
};

// One control block: a transformer block plus its projections (before_proj on the first block only).
struct ControlBlock {
  DitBlock b;
  Tensor before_w, before_b;  // before_proj.{weight,bias} [D, D] / [D]; empty but for block 0
  Tensor after_w, after_b;    // after_proj.{weight,bias}  [D, D] / [D]; empty in 1.0's plain refiner blocks
};

struct ZImageControlNet {
  ControlNetConfig cfg;
  PhaseContext ctx;  // where it was loaded and computes (the WeightLoader's)
  Tensor x_embed_w, x_embed_b;       // control_all_x_embedder.2-1.{weight,bias} [D, p·p·control_in_dim] / [D]
  std::vector<ControlBlock> layers;  // control_layers.{k}
  std::vector<ControlBlock> refiner; // control_noise_refiner.{k} (2.1: control blocks; 1.0: plain blocks; 2.0: none)
};

// Reads the config (a folder's config.json, or inferred from a single file's tensors: dim and
// control_in_dim from the embedder, the layout from control_noise_refiner.0.before_proj — absent
// or all zero: 2.0, else 2.1; plain refiner blocks: 1.0 —, layer places every n_layers/N-th
// transformer layer, refiner places 0..n_refiner_layers−1, as in the published 2.x configs), then
// checks it and every tensor's presence and shape against the transformer `dit`, reading
// headers only. Throws zi::Error naming the path and the first mismatches.
ControlNetConfig inspect_controlnet(const std::string& path, const DitConfig& dit);

// The bytes load_controlnet's weights take (matrices in `wdt`, the rest f32), from the file's
// tensor list (nothing read): the --vram planner counts them as resident in the denoise phase.
int64_t controlnet_weight_bytes(const ControlNetConfig& cfg, DType wdt);

// Loads the weights (matrices in `wdt`, norms and biases f32), tagged Tag::ControlNetWeights.
ZImageControlNet load_controlnet(const PhaseContext& ctx, const ControlNetConfig& cfg, const DitConfig& dit, DType wdt);

}  // namespace zi
