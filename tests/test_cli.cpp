// The zimage binary against bad input (issue 8): every case runs the real executable
// (ZI_BINARY) with posix_spawn, captures stderr and asserts the exit code (2 usage, 1 runtime,
// 130 interrupted), a single one-line "error: ..." naming the thing at fault, no crash signal,
// and no output file (nor temporary file) left behind. Broken model folders are built in a
// temporary folder from the bundled tiny model: untouched parts are symlinks, edited files
// are rewritten (tensors with write_safetensors or a raw writer for dtypes we cannot hold).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "io/image_codec.h"
#include "io/safetensors.h"
#include "test_util.h"

extern char** environ;

namespace fs = std::filesystem;
using nlohmann::json;
using namespace zi;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct RunResult {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;      // the signal that ended it, 0 when it exited
  std::string out, err;
  double seconds = 0;
};

// Runs ZI_BINARY with `args`. `on_stderr(err_so_far, pid)` is called whenever stderr grows
// (to send a signal at the right moment). The child is killed after `timeout_s`.
RunResult run_zimage(const std::vector<std::string>& args,
                     const std::function<void(const std::string&, pid_t)>& on_stderr = {}, double timeout_s = 120) {
  std::vector<std::string> argv_s = {ZI_BINARY};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  // The environment without ZIMAGE_MODEL: every case names its model.
  std::vector<char*> envp;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "ZIMAGE_MODEL=", 13) != 0) envp.push_back(*e);
  envp.push_back(nullptr);

  int out_pipe[2], err_pipe[2];
  EXPECT_EQ(pipe2(out_pipe, O_CLOEXEC), 0);
  EXPECT_EQ(pipe2(err_pipe, O_CLOEXEC), 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err_pipe[1], 2);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  // The child must see SIGINT with its default disposition and unblocked (the test runner
  // may have changed either).
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, def;
  sigemptyset(&none);
  sigemptyset(&def);
  sigaddset(&def, SIGINT);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &def);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  RunResult r;
  const double t0 = now_s();
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &fa, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (rc != 0) {
    ADD_FAILURE() << "cannot start " << ZI_BINARY << ": " << std::strerror(rc);
    close(out_pipe[0]);
    close(err_pipe[0]);
    return r;
  }
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  int open_fds = 2;
  bool killed = false;
  while (open_fds > 0) {
    const double left = timeout_s - (now_s() - t0);
    if (left <= 0 && !killed) {
      kill(pid, SIGKILL);
      killed = true;
      ADD_FAILURE() << "zimage did not finish within " << timeout_s << " s";
    }
    if (poll(fds, 2, killed ? 1000 : int(std::min(left, 1.0) * 1000) + 1) < 0 && errno != EINTR) break;
    for (int k = 0; k < 2; ++k) {
      if (fds[k].fd < 0 || !(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[4096];
      const ssize_t n = read(fds[k].fd, buf, sizeof buf);
      if (n <= 0) {
        close(fds[k].fd);
        fds[k].fd = -1;
        --open_fds;
        continue;
      }
      (k == 0 ? r.out : r.err).append(buf, size_t(n));
      if (k == 1 && on_stderr) on_stderr(r.err, pid);
    }
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  r.seconds = now_s() - t0;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  return r;
}

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> v;
  std::istringstream is(s);
  for (std::string l; std::getline(is, l);) v.push_back(l);
  return v;
}

// The run failed cleanly: `code`, no signal, exactly one "error: " line (the last one), and it
// contains every needle.
void expect_error(const RunResult& r, int code, const std::vector<std::string>& needles) {
  EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "; stderr:\n" << r.err;
  EXPECT_EQ(r.exit_code, code) << "stderr:\n" << r.err;
  const auto ls = lines_of(r.err);
  int n_err = 0;
  for (const auto& l : ls) n_err += l.rfind("error: ", 0) == 0;
  EXPECT_EQ(n_err, 1) << "stderr:\n" << r.err;
  ASSERT_FALSE(ls.empty()) << "no message on stderr";
  const std::string& last = ls.back();
  EXPECT_EQ(last.rfind("error: ", 0), 0u) << "the last line is not the error: " << r.err;
  for (const auto& n : needles) EXPECT_NE(last.find(n), std::string::npos) << "'" << n << "' not in: " << last;
}

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/zi_cli_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& n) const { return (path / n).string(); }
};

