// LoRA loading and merging and the transformer override (src/models/lora.*): key conversion
// of every layout of spec §7.2 (fixture files and small synthetic ones), alpha and
// lora_adapter_metadata scaling (§7.3), the merge W += s·f·B·A (§7.4) against a plain loop,
// malformed files, --lora parsing, the §6.8 override remap, and the fixture cases `lora` and
// `override` through the tiny DiT.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <string>

#include "core/check.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/lora.h"
#include "models/zimage_dit.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace zi;

namespace {

using test::TempDir;

using Tensors = std::vector<std::pair<std::string, Tensor>>;

Tensor randn(const Shape& shape, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(size_t(shape_numel(shape)));
  for (float& x : v) x = dist(rng);
  return Tensor::from_vector(v, shape);
}

Tensor scalar(float v) { return Tensor::from_vector({v}, {}); }

std::string lora_path(const std::string& name) { return test::data_path("loras/" + name); }
std::string tiny_transformer() { return test::tiny_model() + "/transformer"; }

using test::error_of;

const LoraDelta* find_delta(const LoraFile& f, const std::string& target) {
  for (const LoraDelta& d : f.deltas)
    if (d.target == target) return &d;
  return nullptr;
}

std::vector<std::string> targets_of(const LoraFile& f) {
  std::vector<std::string> v;
  for (const LoraDelta& d : f.deltas) v.push_back(d.target);
  std::sort(v.begin(), v.end());
  return v;
}

// Writes `tensors` as a LoRA file and loads it (scale 1).
LoraFile load_written(const TempDir& d, const Tensors& tensors, const std::map<std::string, std::string>& meta = {}) {
  const std::string path = d / "l.safetensors";
  write_safetensors(path, tensors, meta);
  return load_lora({path, 1.0f});
}

std::string load_error(const TempDir& d, const Tensors& tensors) {
  return error_of([&] { load_written(d, tensors); });
}

// A pair of random A [r, in], B [out, r] under the given key names.
Tensors pair(const std::string& a_key, const std::string& b_key, int64_t r = 2, int64_t in = 64, int64_t out = 64,
             uint32_t seed = 1) {
  return {{a_key, randn({r, in}, seed)}, {b_key, randn({out, r}, seed + 100)}};
}

Tensors operator+(Tensors a, const Tensors& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// W + Σ s·f·B·A with double accumulation.
Tensor reference_merge(const Tensor& w, const std::vector<std::pair<const LoraDelta*, float>>& deltas) {
  Tensor out = w.clone();
  const int64_t rows = w.dim(0), cols = w.dim(1);
  for (const auto& [d, s] : deltas)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < d->A.dim(0); ++k)
          acc += double(d->B.f32()[i * d->B.dim(1) + k]) * double(d->A.f32()[k * cols + j]);
        out.f32()[i * cols + j] += float(double(s) * double(d->factor) * acc);
      }
  return out;
}

