#include "io/convert.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "io/layouts.h"
#include "io/model_sources.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace zi {

namespace {

// One component to write: its tensors under diffusers names, and its config.
struct Part {
  Component component;
  TensorStore store;
  std::string config_json;  // the folder's config.json text, or one made from inferred values
  std::string where;
};

json dit_json(const DitConfig& c) {
  return json{{"_class_name", "ZImageTransformer2DModel"},
              {"all_f_patch_size", {c.f_patch_size}},
              {"all_patch_size", {c.patch_size}},
              {"axes_dims", c.axes_dims},
              {"axes_lens", c.axes_lens},
              {"cap_feat_dim", c.cap_feat_dim},
              {"dim", c.dim},
              {"in_channels", c.in_channels},
              {"n_heads", c.n_heads},
              {"n_kv_heads", c.n_kv_heads},
              {"n_layers", c.n_layers},
              {"n_refiner_layers", c.n_refiner_layers},
              {"norm_eps", c.norm_eps},
              {"qk_norm", c.qk_norm},
              {"rope_theta", c.rope_theta},
              {"t_scale", c.t_scale}};
}

json qwen3_json(const Qwen3Config& c) {
  return json{{"architectures", {"Qwen3ForCausalLM"}},
              {"attention_bias", c.attention_bias},
              {"head_dim", c.head_dim},
              {"hidden_act", c.hidden_act},
              {"hidden_size", c.hidden_size},
              {"intermediate_size", c.intermediate_size},
              {"model_type", "qwen3"},
              {"num_attention_heads", c.num_attention_heads},
              {"num_hidden_layers", c.num_hidden_layers},
              {"num_key_value_heads", c.num_key_value_heads},
              {"rms_norm_eps", c.rms_norm_eps},
              {"rope_theta", c.rope_theta},
              {"vocab_size", c.vocab_size}};
}

json vae_json(const VaeConfig& c) {
  const size_t n = c.block_out_channels.size();
  return json{{"_class_name", "AutoencoderKL"},
              {"act_fn", c.act_fn},
              {"block_out_channels", c.block_out_channels},
              {"down_block_types", std::vector<std::string>(n, "DownEncoderBlock2D")},
              {"up_block_types", std::vector<std::string>(n, "UpDecoderBlock2D")},
              {"in_channels", c.in_channels},
              {"latent_channels", c.latent_channels},
              {"layers_per_block", c.layers_per_block},
              {"mid_block_add_attention", c.mid_block_add_attention},
              {"norm_num_groups", c.norm_num_groups},
              {"out_channels", c.out_channels},
              {"scaling_factor", c.scaling_factor},
              {"shift_factor", c.shift_factor},
              {"use_quant_conv", c.use_quant_conv},
              {"use_post_quant_conv", c.use_post_quant_conv}};
}

// The components of SRC: all three of a folder, or those a file holds.
std::vector<Part> read_parts(const std::string& src, std::vector<std::string>* notices, ModelFolder* folder) {
  std::vector<Part> parts;
  std::error_code ec;
  if (fs::is_directory(src, ec)) {
    *folder = open_model_folder(src);
    const std::string* dirs[3] = {&folder->transformer_dir, &folder->text_encoder_dir, &folder->vae_dir};
    for (Component c : kAllComponents) {
      const std::string& d = *dirs[size_t(c)];
      parts.push_back({c, TensorStore::open_dir(d), read_text_file((fs::path(d) / "config.json").string()), d});
    }
    return parts;
  }
  ZI_CHECK(fs::is_regular_file(src, ec), "convert: '", src, "' is neither a model folder nor a file");
  auto lf = LayoutFile::open(src);
  ZI_CHECK(!lf->layout.components.empty(), src, ": no tensor of a known Z-Image layout");
  if (!lf->layout.unclaimed.empty())
    notices->push_back(str_cat(src, ": dropping ", lf->layout.unclaimed.size(), " tensors of no Z-Image component (",
                               lf->file->tensors()[lf->layout.unclaimed[0]].name, ", ...)"));
  for (const ComponentMapping& m : lf->layout.components) {
    TensorStore st = lf->store(m.component);
    std::string cfg;
    if (m.component == Component::Transformer) cfg = dit_json(infer_dit_config(st)).dump(2);
    if (m.component == Component::TextEncoder) cfg = qwen3_json(infer_qwen3_config(st)).dump(2);
    if (m.component == Component::Vae) cfg = vae_json(infer_vae_config(st)).dump(2);
    parts.push_back({m.component, std::move(st), cfg + "\n", lf->layout.describe(m.component)});
  }
  return parts;
}

bool parse_out_dtype(const std::string& s, StDType* out) {
  if (s == "bf16") *out = StDType::BF16;
  else if (s == "f16") *out = StDType::F16;
  else if (s == "f32") *out = StDType::F32;
  else return false;
  return true;
}

// An output tensor: pieces of source tensors concatenated along dim 0.
struct OutTensor {
  std::string name;
  Shape shape;
  StDType dtype;
  std::vector<TensorStore::Entry> pieces;
};

struct Writer {
  const ConvertOptions& opt;
  ConvertResult& res;

