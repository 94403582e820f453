#include "server/engine.h"

#include <algorithm>
#include <filesystem>
#include <sstream>

#include "backends/device.h"
#include "core/allocator.h"
#include "core/check.h"
#include "io/checkpoint.h"
#include "models/qwen3_encoder.h"
#include "models/vae_decoder.h"
#include "models/zimage_dit.h"
#include "text/bpe_tokenizer.h"
#include "io/image_codec.h"
#include "pipeline/metadata.h"

namespace zi::server {

Residency parse_residency(const std::string& s) {
  Residency r{false, false, false};
  if (s == "all") return Residency{};
  if (s == "none") return r;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part == "text-encoder") r.text_encoder = true;
    else if (part == "transformer") r.transformer = true;
    else if (part == "vae") r.vae = true;
    else
      throw UsageError("--resident must be all, none or a comma list of text-encoder, transformer, vae; got '" + s +
                       "'");
  }
  return r;
}

std::string residency_str(const Residency& r) {
  std::string s;
  auto add = [&](bool on, const char* n) {
    if (on) s += (s.empty() ? "" : ",") + std::string(n);
  };
  add(r.text_encoder, "text-encoder");
  add(r.transformer, "transformer");
  add(r.vae, "vae");
  return s.empty() ? "none" : s;
}

Engine::Engine(EngineOptions o) : o_(std::move(o)) {}
Engine::~Engine() = default;

void Engine::load() {
  if (budgeted()) return;
  GenerateOptions probe = o_.defaults;
  probe.prompt = "x";
  preload_models(probe, cache_, o_.resident.text_encoder, o_.resident.transformer, o_.resident.vae);
}

std::string Engine::model_name() const {
  std::filesystem::path p(o_.defaults.model_dir);
  std::string n = p.filename().string();
  if (n.empty()) n = p.parent_path().filename().string();
  return n.empty() ? o_.defaults.model_dir : n;
}

int Engine::max_batch() const {
  if (budgeted()) return 1;
  if (o_.max_batch > 0) return o_.max_batch;
  const ModelFolder mf = open_model_folder(o_.defaults.model_dir);
  const DitConfig& c = mf.transformer;
  // The largest square the pixel limit allows, in whole 16-pixel tokens.
  int side = 16;
  while (int64_t(side + 16) * (side + 16) <= o_.max_pixels) side += 16;
  const int64_t per_image =
      estimate_denoise_activation_bytes(c.dim, dit_ffn_hidden(c), side, side, o_.defaults.max_sequence_length);
  const bool gpu = o_.defaults.transformer_device == Device::CUDA;
  const int64_t free_bytes = gpu ? device::memory_free_bytes(Device::CUDA) : available_host_bytes();
  const int64_t b = free_bytes / 2 / std::max<int64_t>(per_image, 1);
  return int(std::clamp<int64_t>(b, 1, 16));
}

// Under a --vram budget: each item through generate() (the planner, the streaming, the kept
// models released when a phase needs their room) with the engine's cache as --keep-models'.
std::vector<BatchItemResult> Engine::run_planned(const std::vector<BatchItem>& items, const BatchHooks& bh) {
  std::vector<BatchItemResult> res(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    GenerateHooks h;
    h.on_phase_start = bh.on_phase_start;
    if (bh.on_step) h.on_step = [&](int s, int n, double e) { bh.on_step(s, n, e, 1); };
    h.cancel = items[i].cancel;
    try {
      res[i].result = generate(items[i].options, h, &cache_);
    } catch (const Cancelled&) {
      res[i].cancelled = true;
    } catch (const std::bad_alloc&) {
      throw;
    } catch (...) {
      res[i].error = std::current_exception();
    }
  }
  return res;
}