DitConfig tiny_config() {
  const std::string path = tiny_transformer() + "/config.json";
  return parse_dit_config(read_text_file(path), path);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// --lora parsing

TEST(LoraArg, FileAndScale) {
  LoraSpec s = parse_lora_arg("style.safetensors");
  EXPECT_EQ(s.path, "style.safetensors");
  EXPECT_EQ(s.scale, 1.0f);
  s = parse_lora_arg("style.safetensors:0.8");
  EXPECT_EQ(s.path, "style.safetensors");
  EXPECT_FLOAT_EQ(s.scale, 0.8f);
  s = parse_lora_arg("/x/a:b/style.safetensors");  // ':' inside the path, no scale
  EXPECT_EQ(s.path, "/x/a:b/style.safetensors");
  EXPECT_EQ(s.scale, 1.0f);
  s = parse_lora_arg("/x/a:b/style.safetensors:-0.5");
  EXPECT_EQ(s.path, "/x/a:b/style.safetensors");
  EXPECT_FLOAT_EQ(s.scale, -0.5f);
  s = parse_lora_arg("dir:v2.safetensors");  // a file name holding ':'
  EXPECT_EQ(s.path, "dir:v2.safetensors");
  s = parse_lora_arg("a.safetensors:1e-1");
  EXPECT_FLOAT_EQ(s.scale, 0.1f);
}

TEST(LoraArg, BadScaleIsAUsageErrorNamingTheFlag) {
  for (const char* arg : {"style.safetensors:abc", "style.safetensors:", "style.safetensors:nan",
                          "style.safetensors:0.8x", ":0.8", ""}) {
    try {
      parse_lora_arg(arg);
      ADD_FAILURE() << "no error for '" << arg << "'";
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("--lora"), std::string::npos) << e.what();
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fixture files

TEST(LoraFormats, PeftFixture) {
  const LoraFile f = load_lora({lora_path("tiny_lora_peft.safetensors"), 0.8f});
  EXPECT_EQ(f.scale, 0.8f);
  ASSERT_EQ(f.deltas.size(), 28u);  // 7 blocks × to_q/to_k/to_v/to_out.0
  EXPECT_TRUE(f.ignored.empty());
  for (const char* t : {"layers.0.attention.to_q.weight", "layers.2.attention.to_out.0.weight",
                        "noise_refiner.1.attention.to_k.weight", "context_refiner.0.attention.to_v.weight"}) {
    const LoraDelta* d = find_delta(f, t);
    ASSERT_NE(d, nullptr) << t;
    EXPECT_EQ(d->A.shape(), (Shape{4, 64}));
    EXPECT_EQ(d->B.shape(), (Shape{64, 4}));
    EXPECT_EQ(d->A.dtype(), DType::F32);
    EXPECT_EQ(d->factor, 1.0f);  // no alpha: alpha = rank
  }
  // Values are the file's bf16 values, exactly.
  const SafetensorsFile raw = SafetensorsFile::open(lora_path("tiny_lora_peft.safetensors"));
  const LoraDelta* d = find_delta(f, "layers.1.attention.to_v.weight");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->key, "transformer.layers.1.attention.to_v.lora_A.weight");
  EXPECT_EQ(test::max_abs_diff(d->A, raw.load("transformer.layers.1.attention.to_v.lora_A.weight", DType::F32)), 0.0);
  EXPECT_EQ(test::max_abs_diff(d->B, raw.load("transformer.layers.1.attention.to_v.lora_B.weight", DType::F32)), 0.0);
}

TEST(LoraFormats, KohyaFixture) {
  const LoraFile f = load_lora({lora_path("tiny_lora_kohya.safetensors"), 1.0f});
  ASSERT_EQ(f.deltas.size(), 35u);  // 7 blocks × w1/w2/w3/to_q/to_out.0
  const LoraDelta* d = find_delta(f, "layers.0.attention.to_out.0.weight");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->key, "lora_unet_layers_0_attention_to_out_0.lora_down.weight");
  EXPECT_FLOAT_EQ(d->factor, 0.5f);  // alpha 4 / rank 8
  EXPECT_EQ(d->A.shape(), (Shape{8, 64}));
  for (const char* t : {"layers.2.feed_forward.w2.weight", "context_refiner.1.feed_forward.w1.weight",
                        "noise_refiner.0.attention.to_q.weight", "noise_refiner.1.feed_forward.w3.weight"})
    EXPECT_NE(find_delta(f, t), nullptr) << t;
  const LoraDelta* w2 = find_delta(f, "context_refiner.0.feed_forward.w2.weight");
  ASSERT_NE(w2, nullptr);
  EXPECT_EQ(w2->A.shape(), (Shape{8, 170}));
  EXPECT_EQ(w2->B.shape(), (Shape{64, 8}));
}

// ---------------------------------------------------------------------------------------
// Synthetic files: one per layout of spec §7.2

TEST(LoraFormats, PeftWithAdapterName) {
  TempDir d;
  // ".default." triggers the converter; with or without the transformer. prefix.
  LoraFile f = load_written(d, pair("layers.0.attention.to_q.lora_A.default.weight",
                                    "layers.0.attention.to_q.lora_B.default.weight") +
                                   pair("transformer.layers.1.attention.to_k.lora_A.default.weight",
                                        "transformer.layers.1.attention.to_k.lora_B.default.weight"));
  EXPECT_EQ(targets_of(f), (std::vector<std::string>{"layers.0.attention.to_q.weight", "layers.1.attention.to_k.weight"}));
  EXPECT_EQ(f.deltas[0].factor, 1.0f);
}

TEST(LoraFormats, DiffusionModelPrefixUnderscoreStyle) {
  TempDir d;
  LoraFile f = load_written(
      d, pair("diffusion_model.layers.0.attention.to_q.lora_A.weight", "diffusion_model.layers.0.attention.to_q.lora_B.weight") +
             pair("diffusion_model.layers.1.attention.out.lora_down.weight",
                  "diffusion_model.layers.1.attention.out.lora_up.weight", 4) +
             Tensors{{"diffusion_model.layers.1.attention.out.alpha", scalar(2.0f)}} +
             pair("diffusion_model.layers.2.feed_forward.w1.lora_down.weight",
                  "diffusion_model.layers.2.feed_forward.w1.lora_up.weight", 2, 64, 170));
  EXPECT_EQ(targets_of(f), (std::vector<std::string>{"layers.0.attention.to_q.weight", "layers.1.attention.to_out.0.weight",
                                                     "layers.2.feed_forward.w1.weight"}));
  EXPECT_EQ(find_delta(f, "layers.0.attention.to_q.weight")->factor, 1.0f);
  EXPECT_FLOAT_EQ(find_delta(f, "layers.1.attention.to_out.0.weight")->factor, 0.5f);  // bare out → to_out.0, 2/4
  EXPECT_EQ(find_delta(f, "layers.2.feed_forward.w1.weight")->factor, 1.0f);           // no alpha
}

TEST(LoraFormats, LoraABWithAlphaKeys) {
  TempDir d;
  LoraFile f = load_written(d, pair("transformer.layers.0.attention.to_v.lora_A.weight",
                                    "transformer.layers.0.attention.to_v.lora_B.weight", 8) +
                                   Tensors{{"transformer.layers.0.attention.to_v.alpha", scalar(2.0f)}});
  ASSERT_EQ(f.deltas.size(), 1u);
  EXPECT_EQ(f.deltas[0].target, "layers.0.attention.to_v.weight");
  EXPECT_FLOAT_EQ(f.deltas[0].factor, 0.25f);
}

TEST(LoraFormats, KohyaModuleNames) {
  TempDir d;
  auto kohya = [](const std::string& m, int64_t in, int64_t out, float alpha) {
    return pair("lora_unet_" + m + ".lora_down.weight", "lora_unet_" + m + ".lora_up.weight", 4, in, out) +
           Tensors{{"lora_unet_" + m + ".alpha", scalar(alpha)}};
  };
  LoraFile f = load_written(d, kohya("noise_refiner_1_adaLN_modulation_0", 64, 256, 4) +
                                   kohya("all_final_layer_2-1_linear", 64, 64, 2) +
                                   kohya("all_final_layer_2-1_adaLN_modulation_1", 64, 64, 1) +
                                   kohya("t_embedder_mlp_0", 256, 1024, 8) + kohya("cap_embedder_1", 32, 64, 4) +
                                   kohya("all_x_embedder_2-1", 64, 64, 4) + kohya("layers_2_attention_to_k", 64, 64, 4) +
                                   kohya("context_refiner_1_attention_to_v", 64, 64, 4) +
                                   // fused qkv: diffusers drops it; zimage splits it into q, k, v rows
                                   kohya("layers_1_attention_qkv", 64, 192, 4) +
                                   kohya("layers_0_attention_to_out_0", 64, 64, 4));
  EXPECT_EQ(targets_of(f), (std::vector<std::string>{
                               "all_final_layer.2-1.adaLN_modulation.1.weight", "all_final_layer.2-1.linear.weight",
                               "all_x_embedder.2-1.weight", "cap_embedder.1.weight", "context_refiner.1.attention.to_v.weight",
                               "layers.0.attention.to_out.0.weight", "layers.1.attention.to_k.weight",
                               "layers.1.attention.to_q.weight", "layers.1.attention.to_v.weight",
                               "layers.2.attention.to_k.weight", "noise_refiner.1.adaLN_modulation.0.weight",
                               "t_embedder.mlp.0.weight"}));
  EXPECT_EQ(find_delta(f, "layers.1.attention.to_v.weight")->B.shape(), (Shape{64, 4}));
  EXPECT_FLOAT_EQ(find_delta(f, "layers.1.attention.to_v.weight")->factor, 1.0f);
  EXPECT_FLOAT_EQ(find_delta(f, "all_final_layer.2-1.linear.weight")->factor, 0.5f);
  EXPECT_FLOAT_EQ(find_delta(f, "t_embedder.mlp.0.weight")->factor, 2.0f);
  EXPECT_FLOAT_EQ(find_delta(f, "all_final_layer.2-1.adaLN_modulation.1.weight")->factor, 0.25f);
  EXPECT_TRUE(f.ignored.empty());
}

TEST(LoraFormats, KohyaBareOutIsToOutWithItsAlpha) {
  // diffusers drops the bare `out` pair (and then fails on its leftover alpha); it is the
  // original layout's name of to_out.0, which zimage applies, as ComfyUI does.
  TempDir d;
  LoraFile f = load_written(d, pair("lora_unet_layers_0_attention_out.lora_down.weight",
                                    "lora_unet_layers_0_attention_out.lora_up.weight") +
                                   pair("lora_unet_layers_0_attention_to_q.lora_down.weight",
                                        "lora_unet_layers_0_attention_to_q.lora_up.weight") +
                                   Tensors{{"lora_unet_layers_0_attention_out.alpha", scalar(1.0f)}});
  EXPECT_EQ(targets_of(f), (std::vector<std::string>{"layers.0.attention.to_out.0.weight", "layers.0.attention.to_q.weight"}));
  EXPECT_FLOAT_EQ(find_delta(f, "layers.0.attention.to_out.0.weight")->factor, 0.5f);  // 1 / rank 2
  // A bare out beside a to_out_0 of the same block: two keys for one weight, an error.
  const std::string msg = load_error(d, pair("lora_unet_layers_0_attention_out.lora_down.weight",
                                             "lora_unet_layers_0_attention_out.lora_up.weight") +
                                            pair("lora_unet_layers_0_attention_to_out_0.lora_down.weight",
                                                 "lora_unet_layers_0_attention_to_out_0.lora_up.weight"));
  EXPECT_NE(msg.find("both target layers.0.attention.to_out.0.weight"), std::string::npos) << msg;
}

TEST(LoraFormats, DotStyle) {
  TempDir d;
  LoraFile f = load_written(
      d, pair("diffusion_model.layers.0.attention.to.q.lora.down.weight", "diffusion_model.layers.0.attention.to.q.lora.up.weight", 4) +
             Tensors{{"diffusion_model.layers.0.attention.to_q.alpha", scalar(8.0f)}} +
             pair("diffusion_model.layers.0.feed_forward.w2.lora.down.weight",
                  "diffusion_model.layers.0.feed_forward.w2.lora.up.weight", 2, 170, 64) +
             pair("diffusion_model.layers.1.attention.qkv.lora.down.weight",
                  "diffusion_model.layers.1.attention.qkv.lora.up.weight", 2, 64, 192) +
             pair("diffusion_model.layers.0.attention.out.lora.down.weight",
                  "diffusion_model.layers.0.attention.out.lora.up.weight"));
  // diffusers drops the fused qkv and bare out entries; zimage applies them (split / to_out.0).
  EXPECT_EQ(targets_of(f), (std::vector<std::string>{"layers.0.attention.to_out.0.weight", "layers.0.attention.to_q.weight",
                                                     "layers.0.feed_forward.w2.weight", "layers.1.attention.to_k.weight",
                                                     "layers.1.attention.to_q.weight", "layers.1.attention.to_v.weight"}));
  EXPECT_FLOAT_EQ(find_delta(f, "layers.0.attention.to_q.weight")->factor, 2.0f);
  EXPECT_TRUE(f.ignored.empty());
  // A fused qkv beside a separate to_q of the same block: an error naming both keys.
  const std::string msg = load_error(
      d, pair("diffusion_model.layers.0.attention.to.q.lora.down.weight", "diffusion_model.layers.0.attention.to.q.lora.up.weight") +
             pair("diffusion_model.layers.0.attention.qkv.lora.down.weight",
                  "diffusion_model.layers.0.attention.qkv.lora.up.weight", 2, 64, 192));
  EXPECT_NE(msg.find("both target layers.0.attention.to_q.weight"), std::string::npos) << msg;
}

TEST(LoraFormats, PeftKeysOfOtherComponentsAreIgnored) {
  TempDir d;
  LoraFile f = load_written(d, pair("transformer.layers.0.attention.to_q.lora_A.weight",
                                    "transformer.layers.0.attention.to_q.lora_B.weight") +
                                   pair("text_encoder.layers.0.q_proj.lora_A.weight", "text_encoder.layers.0.q_proj.lora_B.weight"));
  EXPECT_EQ(f.deltas.size(), 1u);
  EXPECT_EQ(f.ignored.size(), 2u);
  // Nothing left for the transformer: an error naming the file.
  const std::string msg =
      load_error(d, pair("layers.0.attention.to_q.lora_A.weight", "layers.0.attention.to_q.lora_B.weight"));
  EXPECT_NE(msg.find("no transformer LoRA weights"), std::string::npos) << msg;
  EXPECT_NE(msg.find("l.safetensors"), std::string::npos) << msg;
}

TEST(LoraFormats, AdapterMetadataScales) {
  TempDir d;
  const std::string meta = R"({"transformer.r": 4, "transformer.lora_alpha": 8,
      "transformer.rank_pattern": {"layers.1.attention.to_k": 2},
      "transformer.alpha_pattern": {"^layers.1.attention.to_k": 1, "to_v": 2},
      "transformer.target_modules": ["to_q", "to_k", "to_v"]})";
  LoraFile f = load_written(
      d, pair("transformer.layers.0.attention.to_q.lora_A.weight", "transformer.layers.0.attention.to_q.lora_B.weight", 4) +
             pair("transformer.layers.1.attention.to_k.lora_A.weight", "transformer.layers.1.attention.to_k.lora_B.weight", 2) +
             pair("transformer.layers.1.attention.to_v.lora_A.weight", "transformer.layers.1.attention.to_v.lora_B.weight", 4),
      {{"lora_adapter_metadata", meta}});
  EXPECT_FLOAT_EQ(find_delta(f, "layers.0.attention.to_q.weight")->factor, 2.0f);  // 8 / 4
  EXPECT_FLOAT_EQ(find_delta(f, "layers.1.attention.to_k.weight")->factor, 0.5f);  // 1 / 2
  EXPECT_FLOAT_EQ(find_delta(f, "layers.1.attention.to_v.weight")->factor, 0.5f);  // 2 / 4

  // A rank the metadata contradicts is an error naming the key.
  write_safetensors(d / "m.safetensors",
                    pair("transformer.layers.0.attention.to_q.lora_A.weight", "transformer.layers.0.attention.to_q.lora_B.weight", 3),
                    {{"lora_adapter_metadata", R"({"transformer.r": 4, "transformer.lora_alpha": 4})"}});
  const std::string msg = error_of([&] { load_lora({d / "m.safetensors", 1.0f}); });
  EXPECT_NE(msg.find("transformer.layers.0.attention.to_q.lora_A.weight"), std::string::npos) << msg;

  // rslora: alpha / sqrt(r).
  write_safetensors(d / "r.safetensors",
                    pair("transformer.layers.0.attention.to_q.lora_A.weight", "transformer.layers.0.attention.to_q.lora_B.weight", 4),
                    {{"lora_adapter_metadata", R"({"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": true})"}});
  EXPECT_FLOAT_EQ(load_lora({d / "r.safetensors", 1.0f}).deltas[0].factor, 4.0f);
}