  StDType out_dtype(const TensorStore::Entry& e) const {
    StDType d;
    if (opt.dtype != "keep" && parse_out_dtype(opt.dtype, &d)) return d;
    return e.info->dtype;
  }

  // Writes `tensors` to `path` streaming, one output tensor in memory at a time.
  void write(const std::string& path, const std::vector<OutTensor>& tensors) {
    std::vector<SafetensorsWriter::Entry> entries;
    for (const OutTensor& t : tensors) entries.push_back({t.name, t.dtype, t.shape});
    SafetensorsWriter w(path, entries, {{"format", "pt"}});
    for (const OutTensor& t : tensors) {
      DType dt;
      const uint64_t nbytes = SafetensorsWriter::Entry{t.name, t.dtype, t.shape}.nbytes();
      const bool same = std::all_of(t.pieces.begin(), t.pieces.end(),
                                    [&](const TensorStore::Entry& e) { return e.info->dtype == t.dtype; });
      if (same) {  // bytes as they are: straight from the mapping
        for (const TensorStore::Entry& e : t.pieces) {
          w.write(e.file->data(*e.info), size_t(e.info->nbytes()));
          e.file->release(*e.info);
        }
      } else {
        ZI_CHECK(st_to_dtype(t.dtype, &dt), "convert: cannot write dtype ", st_dtype_name(t.dtype));
        for (const TensorStore::Entry& e : t.pieces) {
          DType sd;
          ZI_CHECK(st_to_dtype(e.info->dtype, &sd) && (sd == DType::F32 || sd == DType::BF16 || sd == DType::F16),
                   e.file->path(), ": tensor '", e.info->name, "' has dtype ", st_dtype_name(e.info->dtype),
                   ", which convert cannot change to ", opt.dtype);
          Tensor piece = e.file->load(*e.info, dt, Tag::Workspace);
          res.largest_buffer = std::max<uint64_t>(res.largest_buffer, piece.nbytes());
          w.write(piece.raw(), piece.nbytes());
          e.file->release(*e.info);
        }
      }
      res.bytes += nbytes;
      ++res.tensors;
    }
    w.finish();
  }
};

// The diffusers folder's names. The text encoder is written as transformers' Qwen3Model
// (what model_index.json names): without the `model.` prefix, and without the LM head.
std::vector<OutTensor> diffusers_tensors(const Part& p, const Writer& w, std::vector<std::string>* dropped) {
  std::vector<OutTensor> out;
  for (const std::string& n : p.store.names()) {
    TensorStore::Entry e = p.store.find(n);
    std::string name = n;
    if (p.component == Component::TextEncoder) {
      if (name.starts_with("lm_head.")) {
        dropped->push_back(name);
        continue;
      }
      if (name.starts_with("model.")) name = name.substr(6);
    }
    out.push_back({name, e.info->shape, w.out_dtype(e), {e}});
  }
  return out;
}

// The original layout: fused qkv (q, k, v rows in order), Flux AE names, 1×1 conv attention.
std::vector<OutTensor> original_tensors(const Part& p, const Writer& w, const std::string& prefix) {
  int up_blocks = 0;
  for (const std::string& n : p.store.names())
    if (n.starts_with("decoder.up_blocks.")) up_blocks = std::max(up_blocks, std::stoi(n.substr(18)) + 1);
  std::vector<OutTensor> out;
  std::map<std::string, size_t> fused;  // name → index in out
  std::map<std::string, std::array<TensorStore::Entry, 3>> qkv;
  for (const std::string& n : p.store.names()) {
    TensorStore::Entry e = p.store.find(n);
    int part = -1;
    bool unsqueeze = false;
    std::string k = original_key(p.component, n, up_blocks, &part, &unsqueeze);
    if (p.component == Component::TextEncoder && !k.starts_with("model.") && !k.starts_with("lm_head."))
      k = "model." + k;  // transformers / ComfyUI spelling
    k = prefix + k;
    if (part >= 0) {
      auto& slot = qkv[k];
      slot[size_t(part)] = e;
      if (!fused.count(k)) {
        fused[k] = out.size();
        out.push_back({k, e.info->shape, w.out_dtype(e), {}});
      }
      continue;
    }
    Shape shape = e.info->shape;
    if (unsqueeze) shape = {shape[0], shape[1], 1, 1};
    out.push_back({k, shape, w.out_dtype(e), {e}});
  }
  for (auto& [k, parts3] : qkv) {
    OutTensor& t = out[fused[k]];
    for (int i = 0; i < 3; ++i) {
      ZI_CHECK(parts3[size_t(i)].file, p.where, ": '", k, "' lacks its ", "qkv"[i], " part (to_", "qkv"[i], ")");
      ZI_CHECK(parts3[size_t(i)].info->shape == parts3[0].info->shape, p.where, ": to_q/to_k/to_v of '", k,
               "' differ in shape");
      t.pieces.push_back(parts3[size_t(i)]);
    }
    t.shape[0] *= 3;
  }
  std::sort(out.begin(), out.end(), [](const OutTensor& a, const OutTensor& b) { return a.name < b.name; });
  return out;
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream os(p, std::ios::binary);
  os << text;
  ZI_CHECK(os.good(), "cannot write '", p.string(), "'");
}

void copy_dir(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from))
    if (e.is_regular_file()) fs::copy_file(e.path(), to / e.path().filename());
}

}  // namespace

