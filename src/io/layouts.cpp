#include "io/layouts.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <set>

#include "core/check.h"

namespace zi {

namespace {

bool has(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

std::string replace_suffix(std::string_view s, std::string_view from, std::string_view to) {
  return std::string(s.substr(0, s.size() - from.size())) + std::string(to);
}

// Reads a decimal index at `pos` ("12." → 12, pos after the digits); -1 when none.
int read_index(std::string_view s, size_t& pos) {
  size_t b = pos;
  while (pos < s.size() && std::isdigit(static_cast<unsigned char>(s[pos]))) ++pos;
  if (pos == b || pos - b > 6) return -1;
  return std::stoi(std::string(s.substr(b, pos - b)));
}

// ---- per-component key recognisers (no prefix) ------------------------------------------

bool is_transformer_key(std::string_view k) {
  for (std::string_view p : {"layers.", "noise_refiner.", "context_refiner.", "x_embedder.", "all_x_embedder.",
                             "final_layer.", "all_final_layer.", "t_embedder.", "cap_embedder.", "norm_final."})
    if (k.starts_with(p))  // Qwen3's layers.N are the text encoder's
      return p != "layers." || (!has(k, ".self_attn.") && !has(k, ".mlp.") && !has(k, "layernorm"));
  return k == "x_pad_token" || k == "cap_pad_token";
}

bool is_text_encoder_key(std::string_view k) {
  if (k.starts_with("model.")) k.remove_prefix(6);
  if (k.starts_with("embed_tokens.") || k.starts_with("norm.") || k.starts_with("lm_head.")) return true;
  return k.starts_with("layers.") && (has(k, ".self_attn.") || has(k, ".mlp.") || has(k, "layernorm"));
}

bool is_vae_key(std::string_view k) {
  for (std::string_view p : {"encoder.", "decoder.", "quant_conv.", "post_quant_conv."})
    if (k.starts_with(p)) return true;
  return false;
}

bool is_key_of(Component c, std::string_view k) {
  switch (c) {
    case Component::Transformer: return is_transformer_key(k);
    case Component::TextEncoder: return is_text_encoder_key(k);
    case Component::Vae: return is_vae_key(k);
  }
  return false;
}

// Prefixes, longest first within a component; "" last (bare keys).
const std::vector<std::string>& prefixes_of(Component c) {
  static const std::vector<std::string> dit = {"model.diffusion_model.", "diffusion_model.", "transformer.",
                                               "model.", ""};
  static const std::vector<std::string> te = {"text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_4b.",
                                              "text_encoder.", "cond_stage_model.transformer.",
                                              "conditioner.embedders.0.transformer.", ""};
  static const std::vector<std::string> vae = {"first_stage_model.", "vae.", ""};
  return c == Component::Transformer ? dit : c == Component::TextEncoder ? te : vae;
}

// ---- transformer ------------------------------------------------------------------------

std::vector<KeyTarget> map_transformer_key(std::string_view k) {
  if (k == "norm_final.weight") return {};  // a stray top-level norm, discarded as diffusers does
  std::string t(k);
  if (t.starts_with("final_layer.")) t = "all_final_layer.2-1." + t.substr(12);
  else if (t.starts_with("x_embedder.")) t = "all_x_embedder.2-1." + t.substr(11);
  static const std::pair<std::string_view, std::string_view> renames[] = {
      {".attention.out.weight", ".attention.to_out.0.weight"},
      {".attention.out.bias", ".attention.to_out.0.bias"},
      {".attention.q_norm.weight", ".attention.norm_q.weight"},
      {".attention.k_norm.weight", ".attention.norm_k.weight"}};
  for (const auto& [from, to] : renames)
    if (t.ends_with(from)) return {{replace_suffix(t, from, to)}};
  for (std::string_view fused : {".attention.qkv.weight", ".attention.qkv.bias"}) {
    if (!t.ends_with(fused)) continue;
    const std::string base = replace_suffix(t, fused, ".attention.to_");
    const std::string kind = fused.ends_with("weight") ? ".weight" : ".bias";
    return {{base + "q" + kind, 0, 3}, {base + "k" + kind, 1, 3}, {base + "v" + kind, 2, 3}};
  }
  return {{t}};
}

bool transformer_key_is_original(std::string_view k) {
  return k.starts_with("final_layer.") || k.starts_with("x_embedder.") || has(k, ".attention.qkv.") ||
         has(k, ".attention.out.") || has(k, ".attention.q_norm.") || has(k, ".attention.k_norm.");
}

// ---- VAE ---------------------------------------------------------------------------------

std::string resnet_part(std::string_view rest) {
  std::string r(rest);
  if (r.starts_with("nin_shortcut.")) r = "conv_shortcut." + r.substr(13);
  return r;
}

// Flux AE / LDM name → diffusers name; "" when `k` is not in the original layout.
std::string vae_original_to_diffusers(std::string_view k, int up_blocks, bool* squeeze) {
  std::string_view side;
  if (k.starts_with("encoder.")) side = "encoder.";
  else if (k.starts_with("decoder.")) side = "decoder.";
  else return "";
  std::string_view r = k.substr(side.size());
  const std::string s(side);
  if (r.starts_with("norm_out.")) return s + "conv_norm_out." + std::string(r.substr(9));
  if (r.starts_with("mid.block_")) {
    size_t pos = 10;
    const int i = read_index(r, pos);
    if ((i != 1 && i != 2) || pos >= r.size() || r[pos] != '.') return "";
    return str_cat(s, "mid_block.resnets.", i - 1, ".", resnet_part(r.substr(pos + 1)));
  }
  if (r.starts_with("mid.attn_1.")) {
    std::string_view a = r.substr(11);
    static const std::pair<std::string_view, std::string_view> names[] = {
        {"norm.", "group_norm."}, {"q.", "to_q."}, {"k.", "to_k."}, {"v.", "to_v."}, {"proj_out.", "to_out.0."}};
    for (const auto& [from, to] : names)
      if (a.starts_with(from)) {
        *squeeze = from != "norm." && a.ends_with("weight");
        return s + "mid_block.attentions.0." + std::string(to) + std::string(a.substr(from.size()));
      }
    return "";
  }
  const bool enc = side == "encoder.";
  std::string_view blocks = enc ? "down." : "up.";
  if (!r.starts_with(blocks)) return "";
  size_t pos = blocks.size();
  const int b = read_index(r, pos);
  if (b < 0 || pos >= r.size() || r[pos] != '.') return "";
  std::string_view rest = r.substr(pos + 1);
  const int i = enc ? b : up_blocks - 1 - b;
  if (i < 0) return "";
  const std::string blk = str_cat(s, enc ? "down_blocks." : "up_blocks.", i, ".");
  if (rest.starts_with("block.")) {
    size_t p2 = 6;
    const int j = read_index(rest, p2);
    if (j < 0 || p2 >= rest.size() || rest[p2] != '.') return "";
    return str_cat(blk, "resnets.", j, ".", resnet_part(rest.substr(p2 + 1)));
  }
  std::string_view sampler = enc ? "downsample.conv." : "upsample.conv.";
  if (rest.starts_with(sampler))
    return str_cat(blk, enc ? "downsamplers.0.conv." : "upsamplers.0.conv.", rest.substr(sampler.size()));
  return "";
}

bool vae_key_is_original(std::string_view k) {
  return has(k, "coder.up.") || has(k, "coder.down.") || has(k, "coder.mid.") || has(k, "coder.norm_out.");
}

// Decoder up blocks of an original-layout VAE: one more than the highest `decoder.up.N`.
int count_vae_up_blocks(const std::vector<std::string>& keys) {
  int n = 0;
  for (const std::string& k : keys) {
    if (!k.starts_with("decoder.up.")) continue;
    size_t pos = 11;
    n = std::max(n, read_index(k, pos) + 1);
  }
  return n > 0 ? n : 4;
}

}  // namespace

const char* component_name(Component c) {
  switch (c) {
    case Component::Transformer: return "transformer";
    case Component::TextEncoder: return "text_encoder";
    case Component::Vae: return "vae";
  }
  return "?";
}

std::string layout_name(Component c, KeyLayout l) {
  if (c == Component::TextEncoder) return "transformers Qwen3";  // one naming, with or without `model.`
  if (l == KeyLayout::Diffusers) return "diffusers";
  switch (c) {
    case Component::Transformer: return "original (ComfyUI)";
    case Component::Vae: return "original (Flux AE)";
    case Component::TextEncoder: return "transformers";
  }
  return "?";
}

const char* all_in_one_prefix(Component c) {
  switch (c) {
    case Component::Transformer: return "model.diffusion_model.";
    case Component::TextEncoder: return "text_encoders.qwen3_4b.transformer.";
    case Component::Vae: return "first_stage_model.";
  }
  return "";
}

std::vector<KeyTarget> map_component_key(Component c, std::string_view key, int vae_up_blocks) {
  switch (c) {
    case Component::Transformer: return map_transformer_key(key);
    case Component::TextEncoder: return {{std::string(key)}};
    case Component::Vae: {
      bool squeeze = false;
      std::string t = vae_original_to_diffusers(key, vae_up_blocks, &squeeze);
      if (t.empty()) return {{std::string(key)}};
      KeyTarget kt{t};
      kt.squeeze_1x1 = squeeze;
      return {kt};
    }
  }
  return {};
}

std::string original_key(Component c, const std::string& n, int vae_up_blocks, int* part, bool* unsqueeze) {
  *part = -1;
  *unsqueeze = false;
  if (c == Component::TextEncoder) return n;
  if (c == Component::Transformer) {
    std::string t = n;
    if (t.starts_with("all_final_layer.2-1.")) return "final_layer." + t.substr(20);
    if (t.starts_with("all_x_embedder.2-1.")) return "x_embedder." + t.substr(19);
    static const std::pair<std::string_view, std::string_view> renames[] = {
        {".attention.to_out.0.weight", ".attention.out.weight"},
        {".attention.to_out.0.bias", ".attention.out.bias"},
        {".attention.norm_q.weight", ".attention.q_norm.weight"},
        {".attention.norm_k.weight", ".attention.k_norm.weight"}};
    for (const auto& [from, to] : renames)
      if (t.ends_with(from)) return replace_suffix(t, from, to);
    for (int i = 0; i < 3; ++i)
      for (std::string_view kind : {"weight", "bias"}) {
        const std::string sfx = str_cat(".attention.to_", "qkv"[i], ".", kind);
        if (t.ends_with(sfx)) {
          *part = i;
          return replace_suffix(t, sfx, str_cat(".attention.qkv.", kind));
        }
      }
    return t;
  }
  // VAE: the inverse of vae_original_to_diffusers.
  std::string_view side = n.starts_with("encoder.") ? "encoder." : n.starts_with("decoder.") ? "decoder." : "";
  if (side.empty()) return n;
  std::string_view r = std::string_view(n).substr(side.size());
  const std::string s(side);
  auto resnet = [](std::string_view rest) {
    std::string x(rest);
    if (x.starts_with("conv_shortcut.")) x = "nin_shortcut." + x.substr(14);
    return x;
  };
  if (r.starts_with("conv_norm_out.")) return s + "norm_out." + std::string(r.substr(14));
  if (r.starts_with("mid_block.resnets.")) {
    size_t pos = 18;
    const int i = read_index(r, pos);
    if (i < 0 || pos >= r.size()) return n;
    return str_cat(s, "mid.block_", i + 1, ".", resnet(r.substr(pos + 1)));
  }
  if (r.starts_with("mid_block.attentions.0.")) {
    std::string_view a = r.substr(23);
    static const std::pair<std::string_view, std::string_view> names[] = {
        {"group_norm.", "norm."}, {"to_q.", "q."}, {"to_k.", "k."}, {"to_v.", "v."}, {"to_out.0.", "proj_out."}};
    for (const auto& [from, to] : names)
      if (a.starts_with(from)) {
        *unsqueeze = from != "group_norm." && a.ends_with("weight");
        return s + "mid.attn_1." + std::string(to) + std::string(a.substr(from.size()));
      }
    return n;
  }
  const bool enc = side == "encoder.";
  std::string_view blocks = enc ? "down_blocks." : "up_blocks.";
  if (!r.starts_with(blocks)) return n;
  size_t pos = blocks.size();
  const int i = read_index(r, pos);
  if (i < 0 || pos >= r.size()) return n;
  std::string_view rest = r.substr(pos + 1);
  const int b = enc ? i : vae_up_blocks - 1 - i;
  const std::string blk = str_cat(s, enc ? "down." : "up.", b, ".");
  if (rest.starts_with("resnets.")) {
    size_t p2 = 8;
    const int j = read_index(rest, p2);
    if (j < 0 || p2 >= rest.size()) return n;
    return str_cat(blk, "block.", j, ".", resnet(rest.substr(p2 + 1)));
  }
  for (std::string_view sampler : {"downsamplers.0.conv.", "upsamplers.0.conv."})
    if (rest.starts_with(sampler))
      return str_cat(blk, enc ? "downsample.conv." : "upsample.conv.", rest.substr(sampler.size()));
  return n;
}

const ComponentMapping* FileLayout::find(Component c) const {
  for (const auto& m : components)
    if (m.component == c) return &m;
  return nullptr;
}

std::string FileLayout::describe(Component c) const {
  const ComponentMapping* m = find(c);
  if (!m) return "";
  std::string s = str_cat(component_name(c), " (", layout_name(c, m->layout));
  if (!m->prefix.empty()) s += str_cat(", prefix '", m->prefix, "'");
  return s + ")";
}

FileLayout analyze_layout(const std::vector<SourceTensor>& tensors, const std::string& path) {
  FileLayout out;
  // Claim each tensor for the first component whose prefix + key form matches. A component's
  // prefix is fixed per file: the most common matching prefix wins.
  std::map<std::pair<Component, std::string>, size_t> votes;
  for (const SourceTensor& t : tensors)
    for (Component c : kAllComponents)
      for (const std::string& p : prefixes_of(c))
        if (t.key.starts_with(p) && is_key_of(c, std::string_view(t.key).substr(p.size()))) {
          ++votes[{c, p}];
          break;
        }
  std::vector<int> owner(tensors.size(), -1);
  for (Component c : kAllComponents) {
    // The prefixes of this component, most votes first (ties: longer prefix first).
    std::vector<std::pair<size_t, std::string>> ps;
    for (const auto& [cp, n] : votes)
      if (cp.first == c) ps.emplace_back(n, cp.second);
    if (ps.empty()) continue;
    std::sort(ps.begin(), ps.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second.size() > b.second.size();
    });
    const std::string prefix = ps[0].second;
    ComponentMapping m;
    m.component = c;
    m.prefix = prefix;
    std::vector<std::string> keys;
    std::vector<size_t> idx;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (owner[i] >= 0 || !tensors[i].key.starts_with(prefix)) continue;
      std::string_view k = std::string_view(tensors[i].key).substr(prefix.size());
      if (!is_key_of(c, k)) continue;
      // A bare "model." key belongs to the text encoder's own "model." prefix, not a DiT prefix.
      if (c == Component::Transformer && prefix.empty() && is_text_encoder_key(k)) continue;
      owner[i] = int(c);
      keys.emplace_back(k);
      idx.push_back(i);
    }
    if (idx.empty()) continue;
    // A diffusers text encoder component with only "model." keys must not be claimed by the
    // transformer's "model." prefix: is_transformer_key refuses self_attn/mlp keys already.
    bool original = false;
    for (const std::string& k : keys)
      original = original || (c == Component::Transformer ? transformer_key_is_original(k)
                                                          : c == Component::Vae && vae_key_is_original(k));
    m.layout = original ? KeyLayout::Original : KeyLayout::Diffusers;
    const int up_blocks = c == Component::Vae ? count_vae_up_blocks(keys) : 4;
    std::map<std::string, size_t> seen;  // target → source index
    for (size_t n = 0; n < keys.size(); ++n) {
      const SourceTensor& src = tensors[idx[n]];
      std::vector<KeyTarget> targets = map_component_key(c, keys[n], up_blocks);
      if (targets.empty()) {
        m.dropped.push_back(idx[n]);
        continue;
      }
      for (const KeyTarget& kt : targets) {
        MappedTensor mt;
        mt.target = kt.target;
        mt.source = idx[n];
        mt.shape = src.shape;
        if (kt.parts > 1) {
          ZI_CHECK(!src.shape.empty() && src.shape[0] % kt.parts == 0, path, ": tensor '", src.key, "' of shape ",
                   shape_str(src.shape), " is a fused qkv whose first dimension is not a multiple of 3");
          mt.shape[0] = src.shape[0] / kt.parts;
          mt.row_begin = mt.shape[0] * kt.part;
        }
        if (kt.squeeze_1x1 && src.shape.size() == 4 && src.shape[2] == 1 && src.shape[3] == 1)
          mt.shape = {src.shape[0], src.shape[1]};
        auto [it, fresh] = seen.emplace(mt.target, idx[n]);
        ZI_CHECK(fresh, path, ": tensors '", tensors[it->second].key, "' and '", src.key, "' both map to ",
                 component_name(c), " weight '", mt.target, "'");
        m.tensors.push_back(std::move(mt));
      }
    }
    out.components.push_back(std::move(m));
  }
  for (size_t i = 0; i < tensors.size(); ++i)
    if (owner[i] < 0) out.unclaimed.push_back(i);
  return out;
}

