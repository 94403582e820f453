// Qwen2 BPE tokenizer (spec §1): every reference vector must match id for id, loaded both from
// tokenizer.json and from vocab.json + merges.txt.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"
#include "text/bpe_tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using Ids = std::vector<int32_t>;

namespace {

const std::string kQwenDir = ZI_TEST_DATA "/qwen-tokenizer/";
const std::string kExpectedDir = ZI_TEST_DATA "/expected/";
constexpr int32_t kPad = 151643;

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << path;
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Loading parses ~11 MB of JSON, so each form is loaded once for the whole file.
const zi::BpeTokenizer& tok_json() {
  static const zi::BpeTokenizer t = zi::BpeTokenizer::from_tokenizer_json(ZI_TINY_MODEL "/tokenizer/tokenizer.json");
  return t;
}
const zi::BpeTokenizer& tok_slow() {
  static const zi::BpeTokenizer t = zi::BpeTokenizer::from_vocab_merges(
      kQwenDir + "vocab.json", kQwenDir + "merges.txt", kQwenDir + "qwen3-4b-2507_tokenizer_config.json");
  return t;
}

struct Named {
  const char* name;
  const zi::BpeTokenizer& (*get)();
};
const Named kBoth[] = {{"tokenizer.json", tok_json}, {"vocab+merges", tok_slow}};

std::string show(const std::string& s) { return json(s).dump(); }

// A tiny safetensors reader: 8-byte little-endian header length, JSON header, data.
Ids read_ids(const std::string& path, const std::string& name, std::vector<int64_t>* shape = nullptr) {
  std::string b = slurp(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(b[size_t(i)]);
  json h = json::parse(b.substr(8, n));
  const json& t = h.at(name);
  if (shape) *shape = t.at("shape").get<std::vector<int64_t>>();
  size_t begin = t.at("data_offsets")[0], end = t.at("data_offsets")[1];
  const std::string dt = t.at("dtype");
  const char* p = b.data() + 8 + n + begin;
  Ids out;
  if (dt == "I32") {
    out.resize((end - begin) / 4);
    std::memcpy(out.data(), p, end - begin);
  } else if (dt == "I64") {
    for (size_t i = 0; i < (end - begin) / 8; ++i) {
      int64_t v;
      std::memcpy(&v, p + 8 * i, 8);
      out.push_back(int32_t(v));
    }
  } else {
    ADD_FAILURE() << path << ": " << name << " has dtype " << dt;
  }
  return out;
}

}  // namespace

TEST(Tokenizer, LoadsBothForms) {
  for (const Named& t : kBoth) {
    EXPECT_EQ(t.get().vocab_size(), 151669u) << t.name;
    EXPECT_EQ(t.get().token_id("<|endoftext|>"), 151643) << t.name;
    EXPECT_EQ(t.get().token_id("<|im_start|>"), 151644) << t.name;
    EXPECT_EQ(t.get().token_id("<|im_end|>"), 151645) << t.name;
    EXPECT_EQ(t.get().token_id("<think>"), 151667) << t.name;
    EXPECT_EQ(t.get().token_id("</think>"), 151668) << t.name;
    EXPECT_EQ(t.get().token_id("Ċ"), 198) << t.name;
    EXPECT_EQ(t.get().token_id("Ġ"), 220) << t.name;
    EXPECT_EQ(t.get().token_id("user"), 872) << t.name;
    EXPECT_EQ(t.get().token_id("no such token"), -1) << t.name;
  }
}

TEST(Tokenizer, SpecWorkedExample) {
  const Ids want = {151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198};
  for (const Named& t : kBoth) EXPECT_EQ(zi::tokenize_zimage_prompt(t.get(), "a cat"), want) << t.name;
  EXPECT_EQ(zi::zimage_chat_prompt(""), "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n");
}

TEST(Tokenizer, ProjectVectors) {
  json cases = json::parse(slurp(ZI_TEST_DATA "/tokenizer_vectors.json"));
  ASSERT_GT(cases.size(), 20u);
  for (const Named& t : kBoth)
    for (const json& c : cases)
      EXPECT_EQ(t.get().encode(c.at("text").get<std::string>()), c.at("ids").get<Ids>())
          << t.name << " text " << c.at("text").dump();
}

// llama.cpp's vectors: inputs separated by "\n__ggml_vocab_test__\n", one " id id ..." line each.
TEST(Tokenizer, LlamaCppVectors) {
  for (const char* stem : {"ggml-vocab-qwen2.gguf", "ggml-vocab-qwen2.gguf.2024-07"}) {
    const std::string base = kQwenDir + "testvectors/" + stem;
    std::string inp = slurp(base + ".inp");
    std::istringstream out(slurp(base + ".out"));
    const std::string sep = "\n__ggml_vocab_test__\n";
    int n = 0;
    for (size_t pos = 0, next; (next = inp.find(sep, pos)) != std::string::npos; pos = next + sep.size(), ++n) {
      std::string text = inp.substr(pos, next - pos), line;
      ASSERT_TRUE(std::getline(out, line)) << stem << " test " << n;
      Ids want;
      std::istringstream ls(line);
      for (int32_t id; ls >> id;) want.push_back(id);
      for (const Named& t : kBoth) EXPECT_EQ(t.get().encode(text), want) << stem << " " << t.name << " " << show(text);
    }
    EXPECT_EQ(n, 46) << stem;
  }
}

TEST(Tokenizer, TransformersIntegrationVectors) {
  json j = json::parse(slurp(kQwenDir + "testvectors/transformers_qwen2_integration.json"));
  ASSERT_EQ(j.at("cases").size(), 3u);
  for (const Named& t : kBoth)
    for (const json& c : j.at("cases"))
      EXPECT_EQ(t.get().encode(c.at("text").get<std::string>()), c.at("ids").get<Ids>()) << t.name;
}

// The pipeline fixtures: chat template, count, and input_ids (right-padded with 151643).
TEST(Tokenizer, PipelineFixtures) {
  for (const char* name : {"turbo", "cfg", "truncated", "lora", "override"}) {
    json c = json::parse(slurp(kExpectedDir + name + ".json"));
    const std::string prompt = c.at("prompt");
    const int max_len = c.at("max_sequence_length");
    const size_t n = c.at("num_prompt_tokens");
    EXPECT_EQ(zi::zimage_chat_prompt(prompt), c.at("templated_prompt").get<std::string>()) << name;
    const std::string st = kExpectedDir + name + ".safetensors";
    Ids padded = read_ids(st, "input_ids"), mask = read_ids(st, "attention_mask");
    ASSERT_EQ(padded.size(), size_t(max_len)) << name;
    Ids want(padded.begin(), padded.begin() + long(n));
    for (size_t i = n; i < padded.size(); ++i) ASSERT_EQ(padded[i], kPad) << name << " pad at " << i;
    for (size_t i = 0; i < mask.size(); ++i) ASSERT_EQ(mask[i], i < n ? 1 : 0) << name << " mask at " << i;
    for (const Named& t : kBoth)
      EXPECT_EQ(zi::tokenize_zimage_prompt(t.get(), prompt, max_len), want) << name << " " << t.name;
  }
}

TEST(Tokenizer, TruncationDropsAssistantTag) {
  json c = json::parse(slurp(kExpectedDir + "truncated.json"));
  Ids ids = zi::tokenize_zimage_prompt(tok_json(), c.at("prompt").get<std::string>(), 24);
  ASSERT_EQ(ids.size(), 24u);
  EXPECT_EQ(ids.front(), 151644);
  EXPECT_NE(ids.back(), 198);  // the tail "<|im_end|>\n<|im_start|>assistant\n" is cut off
  EXPECT_THROW(zi::tokenize_zimage_prompt(tok_json(), "x", 0), zi::Error);
}

// The CFG negative prompt has no ids in the fixture, but its encoder output has one row per token.
TEST(Tokenizer, CfgNegativePromptLength) {
  json c = json::parse(slurp(kExpectedDir + "cfg.json"));
  std::vector<int64_t> shape;
  std::string b = slurp(kExpectedDir + "cfg.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(b[size_t(i)]);
  shape = json::parse(b.substr(8, n)).at("negative_prompt_embeds0").at("shape").get<std::vector<int64_t>>();
  for (const Named& t : kBoth)
    EXPECT_EQ(int64_t(zi::tokenize_zimage_prompt(t.get(), c.at("negative_prompt").get<std::string>()).size()), shape[0])
        << t.name;
}

TEST(Tokenizer, AddedTokensAreCutOutAnywhere) {
  const zi::BpeTokenizer& t = tok_json();
  EXPECT_EQ(t.encode("<|im_start|><|im_end|>"), (Ids{151644, 151645}));
  EXPECT_EQ(t.encode("x<think>y"), (Ids{t.token_id("x"), 151667, t.token_id("y")}));
  // A broken tag is ordinary text.
  Ids broken = t.encode("<|im_start|");
  EXPECT_EQ(std::count(broken.begin(), broken.end(), 151644), 0);
}

TEST(Tokenizer, RejectsInvalidUtf8) {
  for (const char* bad : {"\xff", "abc\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "a\xe4\xb8 b",
                          "<|im_start|>\x80<|im_end|>"}) {
    for (const Named& t : kBoth) {
      EXPECT_THROW(t.get().encode(bad), zi::Error) << t.name << " " << show(bad);
      EXPECT_THROW(zi::tokenize_zimage_prompt(t.get(), bad), zi::Error) << t.name;
    }
  }
  EXPECT_NO_THROW(tok_json().encode(std::string("a\0b", 3)));  // NUL is valid UTF-8
}

TEST(Tokenizer, DecodeRoundTrips) {
  const zi::BpeTokenizer& t = tok_json();
  for (std::string s : {"Hello world", "一只猫 sitting on a chair 🐱, studio light", "tabs\tand\nnewlines\r\n",
                        "<|im_start|>user\nhi<|im_end|>", "  leading and trailing  "})
    EXPECT_EQ(t.decode(t.encode(s)), s);
  EXPECT_EQ(t.decode(t.encode("e\xcc\x81")), "\xc3\xa9");  // NFC composes e + U+0301
  // A lone lead byte (token "æ" is byte 0xE6) decodes to U+FFFD, as in the reference.
  EXPECT_EQ(t.decode({t.token_id("a"), t.token_id("æ"), t.token_id("b")}), std::string("a\xef\xbf\xbd") + "b");
  EXPECT_THROW(t.decode({-1}), zi::Error);
  EXPECT_THROW(t.decode({int32_t(t.vocab_size())}), zi::Error);
}

// Oniguruma's \s (the reference engine) is the White_Space property, which lacks U+180E; PCRE2's
// \s has it. So " \u180E." is one word (like " ."), where PCRE2's \s would split off the space:
// {64, 220, 123970, 236, 13}. Expected ids derived by hand from the Oniguruma rules, not a run.
TEST(Tokenizer, WhitespaceFollowsOniguruma) {
  for (const Named& t : kBoth) EXPECT_EQ(t.get().encode("a \u180E."), (Ids{64, 86089, 254, 236, 13})) << t.name;
}

TEST(Tokenizer, LongAndPathologicalInputs) {
  const zi::BpeTokenizer& t = tok_json();
  for (std::string s : {std::string(200000, ' '), std::string(200000, 'a'), std::string(50000, '!'),
                        std::string(100000, '\n') + "x", std::string(" \t") + std::string(100000, ' ') + "y"}) {
    Ids ids = t.encode(s);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(t.decode(ids), s);
  }
  std::string cjk;
  for (int i = 0; i < 3000; ++i) cjk += "猫坐在椅子上";
  EXPECT_EQ(t.decode(t.encode(cjk)), cjk);
  EXPECT_EQ(t.encode(cjk), tok_slow().encode(cjk));
}

TEST(Tokenizer, ConcurrentEncodeIsSafe) {
  const zi::BpeTokenizer& t = tok_json();
  const std::string text = "A red fox standing in fresh snow, watercolor 一只猫 🐱 <|im_end|> 12345";
  const Ids want = t.encode(text);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&, k] {
      for (int i = 0; i < 200; ++i) ok[size_t(k)] += t.encode(text) == want;
    });
  for (auto& th : threads) th.join();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(ok[size_t(k)], 200);
}