// Everything in `dir` (recursively), to prove a failed run left nothing behind.
std::vector<std::string> files_in(const fs::path& dir) {
  std::vector<std::string> v;
  for (const auto& e : fs::recursive_directory_iterator(dir)) v.push_back(e.path().filename().string());
  return v;
}

std::string read_all(const std::string& p) {
  std::ifstream is(p, std::ios::binary);
  std::ostringstream os;
  os << is.rdbuf();
  return os.str();
}

void write_all(const std::string& p, const std::string& s) {
  std::ofstream os(p, std::ios::binary | std::ios::trunc);
  os << s;
  ASSERT_TRUE(os.good()) << p;
}

// A copy of the tiny model whose components are symlinks until a test edits them.
class ModelCopy {
 public:
  explicit ModelCopy(const fs::path& root) : root_(root / "model"), src_(test::tiny_model()) {
    fs::create_directory(root_);
    for (const auto& e : fs::directory_iterator(src_)) {
      if (e.is_directory()) fs::create_directory_symlink(e.path(), root_ / e.path().filename());
      else fs::copy_file(e.path(), root_ / e.path().filename());
    }
  }
  std::string dir() const { return root_.string(); }
  // The path of `rel` (component/file) as a real, editable file; the component becomes a
  // real folder of symlinks first.
  std::string file(const std::string& rel) {
    fs::path p = root_ / rel;
    own_component(fs::path(rel).begin()->string());
    if (fs::is_symlink(p)) {
      fs::remove(p);
      fs::copy_file(src_ / rel, p);
    }
    return p.string();
  }
  void remove(const std::string& rel) {
    fs::path p = root_ / rel;
    if (fs::path(rel).has_parent_path()) own_component(fs::path(rel).begin()->string());
    fs::remove_all(p);
  }
  void edit_json(const std::string& rel, const std::function<void(json&)>& f) {
    std::string p = file(rel);
    json j = json::parse(read_all(p));
    f(j);
    write_all(p, j.dump(2));
  }

 private:
  void own_component(const std::string& comp) {
    fs::path d = root_ / comp;
    if (!fs::is_symlink(d)) return;
    fs::remove(d);
    fs::create_directory(d);
    for (const auto& e : fs::directory_iterator(src_ / comp)) fs::create_symlink(e.path(), d / e.path().filename());
  }
  fs::path root_, src_;
};

// A tensor for the raw writer: any safetensors dtype name with its bytes.
struct RawTensor {
  std::string name, dtype;
  Shape shape;
  std::string bytes;
};

void write_raw_safetensors(const std::string& path, const std::vector<RawTensor>& ts) {
  json h = json::object();
  uint64_t off = 0;
  for (const auto& t : ts) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string text = h.dump();
  while (text.size() % 8) text += ' ';
  std::string out(8, '\0');
  uint64_t n = text.size();
  std::memcpy(out.data(), &n, 8);
  out += text;
  for (const auto& t : ts) out += t.bytes;
  write_all(path, out);
}

// All tensors of a file as raw tensors, in file order.
std::vector<RawTensor> read_raw(const std::string& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  std::vector<RawTensor> v;
  for (const auto& t : f.tensors())
    v.push_back({t.name, st_dtype_name(t.dtype), t.shape,
                 std::string(reinterpret_cast<const char*>(f.data(t)), size_t(t.nbytes()))});
  return v;
}

const char* kDit = "transformer/diffusion_pytorch_model.safetensors";

class Cli : public ::testing::Test {
 protected:
  TempDir tmp;
  fs::path out_dir = tmp.path / "out";
  std::string out = (out_dir / "image.png").string();
  void SetUp() override { fs::create_directory(out_dir); }

