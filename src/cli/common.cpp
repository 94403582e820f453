#include "cli/common.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "core/check.h"

namespace fs = std::filesystem;

namespace zi::cli {

static std::string bundled_model_dir() {
  // Next to the build tree (build/zimage -> ../models/tiny-zimage), or the source tree.
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path p = exe.parent_path(); !p.empty() && p != p.root_path(); p = p.parent_path()) {
      fs::path cand = p / "models" / "tiny-zimage";
      if (fs::exists(cand / "model_index.json")) return cand.string();
    }
  }
#ifdef ZIMAGE_SOURCE_DIR
  return std::string(ZIMAGE_SOURCE_DIR) + "/models/tiny-zimage";
#else
  return "models/tiny-zimage";
#endif
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

}  // namespace zi::cli
