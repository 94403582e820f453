// --vram on the GPU (issue 13) with the tiny model: budgets between the planner's minimum and
// what everything resident needs force the transformer's and the text encoder's blocks to
// stream through the ring; every image must be byte-identical to the resident run's (with the
// same VAE tile, the only other thing a budget changes), and the measured device peak of every
// GPU phase within the budget, across budgets and sizes. Also: a budget below the minimum is
// an error naming it, one above the card is clamped with a notice. Skips without a GPU.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <utility>
#include <vector>
#include <nlohmann/json.hpp>

#include "backends/device.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/qwen3_encoder.h"
#include "models/zimage_dit.h"
#include "ops/ops.h"
#include "core/check.h"
#include "edit_cases.h"
#include "pipeline/memory_report.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

using namespace zi;

namespace {

#define ZI_REQUIRE_GPU() \
  if (!device::gpu_available()) GTEST_SKIP() << "no CUDA GPU"

std::string tiny_model_dir() {
  const char* e = std::getenv("ZI_TINY_MODEL_DIR");
  return e ? e : ZI_TINY_MODEL;
}

GenerateOptions options(int side, bool cfg) {
  GenerateOptions o;
  o.model_dir = tiny_model_dir();
  o.prompt = "a red fox in the snow";
  o.width = o.height = side;
  o.steps = 3;
  o.seed = 7;
  if (cfg) o.guidance = 2.0f;
  o.text_encoder_device = o.transformer_device = o.vae_device = Device::CUDA;
  o.precision = DType::BF16;
  return o;
}

constexpr int64_t kMiB = int64_t(1) << 20;

}  // namespace

// The transformer alone on the GPU (the tiny text encoder cannot stream below what it needs
// whole: see VramPlan.TinyModelBudgetsStreamTheTransformer): six budgets from the minimum up.
TEST(CudaStream, BudgetsGiveTheResidentImageWithinTheirPeak) {
  ZI_REQUIRE_GPU();
  for (int side : {128, 256}) {
    for (bool cfg : {false, true}) {
      GenerateOptions o = options(side, cfg);
      o.text_encoder_device = o.vae_device = Device::CPU;
      const std::vector<uint8_t> want = generate(o).rgb;
      GenerateOptions big = o;
      big.vram_bytes = 1024 * kMiB;
      const VramPlan whole_plan = plan_generate_memory(big);
      const int64_t minimum = whole_plan.minimum_bytes, whole = whole_plan.dit.predicted_peak_bytes;
      ASSERT_LT(minimum, whole);
      for (int k = 0; k < 6; ++k) {
        GenerateOptions b = o;
        b.vram_bytes = minimum + (whole - minimum) * k / 6;
        SCOPED_TRACE(testing::Message() << side << "², cfg " << cfg << ", budget " << b.vram_bytes);
        const GenerateResult r = generate(b);
        ASSERT_TRUE(r.vram_plan);
        EXPECT_EQ(r.vram_plan->budget_bytes, b.vram_bytes);
        EXPECT_GT(r.vram_plan->dit.streamed_blocks(), 0);
        // Every streamed block crossed once per pass: steps × (1 + cfg) passes.
        EXPECT_GE(r.streamed_bytes, r.vram_plan->dit.streamed_bytes_per_pass * o.steps * (cfg ? 2 : 1));
        for (const PhaseRecord& p : r.gpu_phases) EXPECT_LE(p.peak_bytes, b.vram_bytes) << p.name;
        EXPECT_EQ(r.rgb, want);
        std::printf("%d² cfg %d budget %.3f MiB: transformer %d/%zu blocks streamed, ring %d, gpu peak %.3f MiB, "
                    "streamed %.2f MiB\n",
                    side, int(cfg), double(b.vram_bytes) / kMiB, r.vram_plan->dit.streamed_blocks(),
                    r.vram_plan->dit.resident.size(), r.vram_plan->dit.ring_slots, double(r.gpu_peak_bytes) / kMiB,
                    double(r.streamed_bytes) / kMiB);
      }
    }
  }
}

