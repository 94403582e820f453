// zimage command line: argument parsing and dispatch only. Each subcommand lives in its
// own cmd_*.cpp file and registers itself through one add_* function below.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "backends/device.h"
#include "cli/common.h"
#include "core/check.h"
#include "io/image_codec.h"

namespace {

// OpenMP reads its wait policy once, when libgomp is loaded (before main). Its default lets
// idle workers spin, which costs ~10x when another process is busy on the machine (issue 15).
// So, unless the user chose one, the process re-executes itself once with
// OMP_WAIT_POLICY=PASSIVE (idle workers sleep at once). OpenBLAS is only ever called
// single-threaded (core/parallel.h), so its pool is not started either.
void ensure_passive_openmp(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT") || std::getenv("ZIMAGE_NO_REEXEC")) return;
  setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  if (!std::getenv("OPENBLAS_NUM_THREADS")) setenv("OPENBLAS_NUM_THREADS", "1", 1);
  setenv("ZIMAGE_NO_REEXEC", "1", 1);  // never loop, whatever happens
  execv("/proc/self/exe", argv);
  // exec failed (no /proc?): go on with the default policy.
}

std::string version_text() {
  std::string backends = "cpu (OpenMP, OpenBLAS)";
#ifdef ZIMAGE_HAVE_CUDA
  backends += ", cuda (sm_90; cuDNN loaded at run time when present)";
  backends += zi::device::gpu_available() ? " - a GPU is usable here" : " - no usable GPU here";
#endif
  return zi::str_cat("zimage ", ZIMAGE_VERSION, "\nbackends: ", backends, "\nimage formats: ", zi::image_codec_versions(),
                     "\nbundled model: ", zi::cli::bundled_model_dir_or_empty().empty() ? "not found" : zi::cli::bundled_model_dir_or_empty(),
                     "\n");
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// The closest candidate to `word` when it is a near miss (or a prefix), else "".
std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::string::npos;
  for (const std::string& c : candidates) {
    size_t d = edit_distance(word, c);
    if (word.size() >= 3 && c.rfind(word, 0) == 0) d = std::min<size_t>(d, 1);  // "gen" → "generate"
    if (d < best_d) best_d = d, best = c;
  }
  const size_t limit = std::max<size_t>(2, word.size() / 3);
  return best_d <= limit ? best : "";
}

std::vector<std::string> option_names(const CLI::App* app) {
  std::vector<std::string> names;
  for (const CLI::Option* o : app->get_options()) {
    for (const std::string& l : o->get_lnames()) names.push_back("--" + l);
    for (const std::string& s : o->get_snames()) names.push_back("-" + s);
  }
  return names;
}

// One line for a parse error: what is wrong, with which flag, a suggestion for near misses
// and the help to read.
std::string rewrite_parse_error(const CLI::ParseError& e, CLI::App& app, int argc, char** argv) {
  CLI::App* sub = nullptr;
  int sub_at = argc;
  for (int i = 1; i < argc && !sub; ++i) {
    if (argv[i][0] == '-') continue;
    for (CLI::App* s : app.get_subcommands({}))
      if (s->get_name() == argv[i]) sub = s, sub_at = i;
    if (!sub) {  // the first word is not a command
      std::vector<std::string> names;
      for (CLI::App* s : app.get_subcommands({})) names.push_back(s->get_name());
      const std::string hint = closest(argv[i], names);
      return zi::str_cat("unknown command '", argv[i], "'", hint.empty() ? "" : " (did you mean '" + hint + "'?)",
                         "; see 'zimage --help'");
    }
  }
  if (!sub) return zi::str_cat("a command is required (generate, encode, tokenize, inspect, make-random-model); see 'zimage --help'");
  const std::string help = zi::str_cat("see 'zimage ", sub->get_name(), " --help'");
  const std::string what = e.what();
  if (dynamic_cast<const CLI::ExtrasError*>(&e)) {
    for (int i = sub_at + 1; i < argc; ++i) {
      std::string tok = argv[i];
      if (tok.size() < 2 || tok[0] != '-' || tok == "--") continue;
      const std::string name = tok.substr(0, tok.find('='));
      bool known = false;
      for (const std::string& n : option_names(sub)) known |= n == name;
      if (known) continue;
      if (name.size() > 2 && name[1] != '-' && name.size() != 2) {  // -abc: short flags glued
        bool all_short = true;
        for (size_t k = 1; k < name.size(); ++k) {
          bool f = false;
          for (const std::string& n : option_names(sub)) f |= n == std::string("-") + name[k];
          all_short &= f;
        }
        if (all_short) continue;
      }
      const std::string hint = closest(name, option_names(sub));
      return zi::str_cat("unknown option '", name, "' for 'zimage ", sub->get_name(), "'",
                         hint.empty() ? "" : " (did you mean '" + hint + "'?)", "; ", help);
    }
    std::string extra = what.substr(what.find(':') == std::string::npos ? 0 : what.find(':') + 1);
    while (!extra.empty() && extra.front() == ' ') extra.erase(0, 1);
    return zi::str_cat("unexpected argument '", extra, "' for 'zimage ", sub->get_name(),
                       "' (quote a prompt with spaces); ", help);
  }
  if (dynamic_cast<const CLI::RequiredError*>(&e)) return zi::str_cat(what, "; ", help);
  if (dynamic_cast<const CLI::ArgumentMismatch*>(&e)) {
    const std::string flag = what.substr(0, what.find(':'));
    int times = 0;
    for (int i = sub_at + 1; i < argc; ++i) {
      const std::string tok = argv[i];
      times += tok == flag || tok.rfind(flag + "=", 0) == 0;
    }
    if (times > 1) return zi::str_cat(flag, " is given ", times, " times; give it once; ", help);
    return zi::str_cat(flag, " needs a value; ", help);
  }
  if (dynamic_cast<const CLI::ConversionError*>(&e) || dynamic_cast<const CLI::ValidationError*>(&e)) {
    // CLI11: "Could not convert: --steps = abc"
    const size_t colon = what.find(": "), eq = what.rfind(" = ");
    if (colon != std::string::npos && eq != std::string::npos && eq > colon)
      return zi::str_cat(what.substr(colon + 2, eq - colon - 2), ": cannot read '", what.substr(eq + 3),
                         "' as a value of the right kind (a number?); ", help);
    return zi::str_cat("bad value: ", what, "; ", help);
  }
  return zi::str_cat(what, "; ", help);
}

bool looks_negative_number(const char* s) {
  if (s[0] != '-' || !s[1]) return false;
  for (const char* p = s + 1; *p; ++p)
    if (!(std::isdigit(static_cast<unsigned char>(*p)) || *p == '.' || *p == 'e' || *p == 'E')) return false;
  return std::isdigit(static_cast<unsigned char>(s[1])) || s[1] == '.';
}

// "--seed -1": CLI11 would read -1 as an option. An option that takes a value followed by a
// negative number gets it joined ("--seed=-1"), as everywhere else.
std::vector<std::string> join_negative_values(CLI::App& app, int argc, char** argv) {
  std::vector<std::string> out(argv, argv + argc);
  CLI::App* sub = nullptr;
  for (size_t i = 1; i < out.size(); ++i) {
    if (!sub && out[i][0] != '-') {
      for (CLI::App* s : app.get_subcommands({}))
        if (s->get_name() == out[i]) sub = s;
      continue;
    }
    if (!sub || out[i].size() < 2 || out[i][0] != '-' || out[i].find('=') != std::string::npos) continue;
    if (i + 1 >= out.size() || !looks_negative_number(out[i + 1].c_str())) continue;
    const CLI::Option* o = sub->get_option_no_throw(out[i]);
    if (!o || o->get_type_size() == 0) continue;
    out[i] = out[i].rfind("--", 0) == 0 ? out[i] + "=" + out[i + 1] : out[i] + out[i + 1];
    out.erase(out.begin() + std::ptrdiff_t(i) + 1);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  ensure_passive_openmp(argv);
  CLI::App app{"zimage " ZIMAGE_VERSION
               " - text to image with the Z-Image model family (Z-Image-Turbo, Z-Image).\n\n"
               "Quick start:\n"
               "  zimage generate -p \"a red fox in the snow\" -o fox.png\n"
               "  zimage generate --model ~/models/Z-Image-Turbo -p \"...\" -W 1024 -H 1024\n\n"
               "Run 'zimage COMMAND --help' for the options of a command.",
               "zimage"};
  app.add_flag_callback(
      "--version",
      [] {
        std::fputs(version_text().c_str(), stdout);
        throw CLI::Success();
      },
      "print the version, the backends and the image formats compiled in");
  app.require_subcommand(1);
  zi::cli::add_generate(app);
  zi::cli::add_encode(app);
  zi::cli::add_tokenize(app);
  zi::cli::add_inspect(app);
  zi::cli::add_make_random_model(app);
  std::vector<std::string> args = join_negative_values(app, argc, argv);
  std::vector<char*> argv2;
  for (std::string& a : args) argv2.push_back(a.data());
  argv2.push_back(nullptr);
  argc = int(args.size());
  argv = argv2.data();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fprintf(stderr, "error: %s\n", rewrite_parse_error(e, app, argc, argv).c_str());
    return 2;
  } catch (const zi::UsageError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const zi::cli::Interrupted&) {
    std::fprintf(stderr, "\ninterrupted\n");
    return 130;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
