#include "pipeline/metadata.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/check.h"
#include "core/dtype.h"

namespace zi {

namespace {

using nlohmann::json;

std::string shown_path(const std::string& p, bool full) {
  if (full || p.empty()) return p;
  std::filesystem::path fp = std::filesystem::path(p).lexically_normal();
  std::string name = fp.filename().string();
  if (name.empty()) name = fp.parent_path().filename().string();  // "dir/" → "dir"
  return name;
}

// Shortest text that reads back as the same float ("0.8", not "0.800000011920929").
std::string num(double v) {
  for (int prec = 1; prec <= 17; ++prec) {
    std::ostringstream os;
    os.precision(prec);
    os << v;
    if (std::stod(os.str()) == v) return os.str();
  }
  return std::to_string(v);
}
std::string numf(float v) {
  for (int prec = 1; prec <= 9; ++prec) {
    std::ostringstream os;
    os.precision(prec);
    os << v;
    if (std::stof(os.str()) == v) return os.str();
  }
  return std::to_string(v);
}

// A1111 values may not hold ", " unquoted; quote like A1111 does (JSON string) when they do.
std::string a1111_value(const std::string& v) {
  if (v.find(',') == std::string::npos && v.find(':') == std::string::npos && v.find('\n') == std::string::npos &&
      v.find('"') == std::string::npos)
    return v;
  return json(v).dump();
}

DType dtype_field(const json& j, const char* key, DType dflt) {
  if (!j.contains(key)) return dflt;
  DType d;
  if (!j[key].is_string() || !parse_dtype(j[key].get<std::string>(), &d))
    fail(str_cat("zimage metadata: field '", key, "' must be f32, bf16 or f16"));
  return d;
}

Device device_field(const json& j, const char* key, Device dflt) {
  if (!j.contains(key)) return dflt;
  const std::string v = j[key].is_string() ? j[key].get<std::string>() : "";
  if (v == "cpu") return Device::CPU;
  if (v == "cuda") return Device::CUDA;
  fail(str_cat("zimage metadata: field '", key, "' must be cpu or cuda"));
}

}  // namespace

std::string a1111_parameters(const MetadataInput& in) {
  const GenerateOptions& o = *in.options;
  std::string s = in.prompt_embeds_file.empty() ? o.prompt : "";
  s += "\n";
  if (o.guidance > 0) s += "Negative prompt: " + o.negative_prompt + "\n";
  s += str_cat("Steps: ", o.steps, ", Sampler: Euler, Schedule type: FlowMatch, CFG scale: ", num(cfg_scale_of(o.guidance)),
               ", Seed: ", o.seed, ", Size: ", in.width, "x", in.height,
               ", Model: ", a1111_value(shown_path(o.model_dir, in.full_paths)));
  if (o.guidance > 0 && o.cfg_normalization > 0) s += ", CFG normalization: " + numf(o.cfg_normalization);
  if (o.guidance > 0 && o.cfg_truncation != 1.0f) s += ", CFG truncation: " + numf(o.cfg_truncation);
  if (o.max_sequence_length != 512) s += str_cat(", Max sequence length: ", o.max_sequence_length);
  if (!o.loras.empty()) {
    std::string l;
    for (const auto& [f, sc] : o.loras) l += (l.empty() ? "" : " ") + shown_path(f, in.full_paths) + ":" + numf(sc);
    s += ", LoRA: " + a1111_value(l);
  }
  if (!o.transformer_override.empty())
    s += ", Transformer override: " + a1111_value(shown_path(o.transformer_override, in.full_paths));
  if (!in.prompt_embeds_file.empty()) s += ", Prompt embeddings: " + a1111_value(shown_path(in.prompt_embeds_file, in.full_paths));
  s += ", Version: zimage " ZIMAGE_VERSION;
  return s;
}

std::string reproduction_json(const MetadataInput& in) {
  const GenerateOptions& o = *in.options;
  json j;
  j["zimage_version"] = ZIMAGE_VERSION;
  j["model"] = shown_path(o.model_dir, in.full_paths);
  if (in.prompt_embeds_file.empty()) j["prompt"] = o.prompt;
  else j["prompt_embeds"] = shown_path(in.prompt_embeds_file, in.full_paths);
  j["negative_prompt"] = o.negative_prompt;
  j["width"] = in.width;
  j["height"] = in.height;
  j["steps"] = o.steps;
  j["guidance"] = o.guidance;
  j["cfg_scale"] = cfg_scale_of(o.guidance);
  j["cfg_normalization"] = o.cfg_normalization;
  j["cfg_truncation"] = o.cfg_truncation;
  j["seed"] = o.seed;
  j["max_sequence_length"] = o.max_sequence_length;
  j["text_encoder_dtype"] = dtype_name(o.text_encoder_dtype);
  j["transformer_dtype"] = dtype_name(o.transformer_dtype);
  j["vae_dtype"] = dtype_name(o.vae_dtype);
  j["text_rope_dtype"] = dtype_name(o.text_rope_dtype);
  j["precision"] = dtype_name(o.precision);
  j["text_encoder_device"] = device_name(o.text_encoder_device);
  j["transformer_device"] = device_name(o.transformer_device);
  j["vae_device"] = device_name(o.vae_device);
  j["vae_tile"] = in.vae_tile_used * 8;  // pixels; 0 = untiled (what "auto" resolved to)
  json loras = json::array();
  for (const auto& [f, sc] : o.loras) loras.push_back({{"file", shown_path(f, in.full_paths)}, {"scale", sc}});
  j["loras"] = loras;
  j["transformer_override"] = shown_path(o.transformer_override, in.full_paths);
  return j.dump();
}

TextChunks image_metadata(const MetadataInput& in) {
  return {{"parameters", a1111_parameters(in)}, {"zimage", reproduction_json(in)}, {"Software", "zimage " ZIMAGE_VERSION}};
}

void apply_reproduction_json(const std::string& text, GenerateOptions* o, std::string* prompt_embeds_file) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    fail(str_cat("zimage metadata is not valid JSON: ", e.what()));
  }
  if (!j.is_object() || !j.contains("zimage_version")) fail("zimage metadata: not a zimage record (no 'zimage_version')");
  auto get = [&](const char* key, auto* dst) {
    if (!j.contains(key)) return;
    try {
      *dst = j[key].get<std::remove_pointer_t<decltype(dst)>>();
    } catch (const std::exception&) {
      fail(str_cat("zimage metadata: field '", key, "' has the wrong type"));
    }
  };
  get("model", &o->model_dir);
  get("prompt", &o->prompt);
  if (prompt_embeds_file) get("prompt_embeds", prompt_embeds_file);
  get("negative_prompt", &o->negative_prompt);
  get("width", &o->width);
  get("height", &o->height);
  get("steps", &o->steps);
  get("guidance", &o->guidance);
  get("cfg_normalization", &o->cfg_normalization);
  get("cfg_truncation", &o->cfg_truncation);
  get("seed", &o->seed);
  get("max_sequence_length", &o->max_sequence_length);
  o->text_encoder_dtype = dtype_field(j, "text_encoder_dtype", o->text_encoder_dtype);
  o->transformer_dtype = dtype_field(j, "transformer_dtype", o->transformer_dtype);
  o->vae_dtype = dtype_field(j, "vae_dtype", o->vae_dtype);
  o->text_rope_dtype = dtype_field(j, "text_rope_dtype", o->text_rope_dtype);
  o->precision = dtype_field(j, "precision", o->precision);
  o->text_encoder_device = device_field(j, "text_encoder_device", o->text_encoder_device);
  o->transformer_device = device_field(j, "transformer_device", o->transformer_device);
  o->vae_device = device_field(j, "vae_device", o->vae_device);
  int tile_px = 0;
  get("vae_tile", &tile_px);
  if (tile_px < 0 || tile_px % 8) fail("zimage metadata: field 'vae_tile' must be a multiple of 8 pixels");
  o->vae_tile = tile_px / 8;
  if (j.contains("loras")) {
    if (!j["loras"].is_array()) fail("zimage metadata: field 'loras' must be a list");
    o->loras.clear();
    for (const json& l : j["loras"]) {
      if (!l.is_object() || !l.contains("file") || !l["file"].is_string() || !l.contains("scale") || !l["scale"].is_number())
        fail("zimage metadata: each of 'loras' needs 'file' (text) and 'scale' (number)");
      o->loras.emplace_back(l["file"].get<std::string>(), l["scale"].get<float>());
    }
  }
  get("transformer_override", &o->transformer_override);
}

}  // namespace zi
