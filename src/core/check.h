// Error handling: every failure is a zi::Error with a one-line message naming what is at fault.
#pragma once
#include <stdexcept>
#include <string>
#include <sstream>

namespace zi {

// A runtime failure (bad file, bad tensor, I/O). The CLI prints "error: <what>" and exits 1.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A bad command-line value. The CLI prints "error: <what>" and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

[[noreturn]] inline void fail(const std::string& msg) { throw Error(msg); }

}  // namespace zi

// ZI_CHECK(cond, "[fn] what", values...) throws zi::Error when cond is false.
#define ZI_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) ::zi::fail(::zi::str_cat(__VA_ARGS__));      \
  } while (0)
