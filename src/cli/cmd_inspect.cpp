// zimage inspect PATH: what a .safetensors file or a model folder holds, or why it is rejected.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>

#include "cli/common.h"
#include "core/check.h"
#include "io/checkpoint.h"
#include "io/layouts.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;

namespace zi::cli {
namespace {

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", b, units[u]);
  return buf;
}

// "4,899,136 (4.899 M)": exact, and readable at a glance.
std::string human_count(double n) {
  std::string digits = std::to_string(static_cast<unsigned long long>(n));
  for (int i = int(digits.size()) - 3; i > 0; i -= 3) digits.insert(size_t(i), ",");
  if (n < 1e3) return digits;
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.3f B", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.3f M", n / 1e6);
  else std::snprintf(buf, sizeof buf, "%.3f K", n / 1e3);
  return digits + " (" + buf + ")";
}

void print_file(const std::string& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  std::printf("%s: %zu tensors\n", path.c_str(), f.tensors().size());
  for (const auto& [k, v] : f.metadata()) {
    std::string s = v.size() > 100 ? v.substr(0, 100) + "..." : v;
    std::printf("  metadata %s = %s\n", k.c_str(), s.c_str());
  }
  std::vector<const TensorInfo*> sorted;
  for (const auto& t : f.tensors()) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto a, auto b) { return a->name < b->name; });
  uint64_t total = 0;
  for (const TensorInfo* t : sorted) {
    std::printf("  %-60s %-6s %-22s %s\n", t->name.c_str(), t->format_name().c_str(), shape_str(t->shape).c_str(),
                human_bytes(double(t->nbytes())).c_str());
    total += t->nbytes();
  }
  std::printf("  total %s\n", human_bytes(double(total)).c_str());
  // Which Z-Image components the file holds, in which key layout.
  std::vector<SourceTensor> src;
  for (const auto& t : f.tensors()) src.push_back({t.name, t.shape});
  try {
    const FileLayout l = analyze_layout(src, path);
    for (const auto& m : l.components) std::printf("  layout: %s\n", l.describe(m.component).c_str());
    if (l.components.empty()) std::printf("  layout: no Z-Image component (a LoRA or another model?)\n");
    if (!l.unclaimed.empty())
      std::printf("  layout: %zu tensors of no Z-Image component (first: %s)\n", l.unclaimed.size(),
                  f.tensors()[l.unclaimed[0]].name.c_str());
  } catch (const Error& e) {
    std::printf("  layout: %s\n", e.what());
  }
}

// Parameter count and bytes per dtype of one component; `skip` prefixes are counted apart.
void print_store(const char* title, const std::string& dir, const std::string& summary,
                 const std::vector<std::string>& unused_prefixes) {
  TensorStore s = TensorStore::open_dir(dir);
  std::map<std::string, uint64_t> bytes;
  double params = 0, unused = 0;
  size_t n = 0;
  for (const auto& f : s.files())
    for (const auto& t : f->tensors()) {
      bool skip = false;
      for (const auto& p : unused_prefixes) skip = skip || t.name.starts_with(p);
      (skip ? unused : params) += double(t.numel());
      bytes[t.format_name()] += t.nbytes();
      ++n;
    }
  std::printf("%s (%s)\n  %s\n  %zu tensors in %zu file%s, %s parameters", title, dir.c_str(), summary.c_str(), n,
              s.files().size(), s.files().size() == 1 ? "" : "s", human_count(params).c_str());
  if (unused > 0) std::printf(" (+ %s not used by zimage)", human_count(unused).c_str());
  std::printf("\n ");
  for (const auto& [dt, b] : bytes) std::printf(" %s: %s", dt.c_str(), human_bytes(double(b)).c_str());
  std::printf("\n");
}

void print_folder(const std::string& dir) {
  ModelFolder m = open_model_folder(dir);
  std::printf("%s: Z-Image pipeline (diffusers folder layout)\n", dir.c_str());
  const auto& te = m.text_encoder;
  print_store("text_encoder: Qwen3", m.text_encoder_dir,
              str_cat("hidden ", te.hidden_size, ", ", te.num_hidden_layers, " layers (zimage runs ",
                      te.num_hidden_layers - 1, "), heads ", te.num_attention_heads, "/", te.num_key_value_heads,
                      " kv, head_dim ", te.head_dim, ", mlp ", te.intermediate_size, ", vocab ", te.vocab_size,
                      ", rope_theta ", te.rope_theta),
              {"lm_head.", str_cat("model.layers.", te.num_hidden_layers - 1, "."),
               str_cat("layers.", te.num_hidden_layers - 1, "."), "model.norm.", "norm."});
  const auto& d = m.transformer;
  print_store("transformer: ZImageTransformer2DModel", m.transformer_dir,
              str_cat("dim ", d.dim, ", ", d.n_layers, " layers + ", d.n_refiner_layers, "+", d.n_refiner_layers,
                      " refiners, ", d.n_heads, " heads of ", d.head_dim(), ", ffn ", d.ffn_hidden(), ", cap_feat_dim ",
                      d.cap_feat_dim, ", rope_theta ", d.rope_theta),
              {});
  const auto& v = m.vae;
  std::string ch;
  for (int c : v.block_out_channels) ch += (ch.empty() ? "" : ",") + std::to_string(c);
  print_store("vae: AutoencoderKL (zimage reads the decoder only)", m.vae_dir,
              str_cat("channels [", ch, "], ", v.layers_per_block, " layers per block, latent ", v.latent_channels,
                      ", scaling ", v.scaling_factor, ", shift ", v.shift_factor),
              {"encoder.", "quant_conv."});
  std::printf("scheduler: %s\n", m.scheduler_config_path.c_str());
  std::printf("tokenizer: %s\n", m.tokenizer_dir.c_str());
}

}  // namespace

void add_inspect(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("inspect",
                                     "Show what a .safetensors file, a component folder or a model folder holds "
                                     "(tensors, dtypes, shapes, bytes; configs and parameter counts), or why it is "
                                     "rejected.\n  zimage inspect ~/models/Z-Image-Turbo\n  zimage inspect "
                                     "lora.safetensors");
  cmd->add_option("PATH", *path, "a .safetensors file, a component folder, or a Z-Image model folder")->required();
  cmd->callback([path] {
    if (fs::is_directory(*path)) {
      if (fs::exists(fs::path(*path) / "model_index.json")) print_folder(*path);
      else {
        TensorStore s = TensorStore::open_dir(*path);
        for (const auto& f : s.files()) print_file(f->path());
      }
    } else if (fs::exists(*path)) {
      print_file(*path);
    } else {
      fail(str_cat("'", *path, "' does not exist"));
    }
  });
}

}  // namespace zi::cli
