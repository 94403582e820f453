// make-random-model: the tiny preset reproduces the bundled tiny model's layout exactly
// (configs, keys, shapes, sharding) with random, deterministic, non-zero weights; the turbo
// preset's key/shape table matches the spec without writing 33 GB.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "io/checkpoint.h"
#include "tools/random_model.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace zi;

namespace {

using test::TempDir;

std::string tokenizer_src() { return std::string(ZI_TINY_MODEL) + "/tokenizer"; }

MakeRandomModelResult make_tiny(const std::string& out, uint64_t seed, size_t chunk = size_t(16) << 20) {
  MakeRandomModelOptions o;
  o.preset = RandomPreset::Tiny;
  o.seed = seed;
  o.tokenizer_src = tokenizer_src();
  o.chunk_bytes = chunk;
  return make_random_model(out, o);
}

const char* kComponents[] = {"transformer", "text_encoder", "vae"};

std::string slurp(const fs::path& p) {
  std::ifstream is(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(is), {});
}

const RandomTensor* find(const RandomComponent& c, const std::string& name) {
  for (const auto& t : c.tensors)
    if (t.name == name) return &t;
  return nullptr;
}

Shape shape_of(const RandomComponent& c, const std::string& name) {
  const RandomTensor* t = find(c, name);
  return t ? t->shape : Shape{-1};
}

}  // namespace