// ---------------------------------------------------------------------------------------

std::shared_ptr<LayoutFile> LayoutFile::open(const std::string& path) {
  auto lf = std::make_shared<LayoutFile>();
  lf->file = std::make_shared<SafetensorsFile>(SafetensorsFile::open(path));
  std::vector<SourceTensor> src;
  for (const TensorInfo& t : lf->file->tensors()) src.push_back({t.name, t.shape});
  lf->layout = analyze_layout(src, path);
  return lf;
}

TensorStore LayoutFile::store(Component c) const {
  const ComponentMapping* m = layout.find(c);
  ZI_CHECK(m, file->path(), ": holds no ", component_name(c), " tensors");
  const auto& infos = file->tensors();
  std::vector<TensorInfo> out;
  out.reserve(m->tensors.size());
  for (const MappedTensor& mt : m->tensors) {
    const TensorInfo& s = infos[mt.source];
    TensorInfo t;
    t.name = mt.target;
    t.dtype = s.dtype;
    t.format = s.format;
    t.ggml_type = s.ggml_type;
    t.shape = mt.shape;
    const int64_t rows = s.shape.empty() ? 1 : s.shape[0];
    const uint64_t row_bytes = rows > 0 ? s.nbytes() / uint64_t(rows) : 0;
    t.begin = s.begin + uint64_t(mt.row_begin) * row_bytes;
    t.end = mt.whole(s.shape) ? s.end : t.begin + (mt.shape.empty() ? 1 : uint64_t(mt.shape[0])) * row_bytes;
    out.push_back(std::move(t));
  }
  return TensorStore::from_infos(file->path(), file, std::move(out));
}

