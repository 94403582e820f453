// zimage generate: prompt in, PNG out. Argument parsing, progress and reporting only; the
// work is zi::generate() in src/pipeline.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "cli/common.h"
#include "backends/cuda/cuda_ops.h"
#include "core/check.h"
#include "core/parallel.h"
#include "core/torch_random.h"
#include "io/png.h"
#include "models/lora.h"
#include "pipeline/memory_report.h"
#include "pipeline/pipeline.h"

namespace zi::cli {
namespace {

std::atomic<bool> g_cancel{false};
extern "C" void on_sigint(int) { g_cancel.store(true); }

struct GenerateArgs {
  GenerateOptions o;
  std::string model, output = "zimage.png", seed_text, vae_dtype = "bf16", dit_dtype = "bf16", te_dtype = "bf16";
  std::string vae_tile, memory_report;
  std::vector<std::string> loras;
  bool memory_report_flag = false;
  bool keep_models = false;
  int count = 1;
  int64_t cache_limit_mib = -1;
  std::string device, te_device, vae_device, precision = "bf16";
  int threads = 0;
  bool quiet = false;
};

DType parse_dtype_flag(const std::string& v, const char* flag) {
  DType d;
  if (!parse_dtype(v, &d)) throw UsageError(str_cat(flag, " must be f32, bf16 or f16, got '", v, "'"));
  return d;
}

// --transformer-dtype / --text-encoder-dtype: also the weight formats made at load time.
DType parse_weight_dtype_flag(const std::string& v, const char* flag) {
  DType d;
  if (!parse_weight_dtype(v, &d))
    throw UsageError(str_cat(flag, " must be f32, bf16, f16, q8_0, q5_0, q4_0 or fp8, got '", v, "'"));
  return d;
}

// A one-line progress bar on stderr (only when stderr is a terminal).
void print_progress(int step, int steps, double elapsed) {
  const int width = 30;
  int filled = steps ? step * width / steps : width;
  double rate = elapsed > 0 ? step / elapsed : 0;
  double eta = rate > 0 ? (steps - step) / rate : 0;
  std::string bar(size_t(filled), '#');
  bar.resize(size_t(width), '.');
  std::fprintf(stderr, "\r  denoise [%s] %d/%d  %s  ETA %.1fs   ", bar.c_str(), step, steps,
               rate >= 1 ? str_cat(int(rate * 100) / 100.0, " it/s").c_str()
                         : str_cat(rate > 0 ? int(100 / rate) / 100.0 : 0.0, " s/it").c_str(),
               eta);
  if (step == steps) std::fprintf(stderr, "\n");
}

// out.png → out-0001.png for the k-th image of --count.
std::string numbered_path(const std::string& path, int k) {
  char num[16];
  std::snprintf(num, sizeof num, "-%04d", k);
  std::filesystem::path p(path);
  return (p.parent_path() / (p.stem().string() + num + p.extension().string())).string();
}

std::string parameters_text(const GenerateArgs& a, const std::string& model_dir, int w, int h) {
  const GenerateOptions& o = a.o;
  std::string s = o.prompt + "\n";
  if (o.guidance > 0) s += "Negative prompt: " + o.negative_prompt + "\n";
  s += str_cat("Steps: ", o.steps, ", Guidance: ", o.guidance, ", Seed: ", o.seed, ", Size: ", w, "x", h,
               ", Max sequence length: ", o.max_sequence_length);
  if (o.guidance > 0) s += str_cat(", CFG normalization: ", o.cfg_normalization, ", CFG truncation: ", o.cfg_truncation);
  for (const auto& [f, sc] : o.loras) s += str_cat(", LoRA: ", f, ":", sc);
  if (!o.transformer_override.empty()) s += ", Transformer override: " + o.transformer_override;
  s += ", Model: " + model_dir + ", zimage " ZIMAGE_VERSION;
  return s;
}

void run(GenerateArgs& a) {
  if (!a.seed_text.empty()) {
    try {
      size_t used = 0;
      a.o.seed = std::stoull(a.seed_text, &used);
      if (used != a.seed_text.size() || a.seed_text[0] == '-') throw std::invalid_argument("x");
    } catch (const std::exception&) {
      throw UsageError(str_cat("--seed must be a whole number from 0 to 2^64-1, got '", a.seed_text, "'"));
    }
  } else {
    a.o.seed = random_seed();
  }
  a.o.vae_dtype = parse_dtype_flag(a.vae_dtype, "--vae-dtype");
  a.o.transformer_dtype = parse_weight_dtype_flag(a.dit_dtype, "--transformer-dtype");
  a.o.text_encoder_dtype = parse_weight_dtype_flag(a.te_dtype, "--text-encoder-dtype");
  if (a.vae_tile.empty() || a.vae_tile == "0" || a.vae_tile == "off") a.o.vae_tile = 0;
  else if (a.vae_tile == "auto") a.o.vae_tile = -1;
  else {
    int px = 0;
    try {
      px = std::stoi(a.vae_tile);
    } catch (const std::exception&) {
      throw UsageError(str_cat("--vae-tile must be a number of pixels or 'auto', got '", a.vae_tile, "'"));
    }
    if (px < 128 || px % 8) throw UsageError(str_cat("--vae-tile must be a multiple of 8 of at least 128, got ", px));
    a.o.vae_tile = px / 8;
  }
  for (const std::string& l : a.loras) {
    LoraSpec spec = parse_lora_arg(l);
    a.o.loras.emplace_back(spec.path, spec.scale);
  }
  if (a.count < 1) throw UsageError(str_cat("--count must be at least 1, got ", a.count));
  auto parse_device = [](const std::string& v, const char* flag, Device dflt) {
    if (v.empty()) return dflt;
    if (v == "cpu") return Device::CPU;
    if (v == "cuda") {
      if (!cuda::available())
        throw UsageError(str_cat(flag, " cuda: no usable CUDA GPU (or this zimage was built without CUDA)"));
      return Device::CUDA;
    }
    throw UsageError(str_cat(flag, " must be cpu or cuda, got '", v, "'"));
  };
  const Device dev = parse_device(a.device, "--device", cuda::available() ? Device::CUDA : Device::CPU);
  a.o.transformer_device = dev;
  a.o.text_encoder_device = parse_device(a.te_device, "--text-encoder-device", dev);
  a.o.vae_device = parse_device(a.vae_device, "--vae-device", dev);
  if (a.precision == "bf16") a.o.precision = DType::BF16;
  else if (a.precision == "f32") a.o.precision = DType::F32;
  else throw UsageError(str_cat("--precision must be bf16 or f32, got '", a.precision, "'"));
  if (a.cache_limit_mib >= 0) a.o.cache_limit_bytes = a.cache_limit_mib << 20;
  bool bundled = false;
  a.o.model_dir = resolve_model_dir(a.model, &bundled);
  validate_generate_options(a.o);
  if (bundled) notice_bundled_model(a.quiet);
  set_num_threads(a.threads);

  // Refuse an output path that cannot be written before minutes of work.
  std::filesystem::path out(a.output);
  std::filesystem::path dir = out.has_parent_path() ? out.parent_path() : ".";
  if (!std::filesystem::is_directory(dir))
    throw Error(str_cat("cannot write '", a.output, "': folder '", dir.string(), "' ",
                        std::filesystem::exists(dir) ? "is not a folder" : "does not exist"));
  if (access(dir.c_str(), W_OK) != 0) throw Error(str_cat("cannot write '", a.output, "': folder is not writable"));
  if (std::filesystem::is_directory(out)) throw Error(str_cat("cannot write '", a.output, "': it is a folder"));

  const bool tty = isatty(STDERR_FILENO) && !a.quiet;
  if (!a.quiet) std::fprintf(stderr, "seed %llu\n", static_cast<unsigned long long>(a.o.seed));
  GenerateHooks hooks;
  hooks.cancel = &g_cancel;
  hooks.on_phase_start = [&](const std::string& p) {
    if (!a.quiet) std::fprintf(stderr, "%s...\n", p.c_str());
  };
  if (tty) hooks.on_step = print_progress;
  else if (!a.quiet)
    hooks.on_step = [](int s, int n, double e) { std::fprintf(stderr, "  step %d/%d (%.2f s)\n", s, n, e); };

  std::signal(SIGINT, on_sigint);
  ModelCache cache;
  const uint64_t first_seed = a.o.seed;
  for (int k = 0; k < a.count; ++k) {
    a.o.seed = first_seed + uint64_t(k);
    if (a.count > 1 && !a.quiet) std::fprintf(stderr, "image %d/%d, seed %llu\n", k + 1, a.count,
                                              static_cast<unsigned long long>(a.o.seed));
    GenerateResult r;
    try {
      r = generate(a.o, hooks, a.keep_models ? &cache : nullptr);
    } catch (const Cancelled&) {
      throw Interrupted();
    }
    if (g_cancel.load()) throw Interrupted();  // Ctrl-C after the last check: write nothing
    const std::string path = a.count > 1 ? numbered_path(a.output, k + 1) : a.output;
    write_png_atomic(path, r.rgb.data(), r.width, r.height,
                     {{"parameters", parameters_text(a, a.o.model_dir, r.width, r.height)},
                      {"Software", "zimage " ZIMAGE_VERSION}});
    if (!a.quiet) {
      for (size_t i = 0; i < r.phases.size(); ++i) {
        const double load = i < r.load_seconds.size() ? r.load_seconds[i] : 0.0;
        const double rel = i < r.release_seconds.size() ? r.release_seconds[i] : 0.0;
        std::fprintf(stderr, "  %-8s %7.3f s  (load %.3f s, compute %.3f s", r.phases[i].name.c_str(),
                     r.phases[i].seconds, load, r.phases[i].seconds - load - rel);
        if (rel > 0.0005) std::fprintf(stderr, ", release %.3f s", rel);
        std::fprintf(stderr, ")\n");
      }
      if (!r.gpu_phases.empty()) {
        const cuda::PoolStats ps = cuda::pool_stats();
        const cuda::UploadStats us = cuda::upload_stats();
        std::fprintf(stderr, "  gpu %s: accounted peak %.1f MiB, pool reserved high %.1f MiB; uploaded %.2f GB at %.2f GB/s\n",
                     cuda::device_description().c_str(), double(r.gpu_peak_bytes) / (1 << 20),
                     double(ps.reserved_high) / (1 << 20), double(us.bytes) / 1e9,
                     us.seconds > 0 ? double(us.bytes) / 1e9 / us.seconds : 0.0);
      }
      std::fprintf(stderr, "wrote %s (%dx%d)\n", path.c_str(), r.width, r.height);
    }
    if (a.memory_report_flag) print_memory_report(r, a.memory_report);
  }
  std::signal(SIGINT, SIG_DFL);
}

}  // namespace

void add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* c = app.add_subcommand(
      "generate",
      "Generate an image from a text prompt.\n"
      "  zimage generate -p \"a red fox in fresh snow, watercolor\" -o fox.png\n"
      "  zimage generate --model ~/models/Z-Image-Turbo -p \"...\" -W 1280 -H 720 --seed 42\n"
      "Z-Image-Turbo's recipe is the default: 8 steps, guidance 0, 1024x1024.");
  c->add_option("-p,--prompt", a->o.prompt, "what to draw (UTF-8)")->required();
  c->add_option("--negative-prompt", a->o.negative_prompt, "what to avoid (only used with --guidance > 0)");
  c->add_option("--model", a->model,
                "diffusers-format Z-Image folder (default: $ZIMAGE_MODEL, else the bundled tiny random model)");
  c->add_option("-W,--width", a->o.width, "image width in pixels, a multiple of 16")->capture_default_str();
  c->add_option("-H,--height", a->o.height, "image height in pixels, a multiple of 16")->capture_default_str();
  c->add_option("--steps", a->o.steps, "denoising steps (Turbo: 8)")->capture_default_str();
  c->add_option("--guidance", a->o.guidance, "classifier-free guidance scale; 0 = off (Turbo)")->capture_default_str();
  c->add_option("--cfg-normalization", a->o.cfg_normalization,
                "cap the guided prediction's norm at F x the conditional one (0 = off)")
      ->capture_default_str();
  c->add_option("--cfg-truncation", a->o.cfg_truncation,
                "turn guidance off once the model time (1 - sigma) exceeds F")
      ->capture_default_str();
  c->add_option("--seed", a->seed_text, "random seed; the same seed gives the same image as diffusers (default: random, printed)");
  c->add_option("--max-sequence-length", a->o.max_sequence_length, "prompt tokens kept (template included)")
      ->capture_default_str();
  c->add_option("-o,--output", a->output, "PNG file to write (atomically)")->capture_default_str();
  c->add_option("--threads", a->threads, "CPU threads (default: all cores)");
  c->add_option("--text-encoder-dtype", a->te_dtype, "text encoder weights in memory: bf16, f16 or f32")
      ->capture_default_str();
  c->add_option("--transformer-dtype", a->dit_dtype, "transformer weights in memory: bf16, f16 or f32")
      ->capture_default_str();
  c->add_option("--vae-dtype", a->vae_dtype, "VAE weights in memory: bf16, f16 or f32")->capture_default_str();
  c->add_option("--vae-tile", a->vae_tile,
                "decode in tiles of this many pixels (multiple of 8, >= 128) to bound memory, or 'auto'");
  auto* mr = c->add_option("--memory-report", a->memory_report,
                           "print a table of each phase's weights and peak memory; with FILE also write it as JSON");
  mr->expected(0, 1);
  c->add_option("--lora", a->loras,
                "apply a LoRA (diffusers/PEFT, kohya or ComfyUI keys) merged at load time: FILE or FILE:SCALE; "
                "repeatable, deltas add up")
      ->allow_extra_args(false);
  c->add_option("--transformer-override", a->o.transformer_override,
                "safetensors file whose tensors replace the transformer's of the same name (fine-tunes)");
  c->add_option("-n,--count", a->count, "images to make, with seeds seed, seed+1, ... (out-0001.png, ...)")
      ->capture_default_str();
  c->add_flag("--keep-models", a->keep_models,
              "with --count: keep every component loaded between images (faster, more memory)");
  c->add_option("--cache-limit", a->cache_limit_mib, "MiB the allocator may keep cached after frees");
  c->add_option("--device", a->device, "where to run: cpu or cuda (default: cuda when a GPU is present)");
  c->add_option("--text-encoder-device", a->te_device, "run the text encoder on cpu or cuda (default: --device)");
  c->add_option("--vae-device", a->vae_device, "run the VAE decoder on cpu or cuda (default: --device)");
  c->add_option("--precision", a->precision,
                "activations on the GPU: bf16 (f32 accumulation) or f32 (for checking against the CPU)")
      ->capture_default_str();
  c->add_flag("-q,--quiet", a->quiet, "print nothing but errors");
  c->callback([a, mr] {
    a->memory_report_flag = mr->count() > 0;
    run(*a);
  });
}

}  // namespace zi::cli
