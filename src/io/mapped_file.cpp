#include "io/mapped_file.h"

#include <atomic>
#include <chrono>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/check.h"
#include "core/parallel.h"

namespace zi {

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(str_cat("cannot open '", path, "': ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    fail(str_cat("cannot stat '", path, "': ", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(str_cat("'", path, "' is not a regular file"));
  }
  std::shared_ptr<MappedFile> m(new MappedFile());
  m->path_ = path;
  m->size_ = size_t(st.st_size);
  if (m->size_ > 0) {
    void* p = mmap(nullptr, m->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      fail(str_cat("cannot map '", path, "': ", std::strerror(e)));
    }
    m->data_ = static_cast<const uint8_t*>(p);
  }
  m->fd_ = fd;
  return m;
}

MappedFile::~MappedFile() {
  if (data_) munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::read(void* dst, size_t offset, size_t len) const {
  ZI_CHECK(offset <= size_ && len <= size_ - offset, "cannot read '", path_, "': bytes [", offset, ", ", offset + len,
           ") are beyond its end (", size_, " bytes)");
  std::atomic<int> err{0};
  parallel_for(int64_t(len), int64_t(2) << 20, [&](int64_t b, int64_t e) {
    char* d = static_cast<char*>(dst) + b;
    size_t left = size_t(e - b);
    off_t at = off_t(offset + size_t(b));
    while (left > 0) {
      const ssize_t r = ::pread(fd_, d, left, at);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        int expected = 0;
        err.compare_exchange_strong(expected, r < 0 ? errno : -1);
        return;
      }
      d += r;
      at += r;
      left -= size_t(r);
    }
  });
  if (const int e = err.load())
    fail(str_cat("cannot read '", path_, "' at byte ", offset, ": ", e > 0 ? std::strerror(e) : "unexpected end of file"));
}

namespace {
std::atomic<int64_t> g_release_ns{0};
}  // namespace

double MappedFile::release_seconds_total() { return double(g_release_ns.load()) * 1e-9; }

void MappedFile::release(size_t offset, size_t len) const {
  if (!data_ || len == 0) return;
  const auto t0 = std::chrono::steady_clock::now();
  struct Timed {
    std::chrono::steady_clock::time_point t0;
    ~Timed() {
      g_release_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    }
  } timed{t0};
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  // Only whole pages inside the range: neighbours may still be needed.
  size_t b = (offset + page - 1) / page * page;
  size_t e = (offset + len) / page * page;
  if (e > b) madvise(const_cast<uint8_t*>(data_) + b, e - b, MADV_DONTNEED);
}

}  // namespace zi
