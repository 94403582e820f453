#include "cli/common.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>

#include "backends/device.h"
#include "core/check.h"

namespace fs = std::filesystem;

namespace zi::cli {

// The bundled tiny model, found relative to the binary itself (no compiled-in path), first hit:
//   1. <bindir>/../share/zimage/models/tiny-zimage   (cmake --install: bin/zimage + share/zimage)
//   2. <dir>/models/tiny-zimage for each folder above the binary (build/zimage in a checkout)
// "" when neither exists.
std::string bundled_model_dir_or_empty() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  fs::path installed = exe.parent_path().parent_path() / "share" / "zimage" / "models" / "tiny-zimage";
  if (fs::exists(installed / "model_index.json", ec)) return installed.lexically_normal().string();
  for (fs::path p = exe.parent_path(); !p.empty(); p = p.parent_path()) {
    fs::path cand = p / "models" / "tiny-zimage";
    if (fs::exists(cand / "model_index.json", ec)) return cand.string();
    if (p == p.root_path()) break;
  }
  return "";
}

static std::string bundled_model_dir() {
  std::string d = bundled_model_dir_or_empty();
  if (d.empty())
    throw UsageError(
        "no model given and the bundled tiny model was not found next to the binary "
        "(looked in <bindir>/../share/zimage/models/tiny-zimage and models/tiny-zimage above the binary); "
        "pass --model DIR or set ZIMAGE_MODEL");
  return d;
}

std::string resolve_model_dir(const std::string& flag, bool* bundled) {
  if (bundled) *bundled = false;
  if (!flag.empty()) return flag;
  if (const char* env = std::getenv("ZIMAGE_MODEL"); env && *env) return env;
  if (bundled) *bundled = true;
  return bundled_model_dir();
}

void notice_bundled_model(bool quiet) {
  if (quiet) return;
  std::fprintf(stderr,
               "note: using the bundled tiny random-weight model: its images are noise. Download "
               "Tongyi-MAI/Z-Image-Turbo (diffusers format) and pass --model DIR or set ZIMAGE_MODEL.\n");
}

Device parse_device_flag(const std::string& v, const char* flag, Device dflt) {
  if (v.empty()) return dflt;
  if (v == "cpu") return Device::CPU;
  if (v == "cuda") {
    if (!device::gpu_available())
      throw UsageError(str_cat(flag, " cuda: no usable CUDA GPU: ", device::gpu_unavailable_reason()));
    return Device::CUDA;
  }
  throw UsageError(str_cat(flag, " must be cpu or cuda, got '", v, "'"));
}

int64_t parse_vram_flag(const std::string& value) {
  double gib = 0;
  size_t used = 0;
  try {
    gib = std::stod(value, &used);
  } catch (...) {
    used = 0;
  }
  if (value.empty() || used != value.size() || !(gib > 0) || gib > 1e6)
    throw UsageError(str_cat("--vram must be a positive number of GiB, got '", value, "'"));
  return int64_t(gib * double(int64_t(1) << 30));
}

double seconds_since_exec() {
  // /proc/self/stat: after the command in parentheses (which may hold spaces) come fields 3 … ;
  // field 22 is the start time in clock ticks since boot. CLOCK_BOOTTIME: now since boot.
  std::ifstream f("/proc/self/stat");
  const std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(stat.substr(close + 1));
  std::string field;
  for (int i = 3; i <= 22; ++i)
    if (!(rest >> field)) return -1;
  timespec ts{};
  const long hz = sysconf(_SC_CLK_TCK);
  if (hz <= 0 || clock_gettime(CLOCK_BOOTTIME, &ts) != 0) return -1;
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9 - double(std::stoull(field)) / double(hz);
}

}  // namespace zi::cli