  // A small, fast generate (32x32, 1 step, one thread); `extra` flags are appended and
  // replace the defaults they name ("-W 40", "--width=-32").
  RunResult generate(const std::string& model, const std::vector<std::string>& extra = {}) {
    const std::vector<std::pair<std::vector<std::string>, std::string>> defaults = {
        {{"--model"}, model}, {{"-p", "--prompt"}, "a red fox"}, {{"-W", "--width"}, "32"},
        {{"-H", "--height"}, "32"}, {{"--steps"}, "1"}, {{"--seed"}, "1"}, {{"--threads"}, "1"},
        {{"-o", "--output"}, out}};
    auto given = [&](const std::string& flag) {
      for (const auto& e : extra)
        if (e == flag || e.rfind(flag + "=", 0) == 0) return true;
      return false;
    };
    std::vector<std::string> a = {"generate"};
    for (const auto& [names, value] : defaults) {
      bool overridden = false;
      for (const auto& n : names) overridden = overridden || given(n);
      if (!overridden) {
        a.push_back(names.back());
        a.push_back(value);
      }
    }
    a.insert(a.end(), extra.begin(), extra.end());
    return run_zimage(a);
  }
  void expect_no_output() {
    EXPECT_FALSE(fs::exists(out)) << out << " was written";
    EXPECT_TRUE(files_in(out_dir).empty()) << "left behind: " << files_in(out_dir).front();
  }
  void expect_fails(const RunResult& r, int code, const std::vector<std::string>& needles) {
    expect_error(r, code, needles);
    expect_no_output();
  }
};

}  // namespace

// ---- sanity: the fast case works, so failures below are caused by the edit ------------------

TEST_F(Cli, SmallGenerateSucceedsAndEmptyPromptIsAllowed) {
  RunResult r = generate(test::tiny_model(), {"-p", ""});
  EXPECT_EQ(r.signal, 0);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(out));
  EXPECT_EQ(r.err.find("error"), std::string::npos) << r.err;
  EXPECT_EQ(files_in(out_dir).size(), 1u);
}

// ---- model folder ----------------------------------------------------------------------------

TEST_F(Cli, MissingModelFolder) {
  expect_fails(generate(tmp / "no-such-model"), 1, {"no-such-model", "does not exist"});
}

TEST_F(Cli, MissingModelIndex) {
  ModelCopy m(tmp.path);
  m.remove("model_index.json");
  expect_fails(generate(m.dir()), 1, {"model_index.json"});
}

TEST_F(Cli, MissingComponentFolder) {
  ModelCopy m(tmp.path);
  m.remove("vae");
  expect_fails(generate(m.dir()), 1, {"vae/"});
}

TEST_F(Cli, MissingConfig) {
  ModelCopy m(tmp.path);
  m.remove("transformer/config.json");
  expect_fails(generate(m.dir()), 1, {"transformer/config.json"});
}

TEST_F(Cli, MissingShard) {
  ModelCopy m(tmp.path);
  m.remove("text_encoder/model-00002-of-00002.safetensors");
  expect_fails(generate(m.dir()), 1, {"model-00002-of-00002.safetensors", "missing"});
}

TEST_F(Cli, IndexPointsToMissingShard) {
  ModelCopy m(tmp.path);
  m.edit_json("text_encoder/model.safetensors.index.json",
              [](json& j) { j["weight_map"]["norm.weight"] = "model-00003-of-00003.safetensors"; });
  expect_fails(generate(m.dir()), 1, {"model.safetensors.index.json", "model-00003-of-00003.safetensors", "missing"});
}

TEST_F(Cli, MalformedConfigJson) {
  ModelCopy m(tmp.path);
  write_all(m.file("vae/config.json"), "{\"latent_channels\": 16,");
  expect_fails(generate(m.dir()), 1, {"vae/config.json", "JSON"});
}

// ---- configs that make no sense ---------------------------------------------------------------

TEST_F(Cli, ConfigHeadsNotDividingWidth) {
  ModelCopy m(tmp.path);
  m.edit_json("transformer/config.json", [](json& j) { j["n_heads"] = 3; });
  expect_fails(generate(m.dir()), 1, {"transformer/config.json", "n_heads (3)", "dim (64)"});
}

TEST_F(Cli, ConfigZeroLayers) {
  ModelCopy m(tmp.path);
  m.edit_json("transformer/config.json", [](json& j) { j["n_layers"] = 0; });
  expect_fails(generate(m.dir()), 1, {"transformer/config.json", "n_layers"});
}

