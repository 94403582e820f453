// LoRA files merged into the transformer's weights while they stream in, and the
// --transformer-override single-file key remap. Spec §7 (LoRA), §6.8 (single-file keys).
//
// A LoRA file in any supported layout (diffusers/PEFT, PEFT with an adapter name, kohya
// `lora_unet_`, `diffusion_model.` prefix, dot and underscore styles) is converted the way
// diffusers' ZImageLoraLoaderMixin converts it, into one LoraDelta per target weight. At
// load time a WeightLoader patch adds  W += scale · factor · (B · A)  to each targeted
// weight in f32, before the weight is converted to its final dtype.
//
// Use:
//   LoraSet loras(load_loras(specs));             // reads and converts every file
//   loras.attach(loader);                         // before the model binds its weights
//   ZImageDit dit = load_zimage_dit(loader, ...); loader.finish();
//   loras.check_applied();                        // every delta met its weight
//
// Ref: diffusers src/diffusers/loaders/lora_pipeline.py (ZImageLoraLoaderMixin),
//      src/diffusers/loaders/lora_conversion_utils.py (_convert_non_diffusers_z_image_lora_to_diffusers),
//      src/diffusers/loaders/single_file_utils.py (convert_z_image_transformer_checkpoint_to_diffusers).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"

namespace zi {

// --lora FILE or FILE:SCALE. SCALE is what follows the last ':' when it reads as a number;
// otherwise the whole argument is the file (paths may contain ':'). An argument whose tail
// after the last ':' is neither a number nor a path (no '/', no ".safetensors") is a bad
// scale: zi::UsageError naming --lora.
struct LoraSpec {
  std::string path;
  float scale = 1.0f;
};
LoraSpec parse_lora_arg(const std::string& arg);

// One target weight's low-rank update, in diffusers names.
struct LoraDelta {
  std::string target;  // "layers.0.attention.to_q.weight"
  std::string key;     // the file's own key for A (lora_A / lora_down), for messages
  Tensor A;            // [r, in]  f32
  Tensor B;            // [out, r] f32
  Tensor bias;         // [out] f32 (lora_B.bias, PEFT files only) or undefined; target's ".bias"
  float factor = 1.0f; // alpha / r, from .alpha keys and/or lora_adapter_metadata
  std::string bias_target() const;  // "layers.0.attention.to_q.bias"
};

struct LoraFile {
  std::string path;
  float scale = 1.0f;
  std::vector<LoraDelta> deltas;
  // Keys dropped on purpose, as diffusers drops them: fused `qkv` and bare `out` entries of
  // dot/kohya-style files, keys of other components (no `transformer.` prefix in a PEFT
  // file, kohya `lora_te*`). The CLI may warn about them.
  std::vector<std::string> ignored;
};

// Reads and converts one file. Throws zi::Error naming the file and key for: DoRA
// (dora_scale, lora_magnitude_vector), LoHa/LoKr/OFT/LoCon-mid/full-diff tensors, a missing
// half of a pair, mismatched A/B ranks, tensors that are not 2-D, a non-scalar alpha, a
// rank that contradicts lora_adapter_metadata, a key no rule converts, or no delta at all.
LoraFile load_lora(const LoraSpec& spec);
std::vector<LoraFile> load_loras(const std::vector<LoraSpec>& specs);

// The LoRA files of one run and which of their deltas have been merged. Copies share state,
// so the patch registered by attach() stays valid whatever happens to this object.
class LoraSet {
 public:
  LoraSet() = default;
  explicit LoraSet(std::vector<LoraFile> files);

  bool empty() const;
  const std::vector<LoraFile>& files() const;

  // Registers one WeightLoader::Patch that adds scale·factor·(B·A) of every delta of every
  // file (in file order) to its target weight, in place in the f32 staging buffer (sgemm,
  // beta = 1). A target whose shape disagrees with B·A throws zi::Error naming the key.
  // Returns the targeted tensor names, sorted.
  std::vector<std::string> attach(WeightLoader& loader) const;

  // After the weights were loaded: throws zi::Error, per file, listing a few deltas whose
  // target never came through the loader (no such transformer weight).
  void check_applied() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// --transformer-override: the diffusers name of a tensor of a single-file (ComfyUI-style)
// or diffusers-named transformer checkpoint, spec §6.8. Strips "model.diffusion_model." /
// "diffusion_model.", maps final_layer. / x_embedder. / attention.out / q_norm / k_norm.
// A fused ".attention.qkv.weight" throws zi::Error ("not supported") naming the key.
std::string override_tensor_name(const std::string& key);

// Registers `store` (which must outlive the loader) as an override of the transformer's
// weights under override_tensor_name(). Checks every name first (fused qkv, two tensors
// mapping to one weight). Unmatched names and wrong shapes are reported by loader.finish().
void attach_transformer_override(WeightLoader& loader, const TensorStore& store);

}  // namespace zi
