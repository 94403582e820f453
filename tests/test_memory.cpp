// The memory plan's promises, measured with the allocator's accounting on the tiny model:
// each phase holds only what it needs, loading streams one tensor at a time, and the
// encoder of the VAE is never read.
#include <gtest/gtest.h>

#include <algorithm>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/lora.h"
#include "models/vae_decoder.h"
#include "models/zimage_dit.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

using namespace zi;

namespace {

int64_t largest_tensor_bytes(const TensorStore& s, int64_t elem_size, const std::string& prefix = "") {
  int64_t m = 0;
  for (const auto& f : s.files())
    for (const auto& t : f->tensors())
      if (t.name.starts_with(prefix)) m = std::max(m, t.numel() * elem_size);
  return m;
}

}  // namespace

TEST(MemoryPlan, VaeLoadPeakIsWeightsPlusOneTensor) {
  ModelFolder mf = open_model_folder(test::tiny_model());
  TensorStore store = TensorStore::open_dir(mf.vae_dir);
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t base = ms.total().current;
  for (DType dt : {DType::F32, DType::BF16}) {
    ms.reset_peaks();
    WeightLoader loader(store, Tag::VaeWeights, "vae");
    VaeDecoder vae = load_vae_decoder(loader, mf.vae, dt);
    loader.finish();
    const int64_t weights = ms.tag(Tag::VaeWeights).current;
    const int64_t peak = ms.total().peak - base;
    // Streaming: the final weights plus at most one tensor in flight (here none: the
    // conversion writes straight into the final buffer).
    EXPECT_LE(peak, weights + largest_tensor_bytes(store, 4, "decoder.")) << dtype_name(dt);
    EXPECT_GE(peak, weights);
    for (const std::string& n : store.reads()) EXPECT_TRUE(n.starts_with("decoder.")) << n;
  }
  EXPECT_EQ(ms.total().current, base);
}

TEST(MemoryPlan, LoraMergePeakIsWeightsPlusOneStagedTensor) {
  ModelFolder mf = open_model_folder(test::tiny_model());
  TensorStore store = TensorStore::open_dir(mf.transformer_dir);
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t base = ms.total().current;
  LoraSet loras(load_loras({{test::data_path("loras/tiny_lora_peft.safetensors"), 0.8f},
                            {test::data_path("loras/tiny_lora_kohya.safetensors"), 1.0f}}));
  const int64_t lora_bytes = ms.total().current - base;  // A and B in f32
  ms.reset_peaks();
  {
    WeightLoader loader(store, Tag::DitWeights, "transformer");
    loras.attach(loader);
    ZImageDit dit = load_zimage_dit(loader, mf.transformer, DType::BF16);
    loader.finish();
    loras.check_applied();
    const int64_t weights = ms.tag(Tag::DitWeights).current;
    const int64_t peak = ms.total().peak - base;
    // Base weights + the LoRA factors + one weight staged in f32 for its merge.
    EXPECT_LE(peak, weights + lora_bytes + largest_tensor_bytes(store, 4)) << "peak " << peak;
  }
}

TEST(MemoryPlan, EachPhaseStartsWithThePreviousComponentFreed) {
  GenerateOptions o;
  o.model_dir = test::tiny_model();
  o.prompt = "a cat";
  o.width = o.height = 64;
  o.steps = 2;
  o.seed = 3;
  o.guidance = 2.0f;  // both prompts go through the encoder
  MemoryStats& ms = memory_stats(Device::CPU);
  std::vector<std::pair<std::string, std::array<int64_t, 3>>> seen;
  GenerateHooks hooks;
  hooks.on_phase_start = [&](const std::string& p) {
    seen.push_back({p,
                    {ms.tag(Tag::TextWeights).current, ms.tag(Tag::DitWeights).current,
                     ms.tag(Tag::VaeWeights).current}});
  };
  const auto text0 = ms.tag(Tag::TextWeights).current, dit0 = ms.tag(Tag::DitWeights).current,
             vae0 = ms.tag(Tag::VaeWeights).current;
  GenerateResult r = generate(o, hooks);
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[1].first, "denoise");
  EXPECT_EQ(seen[1].second[0], text0);  // text encoder gone before the transformer loads
  EXPECT_EQ(seen[2].first, "decode");
  EXPECT_EQ(seen[2].second[1], dit0);  // transformer gone before the VAE loads
  EXPECT_EQ(ms.tag(Tag::VaeWeights).current, vae0);
  // Each phase's weights are its own component only.
  ModelFolder mf = open_model_folder(o.model_dir);
  for (const auto& p : r.phases) EXPECT_GT(p.weights_bytes, 0) << p.name;
  // What crosses a phase boundary is small: embeddings and latents only.
  EXPECT_LT(r.phases[0].end_bytes, 64 * 1024);
  EXPECT_LT(r.phases[1].end_bytes, 64 * 1024);
}

TEST(MemoryPlan, KeepModelsKeepsComponentsResidentAndGivesTheSameImage) {
  GenerateOptions o;
  o.model_dir = test::tiny_model();
  o.prompt = "a lighthouse";
  o.width = 64;
  o.height = 48;
  o.steps = 2;
  o.seed = 5;
  GenerateResult fresh = generate(o);
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t w0 = ms.weights_current();
  {
    ModelCache cache;
    GenerateResult a = generate(o, {}, &cache);
    const int64_t resident = ms.weights_current() - w0;
    EXPECT_GT(resident, 0);
    GenerateResult b = generate(o, {}, &cache);
    EXPECT_EQ(ms.weights_current() - w0, resident);  // nothing loaded twice
    EXPECT_EQ(a.rgb, fresh.rgb);
    EXPECT_EQ(b.rgb, fresh.rgb);
  }
  EXPECT_EQ(ms.weights_current(), w0);
}