// Every phase on the GPU under budgets that fit: the plan's VAE tile, the peak within budget,
// the image the resident run makes with that tile.
TEST(CudaStream, AllPhasesUnderABudget) {
  ZI_REQUIRE_GPU();
  for (int side : {128, 256}) {
    GenerateOptions o = options(side, false);
    GenerateOptions big = o;
    big.vram_bytes = 1024 * kMiB;
    const int64_t minimum = plan_generate_memory(big).minimum_bytes;
    for (int64_t budget : {minimum, minimum + minimum / 2, 4 * minimum}) {
      GenerateOptions b = o;
      b.vram_bytes = budget;
      const GenerateResult r = generate(b);
      for (const PhaseRecord& p : r.gpu_phases) EXPECT_LE(p.peak_bytes, budget) << p.name << " " << side;
      GenerateOptions t = o;
      t.vae_tile = r.vae_tile_used;
      EXPECT_EQ(r.rgb, generate(t).rgb) << side << " " << budget;
    }
  }
}

// The streamer on the GPU directly: the tiny text encoder's and transformer's blocks all
// streamed (2 and 3 slots) give the bits of the resident GPU load.
TEST(CudaStream, StreamedModelsOnTheGpuGiveTheResidentBits) {
  ZI_REQUIRE_GPU();
  const ModelFolder mf = open_model_folder(tiny_model_dir());
  const PhaseContext ctx = PhaseContext::on(Device::CUDA, DType::BF16);
  auto encoder = [&](int slots) {
    TensorStore store = TensorStore::open_dir(mf.text_encoder_dir);
    WeightLoader ld(store, Tag::TextWeights, "text_encoder", ctx);
    if (slots) ld.set_streamed_blocks(std::vector<bool>(size_t(mf.text_encoder.num_hidden_layers - 1), true), slots);
    Qwen3Encoder m = load_qwen3_encoder(ld, mf.text_encoder, DType::BF16);
    ld.finish();
    return m;
  };
  auto dit = [&](int slots) {
    TensorStore store = TensorStore::open_dir(mf.transformer_dir);
    WeightLoader ld(store, Tag::DitWeights, "transformer", ctx);
    const size_t n = size_t(2 * mf.transformer.n_refiner_layers + mf.transformer.n_layers);
    if (slots) ld.set_streamed_blocks(std::vector<bool>(n, true), slots);
    ZImageDit m = load_zimage_dit(ld, mf.transformer, DType::BF16);
    ld.finish();
    return m;
  };
  auto bytes = [](const Tensor& t) {
    const Tensor h = ops::to_host_f32(t);
    return std::vector<float>(h.f32(), h.f32() + h.numel());
  };
  const std::vector<int32_t> ids = {151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198};
  const std::vector<float> want_text = bytes(qwen3_encode(encoder(0), ids));
  Tensor latent = Tensor::zeros({mf.transformer.in_channels, 1, 16, 16}, DType::F32);
  for (int64_t i = 0; i < latent.numel(); ++i) latent.f32()[i] = float(i % 17) / 17.0f - 0.5f;
  Tensor cap = Tensor::zeros({6, mf.transformer.cap_feat_dim}, DType::F32);
  for (int64_t i = 0; i < cap.numel(); ++i) cap.f32()[i] = float(i % 13) / 13.0f - 0.5f;
  const ZImageDit resident = dit(0);
  const std::vector<float> want0 = bytes(dit_forward(resident, latent, 0.25f, cap));
  const std::vector<float> want1 = bytes(dit_forward(resident, latent, 0.75f, cap));
  for (int slots : {2, 3}) {
    const Qwen3Encoder e = encoder(slots);
    ASSERT_TRUE(e.streamer);
    EXPECT_EQ(bytes(qwen3_encode(e, ids)), want_text) << slots;
    EXPECT_EQ(bytes(qwen3_encode(e, ids)), want_text) << slots;
    const ZImageDit d = dit(slots);
    ASSERT_TRUE(d.streamer);
    EXPECT_EQ(bytes(dit_forward(d, latent, 0.25f, cap)), want0) << slots;
    EXPECT_EQ(bytes(dit_forward(d, latent, 0.75f, cap)), want1) << slots;
  }
}

