// zimage command line: argument parsing and dispatch only. Each subcommand lives in its
// own cmd_*.cpp file and registers itself through one add_* function below.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cli/common.h"
#include "core/check.h"

int main(int argc, char** argv) {
  CLI::App app{"zimage " ZIMAGE_VERSION
               " - text to image with the Z-Image model family (Z-Image-Turbo, Z-Image).\n\n"
               "Quick start:\n"
               "  zimage generate -p \"a red fox in the snow\" -o fox.png\n"
               "  zimage generate --model ~/models/Z-Image-Turbo -p \"...\" -W 1024 -H 1024\n\n"
               "Run 'zimage COMMAND --help' for the options of a command.",
               "zimage"};
  app.set_version_flag("--version", ZIMAGE_VERSION);
  app.require_subcommand(1);
  zi::cli::add_generate(app);
  zi::cli::add_encode(app);
  zi::cli::add_tokenize(app);
  zi::cli::add_inspect(app);
  zi::cli::add_make_random_model(app);
  zi::cli::add_serve(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fprintf(stderr, "error: %s (see 'zimage --help')\n", e.what());
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
