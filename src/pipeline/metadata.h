// What an image file records about how it was made (issue 15), as a library function so that
// the CLI and a server write the same thing:
//   "parameters"  the AUTOMATIC1111 string image hosts and front ends parse:
//                 <prompt>\nNegative prompt: <neg>\nSteps: 8, Sampler: Euler, CFG scale: 1,
//                 Seed: 42, Size: 1024x1024, Model: Z-Image-Turbo, ... , Version: zimage 0.1.0
//                 CFG scale is the A1111 convention neg + s·(pos − neg), i.e. guidance + 1.
//   "zimage"      JSON with every option that decides the pixels (model, prompt, sizes, seed,
//                 steps, guidance options, dtypes, precision, devices, tiling, LoRAs, override,
//                 prompt-embeddings file, version): `generate --from-image` reads it back.
// With paths off, files and folders are reduced to their names (no home folders leak).
#pragma once
#include <string>

#include "io/image_codec.h"
#include "pipeline/pipeline.h"

namespace zi {

struct MetadataInput {
  const GenerateOptions* options = nullptr;
  int width = 0, height = 0;
  int vae_tile_used = 0;          // the latent tile the decode used (0: untiled), for "auto"
  std::string prompt_embeds_file; // generate --prompt-embeds (prompt text then unknown)
  bool full_paths = true;         // false: --metadata-paths off
};

std::string a1111_parameters(const MetadataInput& in);
std::string reproduction_json(const MetadataInput& in);
// {"parameters", ...}, {"zimage", ...}, {"Software", "zimage <version>"}.
TextChunks image_metadata(const MetadataInput& in);

// Reads reproduction_json's output into `o` (every field it holds; others untouched) and the
// prompt-embeddings file, if any. Throws zi::Error naming the bad field.
void apply_reproduction_json(const std::string& json, GenerateOptions* o, std::string* prompt_embeds_file);

// CFG scale in the A1111 / stable-diffusion.cpp convention for a Z-Image guidance value.
inline double cfg_scale_of(float guidance) { return double(guidance) + 1.0; }

}  // namespace zi