TEST(LoraFormats, PeftBiasDelta) {
  TempDir d;
  LoraFile f = load_written(d, pair("transformer.layers.0.adaLN_modulation.0.lora_A.weight",
                                    "transformer.layers.0.adaLN_modulation.0.lora_B.weight", 2, 64, 256) +
                                   Tensors{{"transformer.layers.0.adaLN_modulation.0.lora_B.bias", randn({256}, 9)}});
  ASSERT_EQ(f.deltas.size(), 1u);
  ASSERT_TRUE(f.deltas[0].bias.defined());
  EXPECT_EQ(f.deltas[0].bias_target(), "layers.0.adaLN_modulation.0.bias");
}

// ---------------------------------------------------------------------------------------
// Malformed files: zi::Error naming the key and the file

TEST(LoraErrors, MalformedFilesNameTheKey) {
  TempDir d;
  struct Case {
    const char* what;
    Tensors tensors;
    const char* key;
  };
  const std::vector<Case> cases = {
      {"mismatched ranks",
       {{"transformer.layers.0.attention.to_q.lora_A.weight", randn({4, 64}, 1)},
        {"transformer.layers.0.attention.to_q.lora_B.weight", randn({64, 3}, 2)}},
       "transformer.layers.0.attention.to_q.lora_B.weight"},
      {"missing B", {{"transformer.layers.0.attention.to_q.lora_A.weight", randn({4, 64}, 1)}},
       "transformer.layers.0.attention.to_q.lora_A.weight"},
      {"missing A", {{"transformer.layers.0.attention.to_q.lora_B.weight", randn({64, 4}, 1)}},
       "transformer.layers.0.attention.to_q.lora_B.weight"},
      {"missing kohya up",
       {{"lora_unet_layers_0_attention_to_q.lora_down.weight", randn({4, 64}, 1)},
        {"lora_unet_layers_0_attention_to_q.alpha", scalar(4)}},
       "lora_unet_layers_0_attention_to_q.lora_down.weight"},
      {"missing kohya down",
       pair("lora_unet_layers_0_attention_to_k.lora_down.weight", "lora_unet_layers_0_attention_to_k.lora_up.weight") +
           Tensors{{"lora_unet_layers_0_attention_to_q.lora_up.weight", randn({64, 4}, 1)}},
       "lora_unet_layers_0_attention_to_q.lora_up.weight"},
      {"3-D tensor",
       {{"transformer.layers.0.attention.to_q.lora_A.weight", randn({4, 64, 1}, 1)},
        {"transformer.layers.0.attention.to_q.lora_B.weight", randn({64, 4}, 2)}},
       "transformer.layers.0.attention.to_q.lora_A.weight"},
      {"non-scalar alpha",
       pair("lora_unet_layers_0_attention_to_q.lora_down.weight", "lora_unet_layers_0_attention_to_q.lora_up.weight") +
           Tensors{{"lora_unet_layers_0_attention_to_q.alpha", randn({2}, 3)}},
       "lora_unet_layers_0_attention_to_q.alpha"},
      {"DoRA",
       pair("transformer.layers.0.attention.to_q.lora_A.weight", "transformer.layers.0.attention.to_q.lora_B.weight") +
           Tensors{{"transformer.layers.0.attention.to_q.dora_scale", randn({1, 64}, 3)}},
       "transformer.layers.0.attention.to_q.dora_scale"},
      {"LoKr without w2", {{"lora_unet_layers_0_attention_to_q.lokr_w1", randn({8, 8}, 1)}}, "lora_unet_layers_0_attention_to_q"},
      {"LoHa without w1_b", {{"lora_unet_layers_0_attention_to_q.hada_w1_a", randn({64, 4}, 1)}},
       "lora_unet_layers_0_attention_to_q"},
      {"NaN alpha",
       pair("lora_unet_layers_0_attention_to_q.lora_down.weight", "lora_unet_layers_0_attention_to_q.lora_up.weight") +
           Tensors{{"lora_unet_layers_0_attention_to_q.alpha", scalar(std::nanf(""))}},
       "lora_unet_layers_0_attention_to_q.alpha"},
      {"stray tensor",
       pair("transformer.layers.0.attention.to_q.lora_A.weight", "transformer.layers.0.attention.to_q.lora_B.weight") +
           Tensors{{"transformer.layers.0.attention.to_q.weight", randn({64, 64}, 3)}},
       "transformer.layers.0.attention.to_q.weight"},
  };
  for (const Case& c : cases) {
    const std::string msg = load_error(d, c.tensors);
    EXPECT_NE(msg.find(c.key), std::string::npos) << c.what << ": " << msg;
    EXPECT_NE(msg.find("l.safetensors"), std::string::npos) << c.what << ": " << msg;
  }
}