// ---------------------------------------------------------------------------------------
// Configs from shapes.

namespace {

const TensorInfo& need(const TensorStore& s, const std::string& name, size_t ndim) {
  TensorStore::Entry e = s.find(name);
  ZI_CHECK(e.file, s.where(), ": tensor '", name, "' is missing (needed to infer the configuration)");
  ZI_CHECK(e.info->shape.size() == ndim, s.where(), ": tensor '", name, "' has shape ", shape_str(e.info->shape),
           ", expected ", ndim, " dimensions");
  return *e.info;
}

int count_blocks(const TensorStore& s, const std::string& prefix) {
  int n = 0;
  for (const std::string& k : s.names()) {
    if (!k.starts_with(prefix)) continue;
    size_t pos = prefix.size();
    n = std::max(n, read_index(k, pos) + 1);
  }
  return n;
}

int as_int(int64_t v, const TensorStore& s, const char* what) {
  ZI_CHECK(v > 0 && v < (int64_t(1) << 24), s.where(), ": inferred ", what, " of ", v, " is not a valid size");
  return int(v);
}

}  // namespace

DitConfig infer_dit_config(const TensorStore& s) {
  DitConfig c;
  const TensorInfo& xe = need(s, "all_x_embedder.2-1.weight", 2);
  c.dim = as_int(xe.shape[0], s, "dim");
  ZI_CHECK(xe.shape[1] % 4 == 0, s.where(), ": all_x_embedder.2-1.weight has ", xe.shape[1],
           " inputs, not 2·2·in_channels");
  c.in_channels = as_int(xe.shape[1] / 4, s, "in_channels");
  c.n_layers = as_int(count_blocks(s, "layers."), s, "n_layers");
  c.n_refiner_layers = count_blocks(s, "noise_refiner.");
  const TensorInfo& nq = need(s, "layers.0.attention.norm_q.weight", 1);
  const int hd = as_int(nq.shape[0], s, "head dimension");
  ZI_CHECK(c.dim % hd == 0 && hd % 8 == 0, s.where(), ": head dimension ", hd, " (from norm_q) does not divide dim ",
           c.dim, " or is not a multiple of 8");
  c.n_heads = c.n_kv_heads = c.dim / hd;
  // Z-Image splits the head dimension 1/4, 3/8, 3/8 over the (frame, height, width) axes.
  c.axes_dims = {hd / 4, hd * 3 / 8, hd * 3 / 8};
  c.cap_feat_dim = as_int(need(s, "cap_embedder.1.weight", 2).shape[1], s, "cap_feat_dim");
  c.validate(s.where());
  return c;
}

