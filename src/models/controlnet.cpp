// Fun ControlNet Union: config reading and inference, checks against the transformer, loading.
#include "models/controlnet.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"

namespace zi {

namespace fs = std::filesystem;
using nlohmann::json;

const char* controlnet_layout_name(ControlNetLayout l) {
  switch (l) {
    case ControlNetLayout::V1: return "1.0";
    case ControlNetLayout::V2_0: return "2.0";
    case ControlNetLayout::V2_1: return "2.1";
  }
  return "?";
}

namespace {

struct Expected {
  std::string name;
  Shape shape;
};

// The tensors of one block under `p` (the DiT block's keys, spec §3.2) and its projections.
void block_tensors(std::vector<Expected>& v, const std::string& p, const ControlNetConfig& c, bool modulated,
                   bool before, bool after) {
  const int64_t D = c.dim, F = int64_t(double(D) / 3.0 * 8.0), hd = D / c.n_heads, A = std::min<int64_t>(D, 256);
  for (const char* n : {"to_q", "to_k", "to_v"}) v.push_back({p + "attention." + n + ".weight", {D, D}});
  v.push_back({p + "attention.to_out.0.weight", {D, D}});
  if (c.qk_norm) {
    v.push_back({p + "attention.norm_q.weight", {hd}});
    v.push_back({p + "attention.norm_k.weight", {hd}});
  }
  for (const char* n : {"attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"}) v.push_back({p + n + ".weight", {D}});
  v.push_back({p + "feed_forward.w1.weight", {F, D}});
  v.push_back({p + "feed_forward.w2.weight", {D, F}});
  v.push_back({p + "feed_forward.w3.weight", {F, D}});
  if (modulated) {
    v.push_back({p + "adaLN_modulation.0.weight", {4 * D, A}});
    v.push_back({p + "adaLN_modulation.0.bias", {4 * D}});
  }
  if (before) {
    v.push_back({p + "before_proj.weight", {D, D}});
    v.push_back({p + "before_proj.bias", {D}});
  }
  if (after) {
    v.push_back({p + "after_proj.weight", {D, D}});
    v.push_back({p + "after_proj.bias", {D}});
  }
}

std::vector<Expected> expected_tensors(const ControlNetConfig& c) {
  std::vector<Expected> v;
  const int64_t P = int64_t(c.f_patch_size) * c.patch_size * c.patch_size * c.control_in_dim;
  const std::string xe = str_cat("control_all_x_embedder.", c.patch_size, "-", c.f_patch_size, ".");
  v.push_back({xe + "weight", {c.dim, P}});
  v.push_back({xe + "bias", {c.dim}});
  for (size_t k = 0; k < c.layers_places.size(); ++k)
    block_tensors(v, str_cat("control_layers.", k, "."), c, true, k == 0, true);
  if (c.layout == ControlNetLayout::V2_1)
    for (int k = 0; k < c.n_refiner_layers; ++k)
      block_tensors(v, str_cat("control_noise_refiner.", k, "."), c, true, k == 0, true);
  if (c.layout == ControlNetLayout::V1)
    for (int k = 0; k < c.n_refiner_layers; ++k)
      block_tensors(v, str_cat("control_noise_refiner.", k, "."), c, true, false, false);
  return v;
}

TensorStore open_store(const ControlNetConfig& c) {
  return c.single_file ? TensorStore::open_file(c.path) : TensorStore::open_dir(c.path);
}

std::vector<int> int_list(const json& j, const char* key, const std::string& where) {
  ZI_CHECK(j.contains(key) && j[key].is_array(), where, ": '", key, "' must be a list of integers");
  std::vector<int> v;
  for (const auto& e : j[key]) {
    ZI_CHECK(e.is_number_integer(), where, ": '", key, "' must be a list of integers");
    v.push_back(e.get<int>());
  }
  return v;
}

ControlNetConfig config_from_json(const std::string& dir, const DitConfig& dit) {
  const std::string p = (fs::path(dir) / "config.json").string();
  json j;
  try {
    j = json::parse(read_text_file(p));
  } catch (const json::exception& e) {
    throw Error(str_cat(p, ": not valid JSON (", e.what(), ")"));
  }
  ControlNetConfig c;
  c.path = dir;
  c.layers_places = int_list(j, "control_layers_places", p);
  if (j.contains("control_refiner_layers_places") && !j["control_refiner_layers_places"].is_null())
    c.refiner_places = int_list(j, "control_refiner_layers_places", p);
  ZI_CHECK(j.contains("control_in_dim") && j["control_in_dim"].is_number_integer(), p, ": 'control_in_dim' must be an integer");
  c.control_in_dim = j["control_in_dim"].get<int>();
  const json& mode = j.contains("add_control_noise_refiner") ? j["add_control_noise_refiner"] : json();
  if (mode.is_null()) c.layout = ControlNetLayout::V1;
  else if (mode.is_string() && mode.get<std::string>() == "control_layers") c.layout = ControlNetLayout::V2_0;
  else if (mode.is_string() && mode.get<std::string>() == "control_noise_refiner") c.layout = ControlNetLayout::V2_1;
  else throw Error(str_cat(p, ": add_control_noise_refiner must be null, \"control_layers\" or \"control_noise_refiner\", got ", mode.dump()));
  auto get_int = [&](const char* k, int dflt) {
    if (!j.contains(k)) return dflt;
    ZI_CHECK(j[k].is_number_integer(), p, ": '", k, "' must be an integer");
    return j[k].get<int>();
  };
  c.dim = get_int("dim", 3840);
  c.n_refiner_layers = get_int("n_refiner_layers", 2);
  c.n_heads = get_int("n_heads", 30);
  if (j.contains("norm_eps") && j["norm_eps"].is_number()) c.norm_eps = j["norm_eps"].get<double>();
  if (j.contains("qk_norm") && j["qk_norm"].is_boolean()) c.qk_norm = j["qk_norm"].get<bool>();
  if (j.contains("all_patch_size") && j["all_patch_size"].is_array() && j["all_patch_size"].size() == 1)
    c.patch_size = j["all_patch_size"][0].get<int>();
  if (j.contains("all_f_patch_size") && j["all_f_patch_size"].is_array() && j["all_f_patch_size"].size() == 1)
    c.f_patch_size = j["all_f_patch_size"][0].get<int>();
  (void)dit;
  return c;
}

// The published single files carry no config: infer it like diffusers' loader does (the
// layout) and from the 2.x configs (places), with the transformer's sizes.
ControlNetConfig config_from_file(const std::string& file, const DitConfig& dit) {
  TensorStore st = TensorStore::open_file(file);
  ControlNetConfig c;
  c.path = file;
  c.single_file = true;
  c.patch_size = dit.patch_size;
  c.f_patch_size = dit.f_patch_size;
  c.n_heads = dit.n_heads;
  c.norm_eps = dit.norm_eps;
  c.qk_norm = dit.qk_norm;
  c.n_refiner_layers = dit.n_refiner_layers;
  const std::string xe = str_cat("control_all_x_embedder.", c.patch_size, "-", c.f_patch_size, ".weight");
  auto e = st.find(xe);
  ZI_CHECK(e.file, file, ": no tensor '", xe, "': not a Z-Image ControlNet (or its patch size differs from the transformer's)");
  const Shape& s = e.info->shape;
  const int64_t pp = int64_t(c.patch_size) * c.patch_size * c.f_patch_size;
  ZI_CHECK(s.size() == 2 && s[1] % pp == 0, file, ": tensor '", xe, "' has shape ", shape_str(s), ", expected [dim, ", pp,
           "·control_in_dim]");
  c.dim = int(s[0]);
  c.control_in_dim = int(s[1] / pp);
  std::set<int> layers;
  bool plain_refiner = false, any_refiner = false;
  for (const std::string& n : st.names()) {
    if (n.rfind("control_layers.", 0) == 0) layers.insert(std::stoi(n.substr(15)));
    if (n.rfind("control_noise_refiner.", 0) == 0) any_refiner = true;
  }
  ZI_CHECK(!layers.empty(), file, ": no control_layers.* tensors: not a Z-Image ControlNet");
  const int N = int(layers.size());
  ZI_CHECK(*layers.rbegin() == N - 1, file, ": control_layers are not numbered 0..", N - 1);
  auto bp = st.find("control_noise_refiner.0.before_proj.weight");
  if (bp.file) {
    Tensor w = bp.file->load(*bp.info, DType::F32);
    bool zero = true;
    for (int64_t i = 0; i < w.numel() && zero; ++i) zero = w.f32()[i] == 0.0f;
    c.layout = zero ? ControlNetLayout::V2_0 : ControlNetLayout::V2_1;
  } else {
    plain_refiner = any_refiner;
    c.layout = plain_refiner ? ControlNetLayout::V1 : ControlNetLayout::V2_0;
  }
  const int step = std::max(1, dit.n_layers / N);
  for (int k = 0; k < N; ++k) c.layers_places.push_back(k * step);
  if (c.layout != ControlNetLayout::V1)
    for (int k = 0; k < c.n_refiner_layers; ++k) c.refiner_places.push_back(k);
  return c;
}

}  // namespace

ControlNetConfig inspect_controlnet(const std::string& path, const DitConfig& dit) {
  ZI_CHECK(fs::exists(path), "--controlnet '", path, "': no such file or folder");
  ControlNetConfig c = fs::is_directory(path) ? config_from_json(path, dit) : config_from_file(path, dit);
  const std::string where = str_cat("--controlnet '", path, "' (Union ", controlnet_layout_name(c.layout), ")");
  ZI_CHECK(c.dim == dit.dim, where, ": dim ", c.dim, " does not fit the transformer's dim ", dit.dim);
  ZI_CHECK(c.n_heads == dit.n_heads, where, ": n_heads ", c.n_heads, " differs from the transformer's ", dit.n_heads);
  ZI_CHECK(c.patch_size == dit.patch_size && c.f_patch_size == dit.f_patch_size, where, ": patch size ", c.patch_size, "-",
           c.f_patch_size, " differs from the transformer's ", dit.patch_size, "-", dit.f_patch_size);
  ZI_CHECK(c.control_in_dim >= dit.in_channels, where, ": control_in_dim ", c.control_in_dim,
           " is smaller than the transformer's ", dit.in_channels, " latent channels");
  ZI_CHECK(!c.layers_places.empty() && c.layers_places[0] == 0, where, ": control_layers_places must start with 0");
  for (size_t k = 0; k < c.layers_places.size(); ++k) {
    ZI_CHECK(c.layers_places[k] >= 0 && c.layers_places[k] < dit.n_layers, where, ": control layer place ", c.layers_places[k],
             " is not a layer of the transformer (", dit.n_layers, " layers)");
    ZI_CHECK(k == 0 || c.layers_places[k] > c.layers_places[k - 1], where, ": control_layers_places must increase");
  }
  if (c.layout != ControlNetLayout::V1) {
    ZI_CHECK(c.n_refiner_layers == dit.n_refiner_layers, where, ": n_refiner_layers ", c.n_refiner_layers,
             " differs from the transformer's ", dit.n_refiner_layers);
    const size_t hints = c.layout == ControlNetLayout::V2_0 ? c.layers_places.size() : size_t(c.n_refiner_layers);
    ZI_CHECK(c.refiner_places.size() <= hints, where, ": ", c.refiner_places.size(), " refiner places but only ", hints,
             " hints");
    for (int p : c.refiner_places)
      ZI_CHECK(p >= 0 && p < dit.n_refiner_layers, where, ": refiner place ", p, " is not a noise-refiner layer");
  }
  TensorStore st = open_store(c);
  std::vector<std::string> bad;
  for (const Expected& e : expected_tensors(c)) {
    auto f = st.find(e.name);
    if (!f.file) bad.push_back(str_cat("missing '", e.name, "'"));
    else if (f.info->shape != e.shape)
      bad.push_back(str_cat("'", e.name, "' is ", shape_str(f.info->shape), ", expected ", shape_str(e.shape)));
    else {
      DType dt;
      if (!st_to_dtype(f.info->dtype, &dt)) bad.push_back(str_cat("'", e.name, "' has unsupported dtype ", st_dtype_name(f.info->dtype)));
    }
    if (bad.size() >= 3) break;
  }
  if (!bad.empty()) {
    std::string msg = str_cat(where, " does not fit the transformer: ", bad[0]);
    for (size_t i = 1; i < bad.size(); ++i) msg += "; " + bad[i];
    throw Error(msg);
  }
  return c;
}

int64_t controlnet_weight_bytes(const ControlNetConfig& c, DType wdt) {
  const TensorStore st = open_store(c);
  int64_t bytes = 0;
  for (const auto& f : st.files())
    for (const auto& t : f->tensors()) bytes += t.shape.size() >= 2 ? int64_t(dtype_bytes(wdt, t.numel())) : 4 * t.numel();
  return bytes;
}

ZImageControlNet load_controlnet(const PhaseContext& ctx, const ControlNetConfig& c, const DitConfig& dit, DType wdt) {
  TensorStore st = open_store(c);
  WeightLoader ld(st, Tag::ControlNetWeights, "controlnet", ctx);
  DitConfig bc = dit;  // the blocks have the transformer's sizes (checked by inspect_controlnet)
  bc.norm_eps = c.norm_eps;
  bc.qk_norm = c.qk_norm;
  const DType f32 = DType::F32;
  const int64_t D = c.dim;
  ZImageControlNet m;
  m.cfg = c;
  m.ctx = ld.context();
  const int64_t P = int64_t(c.f_patch_size) * c.patch_size * c.patch_size * c.control_in_dim;
  const std::string xe = str_cat("control_all_x_embedder.", c.patch_size, "-", c.f_patch_size, ".");
  m.x_embed_w = ld.load(xe + "weight", {D, P}, wdt);
  m.x_embed_b = ld.load(xe + "bias", {D}, f32);
  auto control_block = [&](const std::string& p, bool before, bool after) {
    ControlBlock b;
    b.b = load_dit_block(ld, p, bc, wdt, true);
    if (before) {
      b.before_w = ld.load(p + "before_proj.weight", {D, D}, wdt);
      b.before_b = ld.load(p + "before_proj.bias", {D}, f32);
    }
    if (after) {
      b.after_w = ld.load(p + "after_proj.weight", {D, D}, wdt);
      b.after_b = ld.load(p + "after_proj.bias", {D}, f32);
    }
    return b;
  };
  for (size_t k = 0; k < c.layers_places.size(); ++k) m.layers.push_back(control_block(str_cat("control_layers.", k, "."), k == 0, true));
  if (c.layout == ControlNetLayout::V2_1)
    for (int k = 0; k < c.n_refiner_layers; ++k)
      m.refiner.push_back(control_block(str_cat("control_noise_refiner.", k, "."), k == 0, true));
  else if (c.layout == ControlNetLayout::V1)
    for (int k = 0; k < c.n_refiner_layers; ++k)
      m.refiner.push_back(control_block(str_cat("control_noise_refiner.", k, "."), false, false));
  else
    ld.ignore_prefix("control_noise_refiner.");  // the 2.0 file's unused (zero) refiner, dropped like diffusers does
  ld.finish();
  return m;
}

}  // namespace zi