// ---------------------------------------------------------------------------------------
// Merging through the WeightLoader

namespace {

// A one-weight "transformer": layers.0.attention.to_q.weight [out, in] and its bias.
struct OneWeight {
  TempDir dir;
  Tensor w, b;
  std::string path;
  OneWeight(int64_t out, int64_t in) : w(randn({out, in}, 42)), b(randn({out}, 43)) {
    path = dir / "model.safetensors";
    write_safetensors(path, {{"layers.0.attention.to_q.weight", w}, {"layers.0.attention.to_q.bias", b}});
  }
  // Loads the weight through a WeightLoader carrying `loras`; returns it in f32.
  Tensor load(const LoraSet& loras, DType dt = DType::F32, Tensor* bias = nullptr) const {
    TensorStore store = TensorStore::open_file(path);
    WeightLoader loader(store, Tag::DitWeights, "transformer");
    loras.attach(loader);
    Tensor out = loader.load("layers.0.attention.to_q.weight", w.shape(), dt);
    Tensor bb = loader.load("layers.0.attention.to_q.bias", b.shape(), DType::F32);
    if (bias) *bias = bb;
    loader.finish();
    return out.dtype() == DType::F32 ? out : out.to(DType::F32);
  }
};

LoraFile write_and_load(const TempDir& d, const std::string& name, const Tensors& t, float scale) {
  write_safetensors(d / name, t);
  return load_lora({d / name, scale});
}

}  // namespace

