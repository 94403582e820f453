#include "pipeline/pipeline.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <tuple>

#include "backends/device.h"
#include "core/env.h"
#include "core/parallel.h"
#include "core/torch_random.h"
#include "io/checkpoint.h"
#include "io/mapped_file.h"
#include "io/model_sources.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/controlnet.h"
#include "models/lora.h"
#include "ops/ops.h"
#include "models/qwen3_encoder.h"
#include "models/vae_decoder.h"
#include "models/vae_encoder.h"
#include "models/zimage_dit.h"
#include "pipeline/edit.h"
#include "pipeline/memory_plan.h"
#include "pipeline/text_phase.h"
#include "scheduler/flow_match_euler.h"
#include "text/bpe_tokenizer.h"

namespace zi {

ModelCache::ModelCache() = default;
ModelCache::~ModelCache() = default;

namespace {

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

void check_cancel(const GenerateHooks& h) {
  if (h.cancel && h.cancel->load()) throw Cancelled();
}

struct Embeddings {
  Tensor pos, neg;  // [L, hidden] f32; neg undefined without CFG
  std::vector<int32_t> ids;
  double load_seconds = 0;
  double helper_wait_seconds = 0;  // LoadDetail::helper_wait_seconds
};

// A phase on a device: its context (where its weights load and its activations live, passed
// to the load_* functions) and, off the CPU, a phase scope of that device's accounting. Its end
// waits for the device, so the phase's time is the work's, not the queue's.
class DevicePhase {
 public:
  // release_seconds (optional): set to the time the phase's end spends giving the freed weights'
  // memory back to the driver (after the GPU finished the phase's work).
  DevicePhase(Device d, DType precision, const std::string& name, double* release_seconds = nullptr)
      : ctx(PhaseContext::on(d, precision)), name_(name), release_(release_seconds) {
    if (d != Device::CPU) memory_stats(d).begin_phase(name);
  }
  ~DevicePhase() {
    const Device d = ctx.device;
    if (d == Device::CPU) return;
    try {
      device::synchronize(d);
      const double t0 = now_s();
      device::trim(d);  // the phase's weights are gone: give their blocks back to the driver
      if (release_) *release_ = released + (now_s() - t0);
      const std::string prof = device::profile_report(d);  // empty unless ZI_CUDA_PROFILE=1
      if (!prof.empty()) std::fprintf(stderr, "[%s] %s", name_.c_str(), prof.c_str());
    } catch (...) {  // a failing GPU was already reported by the op that saw it
    }
    memory_stats(d).end_phase();
  }
  DevicePhase(const DevicePhase&) = delete;
  DevicePhase& operator=(const DevicePhase&) = delete;

  const PhaseContext ctx;
  double released = 0;  // time the phase spent freeing its models before its end (added to release)

 private:
  std::string name_;
  double* release_;
};

void notice(const GenerateHooks& h, const std::string& line) {
  if (h.on_notice) h.on_notice(line);
  else std::fprintf(stderr, "warning: %s\n", line.c_str());
}

// A component loading on a thread of its own while the current phase computes
// (GenerateOptions::prefetch); on the GPU its allocations and uploads go to a side stream, so
// they run beside the phase's kernels. take() waits for it (the time the next phase lost),
// rethrows its failure, and passes on the notices its loading gave, in order. The destructor
// of an untaken one (the run failed or was cancelled) waits for the load and frees the model.
template <class T>
class Prefetched {
 public:
  Prefetched(std::string component, std::string during, Device dev, Tag tag,
             std::function<T(const GenerateHooks&)> load) {
    rec_.component = std::move(component);
    rec_.during = std::move(during);
    fut_ = std::async(std::launch::async, [this, dev, tag, load = std::move(load)] {
      adopt_num_threads();
      GenerateHooks h;
      h.on_notice = [this](const std::string& n) { notes_.push_back(n); };
      const double t0 = now_s();
      const int64_t before = memory_stats(dev).tag(tag).current;
      device::SideStream side(dev);
      auto m = std::make_unique<T>(load(h));
      side.finish();
      bytes_ = memory_stats(dev).tag(tag).current - before;
      rec_.load_seconds = now_s() - t0;
      return m;
    });
  }
  ~Prefetched() {
    if (fut_.valid()) fut_.wait();
  }
  Prefetched(const Prefetched&) = delete;
  Prefetched& operator=(const Prefetched&) = delete;

  std::unique_ptr<T> take(const GenerateHooks& hooks, std::vector<PrefetchRecord>* records,
                          std::vector<std::pair<std::string, int64_t>>* component_weights) {
    const double t0 = now_s();
    std::unique_ptr<T> m;
    try {
      m = fut_.get();
    } catch (...) {
      for (const std::string& n : notes_) notice(hooks, n);
      throw;
    }
    rec_.waited_seconds = now_s() - t0;
    for (const std::string& n : notes_) notice(hooks, n);
    if (records) records->push_back(rec_);
    if (component_weights) component_weights->emplace_back(rec_.component, bytes_);
    return m;
  }
  double waited_seconds() const { return rec_.waited_seconds; }

