// `zimage convert`: rewrites a model in any readable layout (a diffusers folder, a single
// file of one component, an all-in-one checkpoint; io/layouts.h) as a diffusers folder or as
// one safetensors file in the original (ComfyUI / Flux AE) layout, streaming tensor by tensor:
// at most one output tensor and one source tensor are in memory at a time, and the mapped
// pages of a source tensor are dropped once copied. Output is atomic (temp name, renamed when
// complete).
//
// Storage dtypes: "keep" (the source's), bf16, f16, f32. Quantized dtypes (issue 14) plug in
// as another OutDType whose per-tensor encoder replaces the float conversion in write_tensor.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace zi {

enum class ConvertTo { Diffusers, SingleFile };

struct ConvertOptions {
  ConvertTo to = ConvertTo::Diffusers;
  std::string dtype = "keep";  // keep | bf16 | f16 | f32
  std::string component;       // "" (all of SRC), transformer, text_encoder or vae (extract one)
  std::function<void(const std::string&)> log;  // progress / notices (no newline); null: silent
};

struct ConvertResult {
  int64_t tensors = 0;
  uint64_t bytes = 0;               // tensor bytes written
  uint64_t largest_buffer = 0;      // the largest output tensor held in memory
  double seconds = 0;
  std::string layout;               // what was read: one line per component
};

// Parses --dtype; throws zi::UsageError naming the flag.
void check_convert_dtype(const std::string& dtype);
void check_convert_component(const std::string& component);

// SRC: a diffusers folder or a .safetensors file. OUT must not exist. Throws zi::Error naming
// the file or tensor (nothing is left at OUT then).
ConvertResult convert_model(const std::string& src, const std::string& out, const ConvertOptions& opt);

}  // namespace zi
