// Library-level checks added by the hardening work (issue 8): overflow-checked sizes from
// files, misaligned tensor data, strict integer config fields, shard names, UTF-8 checks.
// The CLI-level cases are in test_cli.cpp; fuzz inputs replay as the fuzz_replay_* tests.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "core/check.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "text/bpe_tokenizer.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace zi;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/zi_hard_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& n) const { return (path / n).string(); }
};

// A safetensors file with the header exactly as given (no padding) and `data` after it.
void write_raw(const std::string& path, const std::string& header, const std::string& data) {
  std::ofstream os(path, std::ios::binary);
  uint64_t n = header.size();
  os.write(reinterpret_cast<const char*>(&n), 8);
  os << header << data;
}

using test::error_of;

}  // namespace

TEST(Hardening, ShapesWhoseSizesOverflowAreRefusedEvenWithAZero) {
  // Zero bytes, but numel/strides of the non-zero sizes would overflow int64.
  for (const char* shape : {"[0,4294967296,4294967296]", "[4294967296,4294967296,0]", "[0,9223372036854775807,2]"}) {
    std::string h = std::string(R"({"t":{"dtype":"F32","shape":)") + shape + R"(,"data_offsets":[0,0]}})";
    std::string e = error_of([&] { SafetensorsFile::parse_header(h, 0, "f.safetensors", nullptr); });
    EXPECT_NE(e.find("f.safetensors: tensor 't': shape"), std::string::npos) << shape << ": " << e;
    EXPECT_NE(e.find("overflows"), std::string::npos) << e;
  }
  // A zero size with moderate others is fine.
  auto ok = SafetensorsFile::parse_header(R"({"t":{"dtype":"F32","shape":[0,1048576,1048576],"data_offsets":[0,0]}})",
                                          0, "f", nullptr);
  ASSERT_EQ(ok.size(), 1u);
  EXPECT_EQ(ok[0].numel(), 0);
}

TEST(Hardening, SubByteDtypesNeedWholeBytesAndCannotBeLoaded) {
  EXPECT_NE(error_of([] {
              SafetensorsFile::parse_header(R"({"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2, "f",
                                            nullptr);
            }).find("tensor 't'"),
            std::string::npos);
  TempDir d;
  write_raw(d / "f4.safetensors", R"({"t":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})", "\x12\x34");
  SafetensorsFile f = SafetensorsFile::open(d / "f4.safetensors");
  const TensorInfo& t = f.tensors().at(0);
  EXPECT_NE(error_of([&] { f.view(t); }).find("F4"), std::string::npos);
  EXPECT_NE(error_of([&] { f.load(t, DType::F32); }).find("cannot convert F4"), std::string::npos);
}

TEST(Hardening, MisalignedDataLoadsLikeAlignedAndIsNotViewed) {
  TempDir d;
  Tensor ref = Tensor::from_vector({1.5f, -2.25f, 3.0f, 1e-3f}, {2, 2});
  Tensor bf = ref.to(DType::BF16);
  const std::string bytes(static_cast<const char*>(bf.raw()), bf.nbytes());
  // 8 + 61 header bytes: the data area starts at an odd offset.
  std::string h = R"({"t":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}})";
  while ((8 + h.size()) % 2 == 0) h += ' ';
  write_raw(d / "odd.safetensors", h, bytes);
  SafetensorsFile f = SafetensorsFile::open(d / "odd.safetensors");
  ASSERT_EQ(f.data_start() % 2, 1u);
  const TensorInfo& t = f.tensors().at(0);
  Tensor got = f.load(t, DType::F32);
  Tensor want = bf.to(DType::F32);
  EXPECT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0);
  Tensor same = f.load(t, DType::BF16);  // no conversion: a plain copy
  EXPECT_EQ(std::memcmp(same.raw(), bf.raw(), bf.nbytes()), 0);
  EXPECT_NE(error_of([&] { f.view(t); }).find("not aligned"), std::string::npos);
}

TEST(Hardening, IndexRefusesShardNamesWithNul) {
  TempDir d;
  write_safetensors(d / "a.safetensors", {{"x", Tensor::from_vector({1}, {1})}});
  std::ofstream(d / "m.safetensors.index.json") << R"({"weight_map":{"x":"a.safetensors\u0000.txt"}})";
  std::string e = error_of([&] { TensorStore::open_index(d / "m.safetensors.index.json"); });
  EXPECT_NE(e.find("invalid shard"), std::string::npos) << e;
}

TEST(Hardening, ConfigIntegersAreStrict) {
  const std::string base = R"({"dim": 64, "n_heads": 2, "axes_dims": [8, 12, 12], "cap_feat_dim": 32)";
  auto dit = [&](const std::string& extra) { return parse_dit_config(base + extra + "}", "transformer/config.json"); };
  EXPECT_EQ(dit("").dim, 64);
  EXPECT_EQ(dit(R"(, "n_layers": 3.0)").n_layers, 3);  // an integral float is an integer
  for (const char* bad : {R"(, "n_layers": 3.5)", R"(, "n_layers": 1e300)", R"(, "n_layers": 4294967299)",
                          R"(, "n_layers": -1e300)", R"(, "n_layers": "3")", R"(, "axes_lens": [512, 512.5, 512])",
                          R"(, "axes_lens": [512, 1e20, 512])"}) {
    std::string e = error_of([&] { dit(bad); });
    EXPECT_NE(e.find("transformer/config.json: field '"), std::string::npos) << bad << ": " << e;
  }
}

TEST(Hardening, ConfigSizesBeyondAnyModelAreRefused) {
  const std::string base = R"({"dim": 64, "n_heads": 2, "axes_dims": [8, 12, 12], "cap_feat_dim": 32)";
  auto dit_err = [&](const std::string& extra) {
    return error_of([&] { parse_dit_config(base + extra + "}", "t.json"); });
  };
  EXPECT_NE(dit_err(R"(, "n_layers": 100000)").find("n_layers of 100000 is beyond any real model"), std::string::npos);
  EXPECT_NE(dit_err(R"(, "axes_lens": [512, -1, 512])").find("axes_lens entry must be positive"), std::string::npos);
  EXPECT_NE(dit_err(R"(, "axes_dims": [2147483646, 2147483646, 4])").find("axes_dims"), std::string::npos);
  EXPECT_NE(error_of([] { parse_qwen3_config(R"({"vocab_size": 2000000000})", "te.json"); }).find("vocab_size"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_qwen3_config(R"({"num_attention_heads": 65536, "head_dim": 65536})", "te.json"); })
                .find("num_attention_heads x head_dim"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_vae_config(R"({"block_out_channels": [32, 1073741824]})", "vae.json"); })
                .find("block_out_channels"),
            std::string::npos);
}

TEST(Hardening, Utf8Validation) {
  EXPECT_EQ(first_invalid_utf8(""), std::string::npos);
  EXPECT_EQ(first_invalid_utf8("a red fox, \xE4\xB8\x80 \xF0\x9F\xA6\x8A"), std::string::npos);
  EXPECT_EQ(first_invalid_utf8("ab\xFF"), 2u);
  EXPECT_EQ(first_invalid_utf8("\xC0\xAF"), 0u);                  // overlong
  EXPECT_EQ(first_invalid_utf8("x\xED\xA0\x80"), 1u);             // surrogate
  EXPECT_EQ(first_invalid_utf8("xy\xF4\x90\x80\x80"), 2u);        // above U+10FFFF
  EXPECT_EQ(first_invalid_utf8("abc\xE4\xB8"), 3u);               // cut short
}
