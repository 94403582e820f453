#include "io/mapped_file.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

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

void add_ns(std::chrono::steady_clock::time_point t0) {
  g_release_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}

// The releaser thread: madvise(MADV_DONTNEED) of queued page ranges, each job keeping its mapping
// alive until done. Started at the first release; joined at exit after the queue drains.
class Releaser {
 public:
  static constexpr size_t kMaxPending = size_t(256) << 20;
  static Releaser& get() {
    static Releaser r;
    return r;
  }
  void push(std::shared_ptr<const MappedFile> keep, uint8_t* p, size_t n) {
    std::unique_lock<std::mutex> lk(mu_);
    if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
    if (pending_ + n > kMaxPending && pending_ > 0) {
      const auto t0 = std::chrono::steady_clock::now();
      drained_.wait(lk, [&] { return pending_ + n <= kMaxPending || pending_ == 0; });
      add_ns(t0);
    }
    jobs_.push_back({std::move(keep), p, n});
    pending_ += n;
    ready_.notify_one();
  }
  void flush() {
    std::unique_lock<std::mutex> lk(mu_);
    drained_.wait(lk, [&] { return pending_ == 0; });
  }
  ~Releaser() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      ready_.notify_one();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Job {
    std::shared_ptr<const MappedFile> keep;
    uint8_t* p;
    size_t n;
  };
  void run() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      ready_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stop_, and nothing left
      Job j = std::move(jobs_.front());
      jobs_.pop_front();
      lk.unlock();
      const auto t0 = std::chrono::steady_clock::now();
      madvise(j.p, j.n, MADV_DONTNEED);
      add_ns(t0);
      j.keep.reset();  // may unmap the file: outside the lock
      lk.lock();
      pending_ -= j.n;
      drained_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable ready_, drained_;
  std::deque<Job> jobs_;
  size_t pending_ = 0;
  bool stop_ = false;
  std::thread thread_;
};
}  // namespace

double MappedFile::release_seconds_total() { return double(g_release_ns.load()) * 1e-9; }

void MappedFile::flush_releases() { Releaser::get().flush(); }

void MappedFile::release(size_t offset, size_t len) const {
  if (!data_ || len == 0) return;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  // Only whole pages inside the range: neighbours may still be needed.
  size_t b = (offset + page - 1) / page * page;
  size_t e = (offset + len) / page * page;
  if (e <= b) return;
  uint8_t* p = const_cast<uint8_t*>(data_) + b;
  std::shared_ptr<const MappedFile> keep;
  try {
    keep = shared_from_this();
  } catch (const std::bad_weak_ptr&) {  // not owned by a shared_ptr: release here
    const auto t0 = std::chrono::steady_clock::now();
    madvise(p, e - b, MADV_DONTNEED);
    add_ns(t0);
    return;
  }
  Releaser::get().push(std::move(keep), p, e - b);
}

}  // namespace zi
