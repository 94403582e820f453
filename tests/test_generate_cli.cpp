// `zimage generate` as a user runs it: the PNG's `parameters` chunk records what made the
// image (prompt, seed, steps, size, LoRAs with scales, override file, model, version), and
// the LoRA fixture case reproduces the reference image through the command line.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "io/png.h"
#include "test_util.h"

namespace {

int run(const std::string& args) {
  std::string cmd = std::string(ZI_BINARY) + " " + args + " 2>/dev/null";
  int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

}  // namespace

TEST(GenerateCli, ParametersChunkRecordsLorasAndOverride) {
  zi::test::TempDir d;
  const std::string out = d / "lora.png";
  const std::string peft = zi::test::data_path("loras/tiny_lora_peft.safetensors");
  const std::string kohya = zi::test::data_path("loras/tiny_lora_kohya.safetensors");
  ASSERT_EQ(run("generate --model " + zi::test::tiny_model() +
                " -p 'A lighthouse on a cliff, oil painting' -W 96 -H 64 --steps 3 --seed 21 --transformer-dtype f32"
                " --lora " + peft + ":0.8 --lora " + kohya + " -q -o " + out),
            0);
  int w = 0, h = 0;
  std::vector<uint8_t> got = zi::read_png_rgb(out, &w, &h);
  std::vector<uint8_t> want = zi::read_png_rgb(zi::test::data_path("expected/lora.png"), &w, &h);
  ASSERT_EQ(got.size(), want.size());
  int maxd = 0;
  for (size_t i = 0; i < got.size(); ++i) maxd = std::max(maxd, std::abs(int(got[i]) - int(want[i])));
  EXPECT_LE(maxd, 1);
  std::string params;
  for (const auto& [k, v] : zi::read_png_text(out))
    if (k == "parameters") params = v;
  EXPECT_EQ(params.rfind("A lighthouse on a cliff, oil painting\n", 0), 0u) << params;
  for (const std::string& s : {std::string("Seed: 21"), std::string("Steps: 3"), std::string("Size: 96x64"),
                               "LoRA: " + peft + ":0.8", "LoRA: " + kohya + ":1", std::string("zimage ")})
    EXPECT_NE(params.find(s), std::string::npos) << s << " not in: " << params;

  const std::string ov = zi::test::data_path("loras/tiny_transformer_override.safetensors");
  const std::string out2 = d / "override.png";
  ASSERT_EQ(run("generate --model " + zi::test::tiny_model() + " -p 'x' -W 64 -H 64 --steps 1 --seed 1" +
                " --transformer-override " + ov + " -q -o " + out2),
            0);
  params.clear();
  for (const auto& [k, v] : zi::read_png_text(out2))
    if (k == "parameters") params = v;
  EXPECT_NE(params.find("Transformer override: " + ov), std::string::npos) << params;
}