Qwen3Config infer_qwen3_config(const TensorStore& s) {
  Qwen3Config c;
  const std::string p = s.contains("model.embed_tokens.weight") ? "model." : "";
  const TensorInfo& emb = need(s, p + "embed_tokens.weight", 2);
  c.vocab_size = as_int(emb.shape[0], s, "vocab_size");
  c.hidden_size = as_int(emb.shape[1], s, "hidden_size");
  c.num_hidden_layers = as_int(count_blocks(s, p + "layers."), s, "num_hidden_layers");
  const std::string l0 = p + "layers.0.";
  c.head_dim = as_int(need(s, l0 + "self_attn.q_norm.weight", 1).shape[0], s, "head_dim");
  const int64_t q = need(s, l0 + "self_attn.q_proj.weight", 2).shape[0];
  const int64_t kv = need(s, l0 + "self_attn.k_proj.weight", 2).shape[0];
  ZI_CHECK(q % c.head_dim == 0 && kv % c.head_dim == 0, s.where(), ": q_proj/k_proj rows (", q, ", ", kv,
           ") are not multiples of head_dim ", c.head_dim);
  c.num_attention_heads = as_int(q / c.head_dim, s, "num_attention_heads");
  c.num_key_value_heads = as_int(kv / c.head_dim, s, "num_key_value_heads");
  c.intermediate_size = as_int(need(s, l0 + "mlp.gate_proj.weight", 2).shape[0], s, "intermediate_size");
  c.validate(s.where());
  return c;
}

