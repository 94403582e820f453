// Qwen2 byte-level BPE tokenizer (the Z-Image text tokenizer) and the Z-Image chat prompt.
// Spec §1: added-token split → NFC → pre-tokenizer regex → byte→unicode map → BPE merges.
// Output must match Hugging Face `tokenizers` id for id, so every step mirrors its semantics
// (leftmost-longest added tokens, lowest-rank-then-leftmost merges), not an approximation.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace zi {

class BpeTokenizer {
 public:
  // DIR/tokenizer.json if present, else DIR/vocab.json + DIR/merges.txt (+ DIR/tokenizer_config.json
  // for the added tokens, when present). Throws zi::Error naming the file on any problem.
  static BpeTokenizer load_dir(const std::string& tokenizer_dir);
  // A Hugging Face tokenizer.json with a BPE model (merges as "a b" strings or ["a","b"] pairs).
  static BpeTokenizer from_tokenizer_json(const std::string& path);
  // The "slow" files; tokenizer_config_json may be empty (then there are no added tokens).
  static BpeTokenizer from_vocab_merges(const std::string& vocab_json, const std::string& merges_txt,
                                        const std::string& tokenizer_config_json);

  // Added/special tokens found verbatim in `text` become their ids (no BOS/EOS is added).
  // Throws zi::Error on invalid UTF-8. Thread-safe: a const tokenizer may be shared.
  std::vector<int32_t> encode(std::string_view text) const;
  // Id of a vocab or added token written in its stored form (e.g. "Ġcat", "<|im_end|>"); -1 if absent.
  int32_t token_id(std::string_view token) const;
  // Bytes of the tokens, with invalid UTF-8 replaced by U+FFFD like the reference. Throws on bad ids.
  std::string decode(const std::vector<int32_t>& ids) const;
  // Largest id + 1 (vocab and added tokens): 151669 for Qwen3.
  size_t vocab_size() const;

  struct Impl;

 private:
  explicit BpeTokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  // Immutable after loading, so copies share it.
  std::shared_ptr<const Impl> impl_;
};

// The offset of the first byte of `s` that is not valid UTF-8, or std::string_view::npos.
size_t first_invalid_utf8(std::string_view s);

// "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n" (Qwen3 template with
// add_generation_prompt=True, enable_thinking=True, no system message; spec §1.1).
std::string zimage_chat_prompt(std::string_view prompt);
// The chat prompt's ids, keeping the first max_length (spec §1.2): a long prompt loses the
// assistant tag, exactly like the reference. No padding is added.
std::vector<int32_t> tokenize_zimage_prompt(const BpeTokenizer& tok, std::string_view prompt, int max_length = 512);

}  // namespace zi
