#include "core/tuning_cache.h"

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace zi {

TuningCache::TuningCache(std::string path) : path_(std::move(path)) {
  if (path_.empty()) return;
  std::ifstream in(path_);
  std::string line;
  while (std::getline(in, line)) {
    const size_t tab = line.find('\t');
    if (tab == std::string::npos || tab == 0 || tab + 1 >= line.size()) continue;  // not a "key\tvalue" line
    map_[line.substr(0, tab)] = line.substr(tab + 1);
  }
}

std::optional<std::string> TuningCache::get(const std::string& key) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return std::nullopt;
  return it->second;
}

void TuningCache::put(const std::string& key, const std::string& value) {
  auto clean = [](const std::string& s) {
    return !s.empty() && s.find('\t') == std::string::npos && s.find('\n') == std::string::npos;
  };
  if (!clean(key) || !clean(value)) return;
  std::lock_guard<std::mutex> lk(mu_);
  map_[key] = value;
  if (path_.empty()) return;
  std::ofstream out(path_, std::ios::app);  // a failed write only loses the saving
  if (out) out << key << '\t' << value << '\n';
}

std::string TuningCache::default_path(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path dir;
  if (const char* d = std::getenv("ZIMAGE_CACHE_DIR"); d && *d) {
    if (std::string(d) == "off") return "";
    dir = d;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) {
    dir = fs::path(x) / "zimage";
  } else if (const char* h = std::getenv("HOME"); h && *h) {
    dir = fs::path(h) / ".cache" / "zimage";
  } else {
    return "";
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir, ec)) return "";
  std::string file;
  for (char c : name) file += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-') ? c : '_';
  return (dir / (file + ".txt")).string();
}

}  // namespace zi
