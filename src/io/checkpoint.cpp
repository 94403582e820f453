#include "io/checkpoint.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/check.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace zi {

std::string read_text_file(const std::string& path) {
  std::ifstream is(path, std::ios::binary);
  if (!is) fail(str_cat("cannot read '", path, "': ", std::strerror(errno)));
  std::ostringstream os;
  os << is.rdbuf();
  return os.str();
}

namespace {

json parse_json(const std::string& text, const std::string& path) {
  try {
    json j = json::parse(text);
    ZI_CHECK(j.is_object(), path, ": expected a JSON object");
    return j;
  } catch (const json::exception& e) {
    fail(str_cat(path, ": not valid JSON (", e.what(), ")"));
  }
}

// Reads an optional field of the expected JSON kind; a field of the wrong kind is an error.
template <class T>
void get(const json& j, const char* key, T* out, const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return;
  try {
    *out = j[key].get<T>();
  } catch (const json::exception&) {
    fail(str_cat(path, ": field '", key, "' has the wrong type (", j[key].dump(), ")"));
  }
}

// Integer fields: a JSON integer, or an integral float (some exporters write 64.0), that fits
// in an int. get<int>() would silently truncate 3.7 or wrap 2^32, and a float beyond the int
// range is undefined behaviour.
bool json_to_int(const json& v, int* out) {
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > uint64_t(INT_MAX)) return false;
    *out = int(v.get<uint64_t>());
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t s = v.get<int64_t>();
    if (s < INT_MIN || s > INT_MAX) return false;
    *out = int(s);
    return true;
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!(d >= double(INT_MIN) && d <= double(INT_MAX)) || d != std::floor(d)) return false;
    *out = int(d);
    return true;
  }
  return false;
}

void get(const json& j, const char* key, int* out, const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return;
  ZI_CHECK(json_to_int(j[key], out), path, ": field '", key, "' must be an integer, got ", j[key].dump());
}

void get(const json& j, const char* key, std::vector<int>* out, const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return;
  const json& v = j[key];
  ZI_CHECK(v.is_array(), path, ": field '", key, "' must be a list of integers, got ", v.dump());
  std::vector<int> r(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    ZI_CHECK(json_to_int(v[i], &r[i]), path, ": field '", key, "' must be a list of integers, got ", v.dump());
  *out = std::move(r);
}

void positive(int v, const char* name, const std::string& path) {
  ZI_CHECK(v > 0, path, ": ", name, " must be positive, got ", v);
}

// Sizes beyond any real model: also keeps every product of sizes far from overflowing.
constexpr int kMaxSize = 1 << 20, kMaxLayers = 1024, kMaxVocab = 1 << 24;

void in_range(int v, const char* name, int most, const std::string& path) {
  positive(v, name, path);
  ZI_CHECK(v <= most, path, ": ", name, " of ", v, " is beyond any real model (at most ", most, ")");
}

}  // namespace

void Qwen3Config::validate(const std::string& path) const {
  in_range(hidden_size, "hidden_size", kMaxSize, path);
  in_range(num_hidden_layers, "num_hidden_layers", kMaxLayers, path);
  in_range(num_attention_heads, "num_attention_heads", kMaxSize, path);
  in_range(num_key_value_heads, "num_key_value_heads", kMaxSize, path);
  in_range(head_dim, "head_dim", kMaxSize, path);
  in_range(intermediate_size, "intermediate_size", kMaxSize, path);
  in_range(vocab_size, "vocab_size", kMaxVocab, path);
  ZI_CHECK(int64_t(num_attention_heads) * head_dim <= kMaxSize, path, ": num_attention_heads x head_dim (",
           int64_t(num_attention_heads) * head_dim, ") is beyond any real model");
  ZI_CHECK(num_hidden_layers >= 2, path, ": num_hidden_layers must be at least 2 (Z-Image uses hidden_states[-2])");
  ZI_CHECK(num_attention_heads % num_key_value_heads == 0, path, ": num_attention_heads (", num_attention_heads,
           ") must be a multiple of num_key_value_heads (", num_key_value_heads, ")");
  ZI_CHECK(head_dim % 2 == 0, path, ": head_dim must be even for RoPE, got ", head_dim);
  ZI_CHECK(rope_theta > 0 && rms_norm_eps > 0, path, ": rope_theta and rms_norm_eps must be positive");
  ZI_CHECK(hidden_act == "silu", path, ": hidden_act '", hidden_act, "' is not supported (expected silu)");
  ZI_CHECK(!attention_bias, path, ": attention_bias=true is not supported by Qwen3");
}