TEST_F(Cli, ConfigNegativeSize) {
  ModelCopy m(tmp.path);
  m.edit_json("text_encoder/config.json", [](json& j) { j["hidden_size"] = -32; });
  expect_fails(generate(m.dir()), 1, {"text_encoder/config.json", "hidden_size", "-32"});
}

TEST_F(Cli, ConfigAbsurdSize) {
  ModelCopy m(tmp.path);
  m.edit_json("vae/config.json", [](json& j) { j["block_out_channels"] = {32, 32, 64, 1e12}; });
  expect_fails(generate(m.dir()), 1, {"vae/config.json", "block_out_channels"});
}

TEST_F(Cli, ConfigWrongType) {
  ModelCopy m(tmp.path);
  m.edit_json("transformer/config.json", [](json& j) { j["dim"] = "sixty-four"; });
  expect_fails(generate(m.dir()), 1, {"transformer/config.json", "'dim'"});
}

// ---- tensors -------------------------------------------------------------------------------

TEST_F(Cli, TensorMissing) {
  ModelCopy m(tmp.path);
  const std::string p = m.file(kDit);
  auto ts = read_raw(p);
  // The last tensor in file order, unless it is one of the optional pad tokens (those load as
  // zeros with a warning, see test_layouts).
  size_t at = ts.size() - 1;
  while (ts[at].name.ends_with("pad_token")) --at;
  const std::string gone = ts[at].name;
  ts.erase(ts.begin() + std::ptrdiff_t(at));
  write_raw_safetensors(p, ts);
  expect_fails(generate(m.dir()), 1, {"transformer", "missing tensors", gone});
}

TEST_F(Cli, TensorExtra) {
  ModelCopy m(tmp.path);
  const std::string p = m.file(kDit);
  auto ts = read_raw(p);
  ts.push_back({"layers.99.surprise.weight", "F32", {2}, std::string(8, '\0')});
  write_raw_safetensors(p, ts);
  expect_fails(generate(m.dir()), 1, {"transformer", "unexpected tensors", "layers.99.surprise.weight"});
}

TEST_F(Cli, TensorWrongShape) {
  ModelCopy m(tmp.path);
  const std::string p = m.file(kDit);
  auto ts = read_raw(p);
  RawTensor* t = nullptr;
  for (auto& x : ts)
    if (x.shape.size() == 2 && !t) t = &x;
  ASSERT_NE(t, nullptr);
  const std::string name = t->name;
  std::swap(t->shape[0], t->shape[1]);
  if (t->shape[0] == t->shape[1]) t->shape = {t->shape[0] * t->shape[1]};
  write_raw_safetensors(p, ts);
  expect_fails(generate(m.dir()), 1, {"transformer", "wrong shapes", name});
}

TEST_F(Cli, TensorUnsupportedDtype) {
  ModelCopy m(tmp.path);
  const std::string p = m.file(kDit);
  auto ts = read_raw(p);
  RawTensor* t = nullptr;
  for (auto& x : ts)
    if (x.dtype == "F32" || x.dtype == "BF16") t = &x;
  ASSERT_NE(t, nullptr);
  const std::string name = t->name;
  t->dtype = "I64";
  t->bytes.assign(size_t(shape_numel(t->shape)) * 8, '\0');
  write_raw_safetensors(p, ts);
  expect_fails(generate(m.dir()), 1, {"diffusion_pytorch_model.safetensors", name, "I64"});
}

TEST_F(Cli, TruncatedShard) {
  ModelCopy m(tmp.path);
  const std::string p = m.file("vae/diffusion_pytorch_model.safetensors");
  fs::resize_file(p, fs::file_size(p) - 100);
  expect_fails(generate(m.dir()), 1, {"vae/diffusion_pytorch_model.safetensors", "truncated"});
}

TEST_F(Cli, NotASafetensorsFile) {
  ModelCopy m(tmp.path);
  write_all(m.file("vae/diffusion_pytorch_model.safetensors"), "<html>404 Not Found</html>");
  expect_fails(generate(m.dir()), 1, {"vae/diffusion_pytorch_model.safetensors"});
}

