#include "models/lora.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <unordered_map>

#include "core/check.h"
#include "ops/ops.h"

namespace zi {

namespace {

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

std::string strip_suffix(const std::string& s, std::string_view suffix) {
  return s.substr(0, s.size() - suffix.size());
}

// "a, b, c, ... (N in all)"
std::string some(const std::vector<std::string>& v, size_t most = 4) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < most; ++i) s += (i ? ", " : "") + ("'" + v[i] + "'");
  if (v.size() > most) s += str_cat(", ... (", v.size(), " in all)");
  return s;
}

// A finite number filling all of `s`.
bool parse_number(const std::string& s, float* out) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size() || !std::isfinite(v)) return false;
  *out = float(v);
  return true;
}

// ---------------------------------------------------------------------------------------
// Key conversion (spec §7.2). A KeyMap holds the file's tensors under their current,
// progressively converted names; `Src::key` keeps the file's own name for messages.

struct Src {
  std::string key;
  const TensorInfo* info = nullptr;
};
using KeyMap = std::map<std::string, Src>;

// One (down, up) pair found in the file, for the module `module` (diffusers path).
struct Pair {
  std::string module;
  Src down, up;
  std::optional<Src> bias;
  double fold = 1.0;  // alpha / rank from an `.alpha` key, 1 without
};

struct Converter {
  Converter(const SafetensorsFile& f, KeyMap k) : file(f), keys(std::move(k)) {}

  [[noreturn]] void error(const std::string& key, const std::string& what) const {
    fail(str_cat("LoRA '", file.path(), "': key '", key, "' ", what));
  }

  bool any(const std::function<bool(const std::string&)>& pred) const {
    for (const auto& kv : keys)
      if (pred(kv.first)) return true;
    return false;
  }

  // Renames every key; two keys landing on one name is an error.
  void rename(const std::function<std::string(const std::string&)>& f) {
    KeyMap out;
    for (auto& [name, src] : keys) {
      auto [it, fresh] = out.emplace(f(name), src);
      if (!fresh) error(src.key, str_cat("and key '", it->second.key, "' both convert to '", it->first, "'"));
    }
    keys = std::move(out);
  }

  std::optional<Src> take(const std::string& name) {
    auto it = keys.find(name);
    if (it == keys.end()) return std::nullopt;
    Src s = it->second;
    keys.erase(it);
    return s;
  }

  void drop(const std::string& name) {
    if (auto s = take(name)) ignored.push_back(s->key);
  }

  std::vector<std::string> names_ending(std::string_view suffix) const {
    std::vector<std::string> v;
    for (const auto& kv : keys)
      if (kv.first.ends_with(suffix)) v.push_back(kv.first);
    return v;
  }

  // alpha / rank when `alpha_name` exists (and is consumed), else 1.
  double fold(const Src& down, const std::string& alpha_name) {
    std::optional<Src> a = take(alpha_name);
    if (!a) return 1.0;
    if (a->info->numel() != 1) error(a->key, str_cat("is an alpha of shape ", shape_str(a->info->shape), ", not a scalar"));
    check_matrix(down);
    const float alpha = file.load(*a->info, DType::F32).f32()[0];
    if (!std::isfinite(alpha)) error(a->key, str_cat("is an alpha of ", alpha, " (not a finite number)"));
    return double(alpha) / double(down.info->shape[0]);
  }

  void check_matrix(const Src& s) const {
    if (s.info->shape.size() != 2)
      error(s.key, str_cat("has shape ", shape_str(s.info->shape), "; LoRA A/B tensors must be 2-D"));
  }

  // Pairs every `<module><down>` with `<module><up>` (+ `<module>.alpha` when `alphas`).
  void pair_suffix(std::string_view down_sfx, std::string_view up_sfx, bool alphas, bool bias) {
    for (const std::string& name : names_ending(down_sfx)) {
      const std::string module = strip_suffix(name, down_sfx);
      Pair p{module, *take(name), {}, std::nullopt, 1.0};
      std::optional<Src> up = take(module + std::string(up_sfx));
      if (!up) error(p.down.key, str_cat("has no matching '", module, up_sfx, "' (missing half of a LoRA pair)"));
      p.up = *up;
      if (alphas) p.fold = fold(p.down, module + ".alpha");
      if (bias) p.bias = take(module + ".lora_B.bias");
      pairs.push_back(std::move(p));
    }
  }