 private:
  PrefetchRecord rec_;
  std::vector<std::string> notes_;
  int64_t bytes_ = 0;
  std::future<std::unique_ptr<T>> fut_;
};

// Whether `next_bytes` of the next phase's weights may be loaded while the current phase holds
// up to `current_peak` on the GPU (prefetch Auto): within the --vram budget, or without one,
// within the free memory less the automatic budget's margin.
bool prefetch_fits(const GenerateOptions& o, int64_t current_peak, int64_t next_bytes) {
  if (!o.vram_plan) return false;
  // Within a budget: the predictions are upper bounds with slack, and a margin of 5 % (at least
  // 64 MiB) stays free for what they do not itemise, as the automatic budget keeps.
  const int64_t budget = o.vram_plan->budget_bytes;
  if (budget >= 0) return current_peak + next_bytes + std::max<int64_t>(int64_t(64) << 20, budget / 20) <= budget;
  // Without a budget: what the current phase has yet to allocate, and the next weights, within
  // the free memory now less the margin.
  const int64_t held = memory_stats(Device::CUDA).total().current;
  const int64_t free = device::memory_free_bytes(Device::CUDA);
  return std::max<int64_t>(0, current_peak - held) + next_bytes + vram_auto_margin(free) <= free;
}

// True when a cached model's streamed blocks are the ones `plan` streams (nothing streamed: a
// plan that keeps every block resident). A model loaded under another plan (another image size
// or budget: `zimage serve`'s requests) would keep its old residency and could exceed the budget.
bool streams_as_planned(const WeightStreamer* st, const ComponentPlan& plan) {
  if (st && st->streamed_blocks() > 0 && st->slots() != plan.ring_slots) return false;
  for (size_t i = 0; i < plan.resident.size(); ++i)
    if ((st && st->streams(i)) != (plan.ring_slots > 0 && !plan.resident[i])) return false;
  return true;
}

// Drops the cached text encoder and transformer that were loaded under another plan than this
// run's (they load again, under this one).
void drop_models_of_other_plans(const GenerateOptions& o, ModelCache* cache) {
  if (!cache || !o.vram_plan) return;
  if (cache->text_encoder && o.text_encoder_device == Device::CUDA &&
      !streams_as_planned(cache->text_encoder->streamer.get(), o.vram_plan->text))
    cache->text_encoder.reset();
  if (cache->transformer && o.transformer_device == Device::CUDA &&
      !streams_as_planned(cache->transformer->streamer.get(), o.vram_plan->dit))
    cache->transformer.reset();
}

// --keep-models under a budget (--vram, or the one planned from free memory): the device bytes
// of the cached components a phase does not use count against that phase's budget. Before the
// phase, the largest of them are released (with a notice) until the phase's predicted peak fits
// beside the rest, so the measured device peak stays within the budget; the released ones load
// again when their phase comes. Measured from the device's accounting (bytes held per tag).
void fit_cache_to_budget(const GenerateOptions& o, ModelCache* cache, Device phase_device, Tag own,
                         const GenerateHooks& hooks) {
  if (!cache || phase_device != Device::CUDA || !o.vram_plan || o.vram_plan->budget_bytes < 0) return;
  const VramPlan& plan = *o.vram_plan;
  const int64_t phase_peak = own == Tag::TextWeights  ? plan.text.predicted_peak_bytes
                             : own == Tag::DitWeights ? plan.dit.predicted_peak_bytes
                                                      : plan.vae_peak_bytes;
  struct Held {
    const char* name;
    Tag tag;
    std::function<void()> release;
  };
  const std::vector<Held> all = {
      {"text encoder", Tag::TextWeights, [&] { cache->text_encoder.reset(); }},
      {"transformer", Tag::DitWeights, [&] { cache->transformer.reset(); }},
      {"ControlNet", Tag::ControlNetWeights, [&] { cache->controlnet.reset(); }},
      {"VAE decoder", Tag::VaeWeights, [&] { cache->vae.reset(); }},
  };
  const MemoryStats& ms = memory_stats(Device::CUDA);
  for (;;) {
    int64_t others = 0;
    const Held* largest = nullptr;
    int64_t largest_bytes = 0;
    for (const Held& h : all) {
      if (h.tag == own || (own == Tag::DitWeights && h.tag == Tag::ControlNetWeights)) continue;
      const int64_t b = ms.tag(h.tag).current;
      others += b;
      if (b > largest_bytes) largest = &h, largest_bytes = b;
    }
    if (!largest || others + phase_peak <= plan.budget_bytes) return;
    char line[256];
    std::snprintf(line, sizeof line,
                  "--keep-models: the %s (%.1f MiB on the GPU) is not kept: beside it the next phase "
                  "(predicted %.1f MiB) would exceed the budget of %.1f MiB",
                  largest->name, double(largest_bytes) / (1 << 20), double(phase_peak) / (1 << 20),
                  double(plan.budget_bytes) / (1 << 20));
    notice(hooks, line);
    largest->release();
    if (ms.tag(largest->tag).current >= largest_bytes) return;  // nothing was freed: do not loop
  }
}

// The latent's height and width for o's image size: the VAE's scale factor, rounded down to an
// even size (the DiT's 2 × 2 patches).
struct LatentSize {
  int64_t h, w;
};
LatentSize latent_size(const GenerateOptions& o, const VaeConfig& vae) {
  const int sf = vae.scale_factor();
  return {2 * (o.height / (sf * 2)), 2 * (o.width / (sf * 2))};
}

std::atomic<bool> g_force_vae_warm_up{false};  // force_vae_warm_up (tests)

// Whether no decode of latent size h × w (weights `wdt`, activations `act`) was warmed up in
// this process yet; marks it warmed.
bool first_decode_of_size(int h, int w, DType wdt, DType act) {
  static std::mutex mu;
  static std::set<std::tuple<int, int, int, int>> seen;
  std::lock_guard<std::mutex> lk(mu);
  return seen.emplace(h, w, int(wdt), int(act)).second;
}

Embeddings run_encode(const PhaseContext& ctx, const ModelSources& src, const GenerateOptions& o, bool cfg,
                      ModelCache* cache) {
  const ModelFolder& mf = src.folder;
  Embeddings e;
  if (o.embeddings) {  // computed before (--count, --prompt-embeds): no encoder unless a negative is missing
    e.pos = o.embeddings->pos;
    e.neg = o.embeddings->neg;
    e.ids = o.embeddings->ids;
    if (!cfg) e.neg = Tensor();
    if (!cfg || e.neg.defined()) return e;
  }
  // Both prompts go through one loaded encoder, released at the end of this function
  // unless the cache keeps it.
  std::unique_ptr<BpeTokenizer> tok_local;
  std::unique_ptr<Qwen3Encoder> enc_local;
  std::unique_ptr<BpeTokenizer>& tok = cache ? cache->tokenizer : tok_local;
  std::unique_ptr<Qwen3Encoder>& enc = cache ? cache->text_encoder : enc_local;
  // The tokenizer (parsing tokenizer.json: a fifth of a second) on a thread of its own while
  // the encoder's weights load; a tokenizer failure stops that load at its next tensor.
  // On the GPU, that thread then tokenizes the prompts and runs one GEMM of each encoder shape
  // for their lengths (ops::warm_up_linears), so the plans and the kernels' first loads overlap
  // the weights' load: the first encode's compute went from 0.19 to 0.06 s, same image (H100,
  // 2026-12-07). Under a --vram budget its scratch is in the text phase's plan
  // (qwen3_warm_up_bytes; it is freed before the encode's activations). ZI_WARM_GEMMS=0: off.
  const bool warm = !enc && env_flag("ZI_WARM_GEMMS", true) && ctx.device != Device::CPU;
  // Then, where the plan has it (VramPlan::vae_warm_up(), make_vram_plan), a decode of the plan's
  // size (the image's) with zero weights (vae_warm_up), so the convolutions' first use is paid
  // during the load too: the first image's decode compute went from 0.30 to 0.06 s (H100,
  // 2026-12-08; same image: CudaPipeline.VaeWarmUpGivesTheSameImage). Once per size.
  const VramPlan* vp = o.vram_plan.get();
  const int lh = vp ? vp->vae_warm_up_h : 0, lw = vp ? vp->vae_warm_up_w : 0;
  const bool warm_vae = warm && vp && vp->vae_warm_up() && !(cache && cache->vae) &&
                        first_decode_of_size(lh, lw, o.vae_dtype, ctx.act);
  // The VAE's warm-up on a thread of its own from the start (it took longer than the weights'
  // upload after the tokenizer and the GEMM warm-ups on one thread: the encode waited 0.1–0.35 s
  // for them, H100 2026-12-08); the encode waits for both (they share the GPU's stream and pool).
  std::future<void> vae_ahead;
  if (warm_vae)
    vae_ahead = std::async(std::launch::async, [ctx, &o, &mf, lh, lw] {
      try {
        vae_warm_up(ctx, mf.vae, o.vae_dtype, lh, lw);
      } catch (...) {  // a warm-up only: the decode reports any real problem
      }
    });
  std::future<std::unique_ptr<BpeTokenizer>> tok_ahead;
  if (!tok)
    tok_ahead = std::async(std::launch::async, [dir = mf.tokenizer_dir, warm, ctx, &o, &mf, cfg] {
      auto t = std::make_unique<BpeTokenizer>(BpeTokenizer::load_dir(dir));
      if (warm) {
        try {
          std::vector<std::array<int64_t, 3>> mnk;
          std::vector<std::string> prompts{o.prompt};
          if (cfg) prompts.push_back(o.negative_prompt);
          std::vector<int64_t> lengths;
          for (const std::string& p : prompts) {
            const int64_t M = int64_t(tokenize_zimage_prompt(*t, p, o.max_sequence_length).size());
            if (std::find(lengths.begin(), lengths.end(), M) != lengths.end()) continue;
            lengths.push_back(M);
            for (const auto& [N, K] : qwen3_linear_shapes(mf.text_encoder)) mnk.push_back({M, N, K});
          }
          ops::warm_up_linears(ctx, mnk);
        } catch (...) {  // a warm-up only: the encode reports any real problem
        }
      }
      return t;
    });
  auto take_tokenizer = [&] {
    if (tok_ahead.valid()) tok = tok_ahead.get();
  };
  if (!enc) {
    const double t0 = now_s();
    {
      WeightLoader::ProgressFn outer = LoadProgressScope::current();
      LoadProgressScope check([&](const std::string& c, int64_t done, int64_t total) {
        if (outer) outer(c, done, total);
        using namespace std::chrono_literals;
        if (tok_ahead.valid() && tok_ahead.wait_for(0s) == std::future_status::ready) take_tokenizer();  // throws its error
      });
      const TensorStore store = src.open(Component::TextEncoder);
      enc = std::make_unique<Qwen3Encoder>(
          load_text_encoder(store, mf.text_encoder, o.text_encoder_dtype, o.text_rope_dtype, ctx,
                            o.vram_plan ? &o.vram_plan->text : nullptr));
    }
    e.load_seconds += now_s() - t0;
  }
  if (tok_ahead.valid() || vae_ahead.valid()) {
    const double t0 = now_s();
    take_tokenizer();
    if (vae_ahead.valid()) vae_ahead.get();
    e.helper_wait_seconds = now_s() - t0;
    e.load_seconds += e.helper_wait_seconds;
  }
  if (!e.pos.defined()) (void)tokenize_zimage_prompt(*tok, o.prompt, o.max_sequence_length);
  if (cfg) (void)tokenize_zimage_prompt(*tok, o.negative_prompt, o.max_sequence_length);
  if (!e.pos.defined()) e.pos = encode_prompt(*enc, *tok, o.prompt, o.max_sequence_length, &e.ids);
  if (cfg) e.neg = encode_prompt(*enc, *tok, o.negative_prompt, o.max_sequence_length);
  return e;
}

// The transformer with LoRAs merged and override tensors applied while streaming in.
// check_only: the pre-flight check (nothing read, see WeightLoader::set_check_only); its
// notices are left to the run (hooks may be null then).
ZImageDit load_transformer(const PhaseContext& ctx, const ModelSources& src, const GenerateOptions& o,
                           const GenerateHooks* hooks, bool check_only = false) {
  const ModelFolder& mf = src.folder;
  TensorStore store = src.open(Component::Transformer);
  WeightLoader loader(store, Tag::DitWeights, "transformer", ctx);
  loader.set_check_only(check_only);
  set_streamed_blocks(loader, o.vram_plan ? &o.vram_plan->dit : nullptr);
  std::vector<LoraSpec> specs;
  for (const auto& [path, scale] : o.loras) specs.push_back({path, scale});
  LoraSet loras(load_loras(specs));
  if (!loras.empty()) loras.attach(loader);
  std::unique_ptr<TensorStore> override_store;
  if (!o.transformer_override.empty()) {
    override_store = std::make_unique<TensorStore>(TensorStore::open_file(o.transformer_override));
    attach_transformer_override(loader, *override_store);
  }
  ZImageDit dit = load_zimage_dit(loader, mf.transformer, o.transformer_dtype);
  loader.finish();
  if (hooks)
    for (const std::string& n : loader.notes()) notice(*hooks, n);
  if (!loras.empty()) {
    const std::string unmatched = loras.unmatched_report();
    if (!unmatched.empty()) {
      if (o.lora_strict) fail(unmatched + " (--lora-strict)");
      if (hooks) notice(*hooks, unmatched);
    }
  }
  return dit;
}

// What an image-conditioned mode adds to the denoising loop (pipeline/edit.h).
struct DenoiseExtras {
  int start = 0;                       // img2img / inpaint: first step (strength)
  const Tensor* image_latents = nullptr;  // inpaint: clean latents [C, h, w] re-noised for the blend
  const Tensor* noise = nullptr;          // inpaint: the noise they are re-noised with
  const Tensor* mask_latent = nullptr;    // inpaint: [h, w], 1 = repaint
  const ControlNetConfig* controlnet = nullptr;  // ControlNet modes: loaded in the denoise phase
  const Tensor* control = nullptr;        // the control context [control_in_dim, 1, h, w]
  float control_scale = 1.0f;
  std::vector<std::pair<std::string, int64_t>>* component_weights = nullptr;
  Prefetched<ZImageDit>* transformer = nullptr;  // loading since the encode (prefetch)
  std::vector<PrefetchRecord>* prefetched = nullptr;
  std::function<void()> before_last_step;        // starts the VAE's prefetch
  double* release_seconds = nullptr;  // gets the time freeing the phase's models took (not compute)
};

int64_t tag_bytes(const PhaseContext& ctx, Tag t) { return memory_stats(ctx.device).tag(t).current; }

// The denoising loop of spec §4.5–4.7 on latents [C, h, w] (f32, updated in place).
void run_denoise(const PhaseContext& ctx, const ModelSources& src, const GenerateOptions& o, const Embeddings& emb,
                 Tensor& latents, const GenerateHooks& hooks, ModelCache* cache, double* load_seconds,
                 const DenoiseExtras& ex = {}) {
  const ModelFolder& mf = src.folder;
  SchedulerConfig sc;
  if (mf.scheduler_config_path.empty())
    sc.shift = 3.0;  // no folder: Z-Image-Turbo's scheduler_config.json (shift 3, no dynamic shifting)
  else
    sc = parse_scheduler_config(read_text_file(mf.scheduler_config_path), mf.scheduler_config_path);
  const int64_t C = latents.dim(0), h = latents.dim(1), w = latents.dim(2);
  const int64_t seq = (h / 2) * (w / 2);
  Schedule sched = make_schedule(sc, o.steps, seq);
  std::unique_ptr<ZImageDit> local;
  std::unique_ptr<ZImageDit>& dit = cache ? cache->transformer : local;
  if (!dit && ex.transformer) {
    dit = ex.transformer->take(hooks, ex.prefetched, ex.component_weights);
    *load_seconds = ex.transformer->waited_seconds();
  } else if (!dit) {
    const double t0 = now_s();
    const int64_t before = tag_bytes(ctx, Tag::DitWeights);
    dit = std::make_unique<ZImageDit>(load_transformer(ctx, src, o, &hooks));
    *load_seconds = now_s() - t0;
    if (ex.component_weights) ex.component_weights->emplace_back("transformer", tag_bytes(ctx, Tag::DitWeights) - before);
  }
  // The ControlNet is resident during this phase only (kept by --keep-models' cache).
  std::unique_ptr<ZImageControlNet> cn_local;
  std::unique_ptr<ZImageControlNet>& cn = cache ? cache->controlnet : cn_local;
  if (ex.controlnet && !cn) {
    const double t0 = now_s();
    const int64_t before = tag_bytes(ctx, Tag::ControlNetWeights);
    cn = std::make_unique<ZImageControlNet>(load_controlnet(ctx, *ex.controlnet, mf.transformer, o.controlnet_dtype));
    *load_seconds += now_s() - t0;
    if (ex.component_weights) ex.component_weights->emplace_back("controlnet", tag_bytes(ctx, Tag::ControlNetWeights) - before);
  }
  // Recorded steps hold graph memory the --vram plan does not itemise: not under a budget.
  if (o.vram_bytes > 0) dit->ctx.cuda_graphs = 0;
  auto forward = [&](const Tensor& x, float t, const Tensor& cap) {
    if (ex.controlnet) return dit_forward_control(*dit, x, t, cap, *cn, *ex.control, ex.control_scale);
    return dit_forward(*dit, x, t, cap);
  };
  const size_t n = size_t(latents.numel());
  const double t0 = now_s();
  for (int i = ex.start; i < sched.steps(); ++i) {
    check_cancel(hooks);
    if (i + 1 == sched.steps() && ex.before_last_step) ex.before_last_step();
    const float t = model_time(sched, i);
    const bool cfg = emb.neg.defined() && cfg_active(o.guidance, o.cfg_truncation, t);
    Tensor x = latents.reshape({C, 1, h, w});
    Tensor pred = forward(x, t, emb.pos);  // [C, 1, h, w]
    if (cfg) {
      check_cancel(hooks);
      Tensor neg = forward(x, t, emb.neg);
      Tensor pos = pred.clone();
      cfg_combine(pred.f32(), pos.f32(), neg.f32(), n, o.guidance);
      if (o.cfg_normalization > 0) cfg_normalize(pred.f32(), pos.f32(), n, o.cfg_normalization);
    }
    euler_step(latents.f32(), pred.f32(), n, sched.sigmas[size_t(i)], sched.sigmas[size_t(i) + 1]);
    if (ex.mask_latent) {  // inpainting: keep the unmasked region at the image, noised to the next level
      Tensor proper = ex.image_latents->clone();
      if (i + 1 < sched.steps())
        scale_noise(proper.f32(), ex.image_latents->f32(), ex.noise->f32(), n, sched.sigmas[size_t(i) + 1]);
      inpaint_blend(latents.f32(), proper.f32(), ex.mask_latent->f32(), C, h * w);
    }
    const int k = i - ex.start;  // steps are numbered from the first one that runs, like the reference's callback
    if (hooks.on_latents) hooks.on_latents(k, latents);
    if (hooks.on_step) hooks.on_step(k + 1, sched.steps() - ex.start, now_s() - t0);
  }
  static std::atomic<bool> told{false};  // once per process (a kept model keeps its failure)
  if (const std::string why = dit_recording_failure(*dit); !why.empty() && !told.exchange(true))
    notice(hooks, "the denoise step could not be recorded as a CUDA graph (" + why + "); it ran op by op");
  dit_release_recordings(*dit);  // their graph memory is this phase's only (a kept model records again)
  if (local || cn_local) {
    // The GPU's work is the compute's; freeing the models (streamed blocks' pinned host memory
    // is given back page by page: ~0.1 s per GB) is the release's.
    device::synchronize(ctx.device);
    const double t0 = now_s();
    cn_local.reset();
    local.reset();
    if (ex.release_seconds) *ex.release_seconds += now_s() - t0;
  }
}

VaeDecoder load_vae(const PhaseContext& ctx, const ModelSources& src, const GenerateOptions& o,
                    bool check_only = false) {
  const ModelFolder& mf = src.folder;
  TensorStore store = src.open(Component::Vae);
  WeightLoader loader(store, Tag::VaeWeights, "vae", ctx);
  loader.set_check_only(check_only);
  VaeDecoder vae = load_vae_decoder(loader, mf.vae, o.vae_dtype);
  loader.finish();
  return vae;
}

// The --vram plan of a run whose latent is h × w (pipeline/memory_plan.h): the phases on the
// GPU from their configs' sizes, the budget from --vram or free memory, the host → device rate
// measured once when something streams.
// With a ControlNet (`cn`), its weights are resident beside the transformer's fixed part and its
// streams (the control context and the hint being added: 4 × [S, dim] f32 counted) add to the
// denoise activations, so the transformer streams more blocks to stay within the budget.
// `encodes`: the mode runs the VAE encoder on width × height input images (its own phase).
std::shared_ptr<const VramPlan> make_vram_plan(const GenerateOptions& o, const ModelSources& src, int64_t h, int64_t w,
                                               const ControlNetConfig* cn, bool encodes) {
  const ModelFolder& mf = src.folder;
  // Allocations the estimates do not itemise (RoPE tables, latents, small temporaries): a
  // quarter more than the activations and 1 MiB.
  auto slack = [](int64_t act) { return act / 4 + (int64_t(1) << 20); };
  VramPlanInput in;
  in.budget_bytes = o.vram_bytes;
  if (device::gpu_available()) {
    in.card_bytes = device::memory_total_bytes(Device::CUDA);
    in.free_bytes = device::memory_free_bytes(Device::CUDA);
  }
  in.width = o.width;
  in.height = o.height;
  if (o.text_encoder_device == Device::CUDA && !o.embeddings) {
    in.text.name = "text_encoder";
    in.text.fixed_bytes = 0;  // the embedding table, its only fixed weight, stays on the host (load_qwen3)
    in.text.block_bytes = qwen3_block_weight_bytes(mf.text_encoder, o.text_encoder_dtype);
    in.text.activation_bytes = std::max(estimate_text_activation_bytes(mf.text_encoder, o.max_sequence_length),
                                        qwen3_warm_up_bytes(mf.text_encoder, o.max_sequence_length));
    in.text.activation_bytes += slack(in.text.activation_bytes);
    in.text.passes = o.guidance > 0 ? 2 : 1;
  }
  if (o.transformer_device == Device::CUDA) {
    const DitConfig& dc = mf.transformer;
    in.dit.name = "transformer";
    in.dit.fixed_bytes = dit_fixed_weight_bytes(dc, storage_dtype(o.transformer_dtype));
    in.dit.block_bytes = dit_block_weight_bytes(dc, o.transformer_dtype);
    const int elem = o.precision == DType::BF16 ? 2 : 4;  // the activations' element size
    in.dit.activation_bytes =
        estimate_denoise_activation_bytes(dc.dim, dc.ffn_hidden(), o.width, o.height, o.max_sequence_length, elem);
    if (cn) {
      in.dit.fixed_bytes += controlnet_weight_bytes(*cn, o.controlnet_dtype);
      const int64_t tokens = denoise_tokens_bound(o.width, o.height, o.max_sequence_length);
      in.dit.activation_bytes += 4 * tokens * dc.dim * elem;
    }
    in.dit.activation_bytes += slack(in.dit.activation_bytes);
    in.dit.passes = int64_t(o.steps) * (o.guidance > 0 ? 2 : 1);
  }
  in.vae_on_device = o.vae_device == Device::CUDA;
  if (in.vae_on_device) {
    const TensorStore store = src.open(Component::Vae);
    int64_t n = 0, ne = 0;
    for (const auto& f : store.files())
      for (const auto& t : f->tensors())
        (t.name.starts_with("encoder.") || t.name.starts_with("quant_conv.") ? ne : n) += t.numel();
    in.vae = mf.vae;
    in.vae_weight_bytes = int64_t(dtype_bytes(o.vae_dtype, n)) + (int64_t(1) << 20);
    if (encodes) {
      in.vae_encoder_weight_bytes = int64_t(dtype_bytes(o.vae_dtype, ne)) + (int64_t(1) << 20);
      in.encode_width = int(w * mf.vae.scale_factor());
      in.encode_height = int(h * mf.vae.scale_factor());
    }
    in.latent_h = int(h);
    in.latent_w = int(w);
  }
  VramPlan p = plan_vram(in);
  if (p.streams() && device::gpu_available()) {
    in.h2d_bytes_per_second = device::measure_h2d_rate(Device::CUDA);
    p = plan_vram(in);
  }
  // The VAE's warm-up on the tokenizer's thread while the encoder loads (run_encode), in the text
  // phase: with the encoder's GEMM warm-up, on the encoder's device, before an untiled decode
  // (the warm-up is that decode), and when the text phase and a decode together stay within the
  // denoise's predicted peak, so the run's peak does not grow and a budget holds (not at 2048²,
  // nor under budgets below about 10 GiB at 1024²). ZI_WARM_VAE=0: off; force_vae_warm_up: tests.
  // ZI_WARM_VAE_SMALL=1 (experiment): where the image's size does not fit, the largest halving of
  // it that does (its kernels, if not all its shapes, loaded ahead).
  const bool untiled = o.vae_tile > 0 ? o.vae_tile >= std::max(h, w) : p.budget_bytes < 0 || p.vae_tile == 0;
  if (o.text_encoder_device == Device::CUDA && !o.embeddings && o.vae_device == Device::CUDA && untiled &&
      p.vae_peak_bytes > 0 && env_flag("ZI_WARM_GEMMS", true) && env_flag("ZI_WARM_VAE", true)) {
    const int64_t room = g_force_vae_warm_up.load() ? std::numeric_limits<int64_t>::max()
                                                    : p.dit.predicted_peak_bytes - p.text.predicted_peak_bytes;
    const VaeWarmUpSize s = plan_vae_warm_up(mf.vae, p.vae_weight_bytes, int(h), int(w), room,
                                             env_flag("ZI_WARM_VAE_SMALL", false));
    p.vae_warm_up_h = s.h;
    p.vae_warm_up_w = s.w;
    p.text.predicted_peak_bytes += s.bytes;  // 0 when none fits
  }
  return std::make_shared<const VramPlan>(std::move(p));
}

Tensor run_decode(const PhaseContext& ctx, const ModelSources& src, const GenerateOptions& o, const Tensor& latents,
                  ModelCache* cache, double* load_seconds, int* tile_used, Prefetched<VaeDecoder>* prefetched,
                  const GenerateHooks& hooks, std::vector<PrefetchRecord>* records) {
  const ModelFolder& mf = src.folder;
  std::unique_ptr<VaeDecoder> local;
  std::unique_ptr<VaeDecoder>& vae = cache ? cache->vae : local;
  if (!vae && prefetched) {
    vae = prefetched->take(hooks, records, nullptr);
    *load_seconds = prefetched->waited_seconds();
  } else if (!vae) {
    const double t0 = now_s();
    vae = std::make_unique<VaeDecoder>(load_vae(ctx, src, o));
    *load_seconds = now_s() - t0;
  }
  // z = latents / scaling_factor + shift_factor, in f32 like the reference.
  Tensor z = latents.clone();
  const float sf = float(mf.vae.scaling_factor), sh = float(mf.vae.shift_factor);
  float* zp = z.f32();
  for (int64_t i = 0; i < z.numel(); ++i) zp[i] = zp[i] / sf + sh;
  const int h = int(z.dim(1)), w = int(z.dim(2));
  int tile = o.vae_tile;
  // Under a --vram budget the plan's tile, unless --vae-tile names one.
  if (o.vram_plan && o.vram_plan->budget_bytes >= 0 && ctx.device == Device::CUDA && tile <= 0) tile = o.vram_plan->vae_tile;
  else if (tile < 0) {
    // Auto: untiled when the whole decode fits in half of the memory available where it runs.
    const int64_t avail = device::memory_free_bytes(ctx.device);
    const int64_t budget = avail / 2;
    tile = vae_decode_peak_bytes(mf.vae, h, w) <= budget ? 0 : vae_pick_tile(mf.vae, h, w, budget);
  }
  *tile_used = tile > 0 && (tile < h || tile < w) ? tile : 0;
  if (tile > 0 && (tile < h || tile < w)) return vae_decode_tiled(*vae, z, tile, /*overlap: unused, seams are exact*/ 0);
  return vae_decode(*vae, z);
}

}  // namespace

int64_t available_host_bytes() { return device::memory_free_bytes(Device::CPU); }

VramPlan plan_generate_memory(const GenerateOptions& o) {
  const ModelSources src = resolve_model_sources({o.model_dir, o.diffusion_model_file, o.text_encoder_file, o.vae_file});
  const auto [h, w] = latent_size(o, src.folder.vae);
  std::optional<ControlNetConfig> cn;
  if (!o.controlnet.empty()) cn = inspect_controlnet(o.controlnet, src.folder.transformer);
  return *make_vram_plan(o, src, h, w, cn ? &*cn : nullptr, edit_mode(o) != EditMode::Text);
}

void validate_generate_options(const GenerateOptions& o) {
  auto size_ok = [](int v, const char* flag) {
    if (v <= 0) throw UsageError(str_cat(flag, " must be positive, got ", v));
    if (v % 16) throw UsageError(str_cat(flag, " must be a multiple of 16, got ", v));
  };
  size_ok(o.width, "--width");
  size_ok(o.height, "--height");
  // 8192 px per side is the limit of the DiT's position tables (axes_lens 512 × patch 16).
  if (o.width > 8192 || o.height > 8192) {
    int64_t need = estimate_denoise_activation_bytes(3840, 10240, o.width, o.height, 512);
    throw UsageError(str_cat("--width/--height of ", o.width, "x", o.height,
                             " is beyond the model's 8192-pixel limit (it would need about ",
                             need >= (int64_t(1) << 30) ? str_cat(std::round(double(need) / double(1 << 30) * 10) / 10, " GiB")
                                                        : str_cat(std::max<int64_t>(1, need >> 20), " MiB"),
                             " of activations for the real model)"));
  }
  if (o.steps <= 0) throw UsageError(str_cat("--steps must be at least 1, got ", o.steps));
  if (o.steps > 1000) throw UsageError(str_cat("--steps must be at most 1000, got ", o.steps));
  if (!std::isfinite(o.guidance) || o.guidance < 0)
    throw UsageError(str_cat("--guidance must be a finite number >= 0, got ", o.guidance));
  if (!std::isfinite(o.cfg_normalization) || o.cfg_normalization < 0)
    throw UsageError(str_cat("--cfg-normalization must be a finite number >= 0, got ", o.cfg_normalization));
  if (!std::isfinite(o.cfg_truncation))
    throw UsageError(str_cat("--cfg-truncation must be finite, got ", o.cfg_truncation));
  if (o.max_sequence_length <= 0)
    throw UsageError(str_cat("--max-sequence-length must be positive, got ", o.max_sequence_length));
  if (size_t at = first_invalid_utf8(o.prompt); at != std::string::npos)
    throw UsageError(str_cat("--prompt is not valid UTF-8 (byte ", at, ")"));
  if (size_t at = first_invalid_utf8(o.negative_prompt); at != std::string::npos)
    throw UsageError(str_cat("--negative-prompt is not valid UTF-8 (byte ", at, ")"));
  if (o.vram_bytes >= 0) {
    if (!device::gpu_available())
      throw UsageError(str_cat("--vram budgets GPU memory and there is no GPU: ", device::gpu_unavailable_reason()));
    if (o.text_encoder_device != Device::CUDA && o.transformer_device != Device::CUDA && o.vae_device != Device::CUDA)
      throw UsageError("--vram budgets GPU memory and no phase of this run is on the GPU (--device cuda)");
  }
  if (o.vae_tile != 0 && o.vae_tile != -1 && o.vae_tile < 16)
    throw UsageError(str_cat("--vae-tile must be at least 128 pixels, got ", o.vae_tile * 8));
  for (const auto& [path, scale] : o.loras)
    if (!std::isfinite(scale)) throw UsageError(str_cat("--lora ", path, ": scale must be finite"));
  // Image-conditioned modes (pipeline/edit.h).
  if (o.strength != -1 && !(o.strength > 0 && o.strength <= 1))
    throw UsageError(str_cat("--strength must be in (0, 1], got ", o.strength));
  if (o.strength != -1 && o.init_image.empty())
    throw UsageError("--strength needs --init-image");
  if (!o.mask_image.empty() && o.init_image.empty()) throw UsageError("--mask needs --init-image (the image to inpaint)");
  if (!o.control_image.empty() && o.controlnet.empty())
    throw UsageError("--control-image needs --controlnet (a Z-Image Fun ControlNet Union folder or file)");
  if (!o.controlnet.empty() && o.control_image.empty()) throw UsageError("--controlnet needs --control-image");
  if (!o.control_image.empty() && !o.init_image.empty() && o.mask_image.empty())
    throw UsageError("--control-image with --init-image needs --mask (ControlNet inpainting); ControlNet img2img is not supported");
  if (!o.control_image.empty() && o.strength != -1)
    throw UsageError("--strength does not apply with --control-image (the ControlNet pipelines start from noise)");
  if (!std::isfinite(o.control_scale)) throw UsageError(str_cat("--control-scale must be finite, got ", o.control_scale));
  if (!o.control_preprocess.empty() && o.control_preprocess != "canny")
    throw UsageError(str_cat("--control-preprocess must be 'canny' (other preprocessors are not built in), got '",
                             o.control_preprocess, "'"));
  if (!o.control_preprocess.empty() && o.control_image.empty())
    throw UsageError("--control-preprocess needs --control-image");
  if (!(o.canny_low >= 0 && o.canny_high >= o.canny_low && std::isfinite(o.canny_high)))
    throw UsageError(str_cat("--canny-low/--canny-high must satisfy 0 <= low <= high, got ", o.canny_low, " and ", o.canny_high));
}

void preflight_generate(const GenerateOptions& o) {
  validate_generate_options(o);
  const ModelSources src =
      resolve_model_sources({o.model_dir, o.diffusion_model_file, o.text_encoder_file, o.vae_file});
  const ModelFolder& mf = src.folder;
  if (!mf.scheduler_config_path.empty())
    (void)parse_scheduler_config(read_text_file(mf.scheduler_config_path), mf.scheduler_config_path);
  const bool need_encoder = !o.embeddings || (o.guidance > 0 && !o.embeddings->neg.defined());
  if (need_encoder) {
    TensorStore store = src.open(Component::TextEncoder);
    WeightLoader loader(store, Tag::TextWeights, "text_encoder");
    loader.set_check_only(true);
    (void)load_qwen3_encoder(loader, mf.text_encoder, o.text_encoder_dtype);
    loader.finish();
  }
  if (o.embeddings) {
    const Tensor& p = o.embeddings->pos;
    if (!p.defined() || p.ndim() != 2 || p.dim(1) != mf.transformer.cap_feat_dim)
      fail(str_cat("prompt embeddings must be [L, ", mf.transformer.cap_feat_dim, "] for this model, got ",
                   p.defined() ? shape_str(p.shape()) : std::string("none")));
  }
  (void)load_transformer(PhaseContext{}, src, o, nullptr, /*check_only=*/true);
  (void)load_vae(PhaseContext{}, src, o, /*check_only=*/true);
  // Image-conditioned modes (issue 17): the input images, the mask's levels, the ControlNet's
  // config and shapes against the transformer, and the VAE encoder's tensors.
  if (edit_mode(o) != EditMode::Text) {
    (void)prepare_edit_inputs(o, mf);
    TensorStore store = TensorStore::open_dir(mf.vae_dir);
    WeightLoader loader(store, Tag::VaeEncoderWeights, "vae encoder", PhaseContext{});
    loader.set_check_only(true);
    (void)load_vae_encoder(loader, mf.vae, o.vae_dtype);
    loader.finish();
  }
}

std::vector<std::string> validate_model_inputs(const GenerateOptions& o) {
  preflight_generate(o);
  return resolve_model_sources({o.model_dir, o.diffusion_model_file, o.text_encoder_file, o.vae_file}).notices;
}

GenerateResult generate(const GenerateOptions& options, const GenerateHooks& hooks, ModelCache* cache) {
  if (!options.skip_preflight) preflight_generate(options);
  validate_generate_options(options);
  GenerateOptions o = options;  // with the memory plan (below)
  if (o.cache_limit_bytes >= 0) set_host_cache_limit(size_t(o.cache_limit_bytes));
  LoadProgressScope progress(hooks.on_load);
  const ModelSources src =
      resolve_model_sources({o.model_dir, o.diffusion_model_file, o.text_encoder_file, o.vae_file});
  for (const std::string& n : src.notices) notice(hooks, n);
  const ModelFolder& mf = src.folder;
  // Every input image and the ControlNet's shapes are checked before any phase runs.
  const EditInputs edit = prepare_edit_inputs(o, mf);
  const int sf = mf.vae.scale_factor();
  const int64_t C = mf.transformer.in_channels;
  const auto [h, w] = latent_size(o, mf.vae);
  const bool cfg = o.guidance > 0;
  GenerateResult r;
  r.width = int(w * sf);
  r.height = int(h * sf);
  MemoryStats& ms = memory_stats(Device::CPU);
  ms.clear_phases();
  const bool any_gpu = o.text_encoder_device == Device::CUDA || o.transformer_device == Device::CUDA ||
                       o.vae_device == Device::CUDA;
  if (any_gpu) {
    memory_stats(Device::CUDA).clear_phases();
    if (o.cache_limit_bytes >= 0) device::set_cache_limit(Device::CUDA, size_t(o.cache_limit_bytes));
  }
  if (any_gpu) {
    // Without --vram, a budget is planned from free memory only while nothing is cached (the
    // cache's resident models are not free memory to lose).
    const bool cached = cache && (cache->transformer || cache->text_encoder || cache->vae);
    if (o.vram_bytes >= 0 || !cached) {
      o.vram_plan = make_vram_plan(o, src, h, w, !edit.controlnet.path.empty() ? &edit.controlnet : nullptr,
                                   edit.needs_encoder());
      for (const std::string& n : o.vram_plan->notices) notice(hooks, n);
      drop_models_of_other_plans(o, cache);
    }
    r.vram_plan = o.vram_plan;
  }
  const int64_t streamed_before = WeightStreamer::total_bytes_copied();
  const bool encodes = edit.needs_encoder();
  const size_t nphases = encodes ? 4 : 3;
  const size_t ienc = 1, iden = encodes ? 2 : 1, idec = encodes ? 3 : 2;
  r.load_seconds.assign(nphases, 0.0);
  r.release_seconds.assign(nphases, 0.0);
  r.load_detail.assign(nphases, LoadDetail{});
  if (any_gpu) r.gpu_init_seconds = device::runtime_times(Device::CUDA).init_seconds;
  // The upload and allocation figures of phase i: the device runtime's totals across it.
  struct Snapshot {
    device::UploadStats up;
    device::RuntimeTimes rt;
    double unmap = 0;
  };
  auto snap = [&] {
    return any_gpu ? Snapshot{device::upload_stats(), device::runtime_times(Device::CUDA), MappedFile::release_seconds_total()}
                   : Snapshot{};
  };
  auto detail = [&](size_t i, const Snapshot& a) {
    const Snapshot b = snap();
    LoadDetail& d = r.load_detail[i];
    d.upload_bytes = b.up.bytes - a.up.bytes;
    d.upload_seconds = b.up.seconds - a.up.seconds;
    d.copy_seconds = b.up.copy_seconds - a.up.copy_seconds;
    d.wait_seconds = b.up.wait_seconds - a.up.wait_seconds;
    d.alloc_seconds = b.rt.alloc_seconds - a.rt.alloc_seconds;
    d.unmap_seconds = b.unmap - a.unmap;
  };

  // Prefetch (GenerateOptions::prefetch): the transformer loads during the encode, the VAE
  // during the last step, each on a thread (and GPU stream) of its own. Auto: only within an
  // explicit --vram budget that holds both (without one, the run's peak stays the largest
  // phase's); On: whenever the memory holds both (on the CPU: always).
  using Prefetch = GenerateOptions::Prefetch;
  const VramPlan* plan = o.vram_plan.get();
  const bool explicit_budget = plan && plan->budget_bytes >= 0 && !plan->automatic;
  auto may_prefetch = [&](Device dev, int64_t current_peak, int64_t next_bytes) {
    if (o.prefetch == Prefetch::Off || device::profiling(Device::CUDA)) return false;
    if (dev == Device::CPU) return o.prefetch == Prefetch::On;  // host memory: asked for
    if (o.prefetch == Prefetch::Auto && !explicit_budget) return false;
    return plan && prefetch_fits(o, current_peak, next_bytes);
  };
  const bool prefetch_dit =
      !(cache && cache->transformer) && (o.transformer_device == Device::CPU || (plan && plan->dit.ring_slots == 0)) &&
      may_prefetch(o.transformer_device,
                   plan ? std::max(plan->text.predicted_peak_bytes, plan->vae_encode_peak_bytes) : 0,
                   plan ? plan->dit.resident_bytes : 0);
  const bool prefetch_vae =
      !(cache && cache->vae) &&
      may_prefetch(o.vae_device, plan && o.transformer_device == Device::CUDA ? plan->dit.predicted_peak_bytes : 0,
                   plan ? plan->vae_weight_bytes : 0);
  std::optional<Prefetched<ZImageDit>> dit_ahead;
  std::optional<Prefetched<VaeDecoder>> vae_ahead;

  Embeddings emb;
  {
    if (hooks.on_phase_start) hooks.on_phase_start("encode");
    PhaseScope phase("encode");
    DevicePhase on(o.text_encoder_device, o.precision, "encode", &r.release_seconds[0]);
    fit_cache_to_budget(o, cache, o.text_encoder_device, Tag::TextWeights, hooks);
    const Snapshot s0 = snap();
    if (prefetch_dit) {
      const PhaseContext dctx = PhaseContext::on(o.transformer_device, o.precision);
      dit_ahead.emplace("transformer", "encode", o.transformer_device, Tag::DitWeights,
                        [&o, &src, dctx](const GenerateHooks& h) { return load_transformer(dctx, src, o, &h); });
    }
    emb = run_encode(on.ctx, src, o, cfg, cache);
    r.load_seconds[0] = emb.load_seconds;
    detail(0, s0);
    r.load_detail[0].helper_wait_seconds = emb.helper_wait_seconds;
  }
  if (hooks.on_phase_end) hooks.on_phase_end("encode", ms.finished_phases().back().seconds);
  r.prompt_ids = emb.ids;
  {
    auto pe = std::make_shared<PromptEmbeddings>();
    // Host f32 copies: the result outlives the phase, and must hold no device memory.
    pe->pos = ops::to_host_f32(emb.pos);
    if (emb.neg.defined()) pe->neg = ops::to_host_f32(emb.neg);
    pe->ids = emb.ids;
    r.embeddings = std::move(pe);
  }
  check_cancel(hooks);

  // The VAE encoder's own phase (image-conditioned modes): loaded, run on the inputs, freed.
  EditLatents el;
  if (encodes) {
    if (hooks.on_phase_start) hooks.on_phase_start("vae-encode");
    PhaseScope phase("vae-encode");
    DevicePhase on(o.vae_device, o.precision, "vae-encode", &r.release_seconds[ienc]);
    const Snapshot s0 = snap();
    el = encode_edit_inputs(on.ctx, edit, mf, o.vae_dtype);
    detail(ienc, s0);
    r.component_weights.emplace_back("vae_encoder", el.encoder_weight_bytes);
  }
  check_cancel(hooks);

  Tensor latents = Tensor::empty({C, h, w}, DType::F32);
  DenoiseExtras ex;
  ex.component_weights = &r.component_weights;
  ex.prefetched = &r.prefetched;
  if (dit_ahead) ex.transformer = &*dit_ahead;
  if (prefetch_vae)
    ex.before_last_step = [&] {
      const PhaseContext vctx = PhaseContext::on(o.vae_device, o.precision);
      vae_ahead.emplace("vae", "denoise", o.vae_device, Tag::VaeWeights,
                        [&o, &src, vctx](const GenerateHooks&) { return load_vae(vctx, src, o); });
    };
  Tensor image_latents, noise;
  if (edit.mode == EditMode::Img2Img || edit.mode == EditMode::Inpaint) {
    // One generator: the posterior sample draws first, then the noise (prepare_latents).
    TorchGenerator gen(o.seed);
    Tensor eps = Tensor::empty({C, h, w}, DType::F32);
    gen.randn(eps.f32(), eps.numel());
    image_latents = vae_latents_from_moments(el.image_moments, mf.vae, eps.f32());
    noise = Tensor::empty({C, h, w}, DType::F32);
    gen.randn(noise.f32(), noise.numel());
    SchedulerConfig sc = parse_scheduler_config(read_text_file(mf.scheduler_config_path), mf.scheduler_config_path);
    Schedule sched = make_schedule(sc, o.steps, (h / 2) * (w / 2));
    ex.start = img2img_start_step(o.steps, edit.strength);
    ZI_CHECK(ex.start < o.steps, "--strength ", edit.strength, " leaves no denoising step at --steps ", o.steps);
    scale_noise(latents.f32(), image_latents.f32(), noise.f32(), size_t(latents.numel()), sched.sigmas[size_t(ex.start)]);
    if (edit.mode == EditMode::Inpaint) {
      ex.image_latents = &image_latents;
      ex.noise = &noise;
      ex.mask_latent = &el.mask_latent;
    }
  } else {
    torch_randn(o.seed, latents.f32(), latents.numel());
  }
  if (edit.mode == EditMode::ControlNet || edit.mode == EditMode::ControlNetInpaint) {
    ex.controlnet = &edit.controlnet;
    ex.control = &el.control;
    ex.control_scale = float(o.control_scale);
  }
  {
    if (hooks.on_phase_start) hooks.on_phase_start("denoise");
    PhaseScope phase("denoise");
    DevicePhase on(o.transformer_device, o.precision, "denoise", &r.release_seconds[iden]);
    fit_cache_to_budget(o, cache, o.transformer_device, Tag::DitWeights, hooks);
    ex.release_seconds = &on.released;
    const Snapshot s0 = snap();
    run_denoise(on.ctx, src, o, emb, latents, hooks, cache, &r.load_seconds[iden], ex);
    detail(iden, s0);
    emb = Embeddings{};  // the captions are not needed past this point
  }
  if (hooks.on_phase_end) hooks.on_phase_end("denoise", ms.finished_phases().back().seconds);
  check_cancel(hooks);
  {
    if (hooks.on_phase_start) hooks.on_phase_start("decode");
    PhaseScope phase("decode");
    DevicePhase on(o.vae_device, o.precision, "decode", &r.release_seconds[idec]);
    fit_cache_to_budget(o, cache, o.vae_device, Tag::VaeWeights, hooks);
    const Snapshot s0 = snap();
    r.decoded = run_decode(on.ctx, src, o, latents, cache, &r.load_seconds[idec], &r.vae_tile_used,
                           vae_ahead ? &*vae_ahead : nullptr, hooks, &r.prefetched);
    detail(idec, s0);
    latents = Tensor();
  }
  if (hooks.on_phase_end) hooks.on_phase_end("decode", ms.finished_phases().back().seconds);
  r.rgb.resize(size_t(r.width) * size_t(r.height) * 3);
  image_to_u8(r.decoded.f32(), 3, r.height, r.width, r.rgb.data());
  r.phases = ms.finished_phases();
  for (const auto& p : r.phases) r.peak_bytes = std::max(r.peak_bytes, p.peak_bytes);
  r.peak_rss_bytes = peak_rss_bytes();
  if (any_gpu) {
    r.gpu_phases = memory_stats(Device::CUDA).finished_phases();
    for (const auto& p : r.gpu_phases) r.gpu_peak_bytes = std::max(r.gpu_peak_bytes, p.peak_bytes);
  }
  r.streamed_bytes = WeightStreamer::total_bytes_copied() - streamed_before;
  return r;
}

// ---- Batches (zimage serve) ----

namespace {

void check_batch_compatible(const GenerateOptions& a, const GenerateOptions& b) {
  auto same = [](bool ok, const char* what) {
    if (!ok) throw UsageError(str_cat("generate_batch: items differ in ", what));
  };
  same(a.model_dir == b.model_dir, "model");
  same(a.width == b.width && a.height == b.height, "size");
  same(a.steps == b.steps, "steps");
  same(a.guidance == b.guidance && a.cfg_normalization == b.cfg_normalization &&
           a.cfg_truncation == b.cfg_truncation,
       "guidance settings");
  same(a.text_encoder_dtype == b.text_encoder_dtype && a.transformer_dtype == b.transformer_dtype &&
           a.vae_dtype == b.vae_dtype && a.text_rope_dtype == b.text_rope_dtype,
       "dtypes");
  same(a.loras == b.loras && a.transformer_override == b.transformer_override, "LoRAs");
  same(a.text_encoder_device == b.text_encoder_device && a.transformer_device == b.transformer_device &&
           a.vae_device == b.vae_device && a.precision == b.precision,
       "devices");
  same(a.vae_tile == b.vae_tile && a.max_sequence_length == b.max_sequence_length, "tiling or sequence length");
}

bool item_cancelled(const BatchItem& it) { return it.cancel && it.cancel->load(); }

}  // namespace

void force_vae_warm_up(bool on) { g_force_vae_warm_up.store(on); }

void preload_models(const GenerateOptions& o, ModelCache& cache, bool text_encoder, bool transformer, bool vae) {
  validate_generate_options(o);
  const ModelSources src =
      resolve_model_sources({o.model_dir, o.diffusion_model_file, o.text_encoder_file, o.vae_file});
  const ModelFolder& mf = src.folder;
  // Each model keeps the context it was loaded with (its device and activation dtype), the same
  // one generate()'s phases make, so a later generate/generate_batch computes where it would have.
  if (text_encoder) {
    if (!cache.tokenizer) cache.tokenizer = std::make_unique<BpeTokenizer>(BpeTokenizer::load_dir(mf.tokenizer_dir));
    if (!cache.text_encoder)
      cache.text_encoder = std::make_unique<Qwen3Encoder>(
          load_text_encoder(src.open(Component::TextEncoder), mf.text_encoder, o.text_encoder_dtype, o.text_rope_dtype,
                            PhaseContext::on(o.text_encoder_device, o.precision)));
  }
  if (transformer && !cache.transformer)
    cache.transformer =
        std::make_unique<ZImageDit>(load_transformer(PhaseContext::on(o.transformer_device, o.precision), src, o, nullptr));
  if (vae && !cache.vae)
    cache.vae = std::make_unique<VaeDecoder>(load_vae(PhaseContext::on(o.vae_device, o.precision), src, o));
}

std::vector<BatchItemResult> generate_batch(const std::vector<BatchItem>& items, const BatchHooks& hooks,
                                            ModelCache& cache) {
  const size_t B = items.size();
  std::vector<BatchItemResult> res(B);
  if (B == 0) return res;
  const GenerateOptions& o0 = items[0].options;
  for (const BatchItem& it : items) {
    validate_generate_options(it.options);
    check_batch_compatible(o0, it.options);
  }
  if (o0.cache_limit_bytes >= 0) set_host_cache_limit(size_t(o0.cache_limit_bytes));
  const ModelSources src =
      resolve_model_sources({o0.model_dir, o0.diffusion_model_file, o0.text_encoder_file, o0.vae_file});
  const ModelFolder& mf = src.folder;
  const int sf = mf.vae.scale_factor();
  const int64_t C = mf.transformer.in_channels;
  const auto [h, w] = latent_size(o0, mf.vae);
  const bool cfg = o0.guidance > 0;
  MemoryStats& ms = memory_stats(Device::CPU);
  ms.clear_phases();
  const bool any_gpu = o0.text_encoder_device == Device::CUDA || o0.transformer_device == Device::CUDA ||
                       o0.vae_device == Device::CUDA;
  if (any_gpu) {
    memory_stats(Device::CUDA).clear_phases();
    if (o0.cache_limit_bytes >= 0) device::set_cache_limit(Device::CUDA, size_t(o0.cache_limit_bytes));
  }
  std::vector<char> live(B, 1);  // still running: not failed, not cancelled
  auto drop_cancelled = [&] {
    for (size_t i = 0; i < B; ++i)
      if (live[i] && item_cancelled(items[i])) live[i] = 0, res[i].cancelled = true;
  };
  auto fail_all = [&](std::exception_ptr e) {
    for (size_t i = 0; i < B; ++i)
      if (live[i]) live[i] = 0, res[i].error = e;
  };
  std::vector<double> load(3, 0.0), release(3, 0.0);

  std::vector<Embeddings> emb(B);
  try {
    if (hooks.on_phase_start) hooks.on_phase_start("encode");
    PhaseScope phase("encode");
    DevicePhase on(o0.text_encoder_device, o0.precision, "encode", &release[0]);
    for (size_t i = 0; i < B; ++i) {
      drop_cancelled();
      if (!live[i]) continue;
      try {
        emb[i] = run_encode(on.ctx, src, items[i].options, cfg, &cache);
        load[0] += emb[i].load_seconds;
      } catch (const std::bad_alloc&) {
        throw;
      } catch (const Error&) {  // this prompt (or the encoder) failed
        live[i] = 0, res[i].error = std::current_exception();
      }
    }
  } catch (...) {
    fail_all(std::current_exception());
  }
  for (size_t i = 0; i < B; ++i) res[i].result.prompt_ids = emb[i].ids;
  drop_cancelled();

  std::vector<Tensor> latents(B);
  for (size_t i = 0; i < B; ++i) {
    if (!live[i]) continue;
    latents[i] = Tensor::empty({C, h, w}, DType::F32);
    torch_randn(items[i].options.seed, latents[i].f32(), latents[i].numel());
  }
  try {
    if (std::count(live.begin(), live.end(), 1) > 0) {
      if (hooks.on_phase_start) hooks.on_phase_start("denoise");
      PhaseScope phase("denoise");
      DevicePhase on(o0.transformer_device, o0.precision, "denoise", &release[1]);
      SchedulerConfig sc;
      if (mf.scheduler_config_path.empty())
        sc.shift = 3.0;  // no folder: Z-Image-Turbo's scheduler settings, as in run_denoise
      else
        sc = parse_scheduler_config(read_text_file(mf.scheduler_config_path), mf.scheduler_config_path);
      Schedule sched = make_schedule(sc, o0.steps, (h / 2) * (w / 2));
      if (!cache.transformer) {
        const double t0 = now_s();
        cache.transformer = std::make_unique<ZImageDit>(load_transformer(on.ctx, src, o0, nullptr));
        load[1] = now_s() - t0;
      }
      const ZImageDit& dit = *cache.transformer;
      const size_t n = size_t(C * h * w);
      const double t0 = now_s();
      for (int s = 0; s < sched.steps(); ++s) {
        drop_cancelled();
        std::vector<size_t> act;
        for (size_t i = 0; i < B; ++i)
          if (live[i]) act.push_back(i);
        if (act.empty()) break;
        const float t = model_time(sched, s);
        const bool cfg_now = cfg && cfg_active(o0.guidance, o0.cfg_truncation, t);
        std::vector<Tensor> xs, caps, negs;
        for (size_t i : act) {
          xs.push_back(latents[i].reshape({C, 1, h, w}));
          caps.push_back(emb[i].pos);
          if (cfg_now) negs.push_back(emb[i].neg);
        }
        const std::vector<float> ts(act.size(), t);
        std::vector<Tensor> pred = dit_forward_batch(dit, xs, ts, caps);
        if (cfg_now) {
          std::vector<Tensor> neg = dit_forward_batch(dit, xs, ts, negs);
          for (size_t k = 0; k < act.size(); ++k) {
            const GenerateOptions& o = items[act[k]].options;
            Tensor pos = pred[k].clone();
            cfg_combine(pred[k].f32(), pos.f32(), neg[k].f32(), n, o.guidance);
            if (o.cfg_normalization > 0) cfg_normalize(pred[k].f32(), pos.f32(), n, o.cfg_normalization);
          }
        }
        for (size_t k = 0; k < act.size(); ++k)
          euler_step(latents[act[k]].f32(), pred[k].f32(), n, sched.sigmas[size_t(s)], sched.sigmas[size_t(s) + 1]);
        if (hooks.on_step) hooks.on_step(s + 1, sched.steps(), now_s() - t0, int(act.size()));
      }
    }
  } catch (...) {
    fail_all(std::current_exception());
  }
  emb.clear();
  drop_cancelled();

  try {
    if (std::count(live.begin(), live.end(), 1) > 0) {
      if (hooks.on_phase_start) hooks.on_phase_start("decode");
      PhaseScope phase("decode");
      DevicePhase on(o0.vae_device, o0.precision, "decode", &release[2]);
      for (size_t i = 0; i < B; ++i) {
        drop_cancelled();
        if (!live[i]) continue;
        double l = 0;
        GenerateResult& r = res[i].result;
        r.decoded = run_decode(on.ctx, src, items[i].options, latents[i], &cache, &l, &r.vae_tile_used, nullptr, {},
                               nullptr);
        load[2] += l;
        latents[i] = Tensor();
        r.width = int(w * sf);
        r.height = int(h * sf);
        r.rgb.resize(size_t(r.width) * size_t(r.height) * 3);
        image_to_u8(r.decoded.f32(), 3, r.height, r.width, r.rgb.data());
        r.decoded = Tensor();  // the server needs the pixels only
      }
    }
  } catch (...) {
    fail_all(std::current_exception());
  }
  const std::vector<PhaseRecord> phases = ms.finished_phases();
  std::vector<PhaseRecord> gpu_phases;
  if (any_gpu) gpu_phases = memory_stats(Device::CUDA).finished_phases();
  const int64_t rss = peak_rss_bytes();
  for (BatchItemResult& br : res) {
    GenerateResult& r = br.result;
    r.phases = phases;
    for (const auto& p : phases) r.peak_bytes = std::max(r.peak_bytes, p.peak_bytes);
    r.gpu_phases = gpu_phases;
    for (const auto& p : gpu_phases) r.gpu_peak_bytes = std::max(r.gpu_peak_bytes, p.peak_bytes);
    r.load_seconds = load;
    r.release_seconds = release;
    r.peak_rss_bytes = rss;
  }
  return res;
}

}  // namespace zi