TEST_F(Cli, TokenizerAndTextEncoderDoNotMatch) {
  // A text encoder with 1000 embeddings: the chat template's <|im_start|> (151644) is beyond it.
  ModelCopy m(tmp.path);
  m.edit_json("text_encoder/config.json", [](json& j) { j["vocab_size"] = 1000; });
  const std::string p = m.file("text_encoder/model-00001-of-00002.safetensors");
  auto ts = read_raw(p);
  for (auto& t : ts)
    if (t.name == "embed_tokens.weight") {
      t.bytes.resize(t.bytes.size() / size_t(t.shape[0]) * 1000);
      t.shape[0] = 1000;
    }
  write_raw_safetensors(p, ts);
  expect_fails(generate(m.dir()), 1, {"151644", "vocab_size 1000"});
}

// ---- prompts ---------------------------------------------------------------------------------

TEST_F(Cli, InvalidUtf8Prompt) {
  expect_fails(generate(test::tiny_model(), {"-p", "caf\xC3 au lait"}), 2, {"--prompt", "UTF-8"});
}

TEST_F(Cli, InvalidUtf8NegativePrompt) {
  expect_fails(generate(test::tiny_model(), {"--guidance", "2", "--negative-prompt", "bad \xFF"}), 2,
               {"--negative-prompt", "UTF-8"});
}

TEST_F(Cli, LongPromptIsTruncatedWithOneWarning) {
  std::string prompt;
  for (int i = 0; i < 40; ++i) prompt += "fox ";
  RunResult r = generate(test::tiny_model(), {"-p", prompt, "--max-sequence-length", "16"});
  EXPECT_EQ(r.signal, 0);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(out));
  int warnings = 0;
  for (const auto& l : lines_of(r.err))
    if (l.rfind("warning: ", 0) == 0) {
      ++warnings;
      EXPECT_NE(l.find("16"), std::string::npos) << l;
    }
  EXPECT_EQ(warnings, 1) << r.err;
}

// ---- sizes, steps, guidance (refused before anything is loaded) -------------------------------

TEST_F(Cli, SizeNotMultipleOf16) {
  expect_fails(generate(test::tiny_model(), {"-W", "40"}), 2, {"--width", "multiple of 16", "40"});
}

TEST_F(Cli, SizeZero) { expect_fails(generate(test::tiny_model(), {"-H", "0"}), 2, {"--height", "positive"}); }

TEST_F(Cli, SizeNegative) {
  expect_fails(generate(test::tiny_model(), {"--width=-32"}), 2, {"--width", "-32"});
}

TEST_F(Cli, SizeAbsurdIsRefusedWithTheMemoryItNeeds) {
  RunResult r = generate(test::tiny_model(), {"-W", "65536", "-H", "65536"});
  expect_fails(r, 2, {"65536", "GiB"});
  EXPECT_LT(r.seconds, 5.0) << "refused only after loading";
}

TEST_F(Cli, SizeBeyondInt) {
  expect_fails(generate(test::tiny_model(), {"-W", "99999999999999"}), 2, {"--width"});
}

TEST_F(Cli, StepsZero) { expect_fails(generate(test::tiny_model(), {"--steps", "0"}), 2, {"--steps"}); }

TEST_F(Cli, StepsNegative) { expect_fails(generate(test::tiny_model(), {"--steps=-3"}), 2, {"--steps", "-3"}); }

TEST_F(Cli, GuidanceNaN) { expect_fails(generate(test::tiny_model(), {"--guidance", "nan"}), 2, {"--guidance"}); }

TEST_F(Cli, GuidanceInf) { expect_fails(generate(test::tiny_model(), {"--guidance", "inf"}), 2, {"--guidance"}); }

TEST_F(Cli, GuidanceMinusInf) {
  expect_fails(generate(test::tiny_model(), {"--guidance=-inf"}), 2, {"--guidance"});
}

TEST_F(Cli, CfgNormalizationNaN) {
  expect_fails(generate(test::tiny_model(), {"--cfg-normalization", "nan"}), 2, {"--cfg-normalization"});
}

TEST_F(Cli, PrefetchUnknownValue) {
  expect_fails(generate(test::tiny_model(), {"--prefetch", "maybe"}), 2, {"--prefetch", "auto, on or off", "maybe"});
}

TEST_F(Cli, PngLevelOutOfRange) {
  expect_fails(generate(test::tiny_model(), {"--png-level", "12"}), 2, {"--png-level", "0 to 9", "12"});
}