namespace {

// A byte-level tokenizer.json with the 256 byte tokens (ids 0..255, in bytes_to_unicode order)
// and a few merges, written in either merge notation.
std::string tiny_tokenizer_json(bool pairs) {
  json vocab = json::object();
  int next = 0x100, id = 0;
  std::vector<std::string> byte_tok(256);
  auto keep = [](int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; };
  for (int b = 0; b < 256; ++b) {
    uint32_t cp = keep(b) ? uint32_t(b) : uint32_t(next++);
    std::string s;
    if (cp < 0x80) {
      s += char(cp);
    } else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    byte_tok[size_t(b)] = s;
  }
  // ids in table order: self-mapped bytes first, then the remapped ones.
  for (int b = 0; b < 256; ++b)
    if (keep(b)) vocab[byte_tok[size_t(b)]] = id++;
  for (int b = 0; b < 256; ++b)
    if (!keep(b)) vocab[byte_tok[size_t(b)]] = id++;
  const std::vector<std::pair<std::string, std::string>> merges = {{"a", "b"}, {"ab", "c"}, {"Ġ", "ab"}, {"c", "c"}};
  json m = json::array();
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    m.push_back(pairs ? json::array({a, b}) : json(a + " " + b));
  }
  json added = json::array({json{{"id", id}, {"content", "<x>"}, {"special", true}},
                            json{{"id", id + 1}, {"content", "<x><y>"}, {"special", false}}});
  json j = {{"version", "1.0"},
            {"added_tokens", added},
            {"normalizer", {{"type", "NFC"}}},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers", json::array({json{{"type", "Split"},
                                                  {"pattern", {{"Regex", " ?\\S+|\\s+"}}},
                                                  {"behavior", "Isolated"},
                                                  {"invert", false}},
                                             json{{"type", "ByteLevel"}, {"use_regex", false}}})}}},
            {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"vocab", vocab}, {"merges", m}}}};
  return j.dump();
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("zi_tok_" + std::to_string(::getpid()) + "_" + std::to_string(reinterpret_cast<uintptr_t>(this)));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name, std::ios::binary) << text;
    return (path / name).string();
  }
};

}  // namespace

