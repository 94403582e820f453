// VAE decoder speed and accounted peak (spec §5): the bundled tiny model on a 40×24 latent,
// and the real Z-Image VAE shape (block_out_channels [128, 256, 512, 512]) with random bf16
// weights made in memory, whole and tiled (vae_decode_tiled: exact, several times the compute).
// Counters: peak_MB is the accounting allocator's peak above what was held before the decode;
// est_MB is vae_decode(_tiled)_peak_bytes.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>

#include "core/allocator.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/vae_decoder.h"
#include "pipeline/memory_plan.h"

using namespace zi;

namespace {

std::string tiny_vae_dir() {
  return (std::filesystem::path(__FILE__).parent_path() / "../models/tiny-zimage/vae").lexically_normal().string();
}

Tensor random_f32(const Shape& shape, float scale, float offset, std::mt19937& rng) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = offset + scale * nd(rng);
  return t;
}

// Kernels ~ N(0, 1/fan_in) in bf16 keep activations O(1) through the 30-odd layers; norm
// weights near 1, biases near 0.
VaeDecoder random_decoder(const VaeConfig& cfg) {
  std::mt19937 rng(7);
  return bind_vae_decoder(cfg, [&](const std::string& name, const Shape& s, bool is_matrix) {
    if (is_matrix) {
      const int64_t fan_in = shape_numel(s) / s[0];
      return random_f32(s, 1.0f / std::sqrt(float(fan_in)), 0.0f, rng).to(DType::BF16, Tag::VaeWeights);
    }
    const bool norm_weight = name.ends_with("weight");
    return random_f32(s, 0.05f, norm_weight ? 1.0f : 0.0f, rng).clone(Tag::VaeWeights);
  });
}

struct Tiny {
  TensorStore store = TensorStore::open_dir(tiny_vae_dir());
  VaeDecoder m;
  Tiny() {
    WeightLoader loader(store, Tag::VaeWeights, "vae");
    const std::string cfg_path = tiny_vae_dir() + "/config.json";
    m = load_vae_decoder(loader, parse_vae_config(read_text_file(cfg_path), cfg_path), DType::BF16);
    loader.finish();
  }
};

// Runs `decode` each iteration and reports the accounted peak of the last one.
template <class F>
void run(benchmark::State& state, F&& decode, int64_t estimate) {
  MemoryStats& ms = memory_stats(Device::CPU);
  int64_t peak = 0;
  for (auto _ : state) {
    const int64_t before = ms.total().current;
    ms.reset_peaks();
    Tensor img = decode();
    benchmark::DoNotOptimize(img.raw());
    peak = ms.total().peak - before;
  }
  state.counters["peak_MB"] = double(peak) / 1e6;
  state.counters["est_MB"] = double(estimate) / 1e6;
}

void BM_VaeDecodeTiny(benchmark::State& state) {
  static Tiny tiny;
  std::mt19937 rng(1);
  const Tensor z = random_f32({tiny.m.cfg.latent_channels, 40, 24}, 1.0f, 0.0f, rng);
  run(state, [&] { return vae_decode(tiny.m, z); }, vae_decode_peak_bytes(tiny.m.cfg, 40, 24));
}

// Arguments: latent side, tile (0: whole), plan (-1: the one vae_decode_tiled chooses, else an
// index into vae_tile_plans: 0 = checkpoints {0}, 1 = {0, 1}, 2 = {0, 2}, 3 = {0, 1, 2}).
// macs_x: the plan's convolution multiply-adds over the whole decode's.
void BM_VaeDecodeReal(benchmark::State& state) {
  static const VaeDecoder m = random_decoder(VaeConfig{});
  const int side = int(state.range(0)), tile = int(state.range(1)), plan = int(state.range(2));
  std::mt19937 rng(2);
  const Tensor z = random_f32({m.cfg.latent_channels, side, side}, 1.0f, 0.0f, rng);
  if (tile == 0) {
    run(state, [&] { return vae_decode(m, z); }, vae_decode_peak_bytes(m.cfg, side, side));
    return;
  }
  const std::vector<VaeTilePlan> plans = vae_tile_plans(m.cfg, side, side, tile);
  const VaeTilePlan& p =
      plan >= 0 ? plans.at(size_t(plan)) : *std::find_if(plans.begin(), plans.end(), [](const auto& q) { return q.chosen; });
  run(state, [&] { return vae_decode_tiled_with(m, z, tile, p.checkpoints); }, p.peak_bytes);
  state.counters["macs_x"] = p.macs / vae_decode_macs(m.cfg, side, side);
  state.counters["checkpoints"] = double(p.checkpoints.size());
}

}  // namespace

BENCHMARK(BM_VaeDecodeTiny)->Unit(benchmark::kMillisecond)->UseRealTime();
// 32×32 latent → 256×256 image, whole and in tiles of 16 latent pixels (2 × 2 tiles) with the
// chosen plan ({0, 1, 2}) and with the plain one ({0}: every pass from the head's output);
// 64×64 → 512×512, whole and in tiles of 32. One iteration each: a tiled decode takes minutes
// on two cores.
BENCHMARK(BM_VaeDecodeReal)
    ->Args({32, 0, -1})
    ->Args({32, 16, -1})
    ->Args({32, 16, 0})
    ->Args({64, 0, -1})
    ->Args({64, 32, -1})
    ->Unit(benchmark::kSecond)
    ->UseRealTime()
    ->Iterations(1);

BENCHMARK_MAIN();