// Every level writes the same pixels.
TEST_F(Cli, PngLevelKeepsThePixels) {
  ASSERT_EQ(generate(test::tiny_model(), {"--png-level", "1"}).exit_code, 0);
  const std::string fast = out;
  out = (out_dir / "level9.png").string();
  ASSERT_EQ(generate(test::tiny_model(), {"--png-level", "9"}).exit_code, 0);
  const DecodedImage a = read_image_file(fast), b = read_image_file(out);
  EXPECT_EQ(a.width, b.width);
  EXPECT_EQ(a.rgb, b.rgb);
}

TEST_F(Cli, UnknownFlag) { expect_fails(generate(test::tiny_model(), {"--colour", "red"}), 2, {"--colour"}); }

// ---- output ----------------------------------------------------------------------------------

TEST_F(Cli, OutputFolderMissing) {
  out = (out_dir / "no" / "such" / "dir" / "x.png").string();
  expect_fails(generate(test::tiny_model()), 1, {"no/such/dir"});
}

TEST_F(Cli, OutputParentIsAFile) {
  write_all((tmp.path / "plain").string(), "x");
  out = (tmp.path / "plain" / "x.png").string();
  RunResult r = generate(test::tiny_model());
  expect_error(r, 1, {"plain/x.png"});
}

TEST_F(Cli, OutputIsAFolder) {
  fs::create_directory(out_dir / "taken.png");
  out = (out_dir / "taken.png").string();
  RunResult r = generate(test::tiny_model());
  expect_error(r, 1, {"taken.png", "folder"});
  EXPECT_TRUE(fs::is_directory(out));
  EXPECT_EQ(files_in(out_dir).size(), 1u) << "a temporary file was left behind";
}

TEST_F(Cli, OutputFolderNotWritable) {
  if (geteuid() == 0) GTEST_SKIP() << "root may write anywhere";
  fs::permissions(out_dir, fs::perms::owner_read | fs::perms::owner_exec);
  RunResult r = generate(test::tiny_model());
  fs::permissions(out_dir, fs::perms::owner_all);
  expect_fails(r, 1, {"image.png", "not writable"});
}

// A folder where no file can be created even by root: the failure comes at the atomic write
// (for root) or at the early check, and nothing is left behind either way.
TEST_F(Cli, OutputCannotBeCreated) {
  out = "/proc/zimage_cli_test.png";
  RunResult r = generate(test::tiny_model());
  expect_error(r, 1, {"cannot write '/proc/zimage_cli_test.png'"});
  EXPECT_FALSE(fs::exists(out));
}

// ---- SIGINT ----------------------------------------------------------------------------------

// A long denoise (tiny model, 256x256, 1000 steps: many seconds), interrupted as soon as the
// denoise phase starts: exit 130 within a second or two, and no file at all.
TEST_F(Cli, SigintDuringDenoiseStopsPromptlyWithoutOutput) {
  double sent_at = -1;
  RunResult r = run_zimage({"generate", "--model", test::tiny_model(), "-p", "a fox", "-W", "256", "-H", "256",
                            "--steps", "1000", "--seed", "3", "--threads", "1", "-o", out},
                           [&](const std::string& err, pid_t pid) {
                             if (sent_at < 0 && err.find("denoise") != std::string::npos &&
                                 err.find("step 1/") != std::string::npos) {
                               sent_at = now_s();
                               kill(pid, SIGINT);
                             }
                           });
  ASSERT_GT(sent_at, 0) << "the denoise phase never started: " << r.err;
  const double latency = now_s() - sent_at;
  EXPECT_EQ(r.signal, 0) << r.err;
  EXPECT_EQ(r.exit_code, 130) << r.err;
  EXPECT_LT(latency, 5.0) << "stopping took too long";
  EXPECT_EQ(r.err.find("step 1000/1000"), std::string::npos) << "the run was not interrupted";
  EXPECT_NE(r.err.find("interrupted"), std::string::npos) << r.err;
  expect_no_output();
}

// ---- other commands --------------------------------------------------------------------------