  // Dot style (`.lora.down.weight`, every kohya weight key after kohya_to_dots): fused `qkv`
  // entries (and their alpha) and bare `out` entries are dropped as diffusers drops them.
  void pair_dot_style() {
    static constexpr std::string_view down_sfx = ".lora.down.weight", up_sfx = ".lora.up.weight";
    for (const std::string& name : names_ending(down_sfx)) {
      const std::string base = strip_suffix(name, down_sfx);
      // diffusers drops fused `qkv` and bare `out` entries here; zimage applies them (a fused
      // qkv is split by split_fused_qkv, `out` is to_out.0, whose alpha normalize_out_key renamed).
      std::string module = base;
      if (module.ends_with(".attention.out")) module = strip_suffix(module, ".out") + ".to_out.0";
      for (const char* proj : {".to.q", ".to.k", ".to.v"})  // ".to.q" → ".to_q"
        if (module.ends_with(proj)) module = strip_suffix(module, proj) + ".to_" + proj[4];
      Pair p{module, *take(name), {}, std::nullopt, 1.0};
      std::optional<Src> up = take(base + std::string(up_sfx));
      if (!up) error(p.down.key, "has no matching lora_up weight (missing half of a LoRA pair)");
      p.up = *up;
      p.fold = fold(p.down, module + ".alpha");
      pairs.push_back(std::move(p));
    }
  }

  // Whatever no rule consumed is an error, as in diffusers ("state_dict should be empty").
  void reject_leftovers() const {
    if (keys.empty()) return;
    const auto& [name, src] = *keys.begin();
    std::vector<std::string> all;
    for (const auto& kv : keys) all.push_back(kv.second.key);
    std::string why = "is not a LoRA tensor of a known layout";
    if (name.ends_with(".lora_up.weight") || name.ends_with(".lora_B.weight") || name.ends_with(".lora.up.weight"))
      why = "has no matching lora_down/lora_A half (missing half of a LoRA pair)";
    else if (name.ends_with(".alpha"))
      why = "is an alpha with no LoRA pair it belongs to";
    else if (name.ends_with(".lora_B.bias"))
      why = "is a lora_B bias, supported only in diffusers/PEFT files without alpha keys";
    error(src.key, str_cat(why, all.size() > 1 ? str_cat(" (unconverted keys: ", some(all), ")") : ""));
  }

  const SafetensorsFile& file;
  KeyMap keys;
  std::vector<Pair> pairs;
  std::vector<std::string> ignored;
};

// kohya: everything before the last dot, split on '_' into dotted components, keeping the
// pairs to_q/k/v/out and feed_forward whole (diffusers' convert_key).
std::string kohya_to_dots(const std::string& key) {
  const size_t dot = key.rfind('.');
  const std::string base = dot == std::string::npos ? key : key.substr(0, dot);
  const std::string suffix = dot == std::string::npos ? "" : key.substr(dot);
  return kohya_underscores_to_dots(base) + suffix;
}

// A bare `.out` directly before `.lora_down.weight`, `.lora_up.weight` or `.alpha` is to_out.0.
std::string normalize_out_key(const std::string& k) {
  if (contains(k, ".to_out")) return k;
  for (std::string_view sfx : {".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha"}) {
    const std::string tail = ".out" + std::string(sfx);
    if (k.ends_with(tail)) return strip_suffix(k, tail) + ".to_out.0" + std::string(sfx);
  }
  return k;
}

// Module names with underscores that kohya_to_dots over-split.
std::string fixup_module_names(std::string k) {
  static const std::pair<const char*, const char*> fixups[] = {
      {"context.refiner.", "context_refiner."},  {"noise.refiner.", "noise_refiner."},
      {"adaLN.modulation.", "adaLN_modulation."}, {"all.final.layer.", "all_final_layer."},
      {"all.x.embedder.", "all_x_embedder."},     {"cap.embedder.", "cap_embedder."},
      {"t.embedder.", "t_embedder."}};
  for (const auto& [from, to] : fixups) k = replace_all(std::move(k), from, to);
  return k;
}

