// The image-conditioned fixture cases (tests/data/edit/expected/NAME.json) as GenerateOptions,
// shared by the CPU and GPU tests.
#pragma once
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "pipeline/pipeline.h"

namespace zi::test {

inline GenerateOptions edit_case_options(const std::string& data_dir, const std::string& model_dir, const std::string& name) {
  const std::string root = data_dir + "/edit/";
  std::ifstream is(root + "expected/" + name + ".json");
  nlohmann::json j = nlohmann::json::parse(is);
  GenerateOptions o;
  o.model_dir = model_dir;
  o.text_rope_dtype = DType::BF16;  // as the text-to-image fixtures (make_fixtures.py cast the encoder to bf16 and back)
  o.prompt = j["prompt"].get<std::string>();
  o.guidance = j["guidance_scale"].get<float>();
  o.steps = j["num_inference_steps"].get<int>();
  o.height = j["height"].get<int>();
  o.width = j["width"].get<int>();
  o.seed = j["seed"].get<uint64_t>();
  if (j.contains("init_image")) o.init_image = root + j["init_image"].get<std::string>();
  if (j.contains("mask")) o.mask_image = root + j["mask"].get<std::string>();
  if (j.contains("strength")) o.strength = j["strength"].get<double>();
  if (j.contains("control_image")) o.control_image = root + j["control_image"].get<std::string>();
  if (j.contains("controlnet")) o.controlnet = root + j["controlnet"].get<std::string>();
  if (j.contains("control_scale")) o.control_scale = j["control_scale"].get<double>();
  return o;
}

}  // namespace zi::test