TEST(CudaStream, KeepModelsKeepsTheStreamedModels) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options(128, false);
  o.text_encoder_device = o.vae_device = Device::CPU;
  const std::vector<uint8_t> want = generate(o).rgb;
  GenerateOptions big = o;
  big.vram_bytes = 1024 * kMiB;
  o.vram_bytes = plan_generate_memory(big).minimum_bytes;
  ModelCache cache;
  const GenerateResult a = generate(o, {}, &cache);
  ASSERT_TRUE(a.vram_plan->streams());
  ASSERT_TRUE(cache.transformer && cache.transformer->streamer);
  const GenerateResult b = generate(o, {}, &cache);
  EXPECT_EQ(a.rgb, want);
  EXPECT_EQ(b.rgb, want);
}

// --keep-models with every phase on the GPU under tight budgets: the cached components the
// next phase does not use count against its budget, so some are released (with a notice) and the
// measured peak of every phase stays within the budget, image after image, with the image of the
// same budget without a cache.
TEST(CudaStream, KeepModelsStaysWithinTheBudget) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options(128, false);
  GenerateOptions big = o;
  big.vram_bytes = 1024 * kMiB;
  const int64_t minimum = plan_generate_memory(big).minimum_bytes;
  for (int64_t budget : {minimum, minimum + minimum / 2}) {
    GenerateOptions b = o;
    b.vram_bytes = budget;
    SCOPED_TRACE(testing::Message() << "budget " << budget);
    const std::vector<uint8_t> want = generate(b).rgb;
    ModelCache cache;
    std::vector<std::string> notices;
    GenerateHooks h;
    h.on_notice = [&](const std::string& n) { notices.push_back(n); };
    for (int image = 0; image < 2; ++image) {
      const GenerateResult r = generate(b, h, &cache);
      for (const PhaseRecord& p : r.gpu_phases) EXPECT_LE(p.peak_bytes, budget) << p.name << " image " << image;
      EXPECT_EQ(r.rgb, want) << "image " << image;
    }
    std::printf("keep-models budget %.2f MiB: %zu notices%s%s\n", double(budget) / kMiB, notices.size(),
                notices.empty() ? "" : ", first: ", notices.empty() ? "" : notices[0].c_str());
  }
}

TEST(CudaStream, BudgetTooSmallNamesTheMinimum) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options(256, false);
  o.vram_bytes = 1024 * kMiB;
  const int64_t minimum = generate(o).vram_plan->minimum_bytes;
  o.vram_bytes = minimum / 2;
  try {
    generate(o);
    FAIL() << "no error";
  } catch (const UsageError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--vram"), std::string::npos) << m;
    EXPECT_NE(m.find("minimum"), std::string::npos) << m;
  }
}

TEST(CudaStream, BudgetAboveTheCardIsClamped) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options(128, false);
  o.vram_bytes = device::memory_total_bytes(Device::CUDA) * 2;
  std::vector<std::string> notices;
  GenerateHooks h;
  h.on_notice = [&](const std::string& n) { notices.push_back(n); };
  const GenerateResult r = generate(o, h);
  EXPECT_TRUE(r.vram_plan->clamped);
  EXPECT_EQ(r.vram_plan->budget_bytes, device::memory_total_bytes(Device::CUDA));
  bool said = false;
  for (const std::string& n : notices) said |= n.find("--vram") != std::string::npos;
  EXPECT_TRUE(said);
  // The JSON report carries the plan.
  const nlohmann::json j = nlohmann::json::parse(memory_report_json(r));
  EXPECT_TRUE(j["vram_plan"]["clamped"].get<bool>());
}

