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

// What kind of update a delta is (LyCORIS: github.com/KohakuBlueleaf/LyCORIS, and the
// papers: LoHa = FedPara, Hyeon-Woo et al. 2022; LoKr = Yeh et al. 2023, "Navigating
// Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation").
enum class AdapterKind : uint8_t {
  LoRA,  // ΔW = B·A
  LoHa,  // ΔW = (w1a·w1b) ⊙ (w2a·w2b)
  LoKr,  // ΔW = kron(w1, w2), each factor full or low-rank (w1a·w1b, w2a·w2b)
};
const char* adapter_kind_name(AdapterKind k);

// One target weight's update, in diffusers names.
struct LoraDelta {
  std::string target;  // "layers.0.attention.to_q.weight"
  std::string key;     // the file's own key for A (lora_A / lora_down / hada_w1_a / lokr_w1), for messages
  AdapterKind kind = AdapterKind::LoRA;
  Tensor A;            // LoRA: [r, in]  f32
  Tensor B;            // LoRA: [out, r] f32 (the target's rows only, for a split fused qkv)
  Tensor bias;         // [out] f32 (lora_B.bias, PEFT files only) or undefined; target's ".bias"
  // LoHa: w1a [out, r1], w1b [r1, in], w2a [out, r2], w2b [r2, in].
  // LoKr: w1 [a, c] or w1a·w1b; w2 [b, d] or w2a·w2b; ΔW [a·b, c·d].
  Tensor w1, w1a, w1b, w2, w2a, w2b;
  // LoHa/LoKr of a fused module (attention.qkv): this target takes rows
  // [row_begin, row_begin + rows) of the module's ΔW; rows = -1: all of them.
  int64_t row_begin = 0, rows = -1;
  float factor = 1.0f; // alpha / r (alpha / rank of the low-rank factor for LoHa/LoKr, 1 without)
  std::string bias_target() const;  // "layers.0.attention.to_q.bias"
  // The whole module's ΔW·factor [out, in] for LoHa/LoKr (f32), before the row range.
  Tensor dense() const;
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

// The diffusers module path of an adapter's module name in any style: kohya / LyCORIS
// (`lora_unet_layers_0_attention_to_q`, `lycoris_…`), ComfyUI / ai-toolkit
// (`diffusion_model.layers.0.attention.to_q`), PEFT (`transformer.…`), original-layout names
// (`attention.out` → `attention.to_out.0`). A fused `attention.qkv` stays as it is (see
// split_fused_qkv).
std::string lora_module_name(const std::string& module);

// A kohya module name's underscores as dots, keeping to_q/to_k/to_v/to_out and feed_forward
// whole (diffusers' convert_key): `layers_0_attention_to_q` → `layers.0.attention.to_q`. Names
// with underscores of their own (`noise_refiner`, …) come out over-split; callers fix those up.
std::string kohya_underscores_to_dots(const std::string& module);

// Replaces each delta on a fused `attention.qkv.weight` by three on to_q/to_k/to_v (the rows
// of B, or of the dense ΔW), which is what applying it to ComfyUI's fused weight does.
// diffusers drops (kohya) or cannot apply (others) such entries; zimage applies them.
void split_fused_qkv(LoraFile& f);

// Reads and converts one file. Throws zi::Error naming the file and key for: DoRA
// (dora_scale, lora_magnitude_vector), LoHa/LoKr/OFT/LoCon-mid/full-diff tensors, a missing
// half of a pair, mismatched A/B ranks, tensors that are not 2-D, a non-scalar alpha, a
// rank that contradicts lora_adapter_metadata, a key no rule converts, or no delta at all.
LoraFile load_lora(const LoraSpec& spec);
// A LyCORIS file (LoHa `hada_*`, LoKr `lokr_*`, possibly with plain lora_down/lora_up
// modules): one delta per module, alpha / rank scaling as LyCORIS and ComfyUI apply it.
bool is_lycoris_file(const SafetensorsFile& f);
LoraFile load_lycoris(const SafetensorsFile& f, const LoraSpec& spec);
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

  // After the weights were loaded: one line listing, over every file, each adapter tensor
  // that matched no weight (deltas whose target never came through the loader, and keys
  // dropped on purpose: other components', fused kohya qkv); "" when everything applied.
  std::string unmatched_report() const;

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