TEST(Tokenizer, MergesAsPairsOrStrings) {
  TempDir dir;
  Ids results[2];
  for (int pairs = 0; pairs < 2; ++pairs) {
    std::string p = dir.write("tokenizer.json", tiny_tokenizer_json(pairs));
    zi::BpeTokenizer t = zi::BpeTokenizer::load_dir(dir.path.string());
    const int32_t ab = t.token_id("ab"), abc = t.token_id("abc"), sab = t.token_id("Ġab"), cc = t.token_id("cc");
    ASSERT_GE(ab, 256);
    // "abcc": a+b (rank 0), then ab+c (rank 1) before c+c (rank 3).
    EXPECT_EQ(t.encode("abcc"), (Ids{abc, t.token_id("c")}));
    EXPECT_EQ(t.encode(" ab"), (Ids{sab}));
    EXPECT_EQ(t.encode("cccc"), (Ids{cc, cc}));
    // Added tokens: the longest match wins, and they split words.
    EXPECT_EQ(t.encode("ab<x><y>ab<x>"), (Ids{ab, t.token_id("<x><y>"), ab, t.token_id("<x>")}));
    results[pairs] = t.encode("abc ab cc <x> aab");
    EXPECT_EQ(t.decode(results[pairs]), "abc ab cc <x> aab");
  }
  EXPECT_EQ(results[0], results[1]);
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
  TempDir dir;
  auto expect_error_mentions = [](auto fn, const std::string& what) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << what;
    } catch (const zi::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_error_mentions([&] { zi::BpeTokenizer::load_dir(dir.path.string()); }, dir.path.string());
  std::string bad = dir.write("bad.json", "{\"model\": ");
  expect_error_mentions([&] { zi::BpeTokenizer::from_tokenizer_json(bad); }, bad);
  json j = json::parse(tiny_tokenizer_json(false));
  j["model"]["merges"].push_back("zz qq");
  std::string unknown = dir.write("unknown.json", j.dump());
  expect_error_mentions([&] { zi::BpeTokenizer::from_tokenizer_json(unknown); }, unknown);
  std::string merges = dir.write("merges.txt", "#version: 0.2\na b c\n");
  expect_error_mentions([&] { zi::BpeTokenizer::from_vocab_merges(kQwenDir + "vocab.json", merges, ""); }, merges);
}