TEST(CudaStream, PinnedRateIsMeasured) {
  ZI_REQUIRE_GPU();
  const double rate = device::measure_h2d_rate(Device::CUDA);
  std::printf("pinned host -> device: %.1f GB/s\n", rate / 1e9);
  EXPECT_GT(rate, 1e9);  // any PCIe 3 x16 or better
}

// The image-conditioned modes under budgets (tests/data/edit cases on the GPU): the ControlNet's
// weights and streams are counted in the denoise phase's plan, and every GPU phase (the VAE
// encoder's included) stays within the budget, with the resident run's image (same VAE tile).
TEST(CudaStream, EditModesUnderABudget) {
  ZI_REQUIRE_GPU();
  const char* d = std::getenv("ZI_TEST_DATA_DIR");
  const std::string data = d ? d : ZI_TEST_DATA;
  for (const char* name : {"controlnet21", "controlnet_inpaint", "img2img_s60"}) {
    GenerateOptions o = test::edit_case_options(data, tiny_model_dir(), name);
    o.text_encoder_device = o.transformer_device = o.vae_device = Device::CUDA;
    o.precision = DType::BF16;
    GenerateOptions big = o;
    big.vram_bytes = 1024 * kMiB;
    const VramPlan whole = plan_generate_memory(big);
    const int64_t minimum = whole.minimum_bytes;
    // Half way to the transformer's resident peak streams some of its blocks; where another phase
    // (the VAE encode of a control image) sets the minimum above that peak, nothing can stream
    // and the minimum is the only budget.
    std::vector<int64_t> budgets{minimum};
    if (whole.dit.predicted_peak_bytes > minimum)
      budgets.push_back(minimum + (whole.dit.predicted_peak_bytes - minimum) / 2);
    for (int64_t budget : budgets) {
      SCOPED_TRACE(testing::Message() << name << ", budget " << budget);
      GenerateOptions b = o;
      b.vram_bytes = budget;
      const GenerateResult r = generate(b);
      for (const PhaseRecord& p : r.gpu_phases) EXPECT_LE(p.peak_bytes, budget) << p.name;
      GenerateOptions t = o;
      t.vae_tile = r.vae_tile_used;
      EXPECT_EQ(r.rgb, generate(t).rgb);
      std::printf("%s budget %.3f MiB: transformer %d/%zu blocks streamed, gpu peak %.3f MiB\n", name,
                  double(budget) / kMiB, r.vram_plan ? r.vram_plan->dit.streamed_blocks() : 0,
                  r.vram_plan ? r.vram_plan->dit.resident.size() : size_t(0), double(r.gpu_peak_bytes) / kMiB);
    }
  }
}

// Freed pinned blocks are kept for the next request of their size (device::free_pinned): after
// a streamed run they are accounted as Tag::PinnedCache, and the same plan again reuses them —
// the kept bytes do not grow, and the image is the same.
TEST(CudaStream, PinnedBlocksAreKeptForTheNextImage) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options(128, false);
  o.text_encoder_device = o.vae_device = Device::CPU;
  GenerateOptions big = o;
  big.vram_bytes = 1024 * kMiB;
  o.vram_bytes = plan_generate_memory(big).minimum_bytes;  // every block streams
  const GenerateResult a = generate(o);
  ASSERT_TRUE(a.vram_plan);
  ASSERT_GT(a.vram_plan->dit.streamed_blocks(), 0);
  const int64_t kept = memory_stats(Device::CPU).tag(Tag::PinnedCache).current;
  EXPECT_GE(kept, a.vram_plan->dit.host_pinned_bytes);
  const int64_t reused = device::pinned_blocks_reused();
  const GenerateResult b = generate(o);
  EXPECT_EQ(memory_stats(Device::CPU).tag(Tag::PinnedCache).current, kept);
  EXPECT_EQ(device::pinned_blocks_reused() - reused, int64_t(a.vram_plan->dit.streamed_blocks()));  // no block pinned anew
  EXPECT_EQ(b.rgb, a.rgb);
}