void DitConfig::validate(const std::string& path) const {
  in_range(in_channels, "in_channels", kMaxSize, path);
  in_range(dim, "dim", kMaxSize, path);
  in_range(n_layers, "n_layers", kMaxLayers, path);
  ZI_CHECK(n_refiner_layers >= 0 && n_refiner_layers <= kMaxLayers, path, ": n_refiner_layers must be 0 to ",
           kMaxLayers, ", got ", n_refiner_layers);
  in_range(n_heads, "n_heads", kMaxSize, path);
  in_range(cap_feat_dim, "cap_feat_dim", kMaxSize, path);
  ZI_CHECK(dim % n_heads == 0, path, ": n_heads (", n_heads, ") must divide dim (", dim, ")");
  ZI_CHECK(axes_dims.size() == 3 && axes_lens.size() == 3, path, ": axes_dims and axes_lens need 3 entries");
  int sum = 0;
  for (int a : axes_dims) {
    ZI_CHECK(a > 0 && a % 2 == 0 && a <= kMaxSize, path, ": axes_dims entries must be positive and even");
    sum += a;
  }
  for (int a : axes_lens) in_range(a, "axes_lens entry", kMaxSize, path);
  ZI_CHECK(sum == head_dim(), path, ": axes_dims sum to ", sum, " but the head dimension is ", head_dim());
  ZI_CHECK(patch_size == 2 && f_patch_size == 1, path, ": only all_patch_size [2] and all_f_patch_size [1] exist");
  ZI_CHECK(qk_norm, path, ": qk_norm=false is not a Z-Image configuration");
  ZI_CHECK(norm_eps > 0 && rope_theta > 0 && t_scale > 0, path, ": norm_eps, rope_theta and t_scale must be positive");
}

void VaeConfig::validate(const std::string& path) const {
  in_range(latent_channels, "latent_channels", kMaxSize, path);
  in_range(out_channels, "out_channels", kMaxSize, path);
  in_range(layers_per_block, "layers_per_block", kMaxLayers, path);
  in_range(norm_num_groups, "norm_num_groups", kMaxSize, path);
  ZI_CHECK(!block_out_channels.empty() && block_out_channels.size() <= 8, path,
           ": block_out_channels must have 1 to 8 entries");
  for (int c : block_out_channels) {
    ZI_CHECK(c > 0 && c % norm_num_groups == 0, path, ": block_out_channels entry ", c,
             " is not a positive multiple of norm_num_groups (", norm_num_groups, ")");
    in_range(c, "block_out_channels entry", kMaxSize, path);
  }
  ZI_CHECK(act_fn == "silu", path, ": act_fn '", act_fn, "' is not supported (expected silu)");
  ZI_CHECK(!use_post_quant_conv, path, ": use_post_quant_conv=true is not supported");
  ZI_CHECK(scaling_factor != 0, path, ": scaling_factor must not be 0");
}

Qwen3Config parse_qwen3_config(const std::string& text, const std::string& path) {
  json j = parse_json(text, path);
  Qwen3Config c;
  get(j, "hidden_size", &c.hidden_size, path);
  get(j, "num_hidden_layers", &c.num_hidden_layers, path);
  get(j, "num_attention_heads", &c.num_attention_heads, path);
  get(j, "num_key_value_heads", &c.num_key_value_heads, path);
  c.head_dim = c.hidden_size / (c.num_attention_heads > 0 ? c.num_attention_heads : 1);
  get(j, "head_dim", &c.head_dim, path);
  get(j, "intermediate_size", &c.intermediate_size, path);
  get(j, "vocab_size", &c.vocab_size, path);
  get(j, "rms_norm_eps", &c.rms_norm_eps, path);
  get(j, "hidden_act", &c.hidden_act, path);
  get(j, "attention_bias", &c.attention_bias, path);
  get(j, "rope_theta", &c.rope_theta, path);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const json& rp = j["rope_parameters"];
    get(rp, "rope_theta", &c.rope_theta, path);
    std::string type = "default";
    get(rp, "rope_type", &type, path);
    ZI_CHECK(type == "default", path, ": rope_type '", type, "' is not supported");
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    fail(str_cat(path, ": rope_scaling is not supported"));
  c.validate(path);
  return c;
}

