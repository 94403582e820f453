#include "pipeline/pipeline.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "backends/device.h"
#include "core/torch_random.h"
#include "io/checkpoint.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/lora.h"
#include "models/qwen3_encoder.h"
#include "models/vae_decoder.h"
#include "models/zimage_dit.h"
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
      if (release_) *release_ = now_s() - t0;
      const std::string prof = device::profile_report(d);  // empty unless ZI_CUDA_PROFILE=1
      if (!prof.empty()) std::fprintf(stderr, "[%s] %s", name_.c_str(), prof.c_str());
    } catch (...) {  // a failing GPU was already reported by the op that saw it
    }
    memory_stats(d).end_phase();
  }
  DevicePhase(const DevicePhase&) = delete;
  DevicePhase& operator=(const DevicePhase&) = delete;

  const PhaseContext ctx;

 private:
  std::string name_;
  double* release_;
};

Embeddings run_encode(const PhaseContext& ctx, const ModelFolder& mf, const GenerateOptions& o, bool cfg,
                      ModelCache* cache) {
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
  if (!tok) {  // parsing tokenizer.json is loading too
    const double t0 = now_s();
    tok = std::make_unique<BpeTokenizer>(BpeTokenizer::load_dir(mf.tokenizer_dir));
    e.load_seconds += now_s() - t0;
  }
  // Tokenize before loading weights: a bad prompt fails fast.
  if (!e.pos.defined()) (void)tokenize_zimage_prompt(*tok, o.prompt, o.max_sequence_length);
  if (cfg) (void)tokenize_zimage_prompt(*tok, o.negative_prompt, o.max_sequence_length);
  if (!enc) {
    const double t0 = now_s();
    enc = std::make_unique<Qwen3Encoder>(load_text_encoder(mf, o.text_encoder_dtype, o.text_rope_dtype, ctx));
    e.load_seconds += now_s() - t0;
  }
  if (!e.pos.defined()) e.pos = encode_prompt(*enc, *tok, o.prompt, o.max_sequence_length, &e.ids);
  if (cfg) e.neg = encode_prompt(*enc, *tok, o.negative_prompt, o.max_sequence_length);
  return e;
}

// The transformer with LoRAs merged and override tensors applied while streaming in.
// check_only: the pre-flight check (nothing read, see WeightLoader::set_check_only).
ZImageDit load_transformer(const PhaseContext& ctx, const ModelFolder& mf, const GenerateOptions& o,
                           bool check_only = false) {
  TensorStore store = TensorStore::open_dir(mf.transformer_dir);
  WeightLoader loader(store, Tag::DitWeights, "transformer", ctx);
  loader.set_check_only(check_only);
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
  if (!loras.empty()) loras.check_applied();
  return dit;
}

// The denoising loop of spec §4.5–4.7 on latents [C, h, w] (f32, updated in place).
void run_denoise(const PhaseContext& ctx, const ModelFolder& mf, const GenerateOptions& o, const Embeddings& emb, Tensor& latents,
                 const GenerateHooks& hooks, ModelCache* cache, double* load_seconds) {
  SchedulerConfig sc = parse_scheduler_config(read_text_file(mf.scheduler_config_path), mf.scheduler_config_path);
  const int64_t C = latents.dim(0), h = latents.dim(1), w = latents.dim(2);
  const int64_t seq = (h / 2) * (w / 2);
  Schedule sched = make_schedule(sc, o.steps, seq);
  std::unique_ptr<ZImageDit> local;
  std::unique_ptr<ZImageDit>& dit = cache ? cache->transformer : local;
  if (!dit) {
    const double t0 = now_s();
    dit = std::make_unique<ZImageDit>(load_transformer(ctx, mf, o));
    *load_seconds = now_s() - t0;
  }
  const size_t n = size_t(latents.numel());
  const double t0 = now_s();
  for (int i = 0; i < sched.steps(); ++i) {
    check_cancel(hooks);
    const float t = model_time(sched, i);
    const bool cfg = emb.neg.defined() && cfg_active(o.guidance, o.cfg_truncation, t);
    Tensor x = latents.reshape({C, 1, h, w});
    Tensor pred = dit_forward(*dit, x, t, emb.pos);  // [C, 1, h, w]
    if (cfg) {
      check_cancel(hooks);
      Tensor neg = dit_forward(*dit, x, t, emb.neg);
      Tensor pos = pred.clone();
      cfg_combine(pred.f32(), pos.f32(), neg.f32(), n, o.guidance);
      if (o.cfg_normalization > 0) cfg_normalize(pred.f32(), pos.f32(), n, o.cfg_normalization);
    }
    euler_step(latents.f32(), pred.f32(), n, sched.sigmas[size_t(i)], sched.sigmas[size_t(i) + 1]);
    if (hooks.on_latents) hooks.on_latents(i, latents);
    if (hooks.on_step) hooks.on_step(i + 1, sched.steps(), now_s() - t0);
  }
}

