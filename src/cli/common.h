// Helpers shared by the subcommands: model resolution, registration hooks.
#pragma once
#include <stdexcept>
#include <string>

#include "core/allocator.h"

namespace CLI {
class App;
}

namespace zi::cli {

// Thrown when SIGINT asks a long run to stop; main() exits with 130.
struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted") {}
};

// --model, else $ZIMAGE_MODEL, else the bundled tiny random-weight model.
// `bundled` is set when the bundled model was chosen.
std::string resolve_model_dir(const std::string& flag, bool* bundled = nullptr);
// The bundled tiny model's folder found relative to the binary, or "" (see common.cpp).
std::string bundled_model_dir_or_empty();
// One line on stderr telling the user the bundled model draws noise, unless quiet.
void notice_bundled_model(bool quiet);

// A device flag's value: "" → dflt, "cpu", or "cuda" (a UsageError naming `flag` when there is
// no usable GPU); anything else is a UsageError naming the flag.
Device parse_device_flag(const std::string& value, const char* flag, Device dflt);
// --vram's value: a positive number of GiB → bytes (a UsageError otherwise).
int64_t parse_vram_flag(const std::string& value);
// Seconds since this process was started (exec), from /proc (10 ms resolution); -1 if unknown.
double seconds_since_exec();

void add_generate(CLI::App& app);
void add_encode(CLI::App& app);
void add_tokenize(CLI::App& app);
void add_inspect(CLI::App& app);
void add_make_random_model(CLI::App& app);
void add_convert(CLI::App& app);
void add_serve(CLI::App& app);

}  // namespace zi::cli
