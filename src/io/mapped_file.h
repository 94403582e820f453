// A read-only memory mapping of a whole file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace zi {

class MappedFile {
 public:
  // Maps `path` read-only. Throws zi::Error "cannot open 'path': reason".
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Drops the pages of [offset, offset+len) from this process's resident set (they are
  // file-backed and re-read on demand): called after a tensor has been copied out.
  void release(size_t offset, size_t len) const;
  // Seconds every release() of the process has taken so far (the load report: unmapping a
  // tensor's pages is part of its load).
  static double release_seconds_total();
  // Reads [offset, offset+len) of the file into dst with pread, by several threads in 2 MiB
  // pieces: straight from the page cache, no page of the mapping touched (the GPU upload's
  // path into pinned memory, ZI_UPLOAD_READ=1). Throws zi::Error naming the file on a failed or
  // short read.
  void read(void* dst, size_t offset, size_t len) const;

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  int fd_ = -1;  // kept open for read()
};

}  // namespace zi
