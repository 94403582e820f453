// generate_batch (zimage serve's pipeline call): images of one size and step count denoised as
// one DiT batch are byte-identical to generate()'s one-at-a-time images on the CPU, whatever
// their prompts, seeds and caption lengths; an image cancelled mid-batch drops out at a step
// boundary without disturbing the others; items that cannot share a batch are refused.
#include <gtest/gtest.h>

#include <atomic>

#include "core/check.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

using namespace zi;

namespace {

GenerateOptions tiny(const std::string& prompt, uint64_t seed) {
  GenerateOptions o;
  o.model_dir = test::tiny_model();
  o.prompt = prompt;
  o.seed = seed;
  o.width = o.height = 64;
  o.steps = 3;
  return o;
}

}  // namespace

TEST(GenerateBatch, EqualsOneAtATimeByteForByte) {
  const std::vector<GenerateOptions> opts = {
      tiny("a red fox", 1), tiny("a lighthouse on a cliff at dawn, oil painting, dramatic sky", 2),
      tiny("a red fox", 3), tiny("x", 4)};
  std::vector<BatchItem> items;
  for (const auto& o : opts) items.push_back({o, nullptr});
  ModelCache cache;
  int steps_seen = 0, active_max = 0;
  BatchHooks hooks;
  hooks.on_step = [&](int, int, double, int active) {
    ++steps_seen;
    active_max = std::max(active_max, active);
  };
  const std::vector<BatchItemResult> res = generate_batch(items, hooks, cache);
  ASSERT_EQ(res.size(), opts.size());
  EXPECT_EQ(steps_seen, 3);
  EXPECT_EQ(active_max, 4);  // all four in every step
  for (size_t i = 0; i < opts.size(); ++i) {
    ASSERT_FALSE(res[i].error) << i;
    ASSERT_FALSE(res[i].cancelled) << i;
    const GenerateResult one = generate(opts[i]);
    EXPECT_EQ(res[i].result.width, 64);
    EXPECT_EQ(res[i].result.rgb, one.rgb) << "image " << i << " differs from generate()'s";
    EXPECT_EQ(res[i].result.prompt_ids, one.prompt_ids);
  }
  // The models stayed in the cache; a second batch loads nothing and gives the same pixels.
  ASSERT_TRUE(cache.transformer && cache.text_encoder && cache.vae);
  const std::vector<BatchItemResult> again = generate_batch({items[1], items[0]}, {}, cache);
  EXPECT_EQ(again[0].result.rgb, res[1].result.rgb);
  EXPECT_EQ(again[1].result.rgb, res[0].result.rgb);
  for (double s : again[0].result.load_seconds) EXPECT_EQ(s, 0.0);
}

TEST(GenerateBatch, CfgItemsEqualOneAtATime) {
  GenerateOptions a = tiny("a boat", 5), b = tiny("a tree in a field", 6);
  for (GenerateOptions* o : {&a, &b}) o->guidance = 2.5f;
  a.negative_prompt = "blurry";
  ModelCache cache;
  const auto res = generate_batch({{a, nullptr}, {b, nullptr}}, {}, cache);
  EXPECT_EQ(res[0].result.rgb, generate(a).rgb);
  EXPECT_EQ(res[1].result.rgb, generate(b).rgb);
}

TEST(GenerateBatch, CancelledImageDropsOutAtAStep) {
  std::atomic<bool> cancel{false};
  const GenerateOptions a = tiny("kept", 7), b = tiny("cancelled", 8);
  std::vector<BatchItem> items = {{a, nullptr}, {b, &cancel}};
  BatchHooks hooks;
  std::vector<int> active;
  hooks.on_step = [&](int step, int, double, int act) {
    active.push_back(act);
    if (step == 1) cancel.store(true);
  };
  ModelCache cache;
  const auto res = generate_batch(items, hooks, cache);
  EXPECT_EQ(active, (std::vector<int>{2, 1, 1}));
  EXPECT_TRUE(res[1].cancelled);
  EXPECT_TRUE(res[1].result.rgb.empty());
  ASSERT_FALSE(res[0].cancelled);
  EXPECT_EQ(res[0].result.rgb, generate(a).rgb);
}

TEST(GenerateBatch, RefusesItemsThatCannotShareABatch) {
  ModelCache cache;
  GenerateOptions a = tiny("a", 1), b = tiny("b", 2);
  b.width = 128;
  EXPECT_THROW(generate_batch({{a, nullptr}, {b, nullptr}}, {}, cache), UsageError);
  b = tiny("b", 2);
  b.steps = 4;
  EXPECT_THROW(generate_batch({{a, nullptr}, {b, nullptr}}, {}, cache), UsageError);
}
