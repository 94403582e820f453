// Qwen3 text encoder and text phase vs transformers/diffusers fixtures made with the bundled
// tiny model (f32 math on bf16-rounded weights): hidden_states[-2], prompt embeddings of each
// pipeline case, memory release, and checkpoint key variants.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/check.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/qwen3_encoder.h"
#include "pipeline/text_phase.h"
#include "test_util.h"
#include "text/bpe_tokenizer.h"

using namespace zi;
namespace fs = std::filesystem;

namespace {

constexpr double kTol = 1e-4;

const ModelFolder& tiny() {
  static const ModelFolder mf = open_model_folder(test::tiny_model());
  return mf;
}

// The fixture script casts the encoder with .to(torch.bfloat16) before computing in f32, which
// also rounds the RoPE inv_freq buffer to bf16: reproduce that (see Qwen3Encoder::rope_freq_dtype).
const Qwen3Encoder& tiny_encoder() {
  static const Qwen3Encoder enc = load_text_encoder(tiny(), DType::BF16, DType::BF16);
  return enc;
}

const BpeTokenizer& tiny_tokenizer() {
  static const BpeTokenizer tok = BpeTokenizer::load_dir(tiny().tokenizer_dir);
  return tok;
}

// The ids whose attention_mask is 1 (they are a prefix: padding is on the right).
std::vector<int32_t> real_ids(const SafetensorsFile& f, const std::string& ids_name, const std::string& mask_name) {
  Tensor ids = f.load(ids_name);
  Tensor mask = f.load(mask_name);
  EXPECT_EQ(ids.dtype(), DType::I32);
  EXPECT_EQ(ids.numel(), mask.numel());
  std::vector<int32_t> out;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (mask.data<int32_t>()[i] == 0) continue;
    EXPECT_EQ(int64_t(out.size()), i) << "attention_mask is not a prefix of ones";
    out.push_back(ids.data<int32_t>()[i]);
  }
  return out;
}

void expect_close(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const double rel = test::rel_l2(got, want), mad = test::max_abs_diff(got, want);
  std::printf("[qwen3] %-28s %s rel_l2 %.3e  max_abs %.3e\n", what.c_str(), shape_str(got.shape()).c_str(), rel,
              mad);
  EXPECT_LE(rel, kTol) << what;
}

// A scratch directory removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / ("zi_test_qwen3_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Copies every tensor of the tiny text encoder into DIR/model.safetensors, renamed by `rename`
// (an empty name drops the tensor), plus `extra` tensors.
void write_copy(const fs::path& dir, const std::function<std::string(const std::string&)>& rename,
                std::vector<std::pair<std::string, Tensor>> extra = {}) {
  const TensorStore store = TensorStore::open_dir(tiny().text_encoder_dir);
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& f : store.files())
    for (const TensorInfo& t : f->tensors())
      if (std::string n = rename(t.name); !n.empty()) out.emplace_back(n, f->view(t));
  for (auto& e : extra) out.push_back(std::move(e));
  write_safetensors((dir / "model.safetensors").string(), out);
}

Tensor encode_dir(const fs::path& dir, std::set<std::string>* reads = nullptr) {
  const TensorStore store = TensorStore::open_dir(dir.string());
  WeightLoader loader(store, Tag::TextWeights, "text_encoder");
  Qwen3Encoder enc = load_qwen3_encoder(loader, tiny().text_encoder, DType::BF16);
  loader.finish();
  enc.rope_freq_dtype = DType::BF16;
  if (reads) *reads = store.reads();
  return qwen3_encode(enc, {151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198});
}

}  // namespace

// (a) hidden_states[-2] of the component fixture: 37 ids, the last 7 padding.
TEST(Qwen3Encoder, HiddenStatesMinus2MatchesTransformers) {
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const std::vector<int32_t> ids = real_ids(f, "te.input_ids", "te.attention_mask");
  ASSERT_EQ(ids.size(), 30u);
  Tensor want = f.load("te.hidden_states_m2", DType::F32).slice(0, 0, 30).contiguous();
  Tensor got = qwen3_encode(tiny_encoder(), ids);
  EXPECT_EQ(got.dtype(), DType::F32);
  expect_close(got, want, "components hidden[-2]");

  // With transformers' own f32 frequencies the result moves by about 6e-4 (relative L2).
  Qwen3Encoder f32_freqs = load_text_encoder(tiny(), DType::BF16, DType::F32);
  Tensor alt = qwen3_encode(f32_freqs, ids);
  const double rel = test::rel_l2(alt, want);
  std::printf("[qwen3] components hidden[-2], f32 RoPE freqs: rel_l2 %.3e\n", rel);
  EXPECT_LE(rel, 2e-3);
}

