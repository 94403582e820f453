// core/tuning_cache.h: measured choices persist across instances (processes), the last value of a
// key wins, junk lines and unusable places are ignored, ZIMAGE_CACHE_DIR chooses or disables it.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "core/tuning_cache.h"
#include "test_util.h"

using namespace zi;

TEST(TuningCache, PersistsAcrossInstancesLastValueWins) {
  test::TempDir d;
  const std::string path = d / "t.txt";
  {
    TuningCache c(path);
    EXPECT_FALSE(c.get("conv 1x2"));
    c.put("conv 1x2", "nhwc");
    c.put("conv 3x4", "im2col");
    c.put("conv 1x2", "nchw");
    c.put("bad\tkey", "x");  // refused: would break the file format
    c.put("k", "");
    EXPECT_EQ(c.get("conv 1x2").value_or(""), "nchw");
  }
  {
    std::ofstream junk(path, std::ios::app);
    junk << "no tab here\n\tvalue without key\nkey without value\t\n";
  }
  TuningCache c(path);
  EXPECT_EQ(c.get("conv 1x2").value_or(""), "nchw");
  EXPECT_EQ(c.get("conv 3x4").value_or(""), "im2col");
  EXPECT_FALSE(c.get("bad\tkey"));
  EXPECT_FALSE(c.get("k"));
  EXPECT_FALSE(c.get("no tab here"));
}

TEST(TuningCache, UnusablePlacesAreIgnored) {
  TuningCache mem("");  // in memory only
  mem.put("a", "b");
  EXPECT_EQ(mem.get("a").value_or(""), "b");
  TuningCache nowhere("/proc/definitely/not/here.txt");
  nowhere.put("a", "b");  // the write fails quietly; the value is still known in this process
  EXPECT_EQ(nowhere.get("a").value_or(""), "b");
}

TEST(TuningCache, DefaultPathFollowsTheEnvironment) {
  test::TempDir d;
  const char* old = std::getenv("ZIMAGE_CACHE_DIR");
  const std::string saved = old ? old : "";
  setenv("ZIMAGE_CACHE_DIR", (d / "sub").c_str(), 1);
  const std::string p = TuningCache::default_path("cuda-NVIDIA H200/x-cudnn91000");
  EXPECT_EQ(p, d / "sub/cuda-NVIDIA_H200_x-cudnn91000.txt");  // the folder is made, odd characters replaced
  setenv("ZIMAGE_CACHE_DIR", "off", 1);
  EXPECT_EQ(TuningCache::default_path("x"), "");
  if (old) setenv("ZIMAGE_CACHE_DIR", saved.c_str(), 1);
  else unsetenv("ZIMAGE_CACHE_DIR");
}
