// The checks before work of generate() (issue 15) on the real model's layout: a Z-Image-Turbo
// folder of the real size (30 GB of weights, the Hub's dtypes and sharding) whose safetensors
// files hold real headers and sparse, never-written data areas. preflight_generate() reads
// only headers, so it must pass on it in well under a second, and catch what a load would.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tools/random_model.h"
#include "pipeline/pipeline.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace zi;

namespace {

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream os(p, std::ios::binary);
  os << s;
  ASSERT_TRUE(os.good()) << p;
}

// A shard: the real header, then a sparse data area of the real size (nothing written).
void write_sparse_shard(const fs::path& p, const std::vector<const RandomTensor*>& ts) {
  json h = json::object();
  uint64_t off = 0;
  for (const RandomTensor* t : ts) {
    h[t->name] = {{"dtype", st_dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {off, off + t->nbytes()}}};
    off += t->nbytes();
  }
  std::string text = h.dump();
  while (text.size() % 8) text += ' ';
  std::string head(8, '\0');
  const uint64_t n = text.size();
  std::memcpy(head.data(), &n, 8);
  head += text;
  write_text(p, head);
  fs::resize_file(p, head.size() + off);
}

// The turbo preset's folder with sparse weights; the tokenizer is the bundled model's.
void make_sparse_turbo(const fs::path& root) {
  const RandomModelPlan plan = random_model_plan(RandomPreset::Turbo);
  for (const char* d : {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}) fs::create_directories(root / d);
  write_text(root / "scheduler" / "scheduler_config.json", plan.scheduler_config_json);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::create_symlink(fs::path(test::tiny_model()) / "tokenizer" / f, root / "tokenizer" / f);
  for (const RandomComponent& c : plan.components) {
    write_text(root / c.name / "config.json", c.config_json);
    std::vector<uint64_t> sizes;
    for (const auto& t : c.tensors) sizes.push_back(t.nbytes());
    const std::vector<int> shard_of = assign_shards(sizes, c.shards);
    json weight_map = json::object();
    for (int k = 0; k < c.shards; ++k) {
      const std::string file = shard_file_name(c.weights_stem, k + 1, c.shards);
      std::vector<const RandomTensor*> ts;
      for (size_t i = 0; i < c.tensors.size(); ++i)
        if (shard_of[i] == k) ts.push_back(&c.tensors[i]), weight_map[c.tensors[i].name] = file;
      write_sparse_shard(root / c.name / file, ts);
    }
    if (c.shards > 1)
      write_text(root / c.name / (c.weights_stem + ".safetensors.index.json"),
                 json{{"metadata", {{"total_size", c.num_bytes()}}}, {"weight_map", weight_map}}.dump());
  }
  write_text(root / "model_index.json", plan.model_index_json);
}

double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TEST(Preflight, RealSizeModelIsCheckedInWellUnderASecond) {
  test::TempDir d;
  const fs::path root = d.path / "turbo";
  make_sparse_turbo(root);
  GenerateOptions o;
  o.model_dir = root.string();
  o.prompt = "a fox";
  double best = 1e9;
  for (int i = 0; i < 3; ++i) best = std::min(best, seconds_of([&] { preflight_generate(o); }));
  std::printf("preflight of the real-size layout: %.3f s (best of 3)\n", best);
  EXPECT_LT(best, 0.5);

  // A shard cut short and a missing shard are caught, naming the file.
  const fs::path shard = root / "transformer" / shard_file_name("diffusion_pytorch_model", 2, 3);
  ASSERT_TRUE(fs::exists(shard)) << shard;
  fs::resize_file(shard, fs::file_size(shard) - 4096);
  std::string e = test::error_of([&] { preflight_generate(o); });
  EXPECT_NE(e.find(shard.filename().string()), std::string::npos) << e;
  fs::remove(shard);
  e = test::error_of([&] { preflight_generate(o); });
  EXPECT_NE(e.find(shard.filename().string()), std::string::npos) << e;
}

TEST(Preflight, TinyModelPassesAndWrongShapesFail) {
  GenerateOptions o;
  o.model_dir = test::tiny_model();
  o.prompt = "x";
  EXPECT_EQ(test::error_of([&] { preflight_generate(o); }), "");
  // Prompt embeddings of the wrong width for the model.
  auto pe = std::make_shared<PromptEmbeddings>();
  pe->pos = Tensor::zeros({4, 7}, DType::F32);
  o.embeddings = pe;
  EXPECT_NE(test::error_of([&] { preflight_generate(o); }).find("prompt embeddings must be"), std::string::npos);
}
