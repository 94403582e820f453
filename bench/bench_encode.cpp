// Text encoder throughput: one 512-token prompt through qwen3_encode (weights loaded once,
// outside the timing). Always runs the bundled tiny model; with ZIMAGE_BENCH_MODEL=DIR (a
// diffusers folder, e.g. a real-size random model) it also runs that one, once per repetition.
//   build/bench/bench_encode [--benchmark_filter=tiny]
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/parallel.h"
#include "io/checkpoint.h"
#include "pipeline/text_phase.h"

namespace {

namespace fs = std::filesystem;

// ../models/tiny-zimage next to this source file; else ./models/tiny-zimage (run from a copy of
// the repository root whose path differs from the build's).
std::string tiny_model_dir() {
  const fs::path p = fs::path(__FILE__).parent_path().parent_path() / "models" / "tiny-zimage";
  if (fs::exists(p / "model_index.json")) return p.string();
  return "models/tiny-zimage";
}

struct Loaded {
  zi::ModelFolder mf;
  zi::Qwen3Encoder enc;
  std::vector<int32_t> ids;  // exactly 512 ids: a long prompt truncated like the pipeline
};

const Loaded& load(const std::string& dir) {
  static std::map<std::string, std::unique_ptr<Loaded>> cache;
  auto& slot = cache[dir];
  if (!slot) {
    slot = std::make_unique<Loaded>();
    slot->mf = zi::open_model_folder(dir);
    slot->enc = zi::load_text_encoder(slot->mf, zi::DType::BF16);
    const zi::BpeTokenizer tok = zi::BpeTokenizer::load_dir(slot->mf.tokenizer_dir);
    std::string prompt;
    while (prompt.size() < 8000) prompt += "A red fox standing in fresh snow under a pale winter sky, watercolor. ";
    slot->ids = zi::tokenize_zimage_prompt(tok, prompt, 512);
  }
  return *slot;
}

void run(benchmark::State& state, const std::string& dir) {
  const Loaded& m = load(dir);
  for (auto _ : state) {
    zi::Tensor out = zi::qwen3_encode(m.enc, m.ids);
    benchmark::DoNotOptimize(out.raw());
  }
  // Matmul FLOPs per token: 2 · (params of the used layers), attention excluded.
  const auto& c = m.mf.text_encoder;
  const double H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const double per_layer = H * D * (2.0 * c.num_attention_heads + 2.0 * c.num_key_value_heads) + 3.0 * H * I;
  const double flops = 2.0 * per_layer * (c.num_hidden_layers - 1) * double(m.ids.size());
  state.counters["tokens"] = double(m.ids.size());
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tok/s"] = benchmark::Counter(double(m.ids.size()), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (const char* t = std::getenv("ZIMAGE_THREADS")) zi::set_num_threads(std::atoi(t));
  benchmark::RegisterBenchmark("encode512/tiny", [](benchmark::State& s) { run(s, tiny_model_dir()); })
      ->Unit(benchmark::kMillisecond);
  if (const char* dir = std::getenv("ZIMAGE_BENCH_MODEL"); dir && *dir) {
    const std::string d = dir;
    benchmark::RegisterBenchmark("encode512/bench_model", [d](benchmark::State& s) { run(s, d); })
        ->Unit(benchmark::kSecond)
        ->Iterations(1)
        ->UseRealTime();
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
