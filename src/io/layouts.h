// Key layouts of Z-Image weight files: which component a file's tensors belong to, how they
// are named, and the diffusers names the loaders bind. Spec §6.4, §6.8, §5.4.
//
// A file may hold one component or several (all-in-one checkpoints), under a prefix
// (`model.diffusion_model.`, `text_encoders.qwen3_4b.transformer.`, `first_stage_model.`, ...)
// and in one of two layouts per component:
//   diffusers  the names of the diffusers folder (the loaders' names);
//   original   transformer: the Z-Image repository / ComfyUI names (fused `attention.qkv`,
//              `attention.out`, `q_norm`/`k_norm`, `x_embedder.`, `final_layer.`);
//              vae: the Flux AE / LDM names (`decoder.up.N.block.M`, `mid.attn_1`,
//              `norm_out`, attention projections stored as 1×1 convolutions);
//              text encoder: the transformers names, as in the diffusers folder.
// The mapping is pure (names and shapes in, names and row ranges out), so any container —
// safetensors here, GGUF for quantized files — can use it. A fused `qkv` [3·D, D] maps to
// three row ranges of the same stored tensor: each is a contiguous byte range of the file,
// so it streams like any other tensor and is never copied whole.
//
// Ref: diffusers src/diffusers/loaders/single_file_utils.py
//      (convert_z_image_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint,
//       LDM_VAE_KEYS, CHECKPOINT_KEY_NAMES["z-image-turbo"]).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"

namespace zi {

enum class Component : uint8_t { Transformer, TextEncoder, Vae };
constexpr Component kAllComponents[] = {Component::Transformer, Component::TextEncoder, Component::Vae};
const char* component_name(Component c);  // "transformer", "text_encoder", "vae"

enum class KeyLayout : uint8_t { Diffusers, Original };
// "diffusers"; "original (ComfyUI)" for the transformer, "original (Flux AE)" for the VAE.
std::string layout_name(Component c, KeyLayout l);

// One tensor of a file as the mapping sees it: its name and shape (no data).
struct SourceTensor {
  std::string key;
  Shape shape;
};

// A diffusers-named tensor made of rows [row_begin, row_begin + shape[0]) of a source tensor
// (all of it unless fused). `shape` is the target's: a 1×1 convolution [C, C, 1, 1] of the
// Flux AE maps to the Linear [C, C] the loaders bind (same bytes).
struct MappedTensor {
  std::string target;
  Shape shape;
  size_t source = 0;     // index into the SourceTensor list
  int64_t row_begin = 0; // first row of the source's dim 0
  bool whole(const Shape& source_shape) const { return row_begin == 0 && shape_numel(shape) == shape_numel(source_shape); }
};

// One component found in a file.
struct ComponentMapping {
  Component component = Component::Transformer;
  KeyLayout layout = KeyLayout::Diffusers;
  std::string prefix;                 // stripped from every key ("" for none)
  std::vector<MappedTensor> tensors;  // in file order
  std::vector<size_t> dropped;        // known to be unused (a stray `norm_final.weight`), with a notice
};

// Every component of a file, and the tensors that belong to none.
struct FileLayout {
  std::vector<ComponentMapping> components;
  std::vector<size_t> unclaimed;  // no known prefix or name: reported as stray tensors
  const ComponentMapping* find(Component c) const;
  std::string describe(Component c) const;  // "transformer (original (ComfyUI), prefix 'model.diffusion_model.')"
};

// Splits `tensors` into components by prefix and name, detects each one's layout and maps its
// keys to diffusers names. Throws zi::Error "path: ..." naming the tensor for a fused qkv whose
// rows are not a multiple of 3, or two keys mapping to one diffusers name.
FileLayout analyze_layout(const std::vector<SourceTensor>& tensors, const std::string& path);

// The diffusers name(s) of one key of a component (the prefix already stripped). A fused
// qkv gives three entries; a known-unused key none. `vae_up_blocks` is the number of decoder
// up blocks (the Flux AE numbers them in reverse order).
struct KeyTarget {
  std::string target;
  int part = 0, parts = 1;  // rows [part·n/parts, (part+1)·n/parts) of the source's dim 0
  bool squeeze_1x1 = false; // [C, C, 1, 1] → [C, C]
};
std::vector<KeyTarget> map_component_key(Component c, std::string_view key, int vae_up_blocks = 4);

// The inverse: the original (ComfyUI / Flux AE) name of a diffusers name. The transformer's
// to_q/to_k/to_v map to one fused `attention.qkv.weight` (`*part` = 0, 1, 2 in that order);
// VAE attention projections become 1×1 convolutions (`*unsqueeze` = true).
std::string original_key(Component c, const std::string& diffusers_name, int vae_up_blocks, int* part,
                         bool* unsqueeze);

// The prefix an all-in-one checkpoint (ComfyUI's) uses for a component.
const char* all_in_one_prefix(Component c);

// ---------------------------------------------------------------------------------------
// safetensors files

// A safetensors file opened once and analysed; shared by every component it holds.
struct LayoutFile {
  std::shared_ptr<SafetensorsFile> file;
  FileLayout layout;
  static std::shared_ptr<LayoutFile> open(const std::string& path);
  // The component's tensors under their diffusers names (fused rows are byte ranges of the
  // mapping). Throws zi::Error when the file holds no such component.
  TensorStore store(Component c) const;
};

// Configs inferred from tensor shapes, for files given without a model folder. Values that
// shapes cannot tell (epsilons, RoPE bases, the VAE's scaling) are Z-Image's. Throws zi::Error
// naming the tensor that is missing or inconsistent.
DitConfig infer_dit_config(const TensorStore& s);
Qwen3Config infer_qwen3_config(const TensorStore& s);
VaeConfig infer_vae_config(const TensorStore& s);

}  // namespace zi