// Files diffusers sends through _convert_non_diffusers_z_image_lora_to_diffusers.
void convert_non_diffusers(Converter& c) {
  // Not in diffusers (which would produce `transformer.transformer.…` and fail): tolerate a
  // `transformer.` prefix here too. Kohya text-encoder keys are another component's.
  std::vector<std::string> te;
  for (const auto& kv : c.keys)
    if (kv.first.starts_with("lora_te")) te.push_back(kv.first);
  for (const std::string& n : te) c.drop(n);
  c.rename([](const std::string& k) { return k.starts_with("transformer.") ? k.substr(12) : k; });

  for (std::string_view prefix : {"model.diffusion_model.", "diffusion_model."})
    c.rename([prefix](const std::string& k) { return k.starts_with(prefix) ? k.substr(prefix.size()) : k; });
  for (std::string_view prefix : {"lora_unet_", "lycoris_"})
    if (c.any([prefix](const std::string& k) { return k.starts_with(prefix); }))
      c.rename([prefix](const std::string& k) { return kohya_to_dots(k.starts_with(prefix) ? k.substr(prefix.size()) : k); });
  // Original-layout (ComfyUI) module names.
  c.rename([](const std::string& k) {
    if (k.starts_with("final_layer.")) return "all_final_layer.2-1." + k.substr(12);
    if (k.starts_with("x_embedder.")) return "all_x_embedder.2-1." + k.substr(11);
    return k;
  });
  c.rename(normalize_out_key);
  if (c.any([](const std::string& k) { return contains(k, "default."); }))
    c.rename([](const std::string& k) { return replace_all(k, "default.", ""); });
  c.rename([](const std::string& k) { return fixup_module_names(k); });

  c.pair_suffix(".lora_down.weight", ".lora_up.weight", true, false);
  c.pair_suffix(".lora_A.weight", ".lora_B.weight", true, false);
  c.pair_dot_style();
  c.reject_leftovers();
}

// diffusers/PEFT files used as they are: `transformer.<module>.lora_A/B.weight` (+ lora_B.bias).
void convert_peft(Converter& c) {
  std::vector<std::string> other;
  for (const auto& kv : c.keys)
    if (!kv.first.starts_with("transformer.")) other.push_back(kv.first);
  for (const std::string& n : other) c.drop(n);  // the loader keeps only `transformer.` keys
  c.rename([](const std::string& k) {
    std::string s = k.substr(12);  // older diffusers spelling, converted by convert_unet_state_dict_to_peft
    if (s.ends_with(".lora.down.weight")) return strip_suffix(s, ".lora.down.weight") + ".lora_A.weight";
    if (s.ends_with(".lora.up.weight")) return strip_suffix(s, ".lora.up.weight") + ".lora_B.weight";
    return s;
  });
  c.pair_suffix(".lora_A.weight", ".lora_B.weight", false, true);
  c.reject_leftovers();
}

// LyCORIS and other adapter kinds that are not plain LoRA.
void reject_unsupported_kinds(const SafetensorsFile& f) {
  static const std::pair<const char*, const char*> kinds[] = {
      {"dora_scale", "DoRA"}, {"lora_magnitude_vector", "DoRA"}, {"oft_", "OFT/BOFT"},
      {"lora_mid", "LoCon (Tucker)"}};
  for (const TensorInfo& t : f.tensors()) {
    const char* kind = nullptr;
    for (const auto& [needle, k] : kinds)
      if (contains(t.name, needle)) kind = k;
    if (t.name.ends_with(".diff") || t.name.ends_with(".diff_b")) kind = "full-difference (LyCORIS diff)";
    if (kind)
      fail(str_cat("LoRA '", f.path(), "': key '", t.name, "' belongs to a ", kind,
                   " adapter, which is not supported (only plain LoRA A/B or down/up pairs)"));
  }
}

// ---------------------------------------------------------------------------------------
// lora_adapter_metadata (spec §7.3): PEFT's LoraConfig, keys prefixed `transformer.`.

struct AdapterConfig {
  bool present = false;
  double r = 8, alpha = 8;  // PEFT's LoraConfig defaults
  bool rslora = false;
  std::vector<std::pair<std::string, double>> rank_pattern, alpha_pattern;  // in file order
};

