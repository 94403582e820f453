// DiT throughput: one dit_forward (one denoising step, batch 1) with weights loaded once,
// outside the timing. Always runs the bundled tiny model at 64×64 latents (1024 image
// tokens); with ZIMAGE_BENCH_MODEL=DIR (a diffusers folder of real size, e.g. a random
// model) it also runs DIR/transformer at 256×256 pixels (32×32 latents, 256 image tokens),
// once, and reports seconds per step.
//   build/bench/bench_dit [--benchmark_filter=tiny]
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/parallel.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/zimage_dit.h"

namespace {

namespace fs = std::filesystem;

constexpr int64_t kCaptionTokens = 32;  // a short prompt, already a multiple of 32

std::string tiny_model_dir() {
  return (fs::path(__FILE__).parent_path().parent_path() / "models" / "tiny-zimage").string();
}

zi::Tensor randn(const zi::Shape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(size_t(zi::shape_numel(shape)));
  for (float& x : v) x = nd(rng);
  return zi::Tensor::from_vector(v, shape);
}

struct Loaded {
  zi::ZImageDit dit;
  zi::Tensor latent, cap;
};

const Loaded& load(const std::string& model_dir, int64_t latent_size) {
  static std::map<std::string, std::unique_ptr<Loaded>> cache;
  auto& slot = cache[model_dir];
  if (!slot) {
    const std::string dir = (fs::path(model_dir) / "transformer").string();
    const std::string cfg_path = dir + "/config.json";
    const zi::DitConfig cfg = zi::parse_dit_config(zi::read_text_file(cfg_path), cfg_path);
    const zi::TensorStore store = zi::TensorStore::open_dir(dir);
    zi::WeightLoader loader(store, zi::Tag::DitWeights, "transformer");
    slot = std::make_unique<Loaded>();
    slot->dit = zi::load_zimage_dit(loader, cfg, zi::DType::BF16);
    loader.finish();
    slot->latent = randn({cfg.in_channels, 1, latent_size, latent_size}, 1);
    slot->cap = randn({kCaptionTokens, cfg.cap_feat_dim}, 2);
  }
  return *slot;
}

void run(benchmark::State& state, const std::string& dir, int64_t latent_size) {
  const Loaded& m = load(dir, latent_size);
  zi::MemoryStats& mem = zi::memory_stats();
  mem.reset_peaks();
  const int64_t held_before = mem.total().current;  // weights and inputs
  for (auto _ : state) {
    zi::Tensor v = zi::dit_forward(m.dit, m.latent, 0.5f, m.cap);
    benchmark::DoNotOptimize(v.raw());
  }
  const zi::DitConfig& c = m.dit.cfg;
  const int64_t tokens = (latent_size / c.patch_size) * (latent_size / c.patch_size) + kCaptionTokens;
  state.counters["tokens"] = double(tokens);
  // Activations and workspace of one step, beyond what was held before it.
  state.counters["peak_act_MB"] = double(mem.total().peak - held_before) / 1e6;
  state.counters["s/step"] = benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate |
                                                         benchmark::Counter::kInvert);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (const char* t = std::getenv("ZIMAGE_THREADS")) zi::set_num_threads(std::atoi(t));
  benchmark::RegisterBenchmark("dit_step/tiny/64x64_latent", [](benchmark::State& s) { run(s, tiny_model_dir(), 64); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  if (const char* dir = std::getenv("ZIMAGE_BENCH_MODEL"); dir && *dir) {
    const std::string d = dir;
    benchmark::RegisterBenchmark("dit_step/bench_model/256px", [d](benchmark::State& s) { run(s, d, 32); })
        ->Unit(benchmark::kSecond)
        ->Iterations(1)
        ->UseRealTime();
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
