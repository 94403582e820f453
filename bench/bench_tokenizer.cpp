// Qwen2 BPE tokenizer throughput (spec §1): a ~512-token English prompt (the pipeline's
// max_sequence_length), a CJK prompt, a short chat prompt, and the tokenizer.json load.
// Run: build/bench/bench_tokenizer
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "text/bpe_tokenizer.h"

namespace {

// The bundled model's tokenizer, found from this source file (bench targets get no data macros).
std::string tokenizer_dir() {
  std::string here = __FILE__;
  return here.substr(0, here.find_last_of('/') + 1) + "../models/tiny-zimage/tokenizer";
}

const zi::BpeTokenizer& tok() {
  static const zi::BpeTokenizer t = zi::BpeTokenizer::load_dir(tokenizer_dir());
  return t;
}

// Repeats `unit` until the chat-templated prompt reaches about `tokens` ids.
std::string prompt_of(const std::string& unit, size_t tokens) {
  std::string p;
  while (zi::tokenize_zimage_prompt(tok(), p, 1 << 20).size() < tokens) p += unit;
  return p;
}

const std::string kEnglish =
    "A highly detailed photograph of an old lighthouse standing on a rocky cliff at sunset, waves crashing "
    "below, seagulls circling overhead, warm golden light, dramatic clouds, 35mm film grain, shallow depth of "
    "field, award-winning composition. ";
const std::string kCjk =
    "一只橘色的小猫坐在窗台上，窗外下着小雨，柔和的光线照在它的毛发上，"
    "背景是模糊的城市街景，水彩画风格，高细节。";

void run(benchmark::State& state, const std::string& prompt) {
  size_t n = 0;
  for (auto _ : state) {
    std::vector<int32_t> ids = zi::tokenize_zimage_prompt(tok(), prompt, 1 << 20);
    n = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.counters["tokens"] = double(n);
  state.counters["bytes"] = double(prompt.size());
  state.counters["tokens/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Encode_English512(benchmark::State& state) { run(state, prompt_of(kEnglish, 512)); }
void BM_Encode_CJK512(benchmark::State& state) { run(state, prompt_of(kCjk, 512)); }
void BM_Encode_ShortPrompt(benchmark::State& state) { run(state, "A red fox standing in fresh snow, watercolor"); }

void BM_LoadTokenizerJson(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(zi::BpeTokenizer::load_dir(tokenizer_dir()).vocab_size());
}

}  // namespace

BENCHMARK(BM_Encode_English512)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Encode_CJK512)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Encode_ShortPrompt)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_LoadTokenizerJson)->Unit(benchmark::kMillisecond)->Iterations(3);

BENCHMARK_MAIN();
