// zimage generate: prompt in, image out. Argument parsing, checks before work, progress and
// reporting only; the work is zi::generate() in src/pipeline, the metadata
// src/pipeline/metadata, the image files src/io/image_codec.
#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "backends/device.h"
#include "cli/common.h"
#include "core/check.h"
#include "core/parallel.h"
#include "core/torch_random.h"
#include "io/image_codec.h"
#include "io/safetensors.h"
#include "models/lora.h"
#include "pipeline/edit.h"
#include "pipeline/memory_report.h"
#include "pipeline/metadata.h"
#include "pipeline/pipeline.h"

namespace fs = std::filesystem;

namespace zi::cli {
namespace {

std::atomic<bool> g_cancel{false};
extern "C" void on_sigint(int) { g_cancel.store(true); }

struct GenerateArgs {
  GenerateOptions o;
  std::string model, output, seed_text, vae_dtype = "bf16", dit_dtype = "bf16", te_dtype = "bf16";
  std::string vae_tile, memory_report;
  std::vector<std::string> loras;
  bool memory_report_flag = false;
  bool keep_models = false;
  std::string diffusion_model, text_encoder, vae;  // issue 16: per-component files
  bool lora_strict = false;
  int count = 1;
  int64_t cache_limit_mib = -1;
  std::string vram;
  std::string prefetch = "auto";
  std::string device, te_device, vae_device, precision = "bf16";
  std::string controlnet_dtype = "bf16";
  int threads = 0;
  bool quiet = false;
  // issue 15
  double cfg_scale = 1.0;
  std::string output_dir, name_pattern = "zimage-{index}-{seed}.png", format;
  int quality = 90;
  int png_level = -1;  // zlib's default (6)
  bool lossless = false;
  bool no_metadata = false;
  std::string metadata_paths = "on";
  std::string from_image, prompt_embeds;
  bool json_progress = false;
  std::map<std::string, const CLI::Option*> opts;  // by long name: given on the command line?
  bool given(const std::string& name) const {
    auto it = opts.find(name);
    return it != opts.end() && it->second->count() > 0;
  }
};

DType parse_dtype_flag(const std::string& v, const char* flag) {
  DType d;
  if (!parse_dtype(v, &d)) throw UsageError(str_cat(flag, " must be f32, bf16 or f16, got '", v, "'"));
  return d;
}

// --transformer-dtype / --text-encoder-dtype: also the weight formats made at load time.
DType parse_weight_dtype_flag(const std::string& v, const char* flag) {
  DType d;
  if (!parse_weight_dtype(v, &d))
    throw UsageError(str_cat(flag, " must be f32, bf16, f16, q8_0, q5_0, q4_0 or fp8, got '", v, "'"));
  return d;
}

std::string json_str(const std::string& s) { return nlohmann::json(s).dump(); }

// Progress of every phase: a redrawn line on a terminal, plain lines otherwise, or one JSON
// object per line (--json-progress), all on stderr.
class Progress {
 public:
  enum Mode { Off, Tty, Plain, Json };
  explicit Progress(Mode m) : mode_(m) {}
  Mode mode() const { return mode_; }

