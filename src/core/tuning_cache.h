// A small persistent key → value store for measured choices (which convolution path or cuDNN
// algorithm is fastest for a shape on this GPU), so that a new process does not time them again.
// One text file of "key<TAB>value" lines, read once and appended to; the last line of a key wins.
// The file lives in $ZIMAGE_CACHE_DIR, else $XDG_CACHE_HOME/zimage, else ~/.cache/zimage;
// ZIMAGE_CACHE_DIR=off turns it off. A cache that cannot be read or written is simply not
// used (choices are then measured again): it never makes a run fail.
#pragma once
#include <map>
#include <mutex>
#include <optional>
#include <string>

namespace zi {

class TuningCache {
 public:
  // A cache backed by `path` (empty: in memory only).
  explicit TuningCache(std::string path);
  std::optional<std::string> get(const std::string& key);
  void put(const std::string& key, const std::string& value);  // keys/values without tabs or newlines
  const std::string& path() const { return path_; }

  // The cache file for `name` (e.g. "cuda-NVIDIA_H200-cudnn91000") in the directory above, or ""
  // when caching is off or no directory can be made. Characters outside [A-Za-z0-9._-] become '_'.
  static std::string default_path(const std::string& name);

 private:
  std::string path_;
  std::map<std::string, std::string> map_;
  std::mutex mu_;
};

}  // namespace zi
