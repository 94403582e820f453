// `zimage tokenize`: prints the Qwen2 BPE ids of a text (spec §1), optionally wrapped in the
// Z-Image chat template and truncated exactly as the pipeline does.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/common.h"
#include "core/check.h"
#include "text/bpe_tokenizer.h"

namespace zi::cli {
namespace {

struct TokenizeOptions {
  std::string model;
  bool chat = false;
  int max_length = 512;
  bool jsonl = false;
  std::string text;
};

// DIR/tokenizer for a diffusers checkpoint; DIR itself when it is already a tokenizer folder.
std::string tokenizer_dir(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path sub = fs::path(model_dir) / "tokenizer";
  if (fs::is_directory(sub, ec)) return sub.string();
  if (fs::exists(fs::path(model_dir) / "tokenizer.json", ec) || fs::exists(fs::path(model_dir) / "vocab.json", ec))
    return model_dir;
  throw Error(str_cat(model_dir, ": no tokenizer/ folder (expected a diffusers Z-Image checkpoint)"));
}

std::string join_ids(const std::vector<int32_t>& ids, bool as_json) {
  std::string s = as_json ? "[" : "";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += as_json ? "," : " ";
    s += std::to_string(ids[i]);
  }
  if (as_json) s += "]";
  s += '\n';
  return s;
}

void write_out(const std::string& s) {
  if (std::fwrite(s.data(), 1, s.size(), stdout) != s.size() || std::fflush(stdout) != 0)
    throw Error("tokenize: cannot write to stdout");
}

void run_tokenize(const TokenizeOptions& o, const CLI::App& sub) {
  const bool have_text = sub.count("TEXT") > 0;
  if (have_text == o.jsonl) throw UsageError("tokenize: give either TEXT or --jsonl (see 'zimage tokenize --help')");
  if (sub.count("--max-length") > 0 && !o.chat)
    throw UsageError("tokenize: --max-length only applies with --chat (the pipeline truncates the chat prompt)");
  if (o.max_length < 1) throw UsageError(str_cat("tokenize: --max-length must be at least 1, got ", o.max_length));

  const BpeTokenizer tok = BpeTokenizer::load_dir(tokenizer_dir(resolve_model_dir(o.model)));
  auto ids_of = [&](std::string_view text) {
    return o.chat ? tokenize_zimage_prompt(tok, text, o.max_length) : tok.encode(text);
  };
  if (have_text) {
    write_out(join_ids(ids_of(o.text), false));
    return;
  }
  std::string line;
  for (size_t line_no = 1; std::getline(std::cin, line); ++line_no) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      j = nullptr;
    }
    if (!j.is_string()) throw Error(str_cat("tokenize: stdin line ", line_no, ": expected one JSON string"));
    write_out(join_ids(ids_of(j.get_ref<const std::string&>()), true));
  }
}

}  // namespace

void add_tokenize(CLI::App& app) {
  auto opt = std::make_shared<TokenizeOptions>();
  CLI::App* sub = app.add_subcommand("tokenize", "Print the token ids of a text (the model's Qwen2 tokenizer).");
  sub->footer(
      "Ids are printed separated by spaces. No BOS/EOS is added; special tokens such as <|im_end|>\n"
      "written in the text become their ids.\n\n"
      "Examples:\n"
      "  zimage tokenize \"a red fox in the snow\"\n"
      "  zimage tokenize --chat \"a cat\"          # 151644 872 198 64 8251 151645 198 151644 77091 198\n"
      "  zimage tokenize --chat --max-length 8 -- \"-dashes first\"\n"
      "  printf '\"a cat\"\\n\"一只猫\"\\n' | zimage tokenize --jsonl   # one JSON array per line\n");
  sub->add_option("--model", opt->model,
                  "Z-Image checkpoint folder (its tokenizer/ is used); default $ZIMAGE_MODEL, else the bundled "
                  "tiny model, whose tokenizer is the real Qwen3 one")
      ->type_name("DIR");
  sub->add_flag("--chat", opt->chat,
                "Wrap TEXT in the Z-Image chat template (<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n) "
                "and truncate like the pipeline");
  sub->add_option("--max-length", opt->max_length,
                  "With --chat: keep at most N ids (the pipeline's max_sequence_length)")
      ->type_name("N")
      ->capture_default_str();
  sub->add_flag("--jsonl", opt->jsonl, "Read one JSON string per stdin line; write one JSON array of ids per line");
  sub->add_option("TEXT", opt->text, "Text to tokenize (use -- before a text that starts with '-')")->type_name("");
  sub->callback([opt, sub] { run_tokenize(*opt, *sub); });
}

}  // namespace zi::cli