TEST_F(Cli, InspectNamesTheBrokenFile) {
  const std::string p = tmp / "bad.safetensors";
  write_all(p, std::string("\x10\0\0\0\0\0\0\0{\"a\":1}", 16));
  expect_error(run_zimage({"inspect", p}), 1, {"bad.safetensors"});
}

TEST_F(Cli, EncodeInvalidUtf8) {
  expect_error(run_zimage({"encode", "--model", test::tiny_model(), "-p", "\xC0\xAF", "-o", out}), 2,
               {"UTF-8"});
  expect_no_output();
}

TEST_F(Cli, TokenizeInvalidUtf8) {
  RunResult r = run_zimage({"tokenize", "--model", test::tiny_model(), "--", "ab\xE2\x82"});
  expect_error(r, 1, {"UTF-8"});
}

// ---- issue 15: checks before work -------------------------------------------------------------
// Each case used to fail only after the earlier phases had run. Now it fails before the first
// phase: with --json-progress the run prints a "phase_start" event when a phase begins, and
// none may appear.

namespace {

void expect_no_phase(const RunResult& r) {
  EXPECT_EQ(r.err.find("phase_start"), std::string::npos) << "a phase started before the error:\n" << r.err;
  EXPECT_EQ(r.err.find("encode..."), std::string::npos) << r.err;
}

// The first lora_A-like tensor of a LoRA file made twice as wide: its delta no longer fits.
void write_bad_lora(const std::string& from, const std::string& to) {
  std::vector<RawTensor> ts = read_raw(from);
  for (auto& t : ts)
    if (t.name.find("lora_A") != std::string::npos || t.name.find("lora_down") != std::string::npos) {
      t.shape.back() *= 2;
      t.bytes += t.bytes;
      break;
    }
  write_raw_safetensors(to, ts);
}

}  // namespace

TEST_F(Cli, TruncatedTransformerFailsBeforeAnyPhase) {
  ModelCopy m(tmp.path);
  const std::string p = m.file(kDit);
  fs::resize_file(p, fs::file_size(p) - 100);
  RunResult r = generate(m.dir(), {"--json-progress"});
  expect_fails(r, 1, {"transformer/diffusion_pytorch_model.safetensors", "truncated"});
  expect_no_phase(r);
}

TEST_F(Cli, MissingVaeFileFailsBeforeAnyPhase) {
  ModelCopy m(tmp.path);
  m.remove("vae/diffusion_pytorch_model.safetensors");
  RunResult r = generate(m.dir(), {"--json-progress"});
  expect_fails(r, 1, {"vae"});
  expect_no_phase(r);
}

TEST_F(Cli, TruncatedVaeFailsBeforeAnyPhase) {
  ModelCopy m(tmp.path);
  const std::string p = m.file("vae/diffusion_pytorch_model.safetensors");
  fs::resize_file(p, fs::file_size(p) - 100);
  RunResult r = generate(m.dir(), {"--json-progress"});
  expect_fails(r, 1, {"vae/diffusion_pytorch_model.safetensors", "truncated"});
  expect_no_phase(r);
}

TEST_F(Cli, MissingLoraFailsBeforeAnyPhase) {
  RunResult r = generate(test::tiny_model(), {"--json-progress", "--lora", tmp / "nope.safetensors:0.5"});
  expect_fails(r, 1, {"nope.safetensors"});
  expect_no_phase(r);
}

TEST_F(Cli, LoraOfWrongShapeFailsBeforeAnyPhase) {
  const std::string bad = tmp / "bad_lora.safetensors";
  write_bad_lora(test::data_path("loras/tiny_lora_peft.safetensors"), bad);
  RunResult r = generate(test::tiny_model(), {"--json-progress", "--transformer-dtype", "f32", "--lora", bad});
  expect_fails(r, 1, {"bad_lora.safetensors"});
  expect_no_phase(r);
}

TEST_F(Cli, MissingOverrideFailsBeforeAnyPhase) {
  RunResult r = generate(test::tiny_model(), {"--json-progress", "--transformer-override", tmp / "ov.safetensors"});
  expect_fails(r, 1, {"ov.safetensors"});
  expect_no_phase(r);
}