  void event(const std::string& json_body) {  // {"event":..., ...} without braces
    if (mode_ == Json) std::fprintf(stderr, "{%s}\n", json_body.c_str());
  }
  void note(const std::string& line) {  // a plain line (not in JSON mode)
    if (mode_ == Off || mode_ == Json) return;
    end_line();
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  void phase_start(const std::string& p) {
    phase_ = p;
    t0_ = now();
    last_draw_ = 0;
    if (mode_ == Json) event(str_cat("\"event\":\"phase_start\",\"phase\":", json_str(p)));
    else if (mode_ == Plain) note(p + "...");
    else if (mode_ == Tty) draw(p + "...");
  }
  void phase_end(const std::string& p, double seconds) {
    flush_load();
    if (mode_ == Json) event(str_cat("\"event\":\"phase_end\",\"phase\":", json_str(p), ",\"seconds\":", seconds));
    else if (mode_ == Tty) {
      draw(str_cat(p, " done in ", fmt(seconds), " s"));
      end_line();
    } else if (mode_ == Plain) note(str_cat(p, " done in ", fmt(seconds), " s"));
  }
  void load(const std::string& component, int64_t done, int64_t total) {
    const double t = now();
    if (!pending_.empty() && pending_ != component) flush_load();
    pending_ = component;
    pending_done_ = done;
    pending_total_ = total;
    pending_t_ = t - t0_;
    const bool last = done >= total;
    if (last) pending_.clear();
    if (!last && t - last_draw_ < (mode_ == Tty ? 0.1 : 1.0)) return;
    last_draw_ = t;
    const double el = t - t0_;
    const double rate = el > 0 ? double(done) / el : 0;
    if (mode_ == Json)
      event(str_cat("\"event\":\"load\",\"component\":", json_str(component), ",\"bytes\":", done, ",\"total\":", total,
                    ",\"seconds\":", el));
    else if (mode_ == Tty)
      draw(str_cat("  load ", component, "  ", bytes(done), " / ", bytes(total), "  ", bytes(int64_t(rate)), "/s"));
    else if (mode_ == Plain && last)
      note(str_cat("  loaded ", component, ": ", bytes(done), " in ", fmt(el), " s (", bytes(int64_t(rate)), "/s)"));
  }
  // The last load of a component that did not read its whole files (unused tensors): its
  // final figure, once, in the modes that print only final figures.
  void flush_load() {
    if (pending_.empty()) return;
    const std::string c = pending_;
    pending_.clear();
    const double rate = pending_t_ > 0 ? double(pending_done_) / pending_t_ : 0;
    if (mode_ == Json)
      event(str_cat("\"event\":\"load\",\"component\":", json_str(c), ",\"bytes\":", pending_done_, ",\"total\":",
                    pending_total_, ",\"seconds\":", pending_t_));
    else if (mode_ == Plain)
      note(str_cat("  loaded ", c, ": ", bytes(pending_done_), " in ", fmt(pending_t_), " s (", bytes(int64_t(rate)), "/s)"));
  }
  void step(int s, int n, double elapsed) {
    flush_load();
    const double rate = elapsed > 0 ? s / elapsed : 0;
    const double eta = rate > 0 ? (n - s) / rate : 0;
    if (mode_ == Json) {
      event(str_cat("\"event\":\"step\",\"step\":", s, ",\"steps\":", n, ",\"seconds\":", elapsed, ",\"eta\":", eta));
      return;
    }
    const std::string speed = rate >= 1 ? str_cat(fmt(rate), " it/s") : str_cat(fmt(rate > 0 ? 1 / rate : 0), " s/it");
    if (mode_ == Tty) {
      const int width = 30, filled = n ? s * width / n : width;
      std::string bar(size_t(filled), '#');
      bar.resize(size_t(width), '.');
      draw(str_cat("  denoise [", bar, "] ", s, "/", n, "  ", speed, "  ETA ", fmt(eta), " s"));
    } else if (mode_ == Plain) {
      note(str_cat("  step ", s, "/", n, " (", fmt(elapsed), " s, ", speed, ", ETA ", fmt(eta), " s)"));
    }
  }
  void end_line() {
    if (mode_ == Tty && drawn_) {
      std::fprintf(stderr, "\n");
      drawn_ = false;
    }
  }

 private:
  static double now() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
  }
  static std::string fmt(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.2f", v);
    return b;
  }
  static std::string bytes(int64_t b) {  // "12.31 GB", "37.5 MB"
    char buf[32];
    if (b >= 1000000000) std::snprintf(buf, sizeof buf, "%.2f GB", double(b) / 1e9);
    else std::snprintf(buf, sizeof buf, "%.1f MB", double(b) / 1e6);
    return buf;
  }
  void draw(const std::string& line) {
    std::fprintf(stderr, "\r%-78s", line.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }
  Mode mode_;
  std::string phase_, pending_;
  int64_t pending_done_ = 0, pending_total_ = 0;
  double pending_t_ = 0;
  double t0_ = 0, last_draw_ = 0;
  bool drawn_ = false;
};

// out.png → out-0001.png for the k-th image of --count.
std::string numbered_path(const std::string& path, int k) {
  char num[16];
  std::snprintf(num, sizeof num, "-%04d", k);
  fs::path p(path);
  return (p.parent_path() / (p.stem().string() + num + p.extension().string())).string();
}

// --name-pattern: {index} (1-based, 4 digits), {seed}, {width}, {height}, {steps}.
std::string expand_pattern(const std::string& pat, int index, uint64_t seed, const GenerateOptions& o) {
  char idx[16];
  std::snprintf(idx, sizeof idx, "%04d", index);
  const std::map<std::string, std::string> vars = {{"index", idx},
                                                   {"seed", std::to_string(seed)},
                                                   {"width", std::to_string(o.width)},
                                                   {"height", std::to_string(o.height)},
                                                   {"steps", std::to_string(o.steps)}};
  std::string out;
  for (size_t i = 0; i < pat.size(); ++i) {
    if (pat[i] == '{') {
      const size_t close = pat.find('}', i);
      if (close == std::string::npos) throw UsageError(str_cat("--name-pattern: unclosed '{' in '", pat, "'"));
      const std::string key = pat.substr(i + 1, close - i - 1);
      auto it = vars.find(key);
      if (it == vars.end())
        throw UsageError(str_cat("--name-pattern: unknown field {", key, "} (use {index}, {seed}, {width}, {height}, {steps})"));
      out += it->second;
      i = close;
    } else {
      out += pat[i];
    }
  }
  if (out.find('/') != std::string::npos) throw UsageError(str_cat("--name-pattern must give a file name, not a path: '", pat, "'"));
  return out;
}

// A path the run will write, refused now (before any phase) when it cannot be: the folder is
// missing or not a folder, the path is a folder, or a file cannot be created there (tested by
// creating and removing a temporary file, which also catches /proc, read-only mounts, ...).
void check_writable(const std::string& path, const char* flag) {
  if (path.empty()) throw UsageError(str_cat(flag, " must not be empty"));
  if (path == "-") return;
  fs::path out(path);
  fs::path dir = out.has_parent_path() ? out.parent_path() : ".";
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(str_cat("cannot write '", path, "': folder '", dir.string(), "' ",
                        fs::exists(dir, ec) ? "is not a folder" : "does not exist"));
  if (fs::is_directory(out, ec)) throw Error(str_cat("cannot write '", path, "': it is a folder"));
  std::string tmpl = path + ".zimage-probe.XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  const int fd = mkstemp(buf.data());
  if (fd < 0) {
    if (errno == EACCES || errno == EPERM || errno == EROFS)
      throw Error(str_cat("cannot write '", path, "': folder is not writable (", std::strerror(errno), ")"));
    throw Error(str_cat("cannot write '", path, "': ", std::strerror(errno)));
  }
  ::close(fd);
  ::unlink(buf.data());
}

std::string same_file_key(const std::string& p) {
  std::error_code ec;
  fs::path c = fs::weakly_canonical(fs::absolute(p, ec), ec);
  return ec ? p : c.string();
}

std::shared_ptr<PromptEmbeddings> load_prompt_embeds(const std::string& path) {
  SafetensorsFile f = SafetensorsFile::open(path);
  if (!f.find("prompt_embeds"))
    throw Error(str_cat("'", path, "' has no tensor 'prompt_embeds' (make it with 'zimage encode -p TEXT -o FILE')"));
  auto e = std::make_shared<PromptEmbeddings>();
  e->pos = f.load("prompt_embeds", DType::F32);
  if (e->pos.ndim() != 2 || e->pos.dim(0) < 1)
    throw Error(str_cat("'", path, "': prompt_embeds must be [L, hidden], got ", shape_str(e->pos.shape())));
  if (const TensorInfo* t = f.find("input_ids")) {
    Tensor ids = f.load("input_ids");
    if (ids.dtype() == DType::I32)
      e->ids.assign(ids.data<int32_t>(), ids.data<int32_t>() + ids.numel());
    (void)t;
  }
  return e;
}

// Options that --from-image takes from the image (so they may not be given with it).
const char* kFromImageOwned[] = {"prompt",           "negative-prompt",    "width",         "height",
                                 "steps",            "guidance",           "cfg-scale",     "cfg-normalization",
                                 "cfg-truncation",   "max-sequence-length", "text-encoder-dtype", "transformer-dtype",
                                 "vae-dtype",        "vae-tile",           "lora",          "transformer-override",
                                 "precision",        "prompt-embeds"};

void run(GenerateArgs& a) {
  const bool from_image = !a.from_image.empty();
  std::string embeds_file = a.prompt_embeds;
  if (from_image) {
    for (const char* name : kFromImageOwned)
      if (a.given(name))
        throw UsageError(str_cat("--", name, " cannot be combined with --from-image (the image's metadata sets it; "
                                 "--seed, --model, --count, outputs and devices may be changed)"));
    DecodedImage img = read_image_file(a.from_image);
    const std::string js = find_text(img.text, "zimage");
    if (js.empty())
      throw Error(str_cat("'", a.from_image, "' has no zimage metadata (it was not made by zimage, or with --no-metadata)"));
    GenerateOptions o = a.o;
    apply_reproduction_json(js, &o, &embeds_file);
    a.o = o;
    if (!a.given("device") && !a.given("text-encoder-device") && !a.given("vae-device") &&
        (a.o.transformer_device == Device::CUDA || a.o.text_encoder_device == Device::CUDA ||
         a.o.vae_device == Device::CUDA) && !device::gpu_available()) {
      if (!a.quiet) std::fprintf(stderr, "warning: the image was made on a GPU; no usable GPU here, running on the CPU (pixels may differ slightly)\n");
      a.o.transformer_device = a.o.text_encoder_device = a.o.vae_device = Device::CPU;
    }
    if (!a.given("model")) {
      std::error_code ec;
      if (!fs::exists(a.o.model_dir, ec))
        throw Error(str_cat("the image was made with model '", a.o.model_dir,
                            "', which is not here (metadata paths off, or another machine): pass --model DIR"));
      a.model = a.o.model_dir;
    }
  } else {
    if (!a.given("prompt") && embeds_file.empty())
      throw UsageError("--prompt is required (or --prompt-embeds FILE, or --from-image FILE); see 'zimage generate --help'");
    if (a.given("prompt") && !embeds_file.empty())
      throw UsageError("--prompt and --prompt-embeds cannot be combined: the embeddings already are the prompt");
    if (a.given("guidance") && a.given("cfg-scale"))
      throw UsageError("--guidance and --cfg-scale set the same thing (cfg-scale = guidance + 1): give one");
    if (a.given("cfg-scale")) {
      if (!std::isfinite(a.cfg_scale) || a.cfg_scale < 1.0)
        throw UsageError(str_cat("--cfg-scale must be a finite number >= 1 (1 = no guidance), got ", a.cfg_scale));
      a.o.guidance = float(a.cfg_scale - 1.0);
    }
    a.o.vae_dtype = parse_dtype_flag(a.vae_dtype, "--vae-dtype");
    a.o.transformer_dtype = parse_weight_dtype_flag(a.dit_dtype, "--transformer-dtype");
    a.o.text_encoder_dtype = parse_weight_dtype_flag(a.te_dtype, "--text-encoder-dtype");
    if (a.vae_tile.empty() || a.vae_tile == "0" || a.vae_tile == "off") a.o.vae_tile = 0;
    else if (a.vae_tile == "auto") a.o.vae_tile = -1;
    else {
      int px = 0;
      try {
        px = std::stoi(a.vae_tile);
      } catch (const std::exception&) {
        throw UsageError(str_cat("--vae-tile must be a number of pixels or 'auto', got '", a.vae_tile, "'"));
      }
      if (px < 128 || px % 8) throw UsageError(str_cat("--vae-tile must be a multiple of 8 of at least 128, got ", px));
      a.o.vae_tile = px / 8;
    }
    for (const std::string& l : a.loras) {
      LoraSpec spec = parse_lora_arg(l);
      a.o.loras.emplace_back(spec.path, spec.scale);
    }
    if (a.precision == "bf16") a.o.precision = DType::BF16;
    else if (a.precision == "f32") a.o.precision = DType::F32;
    else throw UsageError(str_cat("--precision must be bf16 or f32, got '", a.precision, "'"));
  }
  // --seed: a number, or -1 (and, from an image, absent) for the image's / a random seed.
  if (!a.seed_text.empty() && a.seed_text != "-1") {
    try {
      size_t used = 0;
      if (a.seed_text[0] == '-' || a.seed_text[0] == '+') throw std::invalid_argument("x");
      a.o.seed = std::stoull(a.seed_text, &used);
      if (used != a.seed_text.size()) throw std::invalid_argument("x");
    } catch (const std::exception&) {
      throw UsageError(str_cat("--seed must be a whole number from 0 to 2^64-1, or -1 for a random one, got '",
                               a.seed_text, "'"));
    }
  } else if (!from_image || a.seed_text == "-1") {
    a.o.seed = random_seed();
  }
  if (a.count < 1) throw UsageError(str_cat("--count must be at least 1, got ", a.count));
  if (a.quality < 1 || a.quality > 100) throw UsageError(str_cat("--quality must be 1..100, got ", a.quality));
  if (a.given("png-level") && (a.png_level < 0 || a.png_level > 9))
    throw UsageError(str_cat("--png-level must be from 0 to 9, got ", a.png_level));
  if (a.metadata_paths != "on" && a.metadata_paths != "off")
    throw UsageError(str_cat("--metadata-paths must be on or off, got '", a.metadata_paths, "'"));
  const auto parse_device = parse_device_flag;
  if (!from_image || a.given("device") || a.given("text-encoder-device") || a.given("vae-device")) {
    const Device dev = parse_device(a.device, "--device", device::gpu_available() ? Device::CUDA : Device::CPU);
    a.o.transformer_device = dev;
    a.o.text_encoder_device = parse_device(a.te_device, "--text-encoder-device", dev);
    a.o.vae_device = parse_device(a.vae_device, "--vae-device", dev);
  }
  // The GPU's context and libraries start now, beside the checks and the tokenizer's parse.
  if (a.o.transformer_device == Device::CUDA || a.o.text_encoder_device == Device::CUDA ||
      a.o.vae_device == Device::CUDA)
    device::warm_up_async(Device::CUDA);
  if (a.cache_limit_mib >= 0) a.o.cache_limit_bytes = a.cache_limit_mib << 20;
  if (!a.vram.empty()) a.o.vram_bytes = parse_vram_flag(a.vram);
  if (a.prefetch == "auto") a.o.prefetch = GenerateOptions::Prefetch::Auto;
  else if (a.prefetch == "on") a.o.prefetch = GenerateOptions::Prefetch::On;
  else if (a.prefetch == "off") a.o.prefetch = GenerateOptions::Prefetch::Off;
  else throw UsageError("--prefetch: expected auto, on or off, got '" + a.prefetch + "'");
  a.o.controlnet_dtype = parse_dtype_flag(a.controlnet_dtype, "--controlnet-dtype");
  // Image-conditioned modes: without -W/-H the output takes the input image's size.
  if (!a.given("width") && !a.given("height") && (!a.o.init_image.empty() || !a.o.control_image.empty())) {
    const bool init = !a.o.init_image.empty();
    input_image_size(init ? a.o.init_image : a.o.control_image, init ? "--init-image" : "--control-image", &a.o.width,
                     &a.o.height);
  }
  if (!a.o.init_image.empty() && a.o.control_image.empty() && a.o.strength < 0)
    a.o.strength = a.o.mask_image.empty() ? 0.6 : 1.0;  // the reference pipelines' defaults, recorded in the PNG
  bool bundled = false;
  a.o.diffusion_model_file = a.diffusion_model;
  a.o.text_encoder_file = a.text_encoder;
  a.o.vae_file = a.vae;
  a.o.lora_strict = a.lora_strict;
  // With component files, a folder only when one is named (--model or $ZIMAGE_MODEL): the
  // files, the bundled tokenizer and Turbo's scheduler may be all a run needs.
  if ((!a.diffusion_model.empty() || !a.text_encoder.empty() || !a.vae.empty()) && a.model.empty()) {
    const char* env = std::getenv("ZIMAGE_MODEL");
    a.o.model_dir = env && *env ? env : "";
  } else {
    a.o.model_dir = resolve_model_dir(a.model, &bundled);
  }
  validate_generate_options(a.o);

  // Outputs: the format from the extension (or --format), every path checked now.
  ImageFormat fmt = ImageFormat::PNG;
  if (!a.format.empty()) {
    if (!image_format_from_path("x." + a.format, &fmt))
      throw UsageError(str_cat("--format must be png, jpeg (jpg) or webp, got '", a.format, "'"));
  }
  if (!a.output_dir.empty() && a.given("output"))
    throw UsageError("give either -o/--output or --output-dir (with --name-pattern), not both");
  std::vector<std::string> paths;
  const std::string output = a.output.empty() && a.output_dir.empty() ? "zimage.png" : a.output;
  if (a.given("output") && a.output.empty()) throw UsageError("-o/--output must not be empty");
  for (int k = 0; k < a.count; ++k) {
    if (!a.output_dir.empty())
      paths.push_back((fs::path(a.output_dir) / expand_pattern(a.name_pattern, k + 1, a.o.seed + uint64_t(k), a.o)).string());
    else if (output == "-")
      paths.push_back("-");
    else
      paths.push_back(a.count > 1 ? numbered_path(output, k + 1) : output);
  }
  if (output == "-" && a.count > 1) throw UsageError("-o - (stdout) takes one image; use --output-dir for --count");
  for (const std::string& p : paths) {
    if (p == "-") continue;
    ImageFormat f;
    if (!a.format.empty()) continue;
    if (!image_format_from_path(p, &f))
      throw UsageError(str_cat("cannot tell the image format of '", p,
                               "' from its extension: use .png, .jpg/.jpeg or .webp (or --format)"));
  }
  if (a.lossless && !a.format.empty() && fmt != ImageFormat::WebP)
    throw UsageError("--lossless applies to WebP only (PNG is always lossless)");
  if (!a.output_dir.empty()) {
    std::error_code ec;
    if (!fs::is_directory(a.output_dir, ec))
      throw Error(str_cat("--output-dir '", a.output_dir, "' ", fs::exists(a.output_dir, ec) ? "is not a folder" : "does not exist"));
  }
  for (const std::string& p : paths) check_writable(p, "-o/--output");
  const bool report_file = a.memory_report_flag && !a.memory_report.empty();
  if (report_file) check_writable(a.memory_report, "--memory-report");
  {
    std::map<std::string, std::string> seen;  // canonical path → what writes it
    auto claim = [&](const std::string& p, const std::string& what) {
      if (p == "-") return;
      auto [it, fresh] = seen.emplace(same_file_key(p), what);
      if (!fresh)
        throw UsageError(str_cat("two outputs would be written to '", p, "' (", it->second, " and ", what,
                                 "): give them different paths"));
    };
    for (size_t k = 0; k < paths.size(); ++k) claim(paths[k], a.count > 1 ? str_cat("image ", k + 1) : "the image");
    if (report_file) claim(a.memory_report, "--memory-report");
  }
  if (!embeds_file.empty()) a.o.embeddings = load_prompt_embeds(embeds_file);
  if (!a.quiet && !from_image && !a.o.negative_prompt.empty() && a.o.guidance <= 0)
    std::fprintf(stderr,
                 "warning: the negative prompt has no effect without guidance (--guidance 0 = --cfg-scale 1); "
                 "give --guidance > 0 or --cfg-scale > 1 to use it\n");

  set_num_threads(a.threads);
  // Every file the run reads, checked before any phase (in well under a second).
  preflight_generate(a.o);
  a.o.skip_preflight = true;
  if (bundled) notice_bundled_model(a.quiet);

  Progress::Mode mode = a.quiet ? Progress::Off
                        : a.json_progress ? Progress::Json
                        : isatty(STDERR_FILENO) ? Progress::Tty
                                                : Progress::Plain;
  Progress prog(mode);
  if (mode == Progress::Json) prog.event(str_cat("\"event\":\"start\",\"seed\":", a.o.seed, ",\"count\":", a.count));
  else if (!a.quiet) std::fprintf(stderr, "seed %llu\n", static_cast<unsigned long long>(a.o.seed));
  GenerateHooks hooks;
  hooks.cancel = &g_cancel;
  double first_phase_at = -1;  // seconds since exec when the first phase began
  hooks.on_phase_start = [&](const std::string& p) {
    if (first_phase_at < 0) first_phase_at = seconds_since_exec();
    prog.phase_start(p);
  };
  hooks.on_phase_end = [&](const std::string& p, double s) { prog.phase_end(p, s); };
  hooks.on_step = [&](int s, int n, double e) { prog.step(s, n, e); };
  hooks.on_load = [&](const std::string& c, int64_t d, int64_t t) { prog.load(c, d, t); };
  hooks.on_notice = [&](const std::string& line) {
    if (!a.quiet) std::fprintf(stderr, "warning: %s\n", line.c_str());
  };

  std::signal(SIGINT, on_sigint);
  ModelCache cache;
  const uint64_t first_seed = a.o.seed;
  ImageEncodeOptions enc;
  enc.quality = a.quality;
  enc.lossless = a.lossless;
  enc.png_level = a.png_level;
  for (int k = 0; k < a.count; ++k) {
    a.o.seed = first_seed + uint64_t(k);
    if (a.count > 1) {
      if (mode == Progress::Json) prog.event(str_cat("\"event\":\"image\",\"index\":", k + 1, ",\"seed\":", a.o.seed));
      else prog.note(str_cat("image ", k + 1, "/", a.count, ", seed ", a.o.seed));
    }
    GenerateResult r;
    try {
      r = generate(a.o, hooks, a.keep_models ? &cache : nullptr);
    } catch (const Cancelled&) {
      prog.end_line();
      throw Interrupted();
    }
    if (g_cancel.load()) throw Interrupted();  // Ctrl-C after the last check: write nothing
    // The prompt is encoded once for all images (the encoder was freed before the DiT loaded).
    if (!a.o.embeddings) a.o.embeddings = r.embeddings;
    const std::string& path = paths[size_t(k)];
    ImageFormat f = fmt;
    if (a.format.empty() && path != "-") image_format_from_path(path, &f);
    if (a.lossless && f != ImageFormat::WebP) throw UsageError("--lossless applies to WebP only (PNG is always lossless)");
    MetadataInput mi;
    mi.options = &a.o;
    mi.width = r.width;
    mi.height = r.height;
    mi.vae_tile_used = r.vae_tile_used;
    mi.prompt_embeds_file = embeds_file;
    mi.full_paths = a.metadata_paths == "on";
    const TextChunks meta = a.no_metadata ? TextChunks{} : image_metadata(mi);
    const double write_begin = seconds_since_exec();
    write_image_atomic(path, f, r.rgb.data(), r.width, r.height, enc, meta);
    const double written_at = seconds_since_exec();
    if (mode == Progress::Json) {
      prog.event(str_cat("\"event\":\"wrote\",\"path\":", json_str(path), ",\"format\":", json_str(image_format_name(f)),
                         ",\"width\":", r.width, ",\"height\":", r.height, ",\"seed\":", a.o.seed));
    } else if (!a.quiet) {
      for (size_t i = 0; i < r.phases.size(); ++i) {
        const double load = i < r.load_seconds.size() ? r.load_seconds[i] : 0.0;
        const double rel = i < r.release_seconds.size() ? r.release_seconds[i] : 0.0;
        std::fprintf(stderr, "  %-8s %7.3f s  (load %.3f s, compute %.3f s", r.phases[i].name.c_str(),
                     r.phases[i].seconds, load, r.phases[i].seconds - load - rel);
        if (rel > 0.0005) std::fprintf(stderr, ", release %.3f s", rel);
        std::fprintf(stderr, ")\n");
        if (i < r.load_detail.size() && r.load_detail[i].upload_bytes > 0) {
          const LoadDetail& d = r.load_detail[i];
          std::fprintf(stderr, "           load: uploaded %.2f GB in %.3f s (%.1f GB/s; copying into pinned memory %.3f s, "
                       "waiting for the bus %.3f s), device allocations %.3f s, unmapping file pages %.3f s\n",
                       double(d.upload_bytes) / 1e9, d.upload_seconds,
                       d.upload_seconds > 0 ? double(d.upload_bytes) / 1e9 / d.upload_seconds : 0.0, d.copy_seconds,
                       d.wait_seconds, d.alloc_seconds, d.unmap_seconds);
        }
        if (i < r.load_detail.size() && r.load_detail[i].helper_wait_seconds >= 0.001)
          std::fprintf(stderr, "           then waited %.3f s for the helper threads (parsing the tokenizer%s)\n",
                       r.load_detail[i].helper_wait_seconds, r.gpu_phases.empty() ? "" : "; the GEMM and VAE warm-ups");
      }
      for (const PrefetchRecord& pf : r.prefetched)
        std::fprintf(stderr, "  %s loaded during %s in %.3f s; %.3f s of it overlapped, the next phase waited %.3f s\n",
                     pf.component.c_str(), pf.during.c_str(), pf.load_seconds,
                     std::max(0.0, pf.load_seconds - pf.waited_seconds), pf.waited_seconds);
      if (!r.gpu_phases.empty()) {
        const device::PoolStats ps = device::pool_stats(Device::CUDA);
        const device::UploadStats us = device::upload_stats();
        std::fprintf(stderr, "  gpu %s: accounted peak %.1f MiB, pool reserved high %.1f MiB; uploaded %.2f GB at %.2f GB/s; "
                     "context created in %.3f s\n",
                     device::description(Device::CUDA).c_str(), double(r.gpu_peak_bytes) / (1 << 20),
                     double(ps.reserved_high) / (1 << 20), double(us.bytes) / 1e9,
                     us.seconds > 0 ? double(us.bytes) / 1e9 / us.seconds : 0.0, r.gpu_init_seconds);
      }
      if (k == 0 && first_phase_at >= 0 && written_at >= 0) {
        double phases = 0;
        for (const PhaseRecord& p : r.phases) phases += p.seconds;
        const double probe = device::runtime_times(Device::CUDA).probe_seconds;
        std::fprintf(stderr, "  wall clock: %.2f s from exec to the image written (startup %.2f s", written_at,
                     first_phase_at);
        if (!r.gpu_phases.empty() && probe > 0)
          std::fprintf(stderr, " of which %.2f s finding the GPU and opening cuBLAS", probe);
        std::fprintf(stderr, ", phases %.2f s, writing %.2f s)\n", phases, written_at - write_begin);
      }
      std::fprintf(stderr, "wrote %s (%dx%d %s)\n", path == "-" ? "stdout" : path.c_str(), r.width, r.height,
                   image_format_name(f));
    }
    if (a.memory_report_flag) print_memory_report(r, a.memory_report);
  }
  std::signal(SIGINT, SIG_DFL);
}

}  // namespace

void add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* c = app.add_subcommand(
      "generate",
      "Generate an image from a text prompt.\n"
      "  zimage generate -p \"a red fox in fresh snow, watercolor\" -o fox.png\n"
      "  zimage generate --model ~/models/Z-Image-Turbo -p \"...\" -W 1280 -H 720 --seed 42 -o out.webp\n"
      "  zimage generate --from-image out.png -o again.png     (the image's metadata reproduces it)\n"
      "Z-Image-Turbo's recipe is the default: 8 steps, guidance 0, 1024x1024.");
  auto reg = [&](CLI::Option* o) {
    a->opts[o->get_lnames().empty() ? o->get_name() : o->get_lnames()[0]] = o;
    return o;
  };
  reg(c->add_option("-p,--prompt", a->o.prompt, "what to draw (UTF-8)"));
  reg(c->add_option("-n,--negative-prompt", a->o.negative_prompt,
                    "what to avoid (only used with --guidance > 0 / --cfg-scale > 1)"));
  reg(c->add_option("--model", a->model,
                    "diffusers-format Z-Image folder (default: $ZIMAGE_MODEL, else the bundled tiny random model)"));
  reg(c->add_option("--diffusion-model", a->diffusion_model,
                    "transformer weights file (diffusers, ComfyUI/original or all-in-one layout; replaces --model's)"));
  reg(c->add_option("--text-encoder", a->text_encoder,
                    "text encoder weights file (Qwen3, e.g. ComfyUI's qwen_3_4b.safetensors; replaces --model's)"));
  reg(c->add_option("--vae", a->vae,
                    "VAE weights file (diffusers or Flux AE ae.safetensors layout; replaces --model's)"));
  reg(c->add_option("-W,--width", a->o.width, "image width in pixels, a multiple of 16")->capture_default_str());
  reg(c->add_option("-H,--height", a->o.height, "image height in pixels, a multiple of 16")->capture_default_str());
  reg(c->add_option("--steps", a->o.steps, "denoising steps (Turbo: 8)")->capture_default_str());
  reg(c->add_option("--guidance", a->o.guidance,
                    "Z-Image (diffusers) guidance_scale g: pred = pos + g*(pos - neg); 0 = off (Turbo)")
          ->capture_default_str());
  reg(c->add_option("--cfg-scale", a->cfg_scale,
                    "guidance in the stable-diffusion.cpp / A1111 convention s: pred = neg + s*(pos - neg), "
                    "i.e. --guidance s-1; 1 = off"));
  reg(c->add_option("--cfg-normalization", a->o.cfg_normalization,
                    "cap the guided prediction's norm at F x the conditional one (0 = off)")
          ->capture_default_str());
  reg(c->add_option("--cfg-truncation", a->o.cfg_truncation,
                    "turn guidance off once the model time (1 - sigma) exceeds F")
          ->capture_default_str());
  reg(c->add_option("--seed", a->seed_text,
                    "random seed; the same seed gives the same image as diffusers; -1 or absent: random (printed)"));
  reg(c->add_option("--max-sequence-length", a->o.max_sequence_length, "prompt tokens kept (template included)")
          ->capture_default_str());
  reg(c->add_option("-o,--output", a->output,
                    "image file, written atomically; the format from the extension: .png, .jpg/.jpeg, .webp; "
                    "'-' writes to stdout (default: zimage.png)"));
  reg(c->add_option("--output-dir", a->output_dir, "folder for the images (with --name-pattern), e.g. for --count"));
  reg(c->add_option("--name-pattern", a->name_pattern,
                    "file names in --output-dir: {index} {seed} {width} {height} {steps}")
          ->capture_default_str());
  reg(c->add_option("--format", a->format, "png, jpeg or webp whatever the extension (needed for -o - other than PNG)"));
  reg(c->add_option("--quality", a->quality, "JPEG and lossy WebP quality, 1..100")->capture_default_str());
  reg(c->add_option("--png-level", a->png_level,
                    "PNG zlib compression 0..9: the pixels are the same at every level; 1 writes several times "
                    "faster than the default (zlib's 6) at a somewhat larger file"));
  reg(c->add_flag("--lossless", a->lossless, "WebP: lossless (the pixels of the PNG)"));
  reg(c->add_flag("--no-metadata", a->no_metadata, "write no parameters / zimage metadata into the image"));
  reg(c->add_option("--metadata-paths", a->metadata_paths,
                    "on: metadata names the model, LoRA and override files by path; off: by file name only")
          ->capture_default_str());
  reg(c->add_option("--from-image", a->from_image,
                    "regenerate the image from the zimage metadata of this PNG/JPEG/WebP (--seed, --model, outputs "
                    "and devices may be changed)"));
  reg(c->add_option("--prompt-embeds", a->prompt_embeds,
                    "use these prompt embeddings (the output of 'zimage encode') instead of a prompt"));
  reg(c->add_option("--threads", a->threads, "CPU threads (default: all cores); results are identical for any count"));
  reg(c->add_option("--text-encoder-dtype", a->te_dtype, "text encoder weights in memory: bf16, f16, f32, or a weight format q8_0, q5_0, q4_0, fp8")
          ->capture_default_str());
  reg(c->add_option("--transformer-dtype", a->dit_dtype, "transformer weights in memory: bf16, f16, f32, or a weight format q8_0, q5_0, q4_0, fp8")
          ->capture_default_str());
  reg(c->add_option("--vae-dtype", a->vae_dtype, "VAE weights in memory: bf16, f16 or f32")->capture_default_str());
  reg(c->add_option("--vae-tile", a->vae_tile,
                    "decode in tiles of this many pixels (multiple of 8, >= 128) to bound memory, or 'auto'"));
  auto* mr = reg(c->add_option("--memory-report", a->memory_report,
                               "print a table of each phase's weights and peak memory; with FILE also write it as JSON"));
  mr->expected(0, 1);
  reg(c->add_option("--lora", a->loras,
                    "apply a LoRA, LoHa or LoKr (diffusers/PEFT, kohya, ComfyUI, ai-toolkit or LyCORIS keys) merged "
                    "at load time: FILE or FILE:SCALE; repeatable, each with its own strength, deltas add up")
          ->allow_extra_args(false));
  reg(c->add_flag("--lora-strict", a->lora_strict,
                  "fail when a LoRA tensor matches no transformer weight (default: one warning listing them)"));
  reg(c->add_option("--transformer-override", a->o.transformer_override,
                    "safetensors file whose tensors replace the transformer's of the same name (fine-tunes)"));
  reg(c->add_option("-b,--count,--batch-count", a->count,
                    "images to make, with seeds seed, seed+1, ... (out-0001.png, ...); the prompt is encoded once")
          ->capture_default_str());
  reg(c->add_flag("--keep-models", a->keep_models,
                  "with --count: keep every component loaded between images (faster, more memory)"));
  reg(c->add_option("--cache-limit", a->cache_limit_mib, "MiB the allocator may keep cached after frees"));
  reg(c->add_option("--vram", a->vram,
                    "GiB of GPU memory the GPU phases may allocate: blocks that do not fit stream from pinned host "
                    "memory, the VAE decodes in tiles (default: everything resident, or a budget from free memory "
                    "when the model does not fit; --memory-report prints the plan)"));
  reg(c->add_option("--prefetch", a->prefetch,
                    "load the next phase's weights while the current one computes (the transformer during the "
                    "prompt encoding, the VAE during the last step; faster, and both are in memory at once): auto = "
                    "within a --vram budget that holds both, on = whenever memory holds both (the CPU too), off")
          ->capture_default_str());
  reg(c->add_option("--device", a->device, "where to run: cpu or cuda (default: cuda when a GPU is present)"));
  reg(c->add_option("--text-encoder-device", a->te_device, "run the text encoder on cpu or cuda (default: --device)"));
  reg(c->add_option("--vae-device", a->vae_device, "run the VAE decoder on cpu or cuda (default: --device)"));
  reg(c->add_option("--precision", a->precision,
                    "activations on the GPU: bf16 (f32 accumulation) or f32 (for checking against the CPU)")
          ->capture_default_str());
  // Image-conditioned modes (issue 17; pipeline/edit.h has the input rules).
  reg(c->add_option("--init-image", a->o.init_image,
                    "img2img: start from this PNG/JPEG/WebP (the output takes its size; with --mask: inpaint it)"));
  reg(c->add_option("--strength", a->o.strength,
                "img2img/inpaint: how much of the image is redrawn, in (0, 1] (default 0.6 img2img, 1.0 inpaint)"));
  reg(c->add_option("--mask", a->o.mask_image, "inpaint: PNG of the image's size, white repaints, black keeps"));
  reg(c->add_flag("--mask-binarize", a->o.mask_binarize,
              "accept grey mask pixels and threshold them at 50% like diffusers (default: grey is an error)"));
  reg(c->add_option("--control-image", a->o.control_image,
                "ControlNet condition (edges, depth, pose map...) as a PNG of the output size"));
  reg(c->add_option("--controlnet", a->o.controlnet,
                "Z-Image Fun ControlNet Union 2.0/2.1: diffusers folder or the published .safetensors file"));
  reg(c->add_option("--control-scale", a->o.control_scale, "ControlNet conditioning scale")->capture_default_str());
  reg(c->add_option("--control-preprocess", a->o.control_preprocess,
                "turn the control image into a condition first: canny (other maps: bring your own)"));
  reg(c->add_option("--canny-low", a->o.canny_low, "Canny low threshold (gradient magnitude)")->capture_default_str());
  reg(c->add_option("--canny-high", a->o.canny_high, "Canny high threshold (gradient magnitude)")->capture_default_str());
  reg(c->add_option("--controlnet-dtype", a->controlnet_dtype, "ControlNet weights in memory: bf16, f16 or f32")
      ->capture_default_str());
  reg(c->add_flag("--json-progress", a->json_progress,
                  "progress as one JSON object per line on stderr (events: start, phase_start, load, step, "
                  "phase_end, image, wrote)"));
  reg(c->add_flag("-q,--quiet", a->quiet, "print nothing but errors"));
  c->callback([a, mr] {
    a->memory_report_flag = mr->count() > 0;
    run(*a);
  });
}

}  // namespace zi::cli