VaeDecoder load_vae(const PhaseContext& ctx, const ModelFolder& mf, const GenerateOptions& o, bool check_only = false) {
  TensorStore store = TensorStore::open_dir(mf.vae_dir);
  WeightLoader loader(store, Tag::VaeWeights, "vae", ctx);
  loader.set_check_only(check_only);
  VaeDecoder vae = load_vae_decoder(loader, mf.vae, o.vae_dtype);
  loader.finish();
  return vae;
}

Tensor run_decode(const PhaseContext& ctx, const ModelFolder& mf, const GenerateOptions& o, const Tensor& latents,
                  ModelCache* cache, double* load_seconds, int* tile_used) {
  std::unique_ptr<VaeDecoder> local;
  std::unique_ptr<VaeDecoder>& vae = cache ? cache->vae : local;
  if (!vae) {
    const double t0 = now_s();
    vae = std::make_unique<VaeDecoder>(load_vae(ctx, mf, o));
    *load_seconds = now_s() - t0;
  }
  // z = latents / scaling_factor + shift_factor, in f32 like the reference.
  Tensor z = latents.clone();
  const float sf = float(mf.vae.scaling_factor), sh = float(mf.vae.shift_factor);
  float* zp = z.f32();
  for (int64_t i = 0; i < z.numel(); ++i) zp[i] = zp[i] / sf + sh;
  const int h = int(z.dim(1)), w = int(z.dim(2));
  int tile = o.vae_tile;
  if (tile < 0) {
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
  if (o.vae_tile != 0 && o.vae_tile != -1 && o.vae_tile < 16)
    throw UsageError(str_cat("--vae-tile must be at least 128 pixels, got ", o.vae_tile * 8));
  for (const auto& [path, scale] : o.loras)
    if (!std::isfinite(scale)) throw UsageError(str_cat("--lora ", path, ": scale must be finite"));
}

void preflight_generate(const GenerateOptions& o) {
  validate_generate_options(o);
  ModelFolder mf = open_model_folder(o.model_dir);
  (void)parse_scheduler_config(read_text_file(mf.scheduler_config_path), mf.scheduler_config_path);
  const bool need_encoder = !o.embeddings || (o.guidance > 0 && !o.embeddings->neg.defined());
  if (need_encoder) {
    TensorStore store = TensorStore::open_dir(mf.text_encoder_dir);
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
  (void)load_transformer(PhaseContext{}, mf, o, /*check_only=*/true);
  (void)load_vae(PhaseContext{}, mf, o, /*check_only=*/true);
}

GenerateResult generate(const GenerateOptions& o, const GenerateHooks& hooks, ModelCache* cache) {
  if (!o.skip_preflight) preflight_generate(o);
  validate_generate_options(o);
  if (o.cache_limit_bytes >= 0) set_host_cache_limit(size_t(o.cache_limit_bytes));
  LoadProgressScope progress(hooks.on_load);
  ModelFolder mf = open_model_folder(o.model_dir);
  const int sf = mf.vae.scale_factor();
  const int64_t C = mf.transformer.in_channels;
  const int64_t h = 2 * (o.height / (sf * 2)), w = 2 * (o.width / (sf * 2));
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
  r.load_seconds.assign(3, 0.0);
  r.release_seconds.assign(3, 0.0);

  Embeddings emb;
  {
    if (hooks.on_phase_start) hooks.on_phase_start("encode");
    PhaseScope phase("encode");
    DevicePhase on(o.text_encoder_device, o.precision, "encode", &r.release_seconds[0]);
    emb = run_encode(on.ctx, mf, o, cfg, cache);
    r.load_seconds[0] = emb.load_seconds;
  }
  if (hooks.on_phase_end) hooks.on_phase_end("encode", ms.finished_phases().back().seconds);
  r.prompt_ids = emb.ids;
  {
    auto pe = std::make_shared<PromptEmbeddings>();
    pe->pos = emb.pos;
    pe->neg = emb.neg;
    pe->ids = emb.ids;
    r.embeddings = std::move(pe);
  }
  check_cancel(hooks);

  Tensor latents = Tensor::empty({C, h, w}, DType::F32);
  torch_randn(o.seed, latents.f32(), latents.numel());
  {
    if (hooks.on_phase_start) hooks.on_phase_start("denoise");
    PhaseScope phase("denoise");
    DevicePhase on(o.transformer_device, o.precision, "denoise", &r.release_seconds[1]);
    run_denoise(on.ctx, mf, o, emb, latents, hooks, cache, &r.load_seconds[1]);
    emb = Embeddings{};  // the captions are not needed past this point
  }
  if (hooks.on_phase_end) hooks.on_phase_end("denoise", ms.finished_phases().back().seconds);
  check_cancel(hooks);
  {
    if (hooks.on_phase_start) hooks.on_phase_start("decode");
    PhaseScope phase("decode");
    DevicePhase on(o.vae_device, o.precision, "decode", &r.release_seconds[2]);
    r.decoded = run_decode(on.ctx, mf, o, latents, cache, &r.load_seconds[2], &r.vae_tile_used);
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
  return r;
}

}  // namespace zi
