// safetensors reader/writer, sharded stores and checkpoint configs: valid files written by
// our writer, and every malformed case giving a one-line error naming the file and tensor.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/allocator.h"
#include "core/check.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace zi;

namespace {

using test::TempDir;

// Writes a raw safetensors file from a header string and a data area of `data_len` bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_len, int64_t header_len = -1) {
  std::ofstream os(path, std::ios::binary);
  uint64_t n = header_len < 0 ? header.size() : uint64_t(header_len);
  os.write(reinterpret_cast<const char*>(&n), 8);
  os << header;
  std::string data(data_len, '\x01');
  os << data;
}

using test::error_of;

}  // namespace

TEST(Safetensors, RoundTripAllDtypes) {
  TempDir d;
  Tensor a = Tensor::from_vector({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor b = a.to(DType::BF16);
  Tensor c = a.to(DType::F16);
  write_safetensors(d / "x.safetensors", {{"a", a}, {"b.weight", b}, {"c", c}}, {{"format", "pt"}});
  SafetensorsFile f = SafetensorsFile::open(d / "x.safetensors");
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.data_start() % 8, 0u);
  const TensorInfo* bi = f.find("b.weight");
  ASSERT_NE(bi, nullptr);
  EXPECT_EQ(bi->dtype, StDType::BF16);
  EXPECT_EQ(bi->shape, (Shape{2, 3}));
  Tensor back = f.load("c", DType::F32);
  EXPECT_EQ(test::max_abs_diff(back, a), 0.0);
  Tensor v = f.view(*f.find("a"));
  EXPECT_EQ(v.f32()[5], 6.0f);
  EXPECT_EQ(f.find("nope"), nullptr);
}

// Reading a tensor's bytes with pread (the GPU upload's ZI_UPLOAD_READ path) gives the mapping's
// bytes, for pieces that cross the readers' 2 MiB split, and a read past the end is an error
// naming the file.
TEST(Safetensors, ReadGivesTheMappedBytes) {
  TempDir d;
  const int64_t n = (int64_t(5) << 20) / 4 + 3;  // 5 MiB and 12 bytes of f32
  Tensor big = Tensor::empty({n}, DType::F32);
  for (int64_t i = 0; i < n; ++i) big.f32()[i] = float(i % 9973) * 0.5f - 7.0f;
  write_safetensors(d / "r.safetensors", {{"small", Tensor::from_vector({1, 2, 3}, {3})}, {"big", big}});
  SafetensorsFile f = SafetensorsFile::open(d / "r.safetensors");
  const TensorInfo& bi = *f.find("big");
  for (auto [off, len] : std::vector<std::pair<size_t, size_t>>{{0, size_t(n) * 4}, {4, 12}, {(size_t(2) << 20) - 8, 4096 + 16}, {100, (size_t(4) << 20) + 5}}) {
    std::vector<char> got(len);
    f.read(bi, off, got.data(), len);
    EXPECT_EQ(std::memcmp(got.data(), f.data(bi) + off, len), 0) << off << " + " << len;
  }
  std::vector<char> buf(64);
  const std::string e = error_of([&] { f.file()->read(buf.data(), f.file()->size() - 8, 64); });
  EXPECT_NE(e.find("r.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("beyond its end"), std::string::npos) << e;
}

TEST(Safetensors, MalformedFilesGiveOneLineErrorsNamingFileAndTensor) {
  TempDir d;
  const std::string good_entry = R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  struct Case {
    const char* name;
    std::string header;
    size_t data_len;
    int64_t header_len;
    const char* expect;  // substring of the message
  };
  std::vector<Case> cases = {
      {"header_past_eof", "{" + good_entry + "}", 16, 1 << 20, "runs past the end of the file"},
      {"bad_json", "{\"w\":{\"dtype\":\"F32\",", 16, -1, "not valid JSON"},
      {"unknown_dtype", R"({"w":{"dtype":"F33","shape":[2,2],"data_offsets":[0,16]}})", 16, -1, "unknown dtype 'F33'"},
      {"shape_bytes_mismatch", R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}})", 16, -1,
       "needs 24 bytes but data_offsets span 16"},
      {"range_outside", R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}})", 16, -1,
       "run past the end of the data"},
      {"overlap",
       R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"v":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       16, -1, "overlaps"},
      {"duplicate", "{" + good_entry + "," + good_entry + "}", 16, -1, "appears twice"},
      {"negative_shape", R"({"w":{"dtype":"F32","shape":[-2,2],"data_offsets":[0,16]}})", 16, -1, "non-negative"},
      {"overflow_shape", R"({"w":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,16]}})", 16, -1,
       "overflows"},
      {"not_object", "[1,2]", 0, -1, "does not start with '{'"},
  };
  for (const auto& c : cases) {
    std::string p = d / (std::string(c.name) + ".safetensors");
    write_raw(p, c.header, c.data_len, c.header_len);
    std::string msg = error_of([&] { SafetensorsFile::open(p); });
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": " << msg;
    EXPECT_NE(msg.find(p), std::string::npos) << c.name << " does not name the file: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << c.name;
    if (std::string(c.name) != "header_past_eof" && std::string(c.name) != "bad_json" &&
        std::string(c.name) != "not_object") {
      EXPECT_NE(msg.find("tensor '"), std::string::npos) << c.name << " does not name the tensor: " << msg;
    }
  }
  // Truncated: a valid file cut short.
  Tensor a = Tensor::from_vector(std::vector<float>(64, 1.0f), {8, 8});
  write_safetensors(d / "full.safetensors", {{"big", a}});
  auto sz = fs::file_size(d / "full.safetensors");
  fs::copy_file(d / "full.safetensors", d / "cut.safetensors");
  fs::resize_file(d / "cut.safetensors", sz - 10);
  std::string msg = error_of([&] { SafetensorsFile::open(d / "cut.safetensors"); });
  EXPECT_NE(msg.find("tensor 'big'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  // Too small and missing files.
  write_raw(d / "tiny.safetensors", "", 0, 0);
  fs::resize_file(d / "tiny.safetensors", 3);
  EXPECT_NE(error_of([&] { SafetensorsFile::open(d / "tiny.safetensors"); }).find("too small"), std::string::npos);
  EXPECT_NE(error_of([&] { SafetensorsFile::open(d / "absent.safetensors"); }).find("cannot open"), std::string::npos);
}

TEST(Safetensors, ShardedIndexErrors) {
  TempDir d;
  Tensor a = Tensor::from_vector({1, 2}, {2});
  write_safetensors(d / "s1.safetensors", {{"a", a}});
  write_safetensors(d / "s2.safetensors", {{"b", a}});
  auto write_index = [&](const std::string& body) {
    std::ofstream(d / "m.safetensors.index.json") << R"({"metadata":{"total_size":16},"weight_map":)" << body << "}";
  };
  write_index(R"({"a":"s1.safetensors","b":"s2.safetensors"})");
  TensorStore s = TensorStore::open_dir(d.path.string());
  EXPECT_TRUE(s.contains("a"));
  EXPECT_TRUE(s.contains("b"));
  EXPECT_EQ(s.names().size(), 2u);

  write_index(R"({"a":"s1.safetensors","b":"s3.safetensors"})");
  std::string msg = error_of([&] { TensorStore::open_dir(d.path.string()); });
  EXPECT_NE(msg.find("shard 's3.safetensors'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("missing"), std::string::npos) << msg;

  write_index(R"({"a":"s1.safetensors","b":"s2.safetensors","c":"s2.safetensors"})");
  msg = error_of([&] { TensorStore::open_dir(d.path.string()); });
  EXPECT_NE(msg.find("tensor 'c'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not stored there"), std::string::npos) << msg;

  write_safetensors(d / "s2.safetensors", {{"a", a}, {"b", a}});
  write_index(R"({"a":"s1.safetensors","b":"s2.safetensors"})");
  msg = error_of([&] { TensorStore::open_dir(d.path.string()); });
  EXPECT_NE(msg.find("tensor 'a' is in both"), std::string::npos) << msg;
}

TEST(WeightLoader, ReportsMissingWrongShapeAndUnexpectedAtOnce) {
  TempDir d;
  Tensor a = Tensor::from_vector({1, 2, 3, 4}, {2, 2});
  write_safetensors(d / "m.safetensors", {{"x.weight", a}, {"y.weight", a}, {"extra", a}, {"encoder.z", a}});
  TensorStore s = TensorStore::open_dir(d.path.string());
  WeightLoader l(s, Tag::VaeWeights, "vae");
  l.ignore_prefix("encoder.");
  Tensor x = l.load("x.weight", {2, 2}, DType::BF16);
  EXPECT_EQ(x.dtype(), DType::BF16);
  EXPECT_EQ(l.bytes_loaded(), 8);
  EXPECT_FALSE(l.load("y.weight", {4}, DType::F32).defined());
  EXPECT_FALSE(l.load("missing.weight", {2}, DType::F32).defined());
  std::string msg = error_of([&] { l.finish(); });
  EXPECT_NE(msg.find("missing tensors: missing.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("y.weight is [2, 2], expected [4]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected tensors: extra"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("encoder.z"), std::string::npos) << msg;
  EXPECT_EQ(s.reads().count("encoder.z"), 0u);
}

// load_table: a view of the mapping (nothing allocated, the same values) where the file stores
// the table exactly as asked, on the host whatever the loader's device; a host copy otherwise
// (another dtype, an override); it counts as read (no "unexpected tensors" at finish).
TEST(WeightLoader, TablesAreViewsOfTheFileWhereStoredAsAsked) {
  TempDir d;
  Tensor t = Tensor::from_vector({1.5f, -2.0f, 3.25f, 4.0f, 0.5f, -0.75f}, {3, 2});
  write_safetensors(d / "m.safetensors", {{"emb.weight", t.to(DType::BF16)}, {"other", t}});
  TempDir od;
  write_safetensors(od / "o.safetensors", {{"emb.weight", t.to(DType::BF16)}});
  TensorStore s = TensorStore::open_dir(d.path.string());
  auto held = [] { return memory_stats(Device::CPU).tag(Tag::TextWeights).current; };
  {
    WeightLoader l(s, Tag::TextWeights, "text_encoder");
    l.set_device(Device::CUDA);  // a GPU phase's loader: the table stays on the host all the same
    const int64_t before = held();
    Tensor v = l.load_table("emb.weight", {3, 2}, DType::BF16);
    ASSERT_TRUE(v.defined());
    EXPECT_EQ(v.device(), Device::CPU);
    EXPECT_EQ(v.dtype(), DType::BF16);
    EXPECT_EQ(held(), before) << "a view allocates nothing";
    EXPECT_EQ(l.device(), Device::CUDA);
    EXPECT_EQ(test::max_abs_diff(v.to(DType::F32), t.to(DType::BF16).to(DType::F32)), 0.0);
    Tensor c = l.load_table("other", {3, 2}, DType::BF16);  // stored f32: a converted host copy
    EXPECT_EQ(c.device(), Device::CPU);
    EXPECT_EQ(held(), before + int64_t(c.nbytes()));
    EXPECT_EQ(l.device(), Device::CUDA);
    EXPECT_NO_THROW(l.finish());
  }
  {  // an override of the table: loaded (a copy), not viewed
    TensorStore o = TensorStore::open_file(od / "o.safetensors");
    WeightLoader l(s, Tag::TextWeights, "text_encoder");
    l.add_override(&o, nullptr);
    l.ignore_prefix("other");
    const int64_t before = held();
    Tensor c = l.load_table("emb.weight", {3, 2}, DType::BF16);
    EXPECT_EQ(held(), before + int64_t(c.nbytes()));
    EXPECT_EQ(test::max_abs_diff(c.to(DType::F32), t.to(DType::BF16).to(DType::F32)), 0.0);
  }
  EXPECT_THROW(WeightLoader(s, Tag::TextWeights, "text_encoder").load_table("emb.weight", {3, 2}, DType::Q8_0), Error);
}

TEST(Checkpoint, TinyModelConfigs) {
  ModelFolder m = open_model_folder(test::tiny_model());
  EXPECT_EQ(m.text_encoder.hidden_size, 32);
  EXPECT_EQ(m.text_encoder.num_hidden_layers, 3);
  EXPECT_EQ(m.text_encoder.head_dim, 16);
  EXPECT_DOUBLE_EQ(m.text_encoder.rope_theta, 1e6);  // from rope_parameters
  EXPECT_EQ(m.transformer.dim, 64);
  EXPECT_EQ(m.transformer.head_dim(), 32);
  EXPECT_EQ(m.vae.block_out_channels.size(), 4u);
  EXPECT_EQ(m.vae.scale_factor(), 8);
}

TEST(Checkpoint, BadConfigValuesAreNamed) {
  auto msg_of = [](const std::function<void()>& f) { return error_of(f); };
  EXPECT_NE(msg_of([] { parse_dit_config(R"({"dim":64,"n_heads":3,"axes_dims":[8,12,12]})", "t.json"); })
                .find("n_heads (3) must divide dim (64)"),
            std::string::npos);
  EXPECT_NE(msg_of([] { parse_dit_config(R"({"dim":64,"n_heads":2,"n_layers":0})", "t.json"); }).find("n_layers"),
            std::string::npos);
  EXPECT_NE(msg_of([] { parse_qwen3_config(R"({"num_attention_heads":4,"num_key_value_heads":3})", "q.json"); })
                .find("multiple of num_key_value_heads"),
            std::string::npos);
  EXPECT_NE(msg_of([] { parse_qwen3_config(R"({"hidden_size":-5})", "q.json"); }).find("hidden_size must be positive"),
            std::string::npos);
  EXPECT_NE(msg_of([] { parse_vae_config(R"({"block_out_channels":[32,33]})", "v.json"); }).find("33"),
            std::string::npos);
  EXPECT_NE(msg_of([] { parse_vae_config(R"({"layers_per_block":"two"})", "v.json"); }).find("layers_per_block' must be an integer"),
            std::string::npos);
  EXPECT_NE(msg_of([] { parse_vae_config("{", "v.json"); }).find("v.json: not valid JSON"), std::string::npos);
  // Top-level rope_theta (transformers 4 style) is read too.
  EXPECT_DOUBLE_EQ(parse_qwen3_config(R"({"rope_theta":5000.0})", "q.json").rope_theta, 5000.0);
  EXPECT_NE(msg_of([] { open_model_folder("/nonexistent/zimage"); }).find("does not exist"), std::string::npos);
}