DitConfig parse_dit_config(const std::string& text, const std::string& path) {
  json j = parse_json(text, path);
  DitConfig c;
  get(j, "in_channels", &c.in_channels, path);
  get(j, "dim", &c.dim, path);
  get(j, "n_layers", &c.n_layers, path);
  get(j, "n_refiner_layers", &c.n_refiner_layers, path);
  get(j, "n_heads", &c.n_heads, path);
  get(j, "n_kv_heads", &c.n_kv_heads, path);
  get(j, "norm_eps", &c.norm_eps, path);
  get(j, "qk_norm", &c.qk_norm, path);
  get(j, "cap_feat_dim", &c.cap_feat_dim, path);
  get(j, "rope_theta", &c.rope_theta, path);
  get(j, "t_scale", &c.t_scale, path);
  get(j, "axes_dims", &c.axes_dims, path);
  get(j, "axes_lens", &c.axes_lens, path);
  std::vector<int> ps{c.patch_size}, fps{c.f_patch_size};
  get(j, "all_patch_size", &ps, path);
  get(j, "all_f_patch_size", &fps, path);
  ZI_CHECK(ps.size() == 1 && fps.size() == 1, path, ": all_patch_size and all_f_patch_size need exactly one entry");
  c.patch_size = ps[0];
  c.f_patch_size = fps[0];
  if (j.contains("siglip_feat_dim") && !j["siglip_feat_dim"].is_null())
    fail(str_cat(path, ": siglip_feat_dim is set: Z-Image-Omni is not supported"));
  c.validate(path);
  return c;
}

VaeConfig parse_vae_config(const std::string& text, const std::string& path) {
  json j = parse_json(text, path);
  VaeConfig c;
  get(j, "in_channels", &c.in_channels, path);
  get(j, "out_channels", &c.out_channels, path);
  get(j, "latent_channels", &c.latent_channels, path);
  get(j, "block_out_channels", &c.block_out_channels, path);
  get(j, "layers_per_block", &c.layers_per_block, path);
  get(j, "norm_num_groups", &c.norm_num_groups, path);
  get(j, "scaling_factor", &c.scaling_factor, path);
  get(j, "shift_factor", &c.shift_factor, path);
  get(j, "use_quant_conv", &c.use_quant_conv, path);
  get(j, "use_post_quant_conv", &c.use_post_quant_conv, path);
  get(j, "mid_block_add_attention", &c.mid_block_add_attention, path);
  get(j, "act_fn", &c.act_fn, path);
  c.validate(path);
  return c;
}

ModelFolder open_model_folder(const std::string& dir) {
  ZI_CHECK(fs::is_directory(dir), "model folder '", dir, "' does not exist (expected a diffusers-format Z-Image folder)");
  ModelFolder m;
  m.root = dir;
  std::string index_path = (fs::path(dir) / "model_index.json").string();
  ZI_CHECK(fs::exists(index_path), "'", dir, "' has no model_index.json (expected a diffusers-format Z-Image folder)");
  json idx = parse_json(read_text_file(index_path), index_path);
  std::string cls;
  get(idx, "_class_name", &cls, index_path);
  ZI_CHECK(cls.empty() || cls == "ZImagePipeline", index_path, ": _class_name is '", cls,
           "', expected ZImagePipeline");
  auto sub = [&](const char* name) {
    fs::path p = fs::path(dir) / name;
    ZI_CHECK(fs::is_directory(p), "'", dir, "' has no ", name, "/ folder");
    return p.string();
  };
  m.text_encoder_dir = sub("text_encoder");
  m.tokenizer_dir = sub("tokenizer");
  m.transformer_dir = sub("transformer");
  m.vae_dir = sub("vae");
  m.scheduler_dir = sub("scheduler");
  auto cfg = [&](const std::string& d, const char* file) {
    std::string p = (fs::path(d) / file).string();
    ZI_CHECK(fs::exists(p), "missing '", p, "'");
    return p;
  };
  std::string p = cfg(m.text_encoder_dir, "config.json");
  m.text_encoder = parse_qwen3_config(read_text_file(p), p);
  p = cfg(m.transformer_dir, "config.json");
  m.transformer = parse_dit_config(read_text_file(p), p);
  p = cfg(m.vae_dir, "config.json");
  m.vae = parse_vae_config(read_text_file(p), p);
  m.scheduler_config_path = cfg(m.scheduler_dir, "scheduler_config.json");
  ZI_CHECK(m.transformer.cap_feat_dim == m.text_encoder.hidden_size, m.transformer_dir,
           "/config.json: cap_feat_dim (", m.transformer.cap_feat_dim, ") differs from the text encoder's hidden_size (",
           m.text_encoder.hidden_size, ")");
  ZI_CHECK(m.transformer.in_channels == m.vae.latent_channels, m.transformer_dir, "/config.json: in_channels (",
           m.transformer.in_channels, ") differs from the VAE's latent_channels (", m.vae.latent_channels, ")");
  return m;
}

}  // namespace zi
