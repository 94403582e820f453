// Every adapter flavour against the reference (tests/data/loras/tiny_*, made by
// tests/data/makers/make_loras.py): the same rank-4 LoRA in PEFT, kohya, ComfyUI
// (original layout, fused qkv) and ai-toolkit keys merges to diffusers' fuse_lora weights, and
// gives a byte-identical image in every style; LoHa and LoKr merge to the papers' formulas
// computed in numpy; adapters stack with their own strengths; adapter tensors matching no
// weight are one warning (or, --lora-strict, one error); malformed adapters are one-line errors.
// Tolerance of merged weights: |got − want| ≤ 1e-6 + 2e-6·|want| (f32 rounding of W + s·ΔW,
// summed in another order than the reference's).
#include <gtest/gtest.h>

#include <cmath>

#include "core/check.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/lora.h"
#include "pipeline/pipeline.h"
#include "fixture_cases.h"
#include "test_util.h"

using namespace zi;
using test::error_of;
using test::TempDir;

namespace {

constexpr float kScale = 0.75f;

std::string lora(const std::string& name) { return test::data_path("loras/" + name); }

const SafetensorsFile& expected() {
  static SafetensorsFile f = SafetensorsFile::open(lora("tiny_adapters_expected.safetensors"));
  return f;
}

// Loads `targets` of the tiny transformer in f32 with `specs` merged while streaming.
std::map<std::string, Tensor> merged(const std::vector<LoraSpec>& specs, const std::vector<std::string>& targets) {
  TensorStore store = TensorStore::open_dir(test::tiny_model() + "/transformer");
  WeightLoader loader(store, Tag::DitWeights, "transformer");
  LoraSet set(load_loras(specs));
  set.attach(loader);
  std::map<std::string, Tensor> out;
  for (const std::string& t : targets) out[t] = loader.load(t, store.find(t).info->shape, DType::F32);
  return out;
}

// The targets of one flavour in the expected file ("lora.", "loha.", "lokr.").
std::vector<std::string> targets_of(const std::string& flavour) {
  std::vector<std::string> v;
  for (const TensorInfo& t : expected().tensors())
    if (t.name.starts_with(flavour)) v.push_back(t.name.substr(flavour.size()));
  return v;
}

double worst(const Tensor& got, const Tensor& want) {
  double w = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double d = std::fabs(double(got.f32()[i]) - double(want.f32()[i]));
    w = std::max(w, d / (1e-6 + 2e-6 * std::fabs(double(want.f32()[i]))));
  }
  return w;  // ≤ 1 passes
}

void expect_merged(const std::string& file, const std::string& flavour) {
  const std::vector<std::string> targets = targets_of(flavour);
  ASSERT_FALSE(targets.empty()) << flavour;
  auto got = merged({{lora(file), kScale}}, targets);
  for (const std::string& t : targets) {
    Tensor want = expected().load(flavour + t, DType::F32);
    ASSERT_EQ(got[t].shape(), want.shape()) << t;
    EXPECT_LE(worst(got[t], want), 1.0) << file << ": " << t;
  }
}

}  // namespace

TEST(LoraFlavours, PeftMatchesDiffusersFuseLora) { expect_merged("tiny_lora4_peft.safetensors", "lora."); }
TEST(LoraFlavours, KohyaMatchesDiffusers) { expect_merged("tiny_lora4_kohya.safetensors", "lora."); }
TEST(LoraFlavours, ComfyUiFusedQkvMatchesDiffusers) { expect_merged("tiny_lora4_comfy.safetensors", "lora."); }
TEST(LoraFlavours, AiToolkitMatchesDiffusers) { expect_merged("tiny_lora4_aitoolkit.safetensors", "lora."); }
TEST(LoraFlavours, LoHaMatchesThePaper) { expect_merged("tiny_loha.safetensors", "loha."); }
TEST(LoraFlavours, LoKrMatchesThePaper) { expect_merged("tiny_lokr.safetensors", "lokr."); }

TEST(LoraFlavours, StylesOfOneLoraMergeBitIdentically) {
  const std::vector<std::string> targets = targets_of("lora.");
  auto peft = merged({{lora("tiny_lora4_peft.safetensors"), kScale}}, targets);
  for (const char* f : {"tiny_lora4_kohya.safetensors", "tiny_lora4_comfy.safetensors", "tiny_lora4_aitoolkit.safetensors"}) {
    auto other = merged({{lora(f), kScale}}, targets);
    for (const std::string& t : targets)
      EXPECT_EQ(std::memcmp(peft[t].raw(), other[t].raw(), peft[t].nbytes()), 0) << f << ": " << t;
  }
}