AdapterConfig read_adapter_config(const SafetensorsFile& f) {
  AdapterConfig cfg;
  auto it = f.metadata().find("lora_adapter_metadata");
  if (it == f.metadata().end()) return cfg;
  const std::string where = str_cat("LoRA '", f.path(), "': lora_adapter_metadata");
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(it->second);
  } catch (const std::exception& e) {
    fail(str_cat(where, " is not valid JSON: ", e.what()));
  }
  ZI_CHECK(j.is_object(), where, " is not a JSON object");
  auto number = [&](const nlohmann::ordered_json& v, const std::string& name) {
    ZI_CHECK(v.is_number(), where, ": '", name, "' is not a number");
    return v.get<double>();
  };
  auto patterns = [&](const nlohmann::ordered_json& v, const std::string& name) {
    std::vector<std::pair<std::string, double>> out;
    if (v.is_null()) return out;
    ZI_CHECK(v.is_object(), where, ": '", name, "' is not an object");
    for (auto& [k, x] : v.items()) out.emplace_back(k, number(x, name + "." + k));
    return out;
  };
  for (auto& [key, v] : j.items()) {
    if (!key.starts_with("transformer.")) continue;
    const std::string k = key.substr(12);
    cfg.present = true;
    if (k == "r") cfg.r = number(v, key);
    else if (k == "lora_alpha") cfg.alpha = number(v, key);
    else if (k == "use_rslora") cfg.rslora = v.is_boolean() && v.get<bool>();
    else if (k == "rank_pattern") cfg.rank_pattern = patterns(v, key);
    else if (k == "alpha_pattern") cfg.alpha_pattern = patterns(v, key);
    else if (k == "use_dora" && v.is_boolean() && v.get<bool>())
      fail(str_cat(where, ": use_dora is set; DoRA is not supported"));
  }
  return cfg;
}

// PEFT's get_pattern_key: the first pattern P with re.match(r"(.*\.)?(P)$", module).
const double* pattern_value(const std::vector<std::pair<std::string, double>>& patterns, const std::string& module,
                            const std::string& path) {
  for (const auto& [pat, value] : patterns) {
    std::regex re;
    try {
      re = std::regex("(.*\\.)?(" + pat + ")");
    } catch (const std::regex_error&) {
      fail(str_cat("LoRA '", path, "': lora_adapter_metadata pattern '", pat, "' is not a valid regular expression"));
    }
    if (std::regex_match(module, re)) return &value;
  }
  return nullptr;
}

// The adapter's own scaling for one module: lora_alpha / r (or / sqrt(r) with rslora), 1
// without metadata (diffusers then sets lora_alpha = r for every module).
double config_scale(const AdapterConfig& cfg, const Pair& p, int64_t rank, const std::string& path) {
  if (!cfg.present) return 1.0;
  const double* r = pattern_value(cfg.rank_pattern, p.module, path);
  const double* a = pattern_value(cfg.alpha_pattern, p.module, path);
  const double rr = r ? *r : cfg.r, alpha = a ? *a : cfg.alpha;
  if (rr != double(rank))
    fail(str_cat("LoRA '", path, "': key '", p.down.key, "' has rank ", rank, " but lora_adapter_metadata says r = ", rr));
  return cfg.rslora ? alpha / std::sqrt(rr) : alpha / rr;
}

LoraDelta make_delta(const SafetensorsFile& f, const Pair& p, const AdapterConfig& cfg) {
  auto error = [&](const std::string& key, const std::string& what) {
    fail(str_cat("LoRA '", f.path(), "': key '", key, "' ", what));
  };
  for (const Src* s : {&p.down, &p.up})
    if (s->info->shape.size() != 2)
      error(s->key, str_cat("has shape ", shape_str(s->info->shape), "; LoRA A/B tensors must be 2-D"));
  const int64_t rank = p.down.info->shape[0];
  if (rank <= 0) error(p.down.key, "has rank 0");
  if (p.up.info->shape[1] != rank)
    error(p.up.key, str_cat("has shape ", shape_str(p.up.info->shape), " but '", p.down.key, "' has shape ",
                            shape_str(p.down.info->shape), ": A/B ranks differ (", rank, " vs ", p.up.info->shape[1], ")"));
  LoraDelta d;
  d.target = p.module + ".weight";
  d.key = p.down.key;
  d.A = f.load(*p.down.info, DType::F32, Tag::Workspace);
  d.B = f.load(*p.up.info, DType::F32, Tag::Workspace);
  if (p.bias) {
    if (p.bias->info->shape != Shape{p.up.info->shape[0]})
      error(p.bias->key, str_cat("has shape ", shape_str(p.bias->info->shape), ", expected [", p.up.info->shape[0], "]"));
    d.bias = f.load(*p.bias->info, DType::F32, Tag::Workspace);
  }
  d.factor = float(p.fold * config_scale(cfg, p, rank, f.path()));
  return d;
}

}  // namespace

