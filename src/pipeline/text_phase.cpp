// Text phase: tokenizer → ids → Qwen3 encoder → prompt embeddings. Spec §1.1–1.2, §2.5.
#include "pipeline/text_phase.h"

#include <climits>
#include <cstdio>

#include "core/check.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"

namespace zi {

namespace {

// tokenize_zimage_prompt, with a one-line warning on stderr when the prompt is cut.
std::vector<int32_t> tokenize_prompt_warn(const BpeTokenizer& tok, const std::string& prompt, int max_length) {
  std::vector<int32_t> ids = tokenize_zimage_prompt(tok, prompt, INT_MAX);
  if (ids.size() > size_t(max_length)) {
    std::fprintf(stderr,
                 "warning: the prompt is %zu tokens with the chat template; only the first %d are used "
                 "(--max-sequence-length)\n",
                 ids.size(), max_length);
    ids.resize(size_t(max_length));
  }
  return ids;
}

// The embedding lookup would refuse an id outside the table anyway; this names the cause.
void check_ids_fit(const Qwen3Encoder& enc, const std::vector<int32_t>& ids) {
  for (int32_t id : ids)
    ZI_CHECK(id >= 0 && id < enc.cfg.vocab_size, "the tokenizer gave token id ", id,
             ", beyond the text encoder's vocab_size ", enc.cfg.vocab_size,
             ": tokenizer/ and text_encoder/ do not belong together");
}

}  // namespace

Qwen3Encoder load_text_encoder(const TensorStore& store, const Qwen3Config& cfg, DType wdt, DType rope_freq_dtype,
                               const PhaseContext& ctx, const ComponentPlan* stream) {
  WeightLoader loader(store, Tag::TextWeights, "text_encoder", ctx);
  set_streamed_blocks(loader, stream);
  Qwen3Encoder enc = load_qwen3_encoder(loader, cfg, wdt);
  loader.finish();
  enc.rope_freq_dtype = rope_freq_dtype;
  return enc;  // the weights are owned copies; the caller's store may close
}

Qwen3Encoder load_text_encoder(const ModelFolder& mf, DType wdt, DType rope_freq_dtype, const PhaseContext& ctx) {
  const TensorStore store = TensorStore::open_dir(mf.text_encoder_dir);
  return load_text_encoder(store, mf.text_encoder, wdt, rope_freq_dtype, ctx);
}

Tensor encode_prompt(const Qwen3Encoder& enc, const BpeTokenizer& tok, const std::string& prompt,
                     int max_sequence_length, std::vector<int32_t>* ids_out) {
  ZI_CHECK(max_sequence_length >= 1, "[encode_prompt] max_sequence_length must be >= 1, got ",
           max_sequence_length);
  std::vector<int32_t> ids = tokenize_prompt_warn(tok, prompt, max_sequence_length);
  check_ids_fit(enc, ids);
  Tensor out = qwen3_encode(enc, ids);
  if (ids_out) *ids_out = std::move(ids);
  return out;
}

Tensor encode_prompt(const ModelFolder& mf, const std::string& prompt, int max_sequence_length, DType wdt,
                     std::vector<int32_t>* ids_out, DType rope_freq_dtype) {
  // Tokenize first: a bad prompt fails before gigabytes of weights are read.
  ZI_CHECK(max_sequence_length >= 1, "[encode_prompt] max_sequence_length must be >= 1, got ",
           max_sequence_length);
  std::vector<int32_t> ids;
  {
    const BpeTokenizer tok = BpeTokenizer::load_dir(mf.tokenizer_dir);
    ids = tokenize_prompt_warn(tok, prompt, max_sequence_length);
  }
  Tensor out;
  {
    const Qwen3Encoder enc = load_text_encoder(mf, wdt, rope_freq_dtype);
    check_ids_fit(enc, ids);
    out = qwen3_encode(enc, ids);
  }  // every encoder weight is freed here
  if (ids_out) *ids_out = std::move(ids);
  return out;
}

}  // namespace zi