TEST(LoraFlavours, StackedAdaptersAddWithTheirOwnStrengths) {
  // PEFT at 0.75 + LoHa at 0.75 + LoKr at 0.75: base + the sum of each reference delta.
  TensorStore store = TensorStore::open_dir(test::tiny_model() + "/transformer");
  std::set<std::string> all;
  for (const char* f : {"lora.", "loha.", "lokr."})
    for (const std::string& t : targets_of(f)) all.insert(t);
  const std::vector<std::string> targets(all.begin(), all.end());
  auto got = merged({{lora("tiny_lora4_peft.safetensors"), kScale},
                     {lora("tiny_loha.safetensors"), kScale},
                     {lora("tiny_lokr.safetensors"), kScale}},
                    targets);
  int overlapping = 0;
  for (const std::string& t : targets) {
    Tensor base = store.find(t).file->load(*store.find(t).info, DType::F32);
    Tensor want = base.clone();
    int n = 0;
    for (const char* f : {"lora.", "loha.", "lokr."}) {
      if (!expected().find(f + t)) continue;
      ++n;
      Tensor m = expected().load(f + t, DType::F32);
      for (int64_t i = 0; i < want.numel(); ++i) want.f32()[i] += m.f32()[i] - base.f32()[i];
    }
    overlapping += n > 1;
    EXPECT_LE(worst(got[t], want), 4.0) << t;
  }
  EXPECT_GE(overlapping, 2);  // layers.0 to_q (LoRA + LoHa), layers.2 q/k/v (LoRA + fused LoHa)
  // Strength 0 leaves the weights as they are; a second copy at -0.75 cancels the first.
  auto zero = merged({{lora("tiny_lokr.safetensors"), 0.0f}}, targets_of("lokr."));
  for (auto& [t, w] : zero) {
    Tensor base = store.find(t).file->load(*store.find(t).info, DType::F32);
    EXPECT_EQ(std::memcmp(w.raw(), base.raw(), w.nbytes()), 0) << t;
  }
}

TEST(LoraFlavours, ComfyUiAndKohyaImagesEqualThePeftImage) {
  auto image = [](const std::string& file) {
    GenerateOptions o = test::fixture_case_options(ZI_TEST_DATA, test::tiny_model(), "turbo");
    o.steps = 1;
    o.transformer_dtype = DType::BF16;
    o.loras = {{lora(file), kScale}};
    return generate(o).rgb;
  };
  const std::vector<uint8_t> peft = image("tiny_lora4_peft.safetensors");
  GenerateOptions plain = test::fixture_case_options(ZI_TEST_DATA, test::tiny_model(), "turbo");
  plain.steps = 1;
  EXPECT_FALSE(generate(plain).rgb == peft);  // the LoRA changes the image
  EXPECT_TRUE(image("tiny_lora4_comfy.safetensors") == peft);
  EXPECT_TRUE(image("tiny_lora4_kohya.safetensors") == peft);
  EXPECT_TRUE(image("tiny_lora4_aitoolkit.safetensors") == peft);
}

