#include "io/model_sources.h"

#include <cstdlib>
#include <filesystem>
#include <map>

#include "core/check.h"

namespace fs = std::filesystem;

namespace zi {

namespace {

const char* flag_of(Component c) {
  switch (c) {
    case Component::Transformer: return "--diffusion-model";
    case Component::TextEncoder: return "--text-encoder";
    case Component::Vae: return "--vae";
  }
  return "";
}

std::string list_keys(const LayoutFile& f, const std::vector<size_t>& idx, size_t most = 5) {
  std::string s;
  for (size_t i = 0; i < idx.size() && i < most; ++i) s += (i ? ", " : "") + ("'" + f.file->tensors()[idx[i]].name + "'");
  if (idx.size() > most) s += str_cat(", ... (", idx.size(), " in all)");
  return s;
}

bool has_tokenizer(const fs::path& d) {
  std::error_code ec;
  return fs::exists(d / "tokenizer.json", ec) || (fs::exists(d / "vocab.json", ec) && fs::exists(d / "merges.txt", ec));
}

}  // namespace

std::string bundled_tokenizer_dir() {
  if (const char* env = std::getenv("ZIMAGE_TOKENIZER"); env && *env) {
    ZI_CHECK(has_tokenizer(env), "$ZIMAGE_TOKENIZER '", env, "' holds no tokenizer.json nor vocab.json + merges.txt");
    return env;
  }
  static const char* rel[] = {"models/tiny-zimage/tokenizer", "tests/data/qwen-tokenizer", "share/zimage/tokenizer"};
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    for (fs::path p = exe.parent_path(); !p.empty(); p = p.parent_path()) {
      for (const char* r : rel)
        if (has_tokenizer(p / r)) return (p / r).string();
      if (p == p.root_path()) break;
    }
#ifdef ZIMAGE_SOURCE_DIR
  for (const char* r : rel)
    if (has_tokenizer(fs::path(ZIMAGE_SOURCE_DIR) / r)) return (fs::path(ZIMAGE_SOURCE_DIR) / r).string();
#endif
  fail("no bundled Qwen tokenizer found (models/tiny-zimage/tokenizer next to the zimage executable); pass --model "
       "DIR or set ZIMAGE_TOKENIZER to a folder with tokenizer.json");
}

TensorStore ModelSources::open(Component c) const {
  if (const LayoutFile* f = file(c)) return f->store(c);
  switch (c) {
    case Component::Transformer: return TensorStore::open_dir(folder.transformer_dir);
    case Component::TextEncoder: return TensorStore::open_dir(folder.text_encoder_dir);
    case Component::Vae: return TensorStore::open_dir(folder.vae_dir);
  }
  fail("?");
}

std::string ModelSources::describe(Component c) const {
  if (const LayoutFile* f = file(c)) {
    const std::string d = f->layout.describe(c);
    return str_cat(component_name(c), ": ", f->file->path(), " ", d.substr(d.find('(')));
  }
  const std::string& dir = c == Component::Transformer   ? folder.transformer_dir
                           : c == Component::TextEncoder ? folder.text_encoder_dir
                                                         : folder.vae_dir;
  return str_cat(component_name(c), ": ", dir, " (diffusers folder)");
}

ModelSources resolve_model_sources(const ModelSpec& spec) {
  ModelSources s;
  const bool have_dir = !spec.model_dir.empty();
  if (have_dir) s.folder = open_model_folder(spec.model_dir);
  // Every given file, opened once.
  std::map<std::string, std::shared_ptr<LayoutFile>> opened;
  auto open = [&](const std::string& path, const char* flag) {
    std::error_code ec;
    if (!fs::is_regular_file(path, ec))
      throw UsageError(str_cat(flag, " '", path, "': no such file (expected a .safetensors file)"));
    auto& f = opened[fs::weakly_canonical(path, ec).string()];
    if (!f) f = LayoutFile::open(path);
    return f;
  };
  const std::string* given[3] = {&spec.diffusion_model, &spec.text_encoder, &spec.vae};
  for (Component c : kAllComponents) {
    const std::string& path = *given[size_t(c)];
    if (path.empty()) continue;
    auto f = open(path, flag_of(c));
    if (!f->layout.find(c)) {
      std::string holds;
      for (const auto& m : f->layout.components) holds += (holds.empty() ? "" : ", ") + std::string(component_name(m.component));
      fail(str_cat(flag_of(c), " '", path, "': holds no ", component_name(c), " tensors",
                   holds.empty() ? " (no tensor of a known Z-Image layout)" : str_cat(" (it holds: ", holds, ")")));
    }
    s.files[size_t(c)] = f;
  }
  // Components no flag names, from another given file that holds them (all-in-one).
  for (Component c : kAllComponents) {
    if (s.files[size_t(c)]) continue;
    for (const auto& [p, f] : opened)
      if (f->layout.find(c)) {
        s.files[size_t(c)] = f;
        break;
      }
  }
  for (Component c : kAllComponents)
    if (!s.files[size_t(c)] && !have_dir)
      throw UsageError(str_cat("no ", component_name(c), " given: pass ", flag_of(c), " FILE or --model DIR"));
  // Tensors of a file that belong to no component, and known-unused ones.
  for (const auto& [p, f] : opened) {
    if (!f->layout.unclaimed.empty())
      s.notices.push_back(str_cat(f->file->path(), ": ignoring ", f->layout.unclaimed.size(),
                                  " tensors of no Z-Image component: ", list_keys(*f, f->layout.unclaimed)));
    for (const auto& m : f->layout.components)
      if (!m.dropped.empty())
        s.notices.push_back(str_cat(f->file->path(), ": ignoring unused ", component_name(m.component), " tensors ",
                                    list_keys(*f, m.dropped)));
  }
  // Configs.
  ModelFolder& mf = s.folder;
  if (!have_dir) {
    mf.tokenizer_dir = bundled_tokenizer_dir();
    mf.scheduler_config_path.clear();
  }
  if (const LayoutFile* f = s.file(Component::Transformer)) {
    DitConfig c = infer_dit_config(f->store(Component::Transformer));
    if (have_dir) {  // what shapes cannot tell
      const DitConfig& d = mf.transformer;
      c.norm_eps = d.norm_eps, c.rope_theta = d.rope_theta, c.t_scale = d.t_scale, c.axes_lens = d.axes_lens;
      int sum = 0;
      for (int a : d.axes_dims) sum += a;
      if (sum == c.head_dim()) c.axes_dims = d.axes_dims;
    }
    mf.transformer = c;
    mf.transformer_dir = f->file->path();
  }
  if (const LayoutFile* f = s.file(Component::TextEncoder)) {
    Qwen3Config c = infer_qwen3_config(f->store(Component::TextEncoder));
    if (have_dir) c.rope_theta = mf.text_encoder.rope_theta, c.rms_norm_eps = mf.text_encoder.rms_norm_eps;
    mf.text_encoder = c;
    mf.text_encoder_dir = f->file->path();
  }
  if (const LayoutFile* f = s.file(Component::Vae)) {
    VaeConfig c = infer_vae_config(f->store(Component::Vae));
    if (have_dir) {
      c.scaling_factor = mf.vae.scaling_factor, c.shift_factor = mf.vae.shift_factor;
      if (c.block_out_channels.back() % mf.vae.norm_num_groups == 0) c.norm_num_groups = mf.vae.norm_num_groups;
    }
    mf.vae = c;
    mf.vae_dir = f->file->path();
  }
  ZI_CHECK(mf.transformer.cap_feat_dim == mf.text_encoder.hidden_size, "the transformer's cap_feat_dim (",
           mf.transformer.cap_feat_dim, ", ", s.describe(Component::Transformer),
           ") differs from the text encoder's hidden_size (", mf.text_encoder.hidden_size, ", ",
           s.describe(Component::TextEncoder), "): they do not belong together");
  ZI_CHECK(mf.transformer.in_channels == mf.vae.latent_channels, "the transformer's in_channels (",
           mf.transformer.in_channels, ") differs from the VAE's latent_channels (", mf.vae.latent_channels,
           ", ", s.describe(Component::Vae), "): they do not belong together");
  return s;
}

}  // namespace zi
