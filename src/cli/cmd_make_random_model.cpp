// `zimage make-random-model`: writes a diffusers-layout Z-Image folder with random weights
// (turbo: the real Z-Image-Turbo shapes, ~33 GB; tiny: the bundled tiny model's shapes).
// The logic lives in tools/random_model.
#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>

#include "cli/common.h"
#include "core/check.h"
#include "core/parallel.h"
#include "tools/random_model.h"

namespace zi::cli {
namespace {

struct MakeRandomArgs {
  std::string preset;
  std::string out_dir;
  uint64_t seed = 0;
  std::string dtype;
  int threads = 0;
  bool quiet = false;
};

std::atomic<bool> g_make_random_cancel{false};
void on_make_random_sigint(int) { g_make_random_cancel.store(true); }

void run_make_random_model(const MakeRandomArgs& a) {
  MakeRandomModelOptions o;
  if (!parse_random_preset(a.preset, &o.preset))
    throw UsageError(str_cat("make-random-model: --preset must be turbo or tiny, got '", a.preset, "'"));
  if (!a.dtype.empty()) {
    DType d;
    if (!parse_dtype(a.dtype, &d) || (d != DType::F32 && d != DType::BF16))
      throw UsageError(str_cat("make-random-model: --dtype must be f32 or bf16, got '", a.dtype, "'"));
    o.dtype = d;
  }
  if (a.threads < 0) throw UsageError(str_cat("make-random-model: --threads must not be negative, got ", a.threads));
  if (a.out_dir.empty()) throw UsageError("make-random-model: OUT_DIR must not be empty");
  set_num_threads(a.threads);
  o.seed = a.seed;
  o.tokenizer_src = resolve_model_dir("") + "/tokenizer";
  if (!a.quiet) o.log = [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  o.check_cancel = [] {
    if (g_make_random_cancel.load()) throw Interrupted();
  };
  g_make_random_cancel.store(false);
  std::signal(SIGINT, on_make_random_sigint);
  try {
    make_random_model(a.out_dir, o);
  } catch (...) {
    std::signal(SIGINT, SIG_DFL);
    throw;
  }
  std::signal(SIGINT, SIG_DFL);
}

}  // namespace

void add_make_random_model(CLI::App& app) {
  auto a = std::make_shared<MakeRandomArgs>();
  CLI::App* c = app.add_subcommand(
      "make-random-model",
      "Write a Z-Image model folder (diffusers layout) with random weights of the right shapes, for benchmarks and "
      "tests.");
  c->footer(
      "Presets:\n"
      "  turbo  the shapes, configs and sharding of Tongyi-MAI/Z-Image-Turbo: transformer 6.15 B parameters\n"
      "         (f32, 3 shards), Qwen3-4B text encoder (bf16, 3 shards), VAE encoder+decoder (bf16); ~33 GB\n"
      "  tiny   the shapes of the bundled models/tiny-zimage (bf16, a few MB)\n"
      "The tokenizer/ files are copied from $ZIMAGE_MODEL if set, else from the bundled tiny model (the\n"
      "real Qwen3 tokenizer). Weights are\n"
      "deterministic for a seed: linear/conv N(0, 1/fan_in), norm gains 1 + 0.1 N, biases 0.02 N,\n"
      "embeddings and pad tokens N(0, 1). The images they give are noise.\n\n"
      "Examples:\n"
      "  zimage make-random-model --preset tiny /tmp/tiny-random\n"
      "  zimage make-random-model --preset turbo --dtype bf16 --seed 7 /data/zimage-turbo-random\n");
  c->add_option("--preset", a->preset, "turbo | tiny")->required()->type_name("NAME");
  c->add_option("OUT_DIR", a->out_dir, "Folder to create (must not exist, or be empty)")->required()->type_name("DIR");
  c->add_option("--seed", a->seed, "Random seed")->capture_default_str()->type_name("N");
  c->add_option("--dtype", a->dtype,
                "Storage dtype of every component: f32 | bf16 (default: turbo as on the Hub - transformer f32, "
                "text encoder and VAE bf16; tiny bf16)")
      ->type_name("DT");
  c->add_option("--threads", a->threads, "Threads generating the weights (0: all cores)")->type_name("N");
  c->add_flag("-q,--quiet", a->quiet, "No progress lines on stderr");
  c->callback([a] { run_make_random_model(*a); });
}

}  // namespace zi::cli
