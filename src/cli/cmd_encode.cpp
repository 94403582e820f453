// `zimage encode`: runs only the text phase (spec §1–2) and writes the prompt embeddings
// the transformer would receive, for inspection and for comparison with a reference run.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "cli/common.h"
#include "core/check.h"
#include "core/parallel.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "pipeline/text_phase.h"
#include "text/bpe_tokenizer.h"

namespace zi::cli {
namespace {

struct EncodeOptions {
  std::string model;
  std::string prompt;
  int max_sequence_length = 512;
  int threads = 0;
  std::string output;
  std::string rope_freq_dtype = "f32";
  bool quiet = false;
};

void run_encode(const EncodeOptions& o) {
  if (o.max_sequence_length < 1)
    throw UsageError(str_cat("encode: --max-sequence-length must be at least 1, got ", o.max_sequence_length));
  if (o.threads < 0) throw UsageError(str_cat("encode: --threads must be 0 (all cores) or more, got ", o.threads));
  if (o.output.empty()) throw UsageError("encode: -o FILE.safetensors is required");
  if (size_t at = first_invalid_utf8(o.prompt); at != std::string::npos)
    throw UsageError(str_cat("encode: --prompt is not valid UTF-8 (byte ", at, ")"));
  DType rope_dt = DType::F32;
  if (!parse_dtype(o.rope_freq_dtype, &rope_dt) || rope_dt == DType::F16)
    throw UsageError(str_cat("encode: --rope-freq-dtype must be f32 or bf16, got '", o.rope_freq_dtype, "'"));

  bool bundled = false;
  const std::string dir = resolve_model_dir(o.model, &bundled);
  if (bundled) notice_bundled_model(o.quiet);
  set_num_threads(o.threads);

  // Fail before the (long) encode when the output cannot be created.
  const std::filesystem::path out_dir = std::filesystem::path(o.output).parent_path();
  if (!out_dir.empty() && !std::filesystem::is_directory(out_dir))
    throw Error(str_cat("encode: cannot write '", o.output, "': no directory '", out_dir.string(), "'"));

  const ModelFolder mf = open_model_folder(dir);
  std::vector<int32_t> ids;
  Tensor embeds = encode_prompt(mf, o.prompt, o.max_sequence_length, DType::BF16, &ids, rope_dt);

  Tensor id_tensor = Tensor::empty({int64_t(ids.size())}, DType::I32);
  std::memcpy(id_tensor.raw(), ids.data(), ids.size() * sizeof(int32_t));
  write_safetensors(o.output, {{"prompt_embeds", embeds}, {"input_ids", id_tensor}},
                    {{"prompt", o.prompt}, {"max_sequence_length", std::to_string(o.max_sequence_length)}});
  if (!o.quiet)
    std::fprintf(stderr, "wrote %s: prompt_embeds %s, input_ids [%zu]\n", o.output.c_str(),
                 shape_str(embeds.shape()).c_str(), ids.size());
}

}  // namespace

void add_encode(CLI::App& app) {
  auto opt = std::make_shared<EncodeOptions>();
  CLI::App* sub = app.add_subcommand(
      "encode", "Encode a prompt with the text encoder only and save the embeddings (.safetensors).");
  sub->footer(
      "The prompt is wrapped in the Z-Image chat template, tokenized, truncated to\n"
      "--max-sequence-length ids, and run through the Qwen3 text encoder. The file gets:\n"
      "  prompt_embeds  f32 [L, hidden]  hidden_states[-2] of the real tokens (what the DiT reads)\n"
      "  input_ids      i32 [L]          the token ids (no padding)\n"
      "Weights are held in bf16 and the math runs in f32.\n\n"
      "Examples:\n"
      "  zimage encode -p \"a red fox in the snow\" -o fox.safetensors\n"
      "  zimage encode --model ~/models/Z-Image-Turbo -p \"a cat\" --max-sequence-length 64 -o cat.safetensors");
  sub->add_option("--model", opt->model,
                  "Z-Image checkpoint folder (diffusers format); default $ZIMAGE_MODEL, else the bundled tiny "
                  "random-weight model");
  sub->add_option("-p,--prompt", opt->prompt, "The prompt text")->required();
  sub->add_option("--max-sequence-length", opt->max_sequence_length,
                  "Keep at most N token ids of the templated prompt (the pipeline's max_sequence_length)")
      ->capture_default_str();
  sub->add_option("--threads", opt->threads, "CPU threads for the kernels and BLAS; 0 = all cores")
      ->capture_default_str();
  sub->add_option("-o,--output", opt->output, "Output file (.safetensors)")->required();
  sub->add_option("--rope-freq-dtype", opt->rope_freq_dtype,
                  "Precision of the RoPE frequencies: f32 as transformers' from_pretrained keeps them, or bf16 to "
                  "match a reference whose encoder was cast with .to(torch.bfloat16) (the bundled fixtures)")
      ->capture_default_str();
  sub->add_flag("-q,--quiet", opt->quiet, "Print nothing but errors");
  sub->callback([opt] { run_encode(*opt); });
}

}  // namespace zi::cli
