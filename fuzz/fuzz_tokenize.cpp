// Fuzz target: tokenization with the real Qwen3 tokenizer (the bundled model's
// tokenizer.json, or $ZI_FUZZ_TOKENIZER), loaded once. Any bytes may be given: invalid
// UTF-8 must be refused with zi::Error; valid text must give in-range ids, and ASCII text
// must decode back to itself byte for byte (byte-level BPE loses nothing; ASCII is NFC).
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "core/check.h"
#include "text/bpe_tokenizer.h"

#ifndef ZI_TINY_MODEL
#define ZI_TINY_MODEL "models/tiny-zimage"
#endif

using namespace zi;

namespace {
std::unique_ptr<BpeTokenizer> g_tok;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("ZI_FUZZ_TOKENIZER");
  const std::string path = env && *env ? env : ZI_TINY_MODEL "/tokenizer/tokenizer.json";
  g_tok = std::make_unique<BpeTokenizer>(BpeTokenizer::from_tokenizer_json(path));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (!g_tok) LLVMFuzzerInitialize(nullptr, nullptr);
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<int32_t> ids;
  try {
    ids = g_tok->encode(text);
  } catch (const Error&) {
    return 0;  // invalid UTF-8
  }
  for (int32_t id : ids)
    if (id < 0 || size_t(id) >= g_tok->vocab_size()) std::abort();
  const std::string back = g_tok->decode(ids);
  bool ascii = true;
  for (char c : text) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
  if (ascii && back != text) std::abort();
  const int max_len = 1 + int(size % 64);
  std::vector<int32_t> chat = tokenize_zimage_prompt(*g_tok, text, max_len);
  if (chat.size() > size_t(max_len)) std::abort();
  return 0;
}