// The encoder keeps only what hidden_states[-2] needs.
TEST(Qwen3Encoder, LoadsAllButTheLastLayer) {
  const Qwen3Encoder& enc = tiny_encoder();
  EXPECT_EQ(int(enc.layers.size()), tiny().text_encoder.num_hidden_layers - 1);
  EXPECT_EQ(enc.embed_tokens.dtype(), DType::BF16);
  EXPECT_EQ(enc.layers[0].q_proj.dtype(), DType::BF16);
  EXPECT_EQ(enc.layers[0].q_norm.dtype(), DType::F32);
  EXPECT_EQ(enc.layers[0].input_layernorm.dtype(), DType::F32);
}

// (b) prompt_embeds0 (and negative_prompt_embeds0) of every pipeline case.
class Qwen3Case : public ::testing::TestWithParam<const char*> {};

TEST_P(Qwen3Case, PromptEmbedsMatchDiffusers) {
  const std::string name = GetParam();
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/" + name + ".safetensors"));
  const nlohmann::json meta = nlohmann::json::parse(read_text_file(test::data_path("expected/" + name + ".json")));
  const int max_len = meta.at("max_sequence_length").get<int>();

  const std::vector<int32_t> ids = real_ids(f, "input_ids", "attention_mask");
  EXPECT_EQ(int(ids.size()), meta.at("num_prompt_tokens").get<int>());
  expect_close(qwen3_encode(tiny_encoder(), ids), f.load("prompt_embeds0", DType::F32), name + " prompt_embeds0");

  // The same through the tokenizer: the ids must agree with the reference ones.
  std::vector<int32_t> tok_ids;
  Tensor via_tok =
      encode_prompt(tiny_encoder(), tiny_tokenizer(), meta.at("prompt").get<std::string>(), max_len, &tok_ids);
  EXPECT_EQ(tok_ids, ids) << name << ": tokenizer ids differ from the fixture";
  expect_close(via_tok, f.load("prompt_embeds0", DType::F32), name + " prompt (tokenized)");

  if (f.find("negative_prompt_embeds0")) {
    // Negative ids are not stored: tokenize the negative prompt with the chat template.
    const std::string neg = meta.at("negative_prompt").is_string() ? meta.at("negative_prompt").get<std::string>() : "";
    Tensor got = encode_prompt(tiny_encoder(), tiny_tokenizer(), neg, max_len);
    expect_close(got, f.load("negative_prompt_embeds0", DType::F32), name + " negative_prompt_embeds0");
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, Qwen3Case, ::testing::Values("turbo", "cfg", "truncated", "lora", "override"),
                         [](const auto& info) { return std::string(info.param); });

// (c) The whole text phase frees every encoder byte; only the embeddings survive.
TEST(TextPhase, EncodePromptReleasesEncoderMemory) {
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t text_before = ms.tag(Tag::TextWeights).current;
  const int64_t act_before = ms.tag(Tag::Activations).current;
  ms.reset_peaks();

  std::vector<int32_t> ids;
  Tensor out =
      encode_prompt(tiny(), "A red fox standing in fresh snow, watercolor", 512, DType::BF16, &ids, DType::BF16);
  ASSERT_EQ(out.shape(), (Shape{int64_t(ids.size()), tiny().text_encoder.hidden_size}));

  EXPECT_EQ(ms.tag(Tag::TextWeights).current, text_before);
  EXPECT_EQ(ms.tag(Tag::Activations).current - act_before, int64_t(out.nbytes()));
  // Peak weights = embedding + the first N−1 layers (bf16 matrices, f32 norms), no more.
  const Qwen3Config& c = tiny().text_encoder;
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t QD = int64_t(c.num_attention_heads) * D, KD = int64_t(c.num_key_value_heads) * D;
  const int64_t per_layer = 2 * (QD * H * 2 + KD * H * 2 + 3 * I * H) + 4 * (2 * H + 2 * D);
  const int64_t expect = 2 * int64_t(c.vocab_size) * H + (c.num_hidden_layers - 1) * per_layer;
  EXPECT_EQ(ms.tag(Tag::TextWeights).peak - text_before, expect);

  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/turbo.safetensors"));
  expect_close(out, f.load("prompt_embeds0", DType::F32), "turbo via encode_prompt(mf)");
}

// (d) Keys with the "model." prefix (causal-LM export, spec §6.4) and a stray lm_head load
// to the same result; the bundled checkpoint itself has no prefix. The last layer and the
// final norm are never read.
TEST(Qwen3Encoder, AcceptsModelPrefixAndNeverReadsUnusedTensors) {
  TempDir plain("plain"), prefixed("prefixed");
  write_copy(plain.path, [](const std::string& n) { return n; });
  const TensorStore tiny_store = TensorStore::open_dir(tiny().text_encoder_dir);
  const SafetensorsFile* ef = tiny_store.find("embed_tokens.weight").file;
  ASSERT_NE(ef, nullptr);
  write_copy(prefixed.path, [](const std::string& n) { return "model." + n; },
             {{"lm_head.weight", ef->view(*tiny_store.find("embed_tokens.weight").info)}});

  std::set<std::string> reads_plain, reads_prefixed;
  Tensor a = encode_dir(plain.path, &reads_plain);
  Tensor b = encode_dir(prefixed.path, &reads_prefixed);
  EXPECT_EQ(test::max_abs_diff(a, b), 0.0);

  const std::string last = str_cat("layers.", tiny().text_encoder.num_hidden_layers - 1, ".");
  for (const std::string& n : reads_plain) {
    EXPECT_FALSE(n.starts_with(last)) << n;
    EXPECT_NE(n, "norm.weight");
  }
  for (const std::string& n : reads_prefixed) {
    EXPECT_TRUE(n.starts_with("model.")) << n;
    EXPECT_FALSE(n.starts_with("model." + last)) << n;
    EXPECT_NE(n, "model.norm.weight");
  }
  EXPECT_EQ(reads_plain.size(), reads_prefixed.size());
}

// A checkpoint lacking a tensor fails at finish(), naming it.
TEST(Qwen3Encoder, MissingTensorIsReported) {
  TempDir dir("missing");
  write_copy(dir.path, [](const std::string& n) { return n == "layers.0.mlp.up_proj.weight" ? std::string() : n; });
  const TensorStore store = TensorStore::open_dir(dir.path.string());
  WeightLoader loader(store, Tag::TextWeights, "text_encoder");
  Qwen3Encoder enc = load_qwen3_encoder(loader, tiny().text_encoder, DType::BF16);
  try {
    loader.finish();
    FAIL() << "finish() accepted a checkpoint without layers.0.mlp.up_proj.weight";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.0.mlp.up_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(Qwen3Encoder, RejectsBadIds) {
  EXPECT_THROW(qwen3_encode(tiny_encoder(), {}), Error);
  EXPECT_THROW(qwen3_encode(tiny_encoder(), {1, tiny().text_encoder.vocab_size}), Error);
  EXPECT_THROW(qwen3_encode(tiny_encoder(), {-1}), Error);
}

// RoPE tables: angle p·θ^(−2i/D); the first frequency is exactly 1.
TEST(Qwen3Encoder, RopeTables) {
  Tensor c, s;
  qwen3_rope_tables(4, 16, 1e6, DType::F32, &c, &s);
  ASSERT_EQ(c.shape(), (Shape{4, 8}));
  EXPECT_EQ(c.f32()[0], 1.0f);
  EXPECT_EQ(s.f32()[0], 0.0f);
  EXPECT_FLOAT_EQ(c.f32()[3 * 8 + 0], std::cos(3.0f));
  EXPECT_NEAR(s.f32()[2 * 8 + 1], std::sin(2.0 * std::pow(1e6, -2.0 / 16)), 1e-7);
  // bf16 frequencies: 10^(-3/4) = 0.177828 rounds to 0.177734375.
  qwen3_rope_tables(4, 16, 1e6, DType::BF16, &c, &s);
  EXPECT_FLOAT_EQ(s.f32()[1 * 8 + 1], std::sin(0.177734375f));
}

// The CLI writes what encode_prompt returns.
TEST(EncodeCli, WritesPromptEmbedsAndIds) {
  if (!fs::exists(ZI_BINARY)) GTEST_SKIP() << "zimage binary not built: " << ZI_BINARY;
  TempDir dir("cli");
  const std::string out = (dir.path / "e.safetensors").string();
  const std::string cmd = str_cat("'", ZI_BINARY, "' encode --model '", tiny().root,
                                  "' -p 'A red fox standing in fresh snow, watercolor' --threads 1 --rope-freq-dtype bf16 -q -o '", out, "'");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const SafetensorsFile f = SafetensorsFile::open(out);
  const SafetensorsFile want = SafetensorsFile::open(test::data_path("expected/turbo.safetensors"));
  expect_close(f.load("prompt_embeds"), want.load("prompt_embeds0", DType::F32), "turbo via zimage encode");
  EXPECT_EQ(f.load("input_ids").numel(), 18);

  // Bad flag values are usage errors (exit 2).
  const std::string bad = str_cat("'", ZI_BINARY, "' encode -p x --max-sequence-length 0 -o '", out, "' 2>/dev/null");
  const int rc = std::system(bad.c_str());
  EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 2) << rc;
}
