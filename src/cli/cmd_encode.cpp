// Placeholder until the subcommand lands.
#include <CLI/CLI.hpp>

#include "cli/common.h"

namespace zi::cli {
void add_encode(CLI::App& app) { (void)app; }
}  // namespace zi::cli