// One cache across images of different sizes under one budget (zimage serve --vram): a model
// kept from a differently planned image is loaded again under the new plan, so every phase stays
// within the budget and every image equals its uncached run's.
TEST(CudaStream, CacheAcrossSizesStaysWithinTheBudget) {
  ZI_REQUIRE_GPU();
  GenerateOptions big = options(256, false);
  big.vram_bytes = 1024 * kMiB;
  const int64_t budget = plan_generate_memory(big).minimum_bytes;  // the larger size's minimum
  ModelCache cache;
  for (int side : {128, 256, 128, 256}) {
    GenerateOptions b = options(side, false);
    b.vram_bytes = budget;
    SCOPED_TRACE(testing::Message() << side << "², budget " << budget);
    const GenerateResult r = generate(b, {}, &cache);
    for (const PhaseRecord& p : r.gpu_phases) EXPECT_LE(p.peak_bytes, budget) << p.name;
    GenerateOptions t = b;
    t.vae_tile = r.vae_tile_used;
    EXPECT_EQ(r.rgb, generate(t).rgb);
  }
}

// Issue 13 at the real size: budgets from the planner's minimum to 12 GiB and three image sizes
// on the real-size random model (ZI_REAL_MODEL_DIR: `zimage make-random-model --preset turbo
// --dtype bf16`; `bench/gpu/run_all.sh budget` sets it; skipped without it), 2 steps, every
// phase on the GPU: each measured phase peak within its budget, each image the resident run's
// with the same VAE tile.
TEST(CudaStream, RealSizeBudgetsAndSizesStayWithinTheBudget) {
  ZI_REQUIRE_GPU();
  const char* dir = std::getenv("ZI_REAL_MODEL_DIR");
  if (!dir || !*dir) GTEST_SKIP() << "ZI_REAL_MODEL_DIR not set";
  constexpr int64_t kGiB = int64_t(1) << 30;
  for (const auto& [w, h] : std::vector<std::pair<int, int>>{{512, 512}, {1024, 1024}, {1280, 768}}) {
    GenerateOptions o;
    o.model_dir = dir;
    o.prompt = "a lighthouse on a cliff at sunset";
    o.width = w;
    o.height = h;
    o.steps = 2;
    o.seed = 1;
    o.text_encoder_device = o.transformer_device = o.vae_device = Device::CUDA;
    o.precision = DType::BF16;
    std::map<int, std::vector<uint8_t>> resident;  // by VAE tile
    auto want = [&](int tile) -> const std::vector<uint8_t>& {
      if (!resident.count(tile)) {
        GenerateOptions r = o;
        r.vae_tile = tile;
        resident[tile] = generate(r).rgb;
      }
      return resident[tile];
    };
    (void)want(0);
    GenerateOptions big = o;
    big.vram_bytes = 64 * kGiB;
    const int64_t minimum = plan_generate_memory(big).minimum_bytes;
    for (int64_t budget : {minimum, 4 * kGiB, 6 * kGiB, 8 * kGiB, 12 * kGiB}) {
      if (budget < minimum) continue;
      GenerateOptions b = o;
      b.vram_bytes = budget;
      SCOPED_TRACE(testing::Message() << w << "x" << h << ", budget " << double(budget) / kMiB << " MiB");
      const GenerateResult r = generate(b);
      for (const PhaseRecord& p : r.gpu_phases) EXPECT_LE(p.peak_bytes, budget) << p.name;
      EXPECT_EQ(r.rgb, want(r.vae_tile_used));
      std::printf("real size %dx%d budget %.0f MiB: transformer %d/%zu streamed, text encoder %d streamed, "
                  "vae tile %d px, gpu peak %.0f MiB\n",
                  w, h, double(budget) / kMiB, r.vram_plan->dit.streamed_blocks(), r.vram_plan->dit.resident.size(),
                  r.vram_plan->text.streamed_blocks(), r.vae_tile_used * 8, double(r.gpu_peak_bytes) / kMiB);
    }
  }
}
