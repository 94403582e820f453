// End to end against the reference: the fixture cases run from their prompt, seed and
// settings (tests/data/expected/NAME.json) on the CPU in f32 activations with the bf16
// weights of the bundled tiny model. Tolerances: every step's latents within relative L2
// 1e-4, the final 8-bit image within max |diff| <= 1.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/png.h"
#include "io/safetensors.h"
#include "pipeline/memory_report.h"
#include "pipeline/pipeline.h"
#include "fixture_cases.h"
#include "test_util.h"

using namespace zi;

namespace {

GenerateOptions options_for_case(const std::string& name) {
  return test::fixture_case_options(ZI_TEST_DATA, test::tiny_model(), name);
}

void run_case(const std::string& name) {
  GenerateOptions o = options_for_case(name);
  SafetensorsFile ref = SafetensorsFile::open(test::data_path("expected/" + name + ".safetensors"));
  GenerateHooks hooks;
  int steps_seen = 0;
  hooks.on_latents = [&](int i, const Tensor& lat) {
    Tensor want = ref.load(str_cat("step", i, ".latents_after"), DType::F32);
    double e = test::rel_l2(lat, want.reshape(lat.shape()));
    EXPECT_LT(e, 1e-4) << name << " step " << i;
    ++steps_seen;
  };
  GenerateResult r = generate(o, hooks);
  EXPECT_EQ(steps_seen, o.steps);
  Tensor vae_out = ref.load("vae_out", DType::F32);
  EXPECT_LT(test::rel_l2(r.decoded, vae_out.reshape(r.decoded.shape())), 1e-4) << name;
  int w = 0, h = 0;
  std::vector<uint8_t> png = read_png_rgb(test::data_path("expected/" + name + ".png"), &w, &h);
  ASSERT_EQ(w, r.width);
  ASSERT_EQ(h, r.height);
  int maxd = 0;
  for (size_t i = 0; i < png.size(); ++i) maxd = std::max(maxd, std::abs(int(png[i]) - int(r.rgb[i])));
  EXPECT_LE(maxd, 1) << name;
  // The phases are reported in order, and the run's peak is the max over them, not the sum.
  ASSERT_EQ(r.phases.size(), 3u);
  EXPECT_EQ(r.phases[0].name, "encode");
  EXPECT_EQ(r.phases[1].name, "denoise");
  EXPECT_EQ(r.phases[2].name, "decode");
  int64_t mx = 0, sum = 0;
  for (const auto& p : r.phases) mx = std::max(mx, p.peak_bytes), sum += p.peak_bytes;
  EXPECT_EQ(r.peak_bytes, mx);
  EXPECT_LT(r.peak_bytes, sum);
}

}  // namespace

TEST(Pipeline, TurboCase) { run_case("turbo"); }
TEST(Pipeline, CfgCase) { run_case("cfg"); }
TEST(Pipeline, TruncatedCase) { run_case("truncated"); }
TEST(Pipeline, LoraCase) { run_case("lora"); }
TEST(Pipeline, OverrideCase) { run_case("override"); }

TEST(Pipeline, InitialNoiseMatchesTorch) {
  GenerateOptions o = options_for_case("turbo");
  SafetensorsFile ref = SafetensorsFile::open(test::data_path("expected/turbo.safetensors"));
  Tensor init = ref.load("init_latents", DType::F32);
  // The latents handed to the first step are the noise: check via step 0's input.
  Tensor x0 = ref.load("step0.x0", DType::F32);
  EXPECT_EQ(test::max_abs_diff(init.reshape(x0.shape()), x0), 0.0);
}

// Loading ahead (GenerateOptions::prefetch, issue 19), forced on the CPU: the transformer loads
// on its own thread during the encode and the VAE during the last step, the image is the
// phase-by-phase run's byte for byte, the reports name both loads, the transformer's weights
// are counted once, and the encode phase's peak holds both the encoder and the transformer (the
// reason Auto does it only within a --vram budget that holds both). Auto on the CPU: nothing.
TEST(Pipeline, PrefetchGivesTheSameImage) {
  GenerateOptions o = options_for_case("cfg");
  o.prefetch = GenerateOptions::Prefetch::Off;
  const GenerateResult plain = generate(o);
  EXPECT_TRUE(plain.prefetched.empty());
  o.prefetch = GenerateOptions::Prefetch::Auto;
  EXPECT_TRUE(generate(o).prefetched.empty()) << "Auto prefetches within a --vram budget only";
  o.prefetch = GenerateOptions::Prefetch::On;
  const GenerateResult r = generate(o);
  EXPECT_EQ(r.rgb, plain.rgb);
  ASSERT_EQ(r.prefetched.size(), 2u);
  EXPECT_EQ(r.prefetched[0].component, "transformer");
  EXPECT_EQ(r.prefetched[0].during, "encode");
  EXPECT_EQ(r.prefetched[1].component, "vae");
  EXPECT_EQ(r.prefetched[1].during, "denoise");
  for (const PrefetchRecord& p : r.prefetched) {
    EXPECT_GT(p.load_seconds, 0.0);
    EXPECT_GE(p.waited_seconds, 0.0);
  }
  int64_t dit_bytes = 0;
  int transformers = 0;
  for (const auto& [n, b] : r.component_weights)
    if (n == "transformer") dit_bytes = b, ++transformers;
  EXPECT_EQ(transformers, 1);
  for (const auto& [n, b] : plain.component_weights)
    if (n == "transformer") EXPECT_EQ(dit_bytes, b);
  EXPECT_GE(r.phases[0].peak_bytes, plain.phases[0].peak_bytes + dit_bytes);
  nlohmann::json j = nlohmann::json::parse(memory_report_json(r));
  ASSERT_EQ(j["prefetched"].size(), 2u);
  EXPECT_EQ(j["prefetched"][0]["component"], "transformer");
  EXPECT_GE(j["prefetched"][0]["overlapped_seconds"].get<double>(), 0.0);
}

TEST(Pipeline, MemoryReportJson) {
  GenerateOptions o = options_for_case("turbo");
  GenerateResult r = generate(o);
  nlohmann::json j = nlohmann::json::parse(memory_report_json(r));
  ASSERT_EQ(j["phases"].size(), 3u);
  for (const auto& p : j["phases"]) {
    EXPECT_EQ(p["device"], "cpu");
    EXPECT_GT(p["weights_bytes"].get<int64_t>(), 0);
    EXPECT_GE(p["peak_bytes"].get<int64_t>(), p["weights_bytes"].get<int64_t>());
    EXPECT_GE(p["seconds"].get<double>(), 0.0);
  }
  EXPECT_EQ(j["peak_bytes"].get<int64_t>(), r.peak_bytes);
  EXPECT_GT(j["peak_rss_bytes"].get<int64_t>(), 0);
  EXPECT_EQ(j["pinned_cache_bytes"].get<int64_t>(), 0);  // the CPU keeps no pinned blocks
}

TEST(Pipeline, RejectsBadSizesBeforeAllocating) {
  GenerateOptions o = options_for_case("turbo");
  for (auto [w, h] : std::vector<std::pair<int, int>>{{100, 64}, {0, 64}, {-16, 64}, {64, 65536}}) {
    o.width = w;
    o.height = h;
    EXPECT_THROW(validate_generate_options(o), UsageError) << w << "x" << h;
  }
  o.width = o.height = 64;
  o.steps = 0;
  EXPECT_THROW(validate_generate_options(o), UsageError);
  o.steps = 4;
  o.guidance = NAN;
  EXPECT_THROW(validate_generate_options(o), UsageError);
}