VaeConfig infer_vae_config(const TensorStore& s) {
  VaeConfig c;
  const TensorInfo& ci = need(s, "decoder.conv_in.weight", 4);
  c.latent_channels = as_int(ci.shape[1], s, "latent_channels");
  c.out_channels = as_int(need(s, "decoder.conv_out.weight", 4).shape[0], s, "out_channels");
  const int n = count_blocks(s, "decoder.up_blocks.");
  ZI_CHECK(n >= 1, s.where(), ": no decoder.up_blocks tensors (needed to infer the configuration)");
  c.block_out_channels.assign(size_t(n), 0);
  // Decoder up block i outputs block_out_channels[n − 1 − i].
  for (int i = 0; i < n; ++i)
    c.block_out_channels[size_t(n - 1 - i)] =
        as_int(need(s, str_cat("decoder.up_blocks.", i, ".resnets.0.conv2.weight"), 4).shape[0], s,
               "block_out_channels entry");
  c.layers_per_block = as_int(count_blocks(s, "decoder.up_blocks.0.resnets.") - 1, s, "layers_per_block");
  c.use_quant_conv = s.contains("quant_conv.weight");
  c.use_post_quant_conv = s.contains("post_quant_conv.weight");
  c.mid_block_add_attention = s.contains("decoder.mid_block.attentions.0.to_q.weight");
  c.validate(s.where());
  return c;
}

}  // namespace zi
