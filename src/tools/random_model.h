// Random-weight Z-Image model folders (`zimage make-random-model`): the full diffusers layout
// (spec §6) with configs, the tokenizer, and safetensors shards of random weights of the
// right shapes, written at disk speed with bounded memory. Spec §2.1–2.2, §3.1–3.2,
// §5.1, §5.4–5.5, §6.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace zi {

enum class RandomPreset { Turbo, Tiny };
const char* random_preset_name(RandomPreset p);             // "turbo" | "tiny"
bool parse_random_preset(std::string_view s, RandomPreset* out);

// One tensor to generate: element values are mean + stddev · z with z ≈ N(0, 1)
// (see random_normal_at).
struct RandomTensor {
  std::string name;
  Shape shape;
  StDType dtype = StDType::F32;  // F32 or BF16
  float mean = 0.f;
  float stddev = 1.f;
  int64_t numel() const { return shape_numel(shape); }
  uint64_t nbytes() const { return uint64_t(numel()) * uint64_t(st_dtype_bits(dtype) / 8); }
};

// One weight-carrying component folder.
struct RandomComponent {
  std::string name;          // folder: "transformer" | "text_encoder" | "vae"
  std::string weights_stem;  // "diffusion_pytorch_model" | "model"
  int shards = 1;            // 1: <stem>.safetensors; N > 1: <stem>-0000k-of-0000N.safetensors + index
  std::string config_json;   // the text of <name>/config.json
  std::vector<RandomTensor> tensors;  // in file order
  int64_t num_params() const;
  uint64_t num_bytes() const;
};

struct RandomModelPlan {
  RandomPreset preset = RandomPreset::Tiny;
  std::string model_index_json;
  std::string scheduler_config_json;
  std::vector<RandomComponent> components;  // transformer, text_encoder, vae
  // Throws zi::Error when there is no such component.
  const RandomComponent& component(std::string_view name) const;
  uint64_t num_bytes() const;
};

// Everything a preset writes except the tokenizer, without generating any weight.
// `dtype` (F32 or BF16) overrides every component's storage dtype; nullopt keeps the
// preset's: turbo = the Hub's (transformer F32, text encoder and VAE BF16), tiny = BF16.
// Shapes are derived from the configs (parsed back with parse_*_config), so they are
// exactly what the loaders expect.
RandomModelPlan random_model_plan(RandomPreset preset, std::optional<DType> dtype = std::nullopt);

// Shard index (0-based) of each tensor, in order: whole tensors, roughly equal bytes,
// non-decreasing, every shard non-empty. Requires 1 <= shards <= sizes.size().
std::vector<int> assign_shards(const std::vector<uint64_t>& sizes, int shards);
// "<stem>-0000k-of-0000n.safetensors" (k 1-based), or "<stem>.safetensors" when n == 1.
std::string shard_file_name(const std::string& stem, int k, int n);

// Deterministic generator: a per-tensor key from (seed, component, tensor name), and
// z(key, i) for element i — the i-th splitmix64 output of the key turned into an
// approximately standard normal by Irwin–Hall (sum of four 16-bit uniforms, rescaled to
// unit variance; bounded to ±2√3, so norm weights 1 + 0.1·z stay positive). Any element
// can be computed independently, so chunks are generated in parallel and reproducibly.
uint64_t random_tensor_key(uint64_t seed, std::string_view component, std::string_view name);
float random_normal_at(uint64_t key, uint64_t i);
// Writes elements [begin, begin + count) of `t` in its storage dtype (little-endian) to dst.
void fill_random(const RandomTensor& t, uint64_t key, int64_t begin, int64_t count, void* dst);

struct MakeRandomModelOptions {
  RandomPreset preset = RandomPreset::Tiny;
  uint64_t seed = 0;
  std::optional<DType> dtype;   // F32 or BF16; nullopt: the preset's storage dtypes
  std::string tokenizer_src;    // folder holding tokenizer.json and tokenizer_config.json (+ optional
                                // chat_template.jinja, vocab.json, merges.txt, special_tokens_map.json)
  size_t chunk_bytes = size_t(16) << 20;       // generation/write buffer (two are used)
  std::function<void(const std::string&)> log;  // progress lines (no newline); null: silent
  std::function<void()> check_cancel;           // called between chunks; may throw to abort
};

struct MakeRandomModelResult {
  uint64_t bytes = 0;     // weight bytes written (all shards, headers included)
  double seconds = 0;
};

// Writes the folder `out_dir` (created; an existing non-empty folder is refused). Every
// file is written as NAME.tmp and renamed when complete (weights are fdatasync'ed first);
// model_index.json comes last, so a folder that has it is complete. On failure the .tmp
// being written is removed and the exception propagates.
MakeRandomModelResult make_random_model(const std::string& out_dir, const MakeRandomModelOptions& opt);

}  // namespace zi