TEST(LoraMerge, MatchesAPlainLoop) {
  OneWeight m(48, 40);
  TempDir d;
  LoraFile f = write_and_load(d, "k.safetensors",
                              pair("lora_unet_layers_0_attention_to_q.lora_down.weight",
                                   "lora_unet_layers_0_attention_to_q.lora_up.weight", 6, 40, 48, 7) +
                                  Tensors{{"lora_unet_layers_0_attention_to_q.alpha", scalar(3.0f)}},
                              0.7f);
  ASSERT_EQ(f.deltas.size(), 1u);
  EXPECT_FLOAT_EQ(f.deltas[0].factor, 0.5f);
  LoraSet set({f});
  const Tensor merged = m.load(set);
  const Tensor ref = reference_merge(m.w, {{&set.files()[0].deltas[0], 0.7f}});
  const double err = test::rel_l2(merged, ref);
  EXPECT_LE(err, 1e-6);
  EXPECT_GT(test::rel_l2(m.w, ref), 1e-2);  // the delta is not negligible
  set.check_applied();
  // Rounded once to bf16 at the end.
  const Tensor bf = m.load(set, DType::BF16);
  EXPECT_EQ(test::max_abs_diff(bf, merged.to(DType::BF16).to(DType::F32)), 0.0);
}

