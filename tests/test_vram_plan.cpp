// The --vram planner (pipeline/memory_plan.h, plan_vram): choices, minimum, clamping, the
// automatic budget and predicted peaks within the budget, for the real model's sizes (from
// its configs, nothing loaded) across many budgets and image sizes.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/check.h"
#include "io/checkpoint.h"
#include "io/model_sources.h"
#include "models/controlnet.h"
#include "pipeline/memory_plan.h"
#include "pipeline/pipeline.h"
#include "edit_cases.h"
#include "test_util.h"

using namespace zi;

namespace {

constexpr int64_t kGiB = int64_t(1) << 30;

// The real Z-Image model's plan input at width × height (bf16 weights, 512 caption tokens).
VramPlanInput real_input(int width, int height, int64_t budget, int steps = 8) {
  VramPlanInput in;
  const DitConfig dc;
  const Qwen3Config tc;
  in.budget_bytes = budget;
  in.width = width;
  in.height = height;
  in.text.name = "text_encoder";
  in.text.fixed_bytes = 0;  // as the pipeline: the embedding table stays on the host
  in.text.block_bytes = qwen3_block_weight_bytes(tc, DType::BF16);
  in.text.activation_bytes = estimate_text_activation_bytes(tc, 512);
  in.dit.name = "transformer";
  in.dit.fixed_bytes = dit_fixed_weight_bytes(dc, DType::BF16);
  in.dit.block_bytes = dit_block_weight_bytes(dc, DType::BF16);
  in.dit.activation_bytes = estimate_denoise_activation_bytes(dc.dim, dc.ffn_hidden(), width, height, 512);
  in.dit.passes = steps;
  in.vae_weight_bytes = int64_t(100) << 20;
  in.latent_h = height / 8;
  in.latent_w = width / 8;
  in.h2d_bytes_per_second = 50e9;
  return in;
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

}  // namespace

TEST(VramPlan, RealModelSizesMatchTheCheckpoint) {
  // The transformer in bf16 is 6.15 B parameters: 11.5 GiB, 34 blocks (2 + 2 + 30).
  const DitConfig dc;
  const std::vector<int64_t> b = dit_block_weight_bytes(dc, DType::BF16);
  ASSERT_EQ(b.size(), 34u);
  const double total = double(sum(b) + dit_fixed_weight_bytes(dc, DType::BF16)) / kGiB;
  EXPECT_GT(total, 11.2);
  EXPECT_LT(total, 11.8);
  EXPECT_LT(b[2], b[0]);  // the context refiner has no adaLN
  // q8_0 is about half of bf16.
  EXPECT_LT(sum(dit_block_weight_bytes(dc, DType::Q8_0)), sum(b) * 6 / 10);
  // Qwen3-4B without its last layer: 35 layers.
  EXPECT_EQ(qwen3_block_weight_bytes(Qwen3Config{}, DType::BF16).size(), 35u);
}

// The encoder's GEMM warm-up runs in the text phase before its activations: its scratch is the
// largest projection (Qwen3-4B: gate/up, 9728 × 2560) with its input and output. At the default
// 512 tokens the activations are as large (119 MiB both); at a short --max-sequence-length the warm-up is larger, and the
// plan takes the larger (pipeline.cpp make_vram_plan).
TEST(VramPlan, TheEncoderWarmUpIsWithinTheTextPhase) {
  const Qwen3Config tc;
  EXPECT_EQ(qwen3_warm_up_bytes(tc, 16), 4 * (16 * 2560 + int64_t(9728) * 2560 + 16 * 9728));
  EXPECT_LE(qwen3_warm_up_bytes(tc, 512), estimate_text_activation_bytes(tc, 512));  // equal, as it happens
  EXPECT_GT(qwen3_warm_up_bytes(tc, 16), estimate_text_activation_bytes(tc, 16));
}

// The VAE's warm-up (a decode with zero weights while the encoder loads) is planned in the text
// phase only where the text phase and a decode fit within the denoise's peak: never for the tiny
// model (its text phase alone exceeds its denoise) unless forced, then its peak is the text
// phase's; not with ZI_WARM_VAE=0, nor before a tiled decode. At the real size and 1024², a
// 12 GiB budget has room for it and an 8 GiB one has not (the pipeline's comment says so).
TEST(VramPlan, TheVaeWarmUpIsPlannedInTheTextPhase) {
  GenerateOptions o;
  o.model_dir = test::tiny_model();
  o.prompt = "x";
  o.width = o.height = 256;
  o.text_encoder_device = o.transformer_device = o.vae_device = Device::CUDA;  // planned, not run
  const VramPlan plain = plan_generate_memory(o);
  EXPECT_FALSE(plain.vae_warm_up());
  ASSERT_GT(plain.vae_peak_bytes, 0);
  force_vae_warm_up(true);
  const VramPlan forced = plan_generate_memory(o);
  EXPECT_TRUE(forced.vae_warm_up());
  EXPECT_EQ(forced.text.predicted_peak_bytes, plain.text.predicted_peak_bytes + plain.vae_peak_bytes);
  EXPECT_NE(format_vram_plan(forced).find("warm-up"), std::string::npos);
  ::setenv("ZI_WARM_VAE", "0", 1);
  const VramPlan off = plan_generate_memory(o);
  ::unsetenv("ZI_WARM_VAE");
  EXPECT_FALSE(off.vae_warm_up());
  EXPECT_EQ(off.text.predicted_peak_bytes, plain.text.predicted_peak_bytes);
  o.vae_tile = 8;  // 64 px tiles: a tiled decode
  EXPECT_FALSE(plan_generate_memory(o).vae_warm_up());
  force_vae_warm_up(false);
  for (int gib : {12, 8}) {
    const VramPlan p = plan_vram(real_input(1024, 1024, gib * kGiB));
    EXPECT_EQ(p.text.predicted_peak_bytes + p.vae_peak_bytes <= p.dit.predicted_peak_bytes, gib == 12) << gib;
  }
}

// The warm-up's size: the image's when its decode fits the room, else (ZI_WARM_VAE_SMALL) the
// largest halving that fits, else none. At the real size, 1024² under 8 GiB, the room left by
// the text phase (its embedding table on the host) holds a 512² decode, not a 1024² one.
TEST(VramPlan, TheVaeWarmUpTakesTheLargestSizeThatFits) {
  const VaeConfig vae;
  const int64_t wb = int64_t(100) << 20;
  const int64_t whole = wb + vae_decode_peak_bytes(vae, 128, 128), half = wb + vae_decode_peak_bytes(vae, 64, 64);
  ASSERT_LT(half, whole);
  VaeWarmUpSize s = plan_vae_warm_up(vae, wb, 128, 128, whole, false);
  EXPECT_EQ(s.h, 128);
  EXPECT_EQ(s.bytes, whole);
  EXPECT_EQ(plan_vae_warm_up(vae, wb, 128, 128, whole - 1, false).h, 0);
  const int64_t wide = wb + vae_decode_peak_bytes(vae, 128, 96);
  s = plan_vae_warm_up(vae, wb, 128, 96, wide - 1, true);
  EXPECT_EQ(s.h, 64);
  EXPECT_EQ(s.w, 48);
  EXPECT_EQ(s.bytes, wb + vae_decode_peak_bytes(vae, 64, 48));
  EXPECT_EQ(plan_vae_warm_up(vae, wb, 128, 128, wb, true).h, 0);  // not even the smallest
  const VramPlan p = plan_vram(real_input(1024, 1024, 8 * kGiB));
  s = plan_vae_warm_up(vae, wb, 128, 128, p.dit.predicted_peak_bytes - p.text.predicted_peak_bytes, true);
  EXPECT_EQ(s.h, 64);
}

TEST(VramPlan, NoBudgetKeepsEverythingResident) {
  const VramPlan p = plan_vram(real_input(1024, 1024, -1));
  EXPECT_EQ(p.budget_bytes, -1);
  EXPECT_FALSE(p.streams());
  EXPECT_EQ(p.dit.streamed_blocks(), 0);
  EXPECT_EQ(p.vae_tile, 0);
  EXPECT_TRUE(p.notices.empty());
}

TEST(VramPlan, PredictedPeakStaysWithinEveryBudgetAndSize) {
  for (int side : {512, 768, 1024, 1536}) {
    int prev_resident = -1;
    int64_t prev_streamed = INT64_MAX;
    const int64_t minimum = plan_vram(real_input(side, side, -1)).minimum_bytes;
    for (double g : {2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0}) {
      const int64_t budget = int64_t(g * double(kGiB));
      if (budget < minimum) {
        EXPECT_THROW(plan_vram(real_input(side, side, budget)), UsageError) << side << " " << g;
        continue;
      }
      const VramPlan p = plan_vram(real_input(side, side, budget));
      SCOPED_TRACE(testing::Message() << side << "² at " << g << " GiB");
      EXPECT_EQ(p.budget_bytes, budget);
      EXPECT_LE(p.dit.predicted_peak_bytes, budget);
      EXPECT_LE(p.text.predicted_peak_bytes, budget);
      EXPECT_LE(p.vae_peak_bytes, budget);
      // More budget: never fewer resident blocks, never more streamed bytes.
      const int resident = int(p.dit.resident.size()) - p.dit.streamed_blocks();
      EXPECT_GE(resident, prev_resident);
      EXPECT_LE(p.dit.streamed_bytes_per_pass, prev_streamed);
      prev_resident = resident;
      prev_streamed = p.dit.streamed_bytes_per_pass;
      // Consistency: resident + streamed = all the weights; the pinned copy is what streams.
      const VramPlanInput in = real_input(side, side, budget);
      EXPECT_EQ(p.dit.resident_bytes + p.dit.streamed_bytes_per_pass, in.dit.fixed_bytes + sum(in.dit.block_bytes));
      EXPECT_EQ(p.dit.host_pinned_bytes, p.dit.streamed_bytes_per_pass);
      EXPECT_EQ(p.dit.streamed_bytes_phase, 8 * p.dit.streamed_bytes_per_pass);
      if (p.dit.ring_slots > 0) {
        EXPECT_GE(p.dit.ring_slots, 2);
        EXPECT_EQ(p.dit.prefetch, p.dit.ring_slots - 1);
        EXPECT_NEAR(p.dit.predicted_copy_seconds_per_pass, double(p.dit.streamed_bytes_per_pass) / 50e9, 1e-9);
      } else {
        EXPECT_EQ(p.dit.streamed_blocks(), 0);
      }
    }
  }
}

TEST(VramPlan, BudgetsAtTheDoneWhenPoints) {
  // 4 GiB at 1024²: the transformer streams most blocks, the text encoder streams too.
  const VramPlan p4 = plan_vram(real_input(1024, 1024, 4 * kGiB));
  EXPECT_GT(p4.dit.streamed_blocks(), 20);
  EXPECT_LT(p4.dit.streamed_blocks(), 34);
  EXPECT_GT(p4.text.streamed_blocks(), 0);
  // 12 GiB: all but a few transformer blocks resident, the text encoder (7.5 GiB) whole.
  const VramPlan p12 = plan_vram(real_input(1024, 1024, 12 * kGiB));
  EXPECT_GT(p12.dit.streamed_blocks(), 0);
  EXPECT_LE(p12.dit.streamed_blocks(), 6);
  EXPECT_EQ(p12.text.streamed_blocks(), 0);
  // 16 GiB: nothing streams.
  EXPECT_FALSE(plan_vram(real_input(1024, 1024, 16 * kGiB)).streams());
}

TEST(VramPlan, StreamedBlocksAreSpreadBetweenResidentOnes) {
  const VramPlan p = plan_vram(real_input(1024, 1024, 8 * kGiB));
  const std::vector<bool>& r = p.dit.resident;
  ASSERT_GT(p.dit.streamed_blocks(), 1);
  ASSERT_LT(p.dit.streamed_blocks(), int(r.size()) - 1);
  // No two streamed blocks in a row while resident ones remain to separate them.
  const int s = p.dit.streamed_blocks(), n = int(r.size());
  if (2 * s <= n) {
    for (int i = 0; i + 1 < n; ++i) EXPECT_FALSE(!r[size_t(i)] && !r[size_t(i) + 1]) << i;
  }
}

TEST(VramPlan, BudgetBelowTheMinimumNamesIt) {
  const VramPlan p = plan_vram(real_input(1024, 1024, -1));
  ASSERT_GT(p.minimum_bytes, kGiB);
  try {
    plan_vram(real_input(1024, 1024, p.minimum_bytes - 1));
    FAIL() << "no error";
  } catch (const UsageError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--vram"), std::string::npos) << m;
    EXPECT_NE(m.find("minimum"), std::string::npos) << m;
    EXPECT_NE(m.find("1024x1024"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
  EXPECT_NO_THROW(plan_vram(real_input(1024, 1024, p.minimum_bytes)));
  // A larger image needs more: its minimum is higher.
  EXPECT_GT(plan_vram(real_input(2048, 2048, -1)).minimum_bytes, p.minimum_bytes);
}

TEST(VramPlan, BudgetAboveTheCardIsClampedWithANotice) {
  VramPlanInput in = real_input(1024, 1024, 200 * kGiB);
  in.card_bytes = 80 * kGiB;
  const VramPlan p = plan_vram(in);
  EXPECT_TRUE(p.clamped);
  EXPECT_EQ(p.budget_bytes, 80 * kGiB);
  ASSERT_EQ(p.notices.size(), 1u);
  EXPECT_NE(p.notices[0].find("--vram"), std::string::npos);
  EXPECT_FALSE(p.streams());
}

TEST(VramPlan, WithoutABudgetTheFreeMemoryDecidesWhenTheModelDoesNotFit) {
  VramPlanInput in = real_input(1024, 1024, -1);
  in.free_bytes = 40 * kGiB;  // fits: everything resident, no budget
  EXPECT_EQ(plan_vram(in).budget_bytes, -1);
  in.free_bytes = 7 * kGiB;  // does not fit: free memory less the margin
  const VramPlan p = plan_vram(in);
  EXPECT_TRUE(p.automatic);
  EXPECT_EQ(p.budget_bytes, 7 * kGiB - vram_auto_margin(7 * kGiB));
  EXPECT_TRUE(p.streams());
  EXPECT_LE(p.dit.predicted_peak_bytes, p.budget_bytes);
  ASSERT_EQ(p.notices.size(), 1u);
  in.free_bytes = kGiB;  // not even streaming fits
  EXPECT_THROW(plan_vram(in), UsageError);
}

TEST(VramPlan, AnImageThatOnlyFitsWithATiledDecode) {
  // 2048² under 6 GiB: the untiled decode needs more, so the planner picks a tile.
  const VramPlanInput in = real_input(2048, 2048, 6 * kGiB, 1);
  const int64_t untiled = in.vae_weight_bytes + vae_decode_peak_bytes(in.vae, 256, 256);
  ASSERT_GT(untiled, 6 * kGiB);
  const VramPlan p = plan_vram(in);
  EXPECT_GT(p.vae_tile, 0);
  EXPECT_LT(p.vae_tile, 256);
  EXPECT_LE(p.vae_peak_bytes, 6 * kGiB);
  // Without a budget the decode is left as --vae-tile says.
  EXPECT_EQ(plan_vram(real_input(2048, 2048, -1, 1)).vae_tile, 0);
}

TEST(VramPlan, ReportNamesEveryPhase) {
  const std::string s = format_vram_plan(plan_vram(real_input(1024, 1024, 6 * kGiB)));
  EXPECT_NE(s.find("budget 6144.0 MiB"), std::string::npos) << s;
  EXPECT_NE(s.find("transformer"), std::string::npos) << s;
  EXPECT_NE(s.find("text_encoder"), std::string::npos) << s;
  EXPECT_NE(s.find("streamed"), std::string::npos) << s;
  EXPECT_NE(s.find("host pinned"), std::string::npos) << s;
  EXPECT_NE(s.find("copy floor"), std::string::npos) << s;
  EXPECT_NE(s.find("vae"), std::string::npos) << s;
}

// The plan generate() follows for the tiny model (nothing loaded). Its text encoder has two
// layers (a ring of two slots holds both) and a 9.7 MB embedding table, so the sweep that makes
// blocks stream runs the transformer alone on the GPU: tests/test_cuda_stream.cpp sweeps these
// budgets, between the minimum and what everything resident needs.
TEST(VramPlan, TinyModelBudgetsStreamTheTransformer) {
  for (int side : {128, 256}) {
    GenerateOptions o;
    o.model_dir = test::tiny_model();
    o.prompt = "x";
    o.width = o.height = side;
    o.steps = 3;
    o.transformer_device = Device::CUDA;  // planned, not run
    o.vram_bytes = int64_t(1) << 30;
    const VramPlan big = plan_generate_memory(o);
    EXPECT_FALSE(big.streams());
    EXPECT_TRUE(big.text.resident.empty());  // not on the GPU: not planned
    const int64_t whole = big.dit.predicted_peak_bytes;
    ASSERT_LT(big.minimum_bytes, whole) << side;
    int streamed = 0;
    for (int k = 0; k < 6; ++k) {
      o.vram_bytes = big.minimum_bytes + (whole - big.minimum_bytes) * k / 6;
      const VramPlan p = plan_generate_memory(o);
      streamed += p.dit.streamed_blocks() > 0;
      EXPECT_LE(p.dit.predicted_peak_bytes, o.vram_bytes);
    }
    EXPECT_EQ(streamed, 6) << side;
    o.vram_bytes = big.minimum_bytes - 1;
    EXPECT_THROW(plan_generate_memory(o), UsageError);
  }
}

// A ControlNet's weights are resident in the denoise phase: the plan counts them (file sizes of
// the tiny 2.1 fixture) and its streams, so the minimum budget and the resident part grow by at
// least the weights.
TEST(VramPlan, ControlNetIsCountedInTheDenoisePlan) {
  GenerateOptions o = test::edit_case_options(ZI_TEST_DATA, test::tiny_model(), "controlnet21");
  o.transformer_device = Device::CUDA;  // planned, not run
  o.text_encoder_device = o.vae_device = Device::CPU;
  o.vram_bytes = int64_t(1) << 30;
  const VramPlan with = plan_generate_memory(o);
  GenerateOptions plain = o;
  plain.controlnet.clear();
  plain.control_image.clear();
  const VramPlan without = plan_generate_memory(plain);
  const ModelSources src = resolve_model_sources({o.model_dir, "", "", ""});
  const int64_t cn_bytes = controlnet_weight_bytes(inspect_controlnet(o.controlnet, src.folder.transformer),
                                                   o.controlnet_dtype);
  EXPECT_GT(cn_bytes, 0);
  EXPECT_GE(with.dit.resident_bytes - without.dit.resident_bytes, cn_bytes);
  EXPECT_GE(with.minimum_bytes - without.minimum_bytes, cn_bytes);
  o.vram_bytes = with.minimum_bytes - 1;
  EXPECT_THROW(plan_generate_memory(o), UsageError);
}

// The image-conditioned modes' VAE-encode phase is planned: its weights and untiled peak (the
// estimate Edit.VaeEncoderPeakEstimateBoundsTheMeasuredPeak checks) count, and show in the report.
TEST(VramPlan, VaeEncoderIsCountedForImageInputs) {
  GenerateOptions o = test::edit_case_options(ZI_TEST_DATA, test::tiny_model(), "img2img_s60");
  o.vae_device = Device::CUDA;  // planned, not run
  o.text_encoder_device = o.transformer_device = Device::CPU;
  o.vram_bytes = int64_t(1) << 30;
  const VramPlan with = plan_generate_memory(o);
  GenerateOptions plain = o;
  plain.init_image.clear();
  const VramPlan without = plan_generate_memory(plain);
  const ModelFolder mf = open_model_folder(test::tiny_model());
  EXPECT_EQ(without.vae_encode_peak_bytes, 0);
  EXPECT_GT(with.vae_encode_peak_bytes, vae_encode_peak_bytes(mf.vae, o.height, o.width));  // + its weights
  EXPECT_GE(with.minimum_bytes, with.vae_encode_peak_bytes);
  EXPECT_NE(format_vram_plan(with).find("vae encoder"), std::string::npos);
  EXPECT_EQ(format_vram_plan(without).find("vae encoder"), std::string::npos);
}

// At the real size the encoder runs at full resolution and untiled: at 2048² it needs more than
// any other phase, so it sets the minimum, and a budget below it is refused naming it.
TEST(VramPlan, TheVaeEncoderCanSetTheMinimum) {
  auto with_encoder = [](int side, int64_t budget) {
    VramPlanInput in = real_input(side, side, budget);
    in.vae_encoder_weight_bytes = int64_t(70) << 20;
    in.encode_width = in.encode_height = side;
    return in;
  };
  for (int side : {1024, 2048}) {
    const VramPlan p = plan_vram(with_encoder(side, -1)), q = plan_vram(real_input(side, side, -1));
    std::printf("%d²: vae encoder %.2f GiB, minimum %.2f GiB (without the encoder %.2f GiB)\n", side,
                double(p.vae_encode_peak_bytes) / kGiB, double(p.minimum_bytes) / kGiB, double(q.minimum_bytes) / kGiB);
    EXPECT_EQ(p.minimum_bytes, std::max(q.minimum_bytes, p.vae_encode_peak_bytes));
  }
  const VramPlan p = plan_vram(with_encoder(2048, -1));
  ASSERT_EQ(p.minimum_bytes, p.vae_encode_peak_bytes);
  try {
    plan_vram(with_encoder(2048, p.minimum_bytes - 1));
    FAIL() << "a budget below the encoder's peak was accepted";
  } catch (const UsageError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--vram"), std::string::npos) << m;
    EXPECT_NE(m.find("VAE encoder"), std::string::npos) << m;
    EXPECT_NE(m.find("2048x2048"), std::string::npos) << m;
  }
  EXPECT_NO_THROW(plan_vram(with_encoder(2048, p.minimum_bytes)));
}