TEST(Tokenizer, LoadDirFallsBackToVocabMerges) {
  TempDir dir;
  fs::copy_file(kQwenDir + "vocab.json", dir.path / "vocab.json");
  fs::copy_file(kQwenDir + "merges.txt", dir.path / "merges.txt");
  fs::copy_file(kQwenDir + "qwen3-4b-2507_tokenizer_config.json", dir.path / "tokenizer_config.json");
  zi::BpeTokenizer t = zi::BpeTokenizer::load_dir(dir.path.string());
  EXPECT_EQ(zi::tokenize_zimage_prompt(t, "a cat"), zi::tokenize_zimage_prompt(tok_json(), "a cat"));
}

// The CLI prints the ids; skipped when the zimage binary was not built (per-file target).
TEST(Tokenizer, CliTokenize) {
  if (!fs::exists(ZI_BINARY)) GTEST_SKIP() << ZI_BINARY << " not built";
  std::string cmd = std::string(ZI_BINARY) + " tokenize --model " ZI_TINY_MODEL " --chat 'a cat'";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[512] = {};
  size_t n = fread(buf, 1, sizeof buf - 1, p);
  EXPECT_EQ(pclose(p), 0);
  EXPECT_EQ(std::string(buf, n), "151644 872 198 64 8251 151645 198 151644 77091 198\n");
}