TEST(LoraMerge, ScalesOfTwoFilesAddUp) {
  OneWeight m(32, 24);
  TempDir d;
  LoraFile f1 = write_and_load(d, "a.safetensors",
                               pair("transformer.layers.0.attention.to_q.lora_A.weight",
                                    "transformer.layers.0.attention.to_q.lora_B.weight", 4, 24, 32, 11),
                               0.8f);
  LoraFile f2 = write_and_load(d, "b.safetensors",
                               pair("lora_unet_layers_0_attention_to_q.lora_down.weight",
                                    "lora_unet_layers_0_attention_to_q.lora_up.weight", 8, 24, 32, 12) +
                                   Tensors{{"lora_unet_layers_0_attention_to_q.alpha", scalar(4.0f)}},
                               -1.25f);
  LoraSet set({f1, f2});
  {
    TensorStore store = TensorStore::open_file(m.path);
    WeightLoader loader(store, Tag::DitWeights, "transformer");
    EXPECT_EQ(set.attach(loader), (std::vector<std::string>{"layers.0.attention.to_q.weight"}));
  }
  const Tensor merged = m.load(set);
  const Tensor ref = reference_merge(m.w, {{&set.files()[0].deltas[0], 0.8f}, {&set.files()[1].deltas[0], -1.25f}});
  EXPECT_LE(test::rel_l2(merged, ref), 1e-6);
  // The same as two sets applied one after the other: scale 0 removes a file's effect.
  LoraFile f1_off = f1;
  f1_off.scale = 0.0f;
  const Tensor only2 = m.load(LoraSet({f1_off, f2}));
  EXPECT_LE(test::rel_l2(only2, reference_merge(m.w, {{&set.files()[1].deltas[0], -1.25f}})), 1e-6);
}

TEST(LoraMerge, BiasDelta) {
  OneWeight m(16, 8);
  TempDir d;
  const Tensor db = randn({16}, 5);
  LoraSet set({write_and_load(d, "b.safetensors",
                              pair("transformer.layers.0.attention.to_q.lora_A.weight",
                                   "transformer.layers.0.attention.to_q.lora_B.weight", 2, 8, 16) +
                                  Tensors{{"transformer.layers.0.attention.to_q.lora_B.bias", db}},
                              0.5f)});
  Tensor bias;
  m.load(set, DType::F32, &bias);
  for (int64_t i = 0; i < 16; ++i) EXPECT_FLOAT_EQ(bias.f32()[i], m.b.f32()[i] + 0.5f * db.f32()[i]);
  set.check_applied();
}

