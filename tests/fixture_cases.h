// The reference fixture cases (tests/data/expected/NAME.json) as GenerateOptions, shared by
// the CPU and GPU pipeline tests.
#pragma once
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/pipeline.h"

namespace zi::test {

// `data_dir` holds expected/ and loras/; `model_dir` is the bundled tiny model.
inline GenerateOptions fixture_case_options(const std::string& data_dir, const std::string& model_dir,
                                            const std::string& name) {
  std::ifstream is(data_dir + "/expected/" + name + ".json");
  nlohmann::json j = nlohmann::json::parse(is);
  GenerateOptions o;
  o.model_dir = model_dir;
  // The fixtures' maker cast the text encoder to bf16 and back, RoPE buffer included.
  o.text_rope_dtype = DType::BF16;
  o.prompt = j["prompt"].get<std::string>();
  if (j["negative_prompt"].is_string()) o.negative_prompt = j["negative_prompt"].get<std::string>();
  o.guidance = j["guidance_scale"].get<float>();
  o.steps = j["num_inference_steps"].get<int>();
  o.height = j["height"].get<int>();
  o.width = j["width"].get<int>();
  o.seed = j["seed"].get<uint64_t>();
  if (j["cfg_normalization"].is_number()) o.cfg_normalization = j["cfg_normalization"].get<float>();
  else if (j["cfg_normalization"].is_boolean() && j["cfg_normalization"].get<bool>()) o.cfg_normalization = 1.0f;
  o.cfg_truncation = j["cfg_truncation"].get<float>();
  o.max_sequence_length = j["max_sequence_length"].get<int>();
  // The reference applies LoRAs unfused in f32; merged weights are exact only when kept
  // in f32 (bf16 storage rounds W + ΔW once, like diffusers' fuse_lora in bf16).
  if (j.contains("loras")) {
    o.transformer_dtype = DType::F32;
    for (const auto& l : j["loras"]) o.loras.emplace_back(data_dir + "/" + l[0].get<std::string>(), l[1].get<float>());
  }
  if (j.contains("transformer_override") && j["transformer_override"].is_string())
    o.transformer_override = data_dir + "/" + j["transformer_override"].get<std::string>();
  return o;
}

}  // namespace zi::test