void check_convert_component(const std::string& c) {
  if (!c.empty() && c != "transformer" && c != "text_encoder" && c != "vae")
    throw UsageError(str_cat("--component '", c, "' is not one of transformer, text_encoder, vae"));
}

void check_convert_dtype(const std::string& dtype) {
  StDType d;
  if (dtype != "keep" && !parse_out_dtype(dtype, &d))
    throw UsageError(str_cat("--dtype '", dtype, "' is not one of keep, bf16, f16, f32"));
}

ConvertResult convert_model(const std::string& src, const std::string& out, const ConvertOptions& opt) {
  check_convert_dtype(opt.dtype);
  check_convert_component(opt.component);
  const auto t0 = std::chrono::steady_clock::now();
  std::error_code ec;
  ZI_CHECK(!fs::exists(out, ec), "convert: '", out, "' exists already (choose a new name)");
  std::vector<std::string> notices;
  ModelFolder folder;
  std::vector<Part> parts = read_parts(src, &notices, &folder);
  if (!opt.component.empty()) {
    std::vector<Part> one;
    for (Part& p : parts)
      if (opt.component == component_name(p.component)) one.push_back(std::move(p));
    ZI_CHECK(!one.empty(), "convert: '", src, "' holds no ", opt.component);
    parts = std::move(one);
  }
  for (const std::string& n : notices)
    if (opt.log) opt.log("note: " + n);
  ConvertResult res;
  for (const Part& p : parts) res.layout += str_cat(res.layout.empty() ? "" : "\n", component_name(p.component), ": ", p.where);
  Writer w{opt, res};
  if (opt.to == ConvertTo::SingleFile) {
    std::vector<OutTensor> all;
    for (const Part& p : parts) {
      const std::string prefix = parts.size() > 1 ? all_in_one_prefix(p.component) : "";
      for (OutTensor& t : original_tensors(p, w, prefix)) all.push_back(std::move(t));
    }
    w.write(out, all);
  } else {
    const fs::path tmp = out + ".tmp";
    fs::remove_all(tmp, ec);
    try {
      fs::create_directories(tmp);
      for (const Part& p : parts) {
        const char* sub = component_name(p.component);
        fs::create_directories(tmp / sub);
        write_text(tmp / sub / "config.json", p.config_json);
        const char* file = p.component == Component::TextEncoder ? "model.safetensors"
                                                                    : "diffusion_pytorch_model.safetensors";
        if (opt.log) opt.log(str_cat("writing ", (fs::path(out) / sub / file).string()));
        std::vector<std::string> dropped;
        w.write((tmp / sub / file).string(), diffusers_tensors(p, w, &dropped));
        if (!dropped.empty() && opt.log)
          opt.log(str_cat("note: not writing ", dropped.size(), " text encoder tensors Qwen3Model does not have (",
                          dropped[0], ")"));
      }
      if (parts.size() == 3) {  // a whole pipeline: the rest of the folder
        const bool from_folder = !folder.root.empty();
        copy_dir(from_folder ? folder.tokenizer_dir : bundled_tokenizer_dir(), tmp / "tokenizer");
        fs::create_directories(tmp / "scheduler");
        if (from_folder)
          fs::copy_file(folder.scheduler_config_path, tmp / "scheduler" / "scheduler_config.json");
        else
          write_text(tmp / "scheduler" / "scheduler_config.json",
                     json{{"_class_name", "FlowMatchEulerDiscreteScheduler"}, {"num_train_timesteps", 1000},
                          {"shift", 3.0}, {"use_dynamic_shifting", false}}
                             .dump(2));
        write_text(tmp / "model_index.json",
                   json{{"_class_name", "ZImagePipeline"},
                        {"scheduler", {"diffusers", "FlowMatchEulerDiscreteScheduler"}},
                        {"text_encoder", {"transformers", "Qwen3Model"}},
                        {"tokenizer", {"transformers", "Qwen2Tokenizer"}},
                        {"transformer", {"diffusers", "ZImageTransformer2DModel"}},
                        {"vae", {"diffusers", "AutoencoderKL"}}}
                       .dump(2));
      }
      fs::rename(tmp, out);
    } catch (...) {
      fs::remove_all(tmp, ec);
      throw;
    }
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace zi