std::string kohya_underscores_to_dots(const std::string& module) {
  std::vector<std::string> parts;
  for (size_t b = 0;;) {
    const size_t e = module.find('_', b);
    parts.push_back(module.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  auto joined = [](const std::string& a, const std::string& b) {
    return (a == "to" && (b == "q" || b == "k" || b == "v" || b == "out")) || (a == "feed" && b == "forward");
  };
  std::string out;
  for (size_t i = 0, n = 0; i < parts.size(); ++n) {
    std::string part = parts[i];
    if (i + 1 < parts.size() && joined(parts[i], parts[i + 1])) {
      part += "_" + parts[i + 1];
      i += 2;
    } else {
      i += 1;
    }
    out += (n ? "." : "") + part;
  }
  return out;
}

// ---------------------------------------------------------------------------------------

LoraSpec parse_lora_arg(const std::string& arg) {
  auto bad = [&](const std::string& why) -> LoraSpec { throw UsageError(str_cat("--lora '", arg, "': ", why)); };
  if (arg.empty()) return bad("empty argument (expected FILE or FILE:SCALE)");
  const size_t colon = arg.rfind(':');
  if (colon == std::string::npos) return {arg, 1.0f};
  const std::string file = arg.substr(0, colon), tail = arg.substr(colon + 1);
  float scale = 0;
  if (parse_number(tail, &scale)) {
    if (file.empty()) return bad("no file before the scale");
    return {file, scale};
  }
  std::error_code ec;
  const bool tail_is_path = contains(tail, "/") || contains(tail, "\\") || tail.ends_with(".safetensors") ||
                            std::filesystem::exists(arg, ec);
  if (tail_is_path) return {arg, 1.0f};
  return bad(str_cat("bad scale '", tail, "' (expected FILE or FILE:SCALE with SCALE a finite number)"));
}

std::string LoraDelta::bias_target() const { return strip_suffix(target, ".weight") + ".bias"; }

LoraFile load_lora(const LoraSpec& spec) {
  const SafetensorsFile f = SafetensorsFile::open(spec.path);
  if (is_lycoris_file(f)) return load_lycoris(f, spec);
  reject_unsupported_kinds(f);
  KeyMap keys;
  for (const TensorInfo& t : f.tensors()) keys.emplace(t.name, Src{t.name, &t});

  // diffusers converts when any key ends in .alpha, starts with lora_unet_ or
  // diffusion_model., or contains default.; otherwise the keys are PEFT names as they are.
  Converter c(f, std::move(keys));
  const bool convert = c.any([](const std::string& k) {
    return k.ends_with(".alpha") || k.starts_with("lora_unet_") || k.starts_with("diffusion_model.") ||
           k.starts_with("model.diffusion_model.") || k.starts_with("lycoris_") || contains(k, "default.");
  });
  if (convert)
    convert_non_diffusers(c);
  else
    convert_peft(c);

  LoraFile out{spec.path, spec.scale, {}, std::move(c.ignored)};
  if (c.pairs.empty())
    fail(str_cat("LoRA '", spec.path, "': no transformer LoRA weights found",
                 out.ignored.empty() ? "" : str_cat(" (ignored keys: ", some(out.ignored), ")")));
  const AdapterConfig cfg = read_adapter_config(f);
  std::map<std::string, std::string> seen;  // target → key
  for (const Pair& p : c.pairs) {
    LoraDelta d = make_delta(f, p, cfg);
    auto [it, fresh] = seen.emplace(d.target, d.key);
    if (!fresh)
      fail(str_cat("LoRA '", spec.path, "': keys '", it->second, "' and '", d.key, "' both target ", d.target));
    out.deltas.push_back(std::move(d));
  }
  split_fused_qkv(out);
  return out;
}

std::vector<LoraFile> load_loras(const std::vector<LoraSpec>& specs) {
  std::vector<LoraFile> files;
  for (const LoraSpec& s : specs) files.push_back(load_lora(s));
  return files;
}

// ---------------------------------------------------------------------------------------

struct LoraSet::State {
  struct Use {
    size_t file, delta;
    bool bias;
  };
  std::vector<LoraFile> files;
  std::unordered_map<std::string, std::vector<Use>> by_target;
  std::vector<std::vector<uint8_t>> applied;  // [file][delta]: bit 0 weight, bit 1 bias
  std::mutex mu;

  void apply(const std::string& name, Tensor& w) { apply_or_check(name, &w, w.shape()); }
  // check only (w == nullptr): the shape checks and the bookkeeping, no arithmetic (the
  // pre-flight check of generate(), which reads no weights).
  void apply_or_check(const std::string& name, Tensor* wt, const Shape& shape) {
    auto it = by_target.find(name);
    if (it == by_target.end()) return;
    for (const Use& u : it->second) {
      const LoraFile& f = files[u.file];
      const LoraDelta& d = f.deltas[u.delta];
      const float s = f.scale * d.factor;
      if (u.bias) {
        if (shape != d.bias.shape())
          fail(str_cat("LoRA '", f.path, "': key '", d.key, "' has a bias delta of shape ", shape_str(d.bias.shape()),
                       " but ", name, " is ", shape_str(shape)));
        if (wt) {
          float* b = wt->f32();
          const float* db = d.bias.f32();
          for (int64_t i = 0; i < wt->numel(); ++i) b[i] += s * db[i];
        }
      } else if (d.kind != AdapterKind::LoRA) {
        // LoHa / LoKr: the module's ΔW shape (its rows of a fused module), then, unless only
        // checking, the dense ΔW added one target at a time.
        const int64_t full_rows = d.kind == AdapterKind::LoHa ? d.w1a.dim(0)
                                  : (d.w1.defined() ? d.w1.dim(0) : d.w1a.dim(0)) *
                                        (d.w2.defined() ? d.w2.dim(0) : d.w2a.dim(0));
        const int64_t in = d.kind == AdapterKind::LoHa ? d.w1b.dim(1)
                           : (d.w1.defined() ? d.w1.dim(1) : d.w1b.dim(1)) *
                                 (d.w2.defined() ? d.w2.dim(1) : d.w2b.dim(1));
        const int64_t rows = d.rows < 0 ? full_rows : d.rows;
        if (shape.size() != 2 || shape[0] != rows || shape[1] != in || d.row_begin + rows > full_rows)
          fail(str_cat("LoRA '", f.path, "': key '", d.key, "' (", adapter_kind_name(d.kind), ") makes a delta of shape ",
                       shape_str({rows, in}), " but ", name, " is ", shape_str(shape)));
        if (wt) {
          const Tensor full = d.dense();
          const float* src = full.f32() + d.row_begin * in;
          float* dst = wt->f32();
          for (int64_t i = 0; i < rows * in; ++i) dst[i] += s * src[i];
        }
      } else {
        const int64_t out = d.B.dim(0), rank = d.A.dim(0), in = d.A.dim(1);
        if (shape.size() != 2 || shape[0] != out || shape[1] != in)
          fail(str_cat("LoRA '", f.path, "': key '", d.key, "' makes a delta of shape ", shape_str({out, in}),
                       " but ", name, " is ", shape_str(shape)));
        // W[out, in] += s · B[out, r] · A[r, in]: B · A = linear(B, Aᵀ), Aᵀ [in, r] (the CPU
        // backend's fixed tiling: the merged weights do not depend on --threads).
        (void)rank;
        if (wt) {
          Tensor delta = ops::linear(d.B, d.A.permute({1, 0}).contiguous(Tag::Workspace));
          ops::scale_(delta, s);
          ops::add_(*wt, delta);
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      applied[u.file][u.delta] |= u.bias ? 2 : 1;
    }
  }
};

LoraSet::LoraSet(std::vector<LoraFile> files) : state_(std::make_shared<State>()) {
  state_->files = std::move(files);
  for (size_t fi = 0; fi < state_->files.size(); ++fi) {
    const LoraFile& f = state_->files[fi];
    state_->applied.emplace_back(f.deltas.size(), 0);
    for (size_t di = 0; di < f.deltas.size(); ++di) {
      state_->by_target[f.deltas[di].target].push_back({fi, di, false});
      if (f.deltas[di].bias.defined()) state_->by_target[f.deltas[di].bias_target()].push_back({fi, di, true});
    }
  }
}

bool LoraSet::empty() const { return !state_ || state_->files.empty(); }

const std::vector<LoraFile>& LoraSet::files() const {
  static const std::vector<LoraFile> none;
  return state_ ? state_->files : none;
}

std::vector<std::string> LoraSet::attach(WeightLoader& loader) const {
  std::vector<std::string> targets;
  if (empty()) return targets;
  std::shared_ptr<State> st = state_;
  for (const auto& kv : st->by_target) targets.push_back(kv.first);
  std::sort(targets.begin(), targets.end());
  loader.add_patch({[st](const std::string& name) { return st->by_target.count(name) > 0; },
                    [st](const std::string& name, Tensor& w) { st->apply(name, w); },
                    [st](const std::string& name, const Shape& shape) { st->apply_or_check(name, nullptr, shape); }});
  return targets;
}

void LoraSet::check_applied() const {
  if (empty()) return;
  std::lock_guard<std::mutex> lock(state_->mu);
  for (size_t fi = 0; fi < state_->files.size(); ++fi) {
    const LoraFile& f = state_->files[fi];
    std::vector<std::string> missed;
    for (size_t di = 0; di < f.deltas.size(); ++di) {
      const LoraDelta& d = f.deltas[di];
      const uint8_t want = d.bias.defined() ? 3 : 1, got = state_->applied[fi][di];
      if ((got & 1) == 0) missed.push_back(str_cat(d.key, "' → '", d.target));
      else if ((want & ~got) != 0) missed.push_back(str_cat(d.key, "' (lora_B.bias) → '", d.bias_target()));
    }
    if (missed.empty()) continue;
    fail(str_cat("LoRA '", f.path, "': ", missed.size(), " of ", f.deltas.size(),
                 " LoRA targets match no transformer weight: ", some(missed)));
  }
}

std::string LoraSet::unmatched_report() const {
  if (empty()) return "";
  std::lock_guard<std::mutex> lock(state_->mu);
  std::string msg;
  size_t total = 0;
  for (size_t fi = 0; fi < state_->files.size(); ++fi) {
    const LoraFile& f = state_->files[fi];
    std::vector<std::string> keys = f.ignored;
    for (size_t di = 0; di < f.deltas.size(); ++di) {
      const LoraDelta& d = f.deltas[di];
      const uint8_t want = d.bias.defined() ? 3 : 1, got = state_->applied[fi][di];
      if ((want & ~got) != 0) keys.push_back(d.key);
    }
    if (keys.empty()) continue;
    total += keys.size();
    msg += str_cat(msg.empty() ? "" : "; ", "'", f.path, "': ", some(keys, 8));
  }
  if (total == 0) return "";
  return str_cat("LoRA: ", total, " adapter tensor", total == 1 ? "" : "s", " match no transformer weight and ",
                 total == 1 ? "is" : "are", " not applied: ", msg);
}

// ---------------------------------------------------------------------------------------

namespace {

std::string override_name(const std::string& key, const std::string& where) {
  std::string k = key;
  for (std::string_view prefix : {"model.diffusion_model.", "diffusion_model."})
    if (k.starts_with(prefix)) {
      k = k.substr(prefix.size());
      break;
    }
  if (contains(k, ".attention.qkv."))
    fail(str_cat("transformer override '", where, "': tensor '", key,
                 "' is a fused attention qkv, which is not supported (split it into to_q/to_k/to_v)"));
  if (k.starts_with("final_layer.")) k = "all_final_layer.2-1." + k.substr(12);
  if (k.starts_with("x_embedder.")) k = "all_x_embedder.2-1." + k.substr(11);
  static const std::pair<const char*, const char*> renames[] = {
      {".attention.out.weight", ".attention.to_out.0.weight"},
      {".attention.out.bias", ".attention.to_out.0.bias"},
      {".attention.q_norm.weight", ".attention.norm_q.weight"},
      {".attention.k_norm.weight", ".attention.norm_k.weight"}};
  for (const auto& [from, to] : renames)
    if (k.ends_with(from)) k = strip_suffix(k, from) + to;
  return k;
}

}  // namespace

std::string override_tensor_name(const std::string& key) { return override_name(key, "?"); }

void attach_transformer_override(WeightLoader& loader, const TensorStore& store) {
  std::map<std::string, std::string> seen;  // diffusers name → the file's name
  for (const std::string& n : store.names()) {
    auto [it, fresh] = seen.emplace(override_name(n, store.where()), n);
    if (!fresh)
      fail(str_cat("transformer override '", store.where(), "': tensors '", it->second, "' and '", n,
                   "' both map to ", it->first));
  }
  loader.add_override(&store, [where = store.where()](const std::string& n) { return override_name(n, where); });
}

}  // namespace zi
