// `zimage inspect`: the bundled model's components with exact parameter counts (counted
// independently from the safetensors headers), and a non-zero exit on a broken file.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "test_util.h"

namespace {

std::string run(const std::string& args, int* status) {
  std::string cmd = std::string(ZI_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  *status = pclose(p);
  return out;
}

}  // namespace

TEST(Inspect, TinyModelComponentsAndParameterCounts) {
  int status = 0;
  std::string out = run("inspect " + zi::test::tiny_model(), &status);
  EXPECT_EQ(status, 0) << out;
  // Counted with a separate script from the files' headers (numel summed per component).
  EXPECT_NE(out.find("text_encoder: Qwen3"), std::string::npos) << out;
  EXPECT_NE(out.find("4,886,720 (4.887 M) parameters (+ 12,416 (12.416 K) not used by zimage)"), std::string::npos)
      << out;  // 4,899,136 in all; the last layer's 12,416 are never read
  EXPECT_NE(out.find("transformer: ZImageTransformer2DModel"), std::string::npos) << out;
  EXPECT_NE(out.find("772,128 (772.128 K) parameters"), std::string::npos) << out;
  EXPECT_NE(out.find("vae: AutoencoderKL"), std::string::npos) << out;
  EXPECT_NE(out.find("826,083 (826.083 K) parameters (+ 594,464 (594.464 K) not used by zimage)"),
            std::string::npos)
      << out;  // decoder 826,083 of 1,420,547
}

TEST(Inspect, BrokenFileExitsNonZeroWithOneLine) {
  zi::test::TempDir d;
  std::ofstream(d / "bad.safetensors") << "garbage!garbage!";
  int status = 0;
  std::string out = run("inspect " + (d / "bad.safetensors"), &status);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_EQ(out.rfind("error: ", 0), 0u) << out;
  EXPECT_NE(out.find("bad.safetensors"), std::string::npos) << out;
  EXPECT_EQ(out.find('\n'), out.size() - 1) << out;
}