std::vector<BatchOutcome> Engine::run(const BatchWork& w,
                                      const std::function<void(const std::string&, int, int, double)>& progress) {
  std::vector<BatchItem> items(w.options.size());
  for (size_t i = 0; i < items.size(); ++i) {
    items[i].options = *w.options[i];
    items[i].cancel = w.cancel[i];
  }
  BatchHooks hooks;
  int steps = items.empty() ? 0 : items[0].options.steps;
  hooks.on_phase_start = [&](const std::string& p) { progress(p, 0, steps, 0.0); };
  hooks.on_step = [&](int s, int n, double e, int) { progress("denoise", s, n, e); };
  std::vector<BatchOutcome> out(items.size());
  std::vector<BatchItemResult> res;
  const bool gpu = uses_gpu();
  memory_stats(Device::CPU).reset_peaks();
  if (gpu) memory_stats(Device::CUDA).reset_peaks();
  try {
    if (budgeted()) {
      res = run_planned(items, hooks);
    } else {
      res = generate_batch(items, hooks, cache_);
    }
  } catch (const std::exception& e) {
    for (auto& o : out) o.error = e.what();
  }
  {
    std::lock_guard<std::mutex> lock(peaks_mu_);
    auto& p = peaks_[int(items.size())];
    p.first = std::max(p.first, memory_stats(Device::CPU).total().peak);
    if (gpu) p.second = std::max(p.second, memory_stats(Device::CUDA).total().peak);
  }
  for (size_t i = 0; i < res.size(); ++i) {
    BatchOutcome& o = out[i];
    if (res[i].cancelled) {
      o.cancelled = true;
      continue;
    }
    if (res[i].error) {
      try {
        std::rethrow_exception(res[i].error);
      } catch (const std::exception& e) {
        o.error = e.what();
      } catch (...) {
        o.error = "unknown failure";
      }
      continue;
    }
    // The PNG (the same metadata as `zimage generate` writes, src/pipeline/metadata) is encoded
    // by the scheduler's finisher, beside the next batch's device work.
    GenerateResult& r = res[i].result;
    o.ok = true;
    o.finish = [opts = items[i].options, rgb = std::move(r.rgb), width = r.width, height = r.height,
                tile = r.vae_tile_used, level = o_.png_level]() {
      JobImage img;
      img.seed = opts.seed;
      MetadataInput mi;
      mi.options = &opts;
      mi.width = width;
      mi.height = height;
      mi.vae_tile_used = tile;
      const TextChunks meta = image_metadata(mi);
      for (const auto& [k, v] : meta)
        if (k == "parameters") img.parameters = v;
      ImageEncodeOptions eo;
      eo.png_level = level;
      const std::vector<uint8_t> png = encode_image(ImageFormat::PNG, rgb.data(), width, height, eo, meta);
      img.png.assign(png.begin(), png.end());
      return img;
    };
  }
  // What is not resident goes now (the pipeline loaded it into the cache for this batch).
  if (!o_.resident.text_encoder) cache_.text_encoder.reset(), cache_.tokenizer.reset();
  if (!o_.resident.transformer) cache_.transformer.reset();
  if (!o_.resident.vae) cache_.vae.reset();
  const bool all_resident = o_.resident.text_encoder && o_.resident.transformer && o_.resident.vae;
  if (!all_resident && (o_.defaults.transformer_device == Device::CUDA ||
                        o_.defaults.text_encoder_device == Device::CUDA || o_.defaults.vae_device == Device::CUDA)) {
    try {
      device::trim(Device::CUDA);
    } catch (...) {
    }
  }
  return out;
}

std::map<int, std::pair<int64_t, int64_t>> Engine::peaks_by_batch_size() const {
  std::lock_guard<std::mutex> lock(peaks_mu_);
  return peaks_;
}

bool Engine::uses_gpu() const {
  const GenerateOptions& d = o_.defaults;
  return d.text_encoder_device == Device::CUDA || d.transformer_device == Device::CUDA || d.vae_device == Device::CUDA;
}

MemoryFigures memory_figures(bool with_device) {
  MemoryFigures m;
  m.host_rss = current_rss_bytes();
  m.host_peak_rss = peak_rss_bytes();
  m.host_available = available_host_bytes();
  m.host_accounted = memory_stats(Device::CPU).total().current;
  if (with_device && device::gpu_available()) {
    m.has_device = true;
    m.device_free = device::memory_free_bytes(Device::CUDA);
    const Stat s = memory_stats(Device::CUDA).total();
    m.device_accounted = s.current;
    m.device_accounted_peak = s.peak;
    m.device_reserved = device::pool_stats(Device::CUDA).reserved_now;
  }
  return m;
}

}  // namespace zi::server
