// Where each component of a run comes from: a diffusers folder (--model), per-component files
// (--diffusion-model, --text-encoder, --vae) in any layout of io/layouts.h, or a mix. A file
// is opened (mapped, its header parsed) once, however many components it supplies.
//
// Resolution, per component: the file given for it (which must hold it), else another given
// file holding it (all-in-one checkpoints), else the folder. Configs come from the folder's
// config.json for folder components and are inferred from tensor shapes for file components
// (values shapes cannot tell, such as epsilons and the VAE's scaling, are taken from the folder
// when there is one, else Z-Image's). Without a folder the tokenizer is the bundled copy of the
// Qwen tokenizer and the scheduler is Turbo's.
#pragma once
#include <array>
#include <memory>
#include <string>

#include "io/checkpoint.h"
#include "io/layouts.h"

namespace zi {

struct ModelSpec {
  std::string model_dir;        // may be empty when the files supply every component
  std::string diffusion_model;  // --diffusion-model
  std::string text_encoder;     // --text-encoder
  std::string vae;              // --vae
  bool any_file() const { return !diffusion_model.empty() || !text_encoder.empty() || !vae.empty(); }
};

struct ModelSources {
  ModelFolder folder;  // configs (read or inferred), tokenizer_dir; scheduler_config_path "" = Turbo's
  std::array<std::shared_ptr<LayoutFile>, 3> files;  // per Component, when it comes from a file
  std::vector<std::string> notices;  // one line each: stray or dropped tensors, inferred configs

  const LayoutFile* file(Component c) const { return files[size_t(c)].get(); }
  // The component's tensors under diffusers names.
  TensorStore open(Component c) const;
  // "transformer: FILE (original (ComfyUI), prefix 'model.diffusion_model.')" or "...: DIR/transformer".
  std::string describe(Component c) const;
};

// Opens and checks everything a run needs before any weight is read: the folder's configs,
// every file's header and layout, the components each supplies, shapes for the inferred
// configs, and that the components fit together (cap_feat_dim, latent channels). Throws
// zi::Error naming the file and tensor, or zi::UsageError naming the flag. Cheap (headers only):
// the CLI's pre-flight validation can call it.
ModelSources resolve_model_sources(const ModelSpec& spec);

// The bundled Qwen tokenizer: $ZIMAGE_TOKENIZER, else models/tiny-zimage/tokenizer or
// tests/data/qwen-tokenizer (or share/zimage/tokenizer) found from the executable's folder
// upwards, else from the source tree zimage was built from. Throws zi::Error when none exists.
std::string bundled_tokenizer_dir();

}  // namespace zi
