// A read-only memory mapping of a whole file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace zi {

class MappedFile : public std::enable_shared_from_this<MappedFile> {
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
  // file-backed and re-read on demand): called after a tensor has been copied out. The madvise
  // runs on a releaser thread (it took 0.3 s of a one-shot run's 20 GB load on the caller's);
  // release() waits only while more than 256 MiB are queued, so the resident set stays within
  // that of what it was.
  void release(size_t offset, size_t len) const;
  // Waits until every queued release has run (tests; a caller that measures RSS).
  static void flush_releases();
  // Seconds every release of the process has taken so far on the releaser thread, and the
  // callers' waits for it (the load report's "unmapping file pages").
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
