// The model side of zimage serve: the resident components (ModelCache), the batch runner
// the scheduler calls, the PNG with the CLI's parameters chunk, and the batch size chosen
// from free memory.
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "pipeline/pipeline.h"
#include "server/scheduler.h"

namespace zi::server {

struct Residency {
  bool text_encoder = true, transformer = true, vae = true;
};
// "all", "none", or a comma list of text-encoder, transformer, vae. Throws UsageError.
Residency parse_residency(const std::string& s);
std::string residency_str(const Residency& r);

struct EngineOptions {
  GenerateOptions defaults;  // model, dtypes, devices and the generate defaults
  Residency resident;
  int max_batch = 0;         // 0: from free memory (at most 16)
  int64_t max_pixels = 1024 * 1024;
  int png_level = 1;  // zlib level of the served PNGs (-1: zlib's default)
};

class Engine {
 public:
  explicit Engine(EngineOptions o);
  ~Engine();
  // Loads the resident components (once, before serving); nothing under a --vram budget, where
  // each request's plan decides what is kept.
  void load();
  // The scheduler's BatchRunner.
  std::vector<BatchOutcome> run(const BatchWork& w,
                                const std::function<void(const std::string&, int, int, double)>& progress);
  // Images per DiT batch: 1 under a --vram budget (each request runs through generate()'s
  // planner); else --max-batch, else what half of the free memory holds at the largest allowed
  // size (the DiT's activations per image), from 1 to 16.
  int max_batch() const;
  bool budgeted() const { return o_.defaults.vram_bytes >= 0; }
  const EngineOptions& options() const { return o_; }
  std::string model_name() const;  // the model folder's name
  bool uses_gpu() const;           // some component runs on CUDA

  // Peak accounted bytes (host, device) seen in batches of each size, for /metrics.
  std::map<int, std::pair<int64_t, int64_t>> peaks_by_batch_size() const;

 private:
  std::vector<BatchItemResult> run_planned(const std::vector<BatchItem>& items, const BatchHooks& hooks);
  EngineOptions o_;
  ModelCache cache_;
  mutable std::mutex peaks_mu_;
  std::map<int, std::pair<int64_t, int64_t>> peaks_;
};

// Host and device memory for /metrics.
struct MemoryFigures {
  int64_t host_rss = 0, host_peak_rss = 0, host_available = 0, host_accounted = 0;
  bool has_device = false;
  int64_t device_free = 0, device_accounted = 0, device_accounted_peak = 0, device_reserved = 0;
};
// Device figures only with `device` (querying them would otherwise start a CUDA context).
MemoryFigures memory_figures(bool with_device);

}  // namespace zi::server