TEST(LoraMerge, WrongShapeForTheWeightNamesTheKey) {
  OneWeight m(16, 8);
  TempDir d;
  LoraSet set({write_and_load(d, "w.safetensors",
                              pair("lora_unet_layers_0_attention_to_q.lora_down.weight",
                                   "lora_unet_layers_0_attention_to_q.lora_up.weight", 2, 9, 16),
                              1.0f)});
  const std::string msg = error_of([&] { m.load(set); });
  EXPECT_NE(msg.find("lora_unet_layers_0_attention_to_q.lora_down.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("w.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[16, 8]"), std::string::npos) << msg;
}

TEST(LoraMerge, TargetMatchingNoWeightIsReportedAfterLoading) {
  OneWeight m(16, 8);
  TempDir d;
  LoraSet set({write_and_load(d, "n.safetensors",
                              pair("transformer.layers.0.attention.to_q.lora_A.weight",
                                   "transformer.layers.0.attention.to_q.lora_B.weight", 2, 8, 16) +
                                  pair("transformer.layers.7.attention.to_k.lora_A.weight",
                                       "transformer.layers.7.attention.to_k.lora_B.weight", 2, 8, 16),
                              1.0f)});
  m.load(set);
  const std::string msg = error_of([&] { set.check_applied(); });
  EXPECT_NE(msg.find("transformer.layers.7.attention.to_k.lora_A.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("layers.7.attention.to_k.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("n.safetensors"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("layers.0.attention.to_q"), std::string::npos) << msg;  // that one was applied

  // The same as one line for the run's warning (or --lora-strict's error).
  const std::string report = set.unmatched_report();
  EXPECT_NE(report.find("1 adapter tensor match"), std::string::npos) << report;
  EXPECT_NE(report.find("transformer.layers.7.attention.to_k.lora_A.weight"), std::string::npos) << report;

  // A fused qkv is split into to_q/to_k/to_v; here only to_q exists.
  LoraSet qkv({write_and_load(d, "q.safetensors",
                              pair("diffusion_model.layers.0.attention.qkv.lora_down.weight",
                                   "diffusion_model.layers.0.attention.qkv.lora_up.weight", 2, 8, 48),
                              1.0f)});
  m.load(qkv);
  const std::string qmsg = error_of([&] { qkv.check_applied(); });
  EXPECT_NE(qmsg.find("2 of 3 LoRA targets"), std::string::npos) << qmsg;
  EXPECT_NE(qmsg.find("layers.0.attention.to_k.weight"), std::string::npos) << qmsg;
}

TEST(LoraMerge, EmptySetIsANoOp) {
  OneWeight m(8, 8);
  LoraSet none;
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(test::max_abs_diff(m.load(none), m.w), 0.0);
  none.check_applied();
}

// ---------------------------------------------------------------------------------------
// Transformer override

TEST(Override, SingleFileNamesMapToDiffusers) {
  const std::map<std::string, std::string> cases = {
      {"model.diffusion_model.final_layer.linear.weight", "all_final_layer.2-1.linear.weight"},
      {"diffusion_model.final_layer.adaLN_modulation.1.bias", "all_final_layer.2-1.adaLN_modulation.1.bias"},
      {"x_embedder.weight", "all_x_embedder.2-1.weight"},
      {"model.diffusion_model.layers.3.attention.out.weight", "layers.3.attention.to_out.0.weight"},
      {"layers.3.attention.out.bias", "layers.3.attention.to_out.0.bias"},
      {"noise_refiner.0.attention.q_norm.weight", "noise_refiner.0.attention.norm_q.weight"},
      {"context_refiner.1.attention.k_norm.weight", "context_refiner.1.attention.norm_k.weight"},
      // diffusers names are left alone
      {"all_final_layer.2-1.linear.weight", "all_final_layer.2-1.linear.weight"},
      {"all_x_embedder.2-1.bias", "all_x_embedder.2-1.bias"},
      {"layers.1.attention.to_out.0.weight", "layers.1.attention.to_out.0.weight"},
      {"diffusion_model.layers.1.feed_forward.w2.weight", "layers.1.feed_forward.w2.weight"},
  };
  for (const auto& [from, to] : cases) EXPECT_EQ(override_tensor_name(from), to) << from;
  const std::string msg = error_of([] { override_tensor_name("model.diffusion_model.layers.0.attention.qkv.weight"); });
  EXPECT_NE(msg.find("layers.0.attention.qkv.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not supported"), std::string::npos) << msg;
}

namespace {

// The override fixture rewritten with `rename` applied to its names (and `edit` to the list).
std::string rewritten_override(const TempDir& d, const std::function<std::string(const std::string&)>& rename,
                               const std::function<void(Tensors&)>& edit = {}) {
  const SafetensorsFile f = SafetensorsFile::open(lora_path("tiny_transformer_override.safetensors"));
  Tensors t;
  for (const TensorInfo& i : f.tensors()) t.emplace_back(rename(i.name), f.load(i.name));
  if (edit) edit(t);
  const std::string path = d / "override.safetensors";
  write_safetensors(path, t);
  return path;
}

std::string load_with_override_error(const std::string& path) {
  return error_of([&] {
    TensorStore base = TensorStore::open_dir(tiny_transformer());
    TensorStore ov = TensorStore::open_file(path);
    WeightLoader loader(base, Tag::DitWeights, "transformer");
    attach_transformer_override(loader, ov);
    load_zimage_dit(loader, tiny_config(), DType::BF16);
    loader.finish();
  });
}

}  // namespace

TEST(Override, PrefixedNamesReplaceTheBaseWeights) {
  TempDir d;
  const std::string path = rewritten_override(d, [](const std::string& n) {
    std::string s = "diffusion_model." + n;
    if (n.starts_with("all_final_layer.2-1.")) s = "model.diffusion_model.final_layer." + n.substr(20);
    if (n.ends_with(".attention.to_out.0.weight"))  // "….attention.out.weight"
      s = "diffusion_model." + n.substr(0, n.size() - std::string("to_out.0.weight").size()) + "out.weight";
    if (n.ends_with(".attention.norm_q.weight"))  // "….attention.q_norm.weight"
      s = "diffusion_model." + n.substr(0, n.size() - std::string("norm_q.weight").size()) + "q_norm.weight";
    return s;
  });
  TensorStore base = TensorStore::open_dir(tiny_transformer());
  TensorStore ov = TensorStore::open_file(path);
  WeightLoader loader(base, Tag::DitWeights, "transformer");
  attach_transformer_override(loader, ov);
  const ZImageDit m = load_zimage_dit(loader, tiny_config(), DType::F32);
  loader.finish();  // every override tensor matched
  const SafetensorsFile ref = SafetensorsFile::open(lora_path("tiny_transformer_override.safetensors"));
  EXPECT_EQ(test::max_abs_diff(m.layers[1].to_out, ref.load("layers.1.attention.to_out.0.weight", DType::F32)), 0.0);
  EXPECT_EQ(test::max_abs_diff(m.final_w, ref.load("all_final_layer.2-1.linear.weight", DType::F32)), 0.0);
  EXPECT_EQ(test::max_abs_diff(m.layers[1].norm_q, ref.load("layers.1.attention.norm_q.weight", DType::F32)), 0.0);
  // Untouched weights come from the base.
  const SafetensorsFile b = SafetensorsFile::open(tiny_transformer() + "/diffusion_pytorch_model.safetensors");
  EXPECT_EQ(test::max_abs_diff(m.layers[0].to_out, b.load("layers.0.attention.to_out.0.weight", DType::F32)), 0.0);
}

TEST(Override, WrongShapeOrUnmatchedNameIsAnError) {
  TempDir d;
  std::string msg = load_with_override_error(rewritten_override(
      d, [](const std::string& n) { return n; },
      [](Tensors& t) {
        for (auto& [name, x] : t)
          if (name == "layers.1.feed_forward.w1.weight") x = Tensor::zeros({170, 63}, DType::BF16);
      }));
  EXPECT_NE(msg.find("layers.1.feed_forward.w1.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[170, 63]"), std::string::npos) << msg;

  msg = load_with_override_error(rewritten_override(
      d, [](const std::string& n) { return n; },
      [](Tensors& t) { t.emplace_back("layers.9.attention.to_q.weight", Tensor::zeros({64, 64}, DType::BF16)); }));
  EXPECT_NE(msg.find("layers.9.attention.to_q.weight"), std::string::npos) << msg;

  msg = load_with_override_error(rewritten_override(
      d, [](const std::string& n) { return n; },
      [](Tensors& t) { t.emplace_back("diffusion_model.layers.1.attention.qkv.weight", Tensor::zeros({192, 64}, DType::BF16)); }));
  EXPECT_NE(msg.find("diffusion_model.layers.1.attention.qkv.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not supported"), std::string::npos) << msg;

  msg = load_with_override_error(rewritten_override(
      d, [](const std::string& n) { return n; },
      [](Tensors& t) { t.emplace_back("diffusion_model.layers.1.attention_norm1.weight", Tensor::zeros({64}, DType::BF16)); }));
  EXPECT_NE(msg.find("layers.1.attention_norm1.weight"), std::string::npos) << msg;  // two names, one weight
}

// ---------------------------------------------------------------------------------------
// The fixture cases through the tiny DiT (weights in f32, so only the merge is compared).

namespace {

double step0_error(const ZImageDit& m, const std::string& case_name) {
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/" + case_name + ".safetensors"));
  const Tensor out = dit_forward(m, f.load("step0.x0", DType::F32), f.load("step0.timestep", DType::F32).f32()[0],
                                 f.load("prompt_embeds0", DType::F32));
  return test::rel_l2(out, f.load("step0.out0", DType::F32));
}

}  // namespace

TEST(LoraDit, FixtureLoraCaseMatchesReference) {
  LoraSet loras(load_loras({{lora_path("tiny_lora_peft.safetensors"), 0.8f}, {lora_path("tiny_lora_kohya.safetensors"), 1.0f}}));
  TensorStore store = TensorStore::open_dir(tiny_transformer());
  WeightLoader loader(store, Tag::DitWeights, "transformer");
  const std::vector<std::string> targets = loras.attach(loader);
  EXPECT_EQ(targets.size(), 49u);  // 28 attention (PEFT) ∪ 35 (kohya), 14 shared
  const ZImageDit m = load_zimage_dit(loader, tiny_config(), DType::F32);
  loader.finish();
  loras.check_applied();
  const double err = step0_error(m, "lora");
  std::printf("lora step0.out0: rel L2 %.3g\n", err);
  EXPECT_LE(err, 1e-4);
  // Without the LoRAs the output is clearly different (the test has teeth).
  TensorStore plain_store = TensorStore::open_dir(tiny_transformer());
  WeightLoader plain(plain_store, Tag::DitWeights, "transformer");
  const ZImageDit base = load_zimage_dit(plain, tiny_config(), DType::F32);
  EXPECT_GT(step0_error(base, "lora"), 1e-2);
}

TEST(LoraDit, FixtureOverrideCaseMatchesReference) {
  TensorStore store = TensorStore::open_dir(tiny_transformer());
  TensorStore ov = TensorStore::open_file(lora_path("tiny_transformer_override.safetensors"));
  WeightLoader loader(store, Tag::DitWeights, "transformer");
  attach_transformer_override(loader, ov);
  const ZImageDit m = load_zimage_dit(loader, tiny_config(), DType::F32);
  loader.finish();
  const double err = step0_error(m, "override");
  std::printf("override step0.out0: rel L2 %.3g\n", err);
  EXPECT_LE(err, 1e-4);
}