TEST_F(Cli, OverrideOfWrongShapeFailsBeforeAnyPhase) {
  std::vector<RawTensor> ts = read_raw(test::data_path("loras/tiny_transformer_override.safetensors"));
  ASSERT_FALSE(ts.empty());
  ts[0].shape.back() *= 2;
  ts[0].bytes += ts[0].bytes;
  const std::string bad = tmp / "bad_ov.safetensors";
  write_raw_safetensors(bad, ts);
  RunResult r = generate(test::tiny_model(), {"--json-progress", "--transformer-override", bad});
  expect_fails(r, 1, {"transformer", ts[0].name});
  expect_no_phase(r);
}

TEST_F(Cli, EmptyOutputFailsBeforeAnyPhase) {
  RunResult r = generate(test::tiny_model(), {"--json-progress", "-o", ""});
  expect_error(r, 2, {"-o/--output", "empty"});
  expect_no_phase(r);
}

TEST_F(Cli, ProcOutputFailsBeforeAnyPhase) {
  RunResult r = generate(test::tiny_model(), {"--json-progress", "-o", "/proc/zimage_cli_test.png"});
  expect_error(r, 1, {"cannot write '/proc/zimage_cli_test.png'"});
  expect_no_phase(r);
}

TEST_F(Cli, UnwritableMemoryReportFailsBeforeAnyPhase) {
  RunResult r = generate(test::tiny_model(), {"--json-progress", "--memory-report", tmp / "no/such/r.json"});
  expect_fails(r, 1, {"no/such/r.json"});
  expect_no_phase(r);
  RunResult r2 = generate(test::tiny_model(), {"--json-progress", "--memory-report", "/proc/zimage_report.json"});
  expect_fails(r2, 1, {"/proc/zimage_report.json"});
  expect_no_phase(r2);
}

TEST_F(Cli, TwoOutputsOnOnePathAreRefused) {
  RunResult r = generate(test::tiny_model(), {"--json-progress", "--memory-report", out});
  expect_fails(r, 2, {"two outputs", "image.png", "--memory-report"});
  expect_no_phase(r);
  // --count with a pattern that names every image the same.
  RunResult r2 = run_zimage({"generate", "--model", test::tiny_model(), "-p", "x", "-W", "32", "-H", "32", "--steps",
                             "1", "-b", "2", "--output-dir", out_dir.string(), "--name-pattern", "same.png"});
  expect_error(r2, 2, {"two outputs", "same.png"});
}

TEST_F(Cli, UnknownExtensionIsRefused) {
  out = (out_dir / "image.gif").string();
  expect_fails(generate(test::tiny_model()), 2, {"image.gif", ".png", ".jpg", ".webp"});
}

TEST_F(Cli, SizeLimitMessageStatesRealMemory) {
  RunResult r = generate(test::tiny_model(), {"-W", "8208", "-H", "64"});
  expect_fails(r, 2, {"8192"});
  EXPECT_EQ(r.err.find("about 0 GiB"), std::string::npos) << r.err;
}

// ---- issue 15: parser messages ---------------------------------------------------------------

TEST_F(Cli, NearMissFlagGetsASuggestionAndTheSubcommandHelp) {
  RunResult r = generate(test::tiny_model(), {"--stesp", "3"});
  expect_fails(r, 2, {"'--stesp'", "did you mean '--steps'", "zimage generate --help"});
  RunResult r2 = generate(test::tiny_model(), {"--negative-promt", "x"});
  expect_fails(r2, 2, {"did you mean '--negative-prompt'"});
}

TEST_F(Cli, UnknownCommandGetsASuggestion) {
  RunResult r = run_zimage({"gen", "-p", "x"});
  expect_error(r, 2, {"unknown command 'gen'", "did you mean 'generate'", "zimage --help"});
}

TEST_F(Cli, MissingValueNamesTheFlag) {
  RunResult r = run_zimage({"generate", "--model", test::tiny_model(), "-p", "x", "--steps"});
  expect_error(r, 2, {"--steps", "zimage generate --help"});
}

TEST_F(Cli, VersionListsBackendsAndFormats) {
  RunResult r = run_zimage({"--version"});
  EXPECT_EQ(r.exit_code, 0);
  for (const char* s : {"zimage ", "backends: cpu", "PNG", "JPEG", "WebP", "bundled model:"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s << " not in " << r.out;
}
