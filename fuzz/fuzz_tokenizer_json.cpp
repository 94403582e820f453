// Fuzz target: loading a Hugging Face tokenizer.json (BpeTokenizer::from_tokenizer_json).
// Each input is written as a tokenizer.json; a tokenizer that loads is then used on a few
// texts, and every id it returns must decode.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "fuzz_util.h"
#include "text/bpe_tokenizer.h"

using namespace zi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = fuzz::temp_dir() + "/tokenizer.json";
  fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    BpeTokenizer tok = BpeTokenizer::from_tokenizer_json(path);
    for (std::string_view text : {"", "a", "Hello world, hello  there!\n", "<|im_start|>user\nhi<|im_end|>",
                                  "caf\xC3\xA9 \xE4\xB8\x80\xE5\x8F\xAA\xE7\x8C\xAB 123 \xF0\x9F\x98\x80"}) {
      std::vector<int32_t> ids = tok.encode(text);
      for (int32_t id : ids)
        if (id < 0 || size_t(id) >= tok.vocab_size()) std::abort();
      (void)tok.decode(ids);
      (void)tokenize_zimage_prompt(tok, text, 4);
    }
    if (tok.vocab_size() <= 4096) {
      std::vector<int32_t> all;
      for (size_t i = 0; i < tok.vocab_size(); ++i) all.push_back(int32_t(i));
      (void)tok.decode(all);
    }
  } catch (const Error&) {
  }
  return 0;
}