TEST(RandomModel, TinyMatchesBundledLayout) {
  TempDir d;
  const std::string out = d.sub("m");
  const MakeRandomModelResult r = make_tiny(out, 1);
  EXPECT_GT(r.bytes, 10u << 20);

  const ModelFolder m = open_model_folder(out);
  const ModelFolder ref = open_model_folder(ZI_TINY_MODEL);
  EXPECT_EQ(m.text_encoder.hidden_size, ref.text_encoder.hidden_size);
  EXPECT_EQ(m.transformer.dim, ref.transformer.dim);
  EXPECT_EQ(m.vae.block_out_channels, ref.vae.block_out_channels);

  for (const char* comp : kComponents) {
    SCOPED_TRACE(comp);
    const TensorStore got = TensorStore::open_dir(out + "/" + comp);
    const TensorStore want = TensorStore::open_dir(std::string(ZI_TINY_MODEL) + "/" + comp);
    ASSERT_EQ(got.names(), want.names());
    EXPECT_EQ(got.files().size(), want.files().size());
    for (const auto& name : want.names()) {
      const auto g = got.find(name), w = want.find(name);
      EXPECT_EQ(g.info->shape, w.info->shape) << name;
      EXPECT_EQ(g.info->dtype, StDType::BF16) << name;
      // Random, finite, never all zeros.
      const Tensor t = g.file->load(*g.info, DType::F32);
      const float* p = t.f32();
      bool nonzero = false, finite = true;
      for (int64_t i = 0; i < t.numel(); ++i) {
        nonzero = nonzero || p[i] != 0.f;
        finite = finite && std::isfinite(p[i]);
      }
      EXPECT_TRUE(nonzero) << name << " is all zeros";
      EXPECT_TRUE(finite) << name;
    }
  }
  // Configs and the copied tokenizer are those of the bundled model.
  for (const char* f : {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                        "transformer/config.json", "vae/config.json"})
    EXPECT_EQ(nlohmann::json::parse(slurp(fs::path(out) / f)), nlohmann::json::parse(slurp(fs::path(ZI_TINY_MODEL) / f)))
        << f;
  for (const char* f : {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja"})
    EXPECT_EQ(slurp(fs::path(out) / f), slurp(fs::path(ZI_TINY_MODEL) / f)) << f;
  // No temporary file is left behind.
  for (const auto& e : fs::recursive_directory_iterator(out))
    EXPECT_FALSE(e.path().string().ends_with(".tmp")) << e.path();
}

TEST(RandomModel, InitScales) {
  TempDir d;
  const std::string out = d.sub("m");
  make_tiny(out, 3);
  const TensorStore te = TensorStore::open_dir(out + "/text_encoder");
  auto stats = [&](const std::string& name, double* mean, double* sd) {
    const auto e = te.find(name);
    ASSERT_NE(e.file, nullptr) << name;
    const Tensor t = e.file->load(*e.info, DType::F32);
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < t.numel(); ++i) {
      s += t.f32()[i];
      s2 += double(t.f32()[i]) * t.f32()[i];
    }
    *mean = s / double(t.numel());
    *sd = std::sqrt(s2 / double(t.numel()) - *mean * *mean);
  };
  double m, s;
  stats("embed_tokens.weight", &m, &s);  // 4.9 M elements, N(0, 1)
  EXPECT_NEAR(m, 0.0, 0.01);
  EXPECT_NEAR(s, 1.0, 0.01);
  stats("layers.0.mlp.down_proj.weight", &m, &s);  // fan_in 64
  EXPECT_NEAR(s, 0.125, 0.125 * 0.15);
  stats("layers.0.input_layernorm.weight", &m, &s);  // 1 + 0.1 N
  EXPECT_NEAR(m, 1.0, 0.06);
  EXPECT_GT(s, 0.03);
  EXPECT_LT(s, 0.2);
}

TEST(RandomModel, DeterministicPerSeed) {
  TempDir d;
  // A small chunk size makes tensors straddle buffers: the bytes must not depend on it.
  make_tiny(d.sub("a"), 7);
  make_tiny(d.sub("b"), 7, 4096 + 6);
  make_tiny(d.sub("c"), 8);
  for (const char* comp : kComponents) {
    SCOPED_TRACE(comp);
    for (const auto& e : fs::directory_iterator(d.sub(std::string("a/") + comp))) {
      const std::string f = e.path().filename().string();
      if (!f.ends_with(".safetensors")) continue;
      EXPECT_EQ(slurp(e.path()), slurp(fs::path(d.sub("b")) / comp / f)) << f;
      EXPECT_NE(slurp(e.path()), slurp(fs::path(d.sub("c")) / comp / f)) << f;
    }
    // Every single tensor changes with the seed.
    const TensorStore a = TensorStore::open_dir(d.sub(std::string("a/") + comp));
    const TensorStore c = TensorStore::open_dir(d.sub(std::string("c/") + comp));
    for (const auto& name : a.names()) {
      const auto x = a.find(name), y = c.find(name);
      EXPECT_NE(0, std::memcmp(x.file->data(*x.info), y.file->data(*y.info), x.info->nbytes())) << name;
    }
  }
}

TEST(RandomModel, ShardIndexIsValid) {
  TempDir d;
  const std::string out = d.sub("m");
  make_tiny(out, 0);
  const fs::path te = fs::path(out) / "text_encoder";
  const nlohmann::json idx = nlohmann::json::parse(slurp(te / "model.safetensors.index.json"));
  ASSERT_TRUE(idx["weight_map"].is_object());
  std::set<std::string> shards;
  for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) shards.insert(it.value());
  EXPECT_EQ(shards, (std::set<std::string>{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}));
  uint64_t total = 0;
  size_t n = 0;
  int64_t params = 0;
  for (const auto& s : shards) {
    const SafetensorsFile f = SafetensorsFile::open((te / s).string());
    EXPECT_FALSE(f.tensors().empty()) << s;
    EXPECT_EQ(f.metadata().at("format"), "pt");
    EXPECT_EQ(f.data_start() % 8, 0u);
    for (const auto& t : f.tensors()) {
      total += t.nbytes();
      params += t.numel();
      EXPECT_EQ(idx["weight_map"][t.name], s) << t.name;
      ++n;
    }
    EXPECT_EQ(fs::file_size(te / s), f.data_start() + [&] {
      uint64_t b = 0;
      for (const auto& t : f.tensors()) b += t.nbytes();
      return b;
    }());
  }
  EXPECT_EQ(n, idx["weight_map"].size());
  EXPECT_EQ(idx["metadata"]["total_size"].get<uint64_t>(), total);
  EXPECT_EQ(idx["metadata"]["total_parameters"].get<int64_t>(), params);
  // Like the bundled model: the embedding table alone in the first shard.
  EXPECT_EQ(idx["weight_map"]["embed_tokens.weight"], "model-00001-of-00002.safetensors");
  EXPECT_EQ(idx["weight_map"]["norm.weight"], "model-00002-of-00002.safetensors");
  // Single-file components have no index.
  EXPECT_FALSE(fs::exists(fs::path(out) / "transformer" / "diffusion_pytorch_model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(fs::path(out) / "vae" / "diffusion_pytorch_model.safetensors"));
}

TEST(RandomModel, RefusesNonEmptyOutDir) {
  TempDir d;
  const std::string out = d.sub("busy");
  fs::create_directories(out);
  { std::ofstream(out + "/keep.txt") << "precious"; }
  std::string msg;
  try {
    make_tiny(out, 0);
  } catch (const Error& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("not empty"), std::string::npos) << msg;
  EXPECT_EQ(slurp(out + "/keep.txt"), "precious");
  EXPECT_EQ(std::distance(fs::directory_iterator(out), fs::directory_iterator{}), 1);
  // A file in the way is refused too; an existing empty folder is fine.
  { std::ofstream(d.sub("file")) << "x"; }
  EXPECT_THROW(make_tiny(d.sub("file"), 0), Error);
  fs::create_directories(d.sub("empty"));
  EXPECT_NO_THROW(make_tiny(d.sub("empty"), 0));
  // A missing tokenizer source is an error before anything is written.
  MakeRandomModelOptions o;
  o.tokenizer_src = d.sub("nowhere");
  EXPECT_THROW(make_random_model(d.sub("x"), o), Error);
  EXPECT_FALSE(fs::exists(d.sub("x")));
}

TEST(RandomModel, CancelLeavesNoCompleteFiles) {
  TempDir d;
  MakeRandomModelOptions o;
  o.tokenizer_src = tokenizer_src();
  o.chunk_bytes = 1 << 16;
  int calls = 0;
  o.check_cancel = [&] {
    if (++calls == 40) throw std::runtime_error("stop");
  };
  EXPECT_THROW(make_random_model(d.sub("m"), o), std::runtime_error);
  EXPECT_FALSE(fs::exists(d.sub("m/model_index.json")));
  for (const auto& e : fs::recursive_directory_iterator(d.sub("m")))
    EXPECT_FALSE(e.path().string().ends_with(".tmp")) << e.path();
}

TEST(RandomModel, TurboPlanMatchesSpec) {
  const RandomModelPlan p = random_model_plan(RandomPreset::Turbo);
  const RandomComponent& dit = p.component("transformer");
  const RandomComponent& te = p.component("text_encoder");
  const RandomComponent& vae = p.component("vae");

  // Transformer, from the spec §3.2 table: 32 modulated blocks (2 noise refiners + 30
  // layers), 2 context refiners, and the embedders.
  const int64_t D = 3840, F = 10240, A = 256;
  const int64_t attn = 4 * D * D + 2 * 128, ffn = 3 * F * D, norms = 4 * D, ada = 4 * D * A + 4 * D;
  const int64_t top = (D * 64 + D) + (1024 * 256 + 1024) + (256 * 1024 + 256) + 2560 + (D * 2560 + D) + 2 * D +
                      (D * A + D) + (64 * D + 64);
  const int64_t dit_params = 32 * (attn + ffn + norms + ada) + 2 * (attn + ffn + norms) + top;
  EXPECT_EQ(dit_params, 6154908736);
  EXPECT_EQ(dit.num_params(), dit_params);
  EXPECT_EQ(dit.tensors.size(), 32u * 15 + 2 * 13 + 15);
  // Text encoder, spec §2.2: embedding + 36 layers + final norm, no lm_head.
  const int64_t H = 2560, I = 9728;
  const int64_t layer = 2 * H + 4096 * H + 2 * 1024 * H + H * 4096 + 2 * 128 + 3 * I * H;
  const int64_t te_params = 151936 * H + 36 * layer + H;
  EXPECT_EQ(te_params, 4022468096);
  EXPECT_EQ(te.num_params(), te_params);
  EXPECT_EQ(te.tensors.size(), 1u + 36 * 11 + 1);
  EXPECT_EQ(find(te, "lm_head.weight"), nullptr);

  EXPECT_EQ(shape_of(dit, "all_x_embedder.2-1.weight"), (Shape{3840, 64}));
  EXPECT_EQ(shape_of(dit, "t_embedder.mlp.0.weight"), (Shape{1024, 256}));
  EXPECT_EQ(shape_of(dit, "t_embedder.mlp.2.weight"), (Shape{256, 1024}));
  EXPECT_EQ(shape_of(dit, "cap_embedder.0.weight"), (Shape{2560}));
  EXPECT_EQ(shape_of(dit, "cap_embedder.1.weight"), (Shape{3840, 2560}));
  EXPECT_EQ(shape_of(dit, "x_pad_token"), (Shape{1, 3840}));
  EXPECT_EQ(shape_of(dit, "all_final_layer.2-1.adaLN_modulation.1.weight"), (Shape{3840, 256}));
  EXPECT_EQ(shape_of(dit, "all_final_layer.2-1.linear.weight"), (Shape{64, 3840}));
  EXPECT_EQ(shape_of(dit, "layers.29.feed_forward.w2.weight"), (Shape{3840, 10240}));
  EXPECT_EQ(shape_of(dit, "layers.29.adaLN_modulation.0.weight"), (Shape{15360, 256}));
  EXPECT_EQ(shape_of(dit, "noise_refiner.1.adaLN_modulation.0.bias"), (Shape{15360}));
  EXPECT_EQ(shape_of(dit, "context_refiner.1.attention.norm_k.weight"), (Shape{128}));
  EXPECT_EQ(find(dit, "context_refiner.0.adaLN_modulation.0.weight"), nullptr);
  EXPECT_EQ(find(dit, "layers.30.attention.to_q.weight"), nullptr);

  EXPECT_EQ(shape_of(te, "model.embed_tokens.weight"), (Shape{151936, 2560}));
  EXPECT_EQ(shape_of(te, "model.layers.35.self_attn.q_proj.weight"), (Shape{4096, 2560}));
  EXPECT_EQ(shape_of(te, "model.layers.35.self_attn.k_proj.weight"), (Shape{1024, 2560}));
  EXPECT_EQ(shape_of(te, "model.layers.0.self_attn.o_proj.weight"), (Shape{2560, 4096}));
  EXPECT_EQ(shape_of(te, "model.layers.7.mlp.down_proj.weight"), (Shape{2560, 9728}));
  EXPECT_EQ(shape_of(te, "model.layers.7.self_attn.q_norm.weight"), (Shape{128}));
  EXPECT_EQ(shape_of(te, "model.norm.weight"), (Shape{2560}));

  // VAE, spec §5.4–5.5.
  EXPECT_EQ(shape_of(vae, "decoder.conv_in.weight"), (Shape{512, 16, 3, 3}));
  EXPECT_EQ(shape_of(vae, "decoder.mid_block.attentions.0.to_q.weight"), (Shape{512, 512}));
  EXPECT_EQ(shape_of(vae, "decoder.up_blocks.2.resnets.0.conv1.weight"), (Shape{256, 512, 3, 3}));
  EXPECT_EQ(shape_of(vae, "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"), (Shape{256, 512, 1, 1}));
  EXPECT_EQ(shape_of(vae, "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"), (Shape{128, 256, 1, 1}));
  EXPECT_EQ(shape_of(vae, "decoder.up_blocks.2.upsamplers.0.conv.weight"), (Shape{256, 256, 3, 3}));
  EXPECT_EQ(find(vae, "decoder.up_blocks.3.upsamplers.0.conv.weight"), nullptr);
  EXPECT_EQ(shape_of(vae, "decoder.conv_norm_out.weight"), (Shape{128}));
  EXPECT_EQ(shape_of(vae, "decoder.conv_out.weight"), (Shape{3, 128, 3, 3}));
  EXPECT_EQ(shape_of(vae, "encoder.conv_in.weight"), (Shape{128, 3, 3, 3}));
  EXPECT_EQ(shape_of(vae, "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"), (Shape{256, 128, 1, 1}));
  EXPECT_EQ(shape_of(vae, "encoder.down_blocks.2.resnets.0.conv_shortcut.weight"), (Shape{512, 256, 1, 1}));
  EXPECT_EQ(find(vae, "encoder.down_blocks.3.resnets.0.conv_shortcut.weight"), nullptr);
  EXPECT_EQ(shape_of(vae, "encoder.down_blocks.2.downsamplers.0.conv.weight"), (Shape{512, 512, 3, 3}));
  EXPECT_EQ(find(vae, "encoder.down_blocks.3.downsamplers.0.conv.weight"), nullptr);
  EXPECT_EQ(shape_of(vae, "encoder.mid_block.attentions.0.to_out.0.weight"), (Shape{512, 512}));
  EXPECT_EQ(shape_of(vae, "encoder.conv_norm_out.weight"), (Shape{512}));
  EXPECT_EQ(shape_of(vae, "encoder.conv_out.weight"), (Shape{32, 512, 3, 3}));
  EXPECT_EQ(find(vae, "quant_conv.weight"), nullptr);

  // The configs parse back to the spec values.
  const Qwen3Config qc = parse_qwen3_config(te.config_json, "te");
  EXPECT_EQ(qc.num_hidden_layers, 36);
  EXPECT_EQ(qc.head_dim, 128);
  const DitConfig dc = parse_dit_config(dit.config_json, "dit");
  EXPECT_EQ(dc.axes_lens, (std::vector<int>{1536, 512, 512}));
  const VaeConfig vc = parse_vae_config(vae.config_json, "vae");
  EXPECT_DOUBLE_EQ(vc.scaling_factor, 0.3611);
  const auto sched = nlohmann::json::parse(p.scheduler_config_json);
  EXPECT_EQ(sched["shift"], 3.0);
  EXPECT_EQ(sched["use_dynamic_shifting"], false);
  EXPECT_EQ(sched["num_train_timesteps"], 1000);

  // Storage dtypes and sharding as on the Hub; total ≈ 32.8 GB.
  for (const auto& t : dit.tensors) EXPECT_EQ(t.dtype, StDType::F32) << t.name;
  for (const auto& t : te.tensors) EXPECT_EQ(t.dtype, StDType::BF16) << t.name;
  for (const auto& t : vae.tensors) EXPECT_EQ(t.dtype, StDType::BF16) << t.name;
  EXPECT_EQ(dit.shards, 3);
  EXPECT_EQ(te.shards, 3);
  EXPECT_EQ(vae.shards, 1);
  EXPECT_EQ(dit.num_bytes(), uint64_t(dit_params) * 4);
  EXPECT_EQ(te.num_bytes(), uint64_t(te_params) * 2);
  EXPECT_NEAR(double(p.num_bytes()) / 1e9, 32.8, 0.1);

  for (DType dt : {DType::F32, DType::BF16}) {
    const RandomModelPlan q = random_model_plan(RandomPreset::Turbo, dt);
    const StDType want = dt == DType::F32 ? StDType::F32 : StDType::BF16;
    for (const auto& c : q.components)
      for (const auto& t : c.tensors) EXPECT_EQ(t.dtype, want) << c.name << " " << t.name;
  }
  EXPECT_THROW(random_model_plan(RandomPreset::Turbo, DType::F16), Error);
}

TEST(RandomModel, TurboShardsAreBalanced) {
  const RandomModelPlan p = random_model_plan(RandomPreset::Turbo);
  for (const char* name : {"transformer", "text_encoder"}) {
    SCOPED_TRACE(name);
    const RandomComponent& c = p.component(name);
    std::vector<uint64_t> sizes;
    uint64_t biggest = 0;
    for (const auto& t : c.tensors) {
      sizes.push_back(t.nbytes());
      biggest = std::max(biggest, t.nbytes());
    }
    const std::vector<int> s = assign_shards(sizes, c.shards);
    std::vector<uint64_t> per(size_t(c.shards), 0);
    for (size_t i = 0; i < s.size(); ++i) per[size_t(s[i])] += sizes[i];
    for (uint64_t b : per) EXPECT_LE(std::llabs(int64_t(b) - int64_t(c.num_bytes() / 3)), int64_t(biggest)) << b;
  }
}

TEST(RandomModel, AssignShards) {
  auto check = [](const std::vector<uint64_t>& sizes, int n) {
    const std::vector<int> s = assign_shards(sizes, n);
    EXPECT_EQ(s.size(), sizes.size());
    EXPECT_EQ(s.front(), 0);
    EXPECT_EQ(s.back(), n - 1);
    for (size_t i = 1; i < s.size(); ++i) EXPECT_TRUE(s[i] == s[i - 1] || s[i] == s[i - 1] + 1);
    return s;
  };
  EXPECT_EQ(check({10, 10, 10, 10, 10, 10}, 3), (std::vector<int>{0, 0, 1, 1, 2, 2}));
  EXPECT_EQ(check({1000, 1, 1, 1}, 3), (std::vector<int>{0, 1, 2, 2}));  // every shard gets a tensor
  EXPECT_EQ(check({1, 1, 1, 1000}, 3), (std::vector<int>{0, 0, 1, 2}));
  EXPECT_EQ(check({5, 5, 5}, 3), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(check({0, 0, 0, 0}, 2), (std::vector<int>{0, 0, 1, 1}));
  EXPECT_EQ(check({7}, 1), (std::vector<int>{0}));
  EXPECT_THROW(assign_shards({1, 2}, 3), Error);
  EXPECT_EQ(shard_file_name("model", 2, 3), "model-00002-of-00003.safetensors");
  EXPECT_EQ(shard_file_name("diffusion_pytorch_model", 1, 1), "diffusion_pytorch_model.safetensors");
}

TEST(RandomModel, NormalGenerator) {
  const uint64_t key = random_tensor_key(0, "c", "t");
  EXPECT_NE(key, random_tensor_key(1, "c", "t"));
  EXPECT_NE(key, random_tensor_key(0, "c", "u"));
  EXPECT_NE(key, random_tensor_key(0, "d", "t"));
  double s = 0, s2 = 0, s4 = 0, mx = 0;
  const int n = 1 << 20;
  for (int i = 0; i < n; ++i) {
    const double z = random_normal_at(key, uint64_t(i));
    s += z;
    s2 += z * z;
    s4 += z * z * z * z;
    mx = std::max(mx, std::fabs(z));
  }
  EXPECT_NEAR(s / n, 0.0, 0.005);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
  EXPECT_NEAR(s4 / n, 2.7, 0.05);  // Irwin–Hall(4): kurtosis 3 − 6/20 (a normal has 3)
  EXPECT_LE(mx, 2 * std::sqrt(3.0) + 1e-6);
  EXPECT_GT(mx, 3.0);
}

TEST(RandomModel, CliErrors) {
  if (!fs::exists(ZI_BINARY)) GTEST_SKIP() << "zimage binary not built: " << ZI_BINARY;
  TempDir d;
  auto rc_of = [](const std::string& args) {
    const int rc = std::system((std::string("'") + ZI_BINARY + "' make-random-model " + args + " 2>/dev/null").c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  };
  EXPECT_EQ(rc_of("--preset huge '" + d.sub("a") + "'"), 2);
  EXPECT_EQ(rc_of("--preset tiny --dtype f16 '" + d.sub("a") + "'"), 2);
  EXPECT_EQ(rc_of("--preset tiny"), 2);
  EXPECT_FALSE(fs::exists(d.sub("a")));
  EXPECT_EQ(rc_of("-q --preset tiny --seed 5 --dtype f32 '" + d.sub("a") + "'"), 0);
  const TensorStore s = TensorStore::open_dir(d.sub("a/transformer"));
  EXPECT_EQ(s.find("x_pad_token").info->dtype, StDType::F32);
  EXPECT_EQ(rc_of("--preset tiny '" + d.sub("a") + "'"), 1);  // not empty now
}
