// torch_randn: bit-exact against torch.randn on a seeded CPU generator.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/torch_random.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace zi;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Number of elements whose bit patterns differ; first mismatch reported through `first`.
int64_t count_mismatches(const std::vector<float>& got, const float* ref, int64_t n, int64_t* first) {
  int64_t bad = 0;
  *first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (bits(got[size_t(i)]) != bits(ref[i])) {
      if (*first < 0) *first = i;
      ++bad;
    }
  }
  return bad;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  return nlohmann::json::parse(f);
}

}  // namespace

TEST(TorchRandom, Mt19937MatchesReferenceSequence) {
  // std::mt19937 with default seed 5489: the 10000th output is 4123659995 (C++ standard).
  TorchMt19937 g(5489);
  uint32_t v = 0;
  for (int i = 0; i < 10000; ++i) v = g.next_u32();
  EXPECT_EQ(v, 4123659995u);
  // Only the low 32 bits of the seed are used, like at::mt19937.
  TorchMt19937 a(7), b((uint64_t(1) << 32) | 7);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(a.next_u32(), b.next_u32());
  // random64 = (first << 32) | second.
  TorchMt19937 c(1), d(1);
  const uint64_t hi = c.next_u32(), lo = c.next_u32();
  EXPECT_EQ(d.next_u64(), (hi << 32) | lo);
}

TEST(TorchRandom, BitExactAgainstTorchReferenceTensors) {
  SafetensorsFile f = SafetensorsFile::open(test::data_path("torch_cpu_randn.safetensors"));
  int checked = 0;
  std::set<int64_t> sizes;
  for (const TensorInfo& t : f.tensors()) {
    // randn.seed{S}.{shape}
    ASSERT_EQ(t.name.rfind("randn.seed", 0), 0u) << t.name;
    const size_t dot = t.name.find('.', 10);
    ASSERT_NE(dot, std::string::npos) << t.name;
    const uint64_t seed = std::stoull(t.name.substr(10, dot - 10));
    ASSERT_EQ(t.dtype, StDType::F32) << t.name;
    const int64_t n = t.numel();
    const auto* ref = reinterpret_cast<const float*>(f.data(t));
    std::vector<float> got = torch_randn(seed, n);
    int64_t first = -1;
    const int64_t bad = count_mismatches(got, ref, n, &first);
    EXPECT_EQ(bad, 0) << t.name << ": " << bad << " of " << n << " values differ, first at " << first << " (got "
                      << (first >= 0 ? got[size_t(first)] : 0.f) << ", want " << (first >= 0 ? ref[first] : 0.f) << ")";
    sizes.insert(n);
    ++checked;
  }
  EXPECT_EQ(checked, 12);
  // Both code paths (scalar < 16 and vectorised >= 16) are covered.
  EXPECT_TRUE(sizes.count(7));
  EXPECT_TRUE(sizes.count(16));
  EXPECT_TRUE(sizes.count(16 * 128 * 128));
}

TEST(TorchRandom, BitExactAgainstFixtureInitLatents) {
  for (const char* name : {"turbo", "cfg", "truncated", "lora", "override"}) {
    SCOPED_TRACE(name);
    const nlohmann::json meta = read_json(test::data_path(std::string("expected/") + name + ".json"));
    const uint64_t seed = meta.at("seed").get<uint64_t>();
    const int64_t H = meta.at("height").get<int64_t>(), W = meta.at("width").get<int64_t>();
    SafetensorsFile f = SafetensorsFile::open(test::data_path(std::string("expected/") + name + ".safetensors"));
    const TensorInfo* t = f.find("init_latents");
    ASSERT_NE(t, nullptr);
    ASSERT_EQ(t->dtype, StDType::F32);
    ASSERT_EQ(t->shape, (Shape{1, 16, 2 * (H / 16), 2 * (W / 16)}));
    const int64_t n = t->numel();
    std::vector<float> got = torch_randn(seed, n);
    int64_t first = -1;
    EXPECT_EQ(count_mismatches(got, reinterpret_cast<const float*>(f.data(*t)), n, &first), 0)
        << "first mismatch at " << first;
  }
}

TEST(TorchRandom, PointerOverloadAndEdgeSizes) {
  EXPECT_TRUE(torch_randn(1, 0).empty());
  EXPECT_THROW(torch_randn(1, -1), Error);
  // The two overloads agree, including sizes that are not multiples of 16 (tail refill).
  for (int64_t n : {1, 2, 15, 16, 17, 33, 1000}) {
    std::vector<float> a = torch_randn(99, n), b(static_cast<size_t>(n));
    torch_randn(99, b.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bits(a[size_t(i)]), bits(b[size_t(i)])) << n << " " << i;
  }
  // Same seed, same numbers; a prefix of a longer draw is *not* required (torch isn't either).
  EXPECT_EQ(torch_randn(5, 64), torch_randn(5, 64));
  EXPECT_NE(torch_randn(5, 64), torch_randn(6, 64));
}

TEST(TorchRandom, KnownValuesOffTheReferenceSizes) {
  // Bit patterns printed by torch 2.15 (CPU, x86-64, AVX2 and AVX-512 kernels alike) for
  // torch.randn(n, generator=torch.Generator().manual_seed(seed)): sizes that exercise the
  // recomputed tail (n % 16 != 0) and the cached-second-sample scalar path (odd n < 16).
  struct Case {
    uint64_t seed;
    std::vector<uint32_t> want;
  };
  const std::vector<Case> cases = {
      {0,
       {0xbf901b85, 0xbfd91446, 0x3f111004, 0x3f4b235d, 0x3f194d8b, 0xbfc70d5b, 0xbeaec6ca, 0x3fed2f4e, 0x3eefaa55,
        0xbf15e32b, 0xbe318eeb, 0x3e3be1a4, 0x3fb1d6c0, 0x3fcb0d00, 0x3f72409c, 0xbf57fb33, 0x3f6e8c30}},
      {123, {0xbde448df, 0x3df680d9, 0xbebd40bc, 0xbe763021, 0xbf9934d1}},
      {(uint64_t(1) << 40) + 3,
       {0xbd9cf7af, 0x3eb84264, 0xbf483241, 0x3d927d22, 0x3f2a32ea, 0xbe92d4de, 0x3fcf6e35, 0xbfcc60ee, 0xbd53af6b,
        0xbe9ca8d9, 0x3e7e773e, 0xbe63e6fd, 0x3f69c453, 0x3e513ecc, 0x3f12f0a9, 0x3ed52960, 0x3e85e37b, 0x3f6e5e2c,
        0xbf03b3c8, 0x3eb28ee2, 0x3d17d370, 0xbd8a9ebe, 0x3edbaa38, 0xbf5e3d10, 0xbf992100, 0x3f839564, 0x3d933ba3,
        0x3f2e70f5, 0xbf75532d, 0x3d82eaa1, 0x3f28ae95, 0x3f51c814, 0x3f0fc49e, 0xbe7e1a34, 0xbf8a3c29}},
  };
  for (const Case& c : cases) {
    std::vector<float> got = torch_randn(c.seed, int64_t(c.want.size()));
    for (size_t i = 0; i < c.want.size(); ++i)
      EXPECT_EQ(bits(got[i]), c.want[i]) << "seed " << c.seed << " n " << c.want.size() << " i " << i;
  }
}

TEST(TorchRandom, RandomSeedVaries) {
  const uint64_t a = random_seed(), b = random_seed(), c = random_seed();
  EXPECT_LT(a, uint64_t(1) << 53);
  EXPECT_FALSE(a == b && b == c);
}