TEST(LoraFlavours, UnmatchedTensorsAreOneWarningOrAStrictError) {
  TempDir d;
  // The PEFT LoRA plus a block the tiny model does not have and a text-encoder LoRA.
  SafetensorsFile f = SafetensorsFile::open(lora("tiny_lora4_peft.safetensors"));
  std::vector<std::pair<std::string, Tensor>> t;
  for (const TensorInfo& i : f.tensors()) t.emplace_back(i.name, f.load(i, DType::F32));
  t.emplace_back("transformer.layers.9.attention.to_q.lora_A.weight", Tensor::zeros({4, 64}, DType::F32));
  t.emplace_back("transformer.layers.9.attention.to_q.lora_B.weight", Tensor::zeros({64, 4}, DType::F32));
  t.emplace_back("text_encoder.layers.0.q_proj.lora_A.weight", Tensor::zeros({4, 32}, DType::F32));
  const std::string path = d / "extra.safetensors";
  write_safetensors(path, t);
  GenerateOptions o = test::fixture_case_options(ZI_TEST_DATA, test::tiny_model(), "turbo");
  o.steps = 1;
  o.loras = {{path, 1.0f}};
  std::vector<std::string> notices;
  GenerateHooks h;
  h.on_notice = [&](const std::string& n) { notices.push_back(n); };
  generate(o, h);
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_NE(notices[0].find("2 adapter tensors match no transformer weight"), std::string::npos) << notices[0];
  EXPECT_NE(notices[0].find("transformer.layers.9.attention.to_q.lora_A.weight"), std::string::npos) << notices[0];
  EXPECT_NE(notices[0].find("text_encoder.layers.0.q_proj.lora_A.weight"), std::string::npos) << notices[0];
  // Loaded ahead on its own thread (prefetch), the transformer gives the same notice, once.
  notices.clear();
  o.prefetch = GenerateOptions::Prefetch::On;
  generate(o, h);
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_NE(notices[0].find("2 adapter tensors match no transformer weight"), std::string::npos) << notices[0];
  o.lora_strict = true;
  for (auto p : {GenerateOptions::Prefetch::Off, GenerateOptions::Prefetch::On}) {
    o.prefetch = p;
    const std::string e = error_of([&] { generate(o, h); });
    EXPECT_NE(e.find("--lora-strict"), std::string::npos) << e;
    EXPECT_NE(e.find("layers.9.attention.to_q"), std::string::npos) << e;
  }
}

TEST(LoraFlavours, MalformedLyCorisFilesAreOneLineErrors) {
  TempDir d;
  auto err = [&](const std::vector<std::pair<std::string, Tensor>>& t) {
    write_safetensors(d / "bad.safetensors", t);
    return error_of([&] {
      LoraSet set(load_loras({{d / "bad.safetensors", 1.0f}}));
      TensorStore store = TensorStore::open_dir(test::tiny_model() + "/transformer");
      WeightLoader loader(store, Tag::DitWeights, "transformer");
      set.attach(loader);
      loader.load("layers.0.attention.to_q.weight", {64, 64}, DType::F32);
    });
  };
  const std::string m = "lora_unet_layers_0_attention_to_q";
  auto z = [](Shape s) { return Tensor::zeros(s, DType::F32); };
  struct Case {
    const char* what;
    std::vector<std::pair<std::string, Tensor>> t;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {"LoHa ranks that do not pair",
       {{m + ".hada_w1_a", z({64, 2})}, {m + ".hada_w1_b", z({3, 64})}, {m + ".hada_w2_a", z({64, 2})},
        {m + ".hada_w2_b", z({2, 64})}},
       "ranks that do not pair"},
      {"LoKr ranks that do not pair",
       {{m + ".lokr_w1", z({4, 8})}, {m + ".lokr_w2_a", z({16, 2})}, {m + ".lokr_w2_b", z({3, 8})}},
       "ranks do not pair"},
      {"LoKr of the wrong shape for its weight", {{m + ".lokr_w1", z({4, 8})}, {m + ".lokr_w2", z({8, 8})}},
       "makes a delta of shape [32, 64]"},
      {"NaN alpha",
       {{m + ".lokr_w1", z({4, 8})}, {m + ".lokr_w2", z({16, 8})}, {m + ".alpha", Tensor::from_vector({NAN}, {})}},
       "not a finite number"},
      {"Tucker factor", {{m + ".lokr_w1", z({4, 8})}, {m + ".lokr_t2", z({2, 2, 3, 3})}}, "Tucker"},
      {"unknown LyCORIS tensor", {{m + ".lokr_w1", z({4, 8})}, {m + ".lokr_w9", z({4, 8})}}, "not a LoHa, LoKr"},
      {"duplicate module in two styles",
       {{m + ".lokr_w1", z({4, 8})}, {m + ".lokr_w2", z({16, 8})}, {"lycoris_layers_0_attention_to_q.lokr_w1", z({4, 8})},
        {"lycoris_layers_0_attention_to_q.lokr_w2", z({16, 8})}},
       "both target layers.0.attention.to_q.weight"},
  };
  for (const Case& c : cases) {
    const std::string e = err(c.t);
    EXPECT_NE(e.find(c.needle), std::string::npos) << c.what << ": " << e;
    EXPECT_NE(e.find("bad.safetensors"), std::string::npos) << c.what << ": " << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << c.what;
  }
}
