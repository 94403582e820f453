// Shared helpers of the fuzz targets (libFuzzer entry points, also built as plain replay
// executables by fuzz/replay_main.cpp). A target may fail only with zi::Error / zi::UsageError:
// any other exception escapes and aborts, a crash or sanitizer report is a finding.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

namespace zi::fuzz {

// A temporary directory removed at exit (one per process).
inline const std::string& temp_dir() {
  static const std::string dir = [] {
    char tmpl[] = "/tmp/zi_fuzz_XXXXXX";
    const char* d = mkdtemp(tmpl);
    if (!d) std::abort();
    std::string s = d;
    static struct Cleanup {
      std::string p;
      ~Cleanup() {
        std::error_code ec;
        std::filesystem::remove_all(p, ec);
      }
    } cleanup{s};
    return s;
  }();
  return dir;
}

// Replaces the contents of a file with `data`.
inline void write_file(const std::string& path, std::string_view data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (!data.empty() && std::fwrite(data.data(), 1, data.size(), f) != data.size()) std::abort();
  std::fclose(f);
}

// An in-memory file (memfd) reachable by a path, rewritten for every input: mapping it
// exercises the same code as a file on disk without disk I/O.
class MemFile {
 public:
  MemFile() {
    fd_ = memfd_create("zi_fuzz", 0);
    if (fd_ < 0) std::abort();
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  const std::string& set(const uint8_t* data, size_t size) {
    if (ftruncate(fd_, 0) != 0 || ftruncate(fd_, off_t(size)) != 0) std::abort();
    size_t done = 0;
    while (done < size) {
      ssize_t n = pwrite(fd_, data + done, size - done, off_t(done));
      if (n <= 0) std::abort();
      done += size_t(n);
    }
    return path_;
  }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace zi::fuzz
