// The whole pipeline: encode the prompt → free the encoder → denoise → free the DiT →
// decode → free the VAE. Each phase is a PhaseScope, so its weights, peak and end bytes
// are measured by the allocator's accounting. Spec §0.1, §4.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/check.h"
#include "core/tensor.h"
#include "pipeline/memory_plan.h"  // the peak estimates (estimate_denoise_activation_bytes, ...)

namespace zi {

// Thrown when the caller's cancel flag is raised (SIGINT); nothing is written.
struct Cancelled : Error {
  Cancelled() : Error("cancelled") {}
};

// Prompt embeddings computed once and reused (--count, generate --prompt-embeds): when set in
// GenerateOptions, the encode phase uses them instead of the text encoder (which is then not
// loaded at all, unless guidance needs a negative prompt and `neg` is undefined).
struct PromptEmbeddings {
  Tensor pos, neg;  // [L, hidden] f32; neg undefined without CFG
  std::vector<int32_t> ids;
};

struct GenerateOptions {
  std::string model_dir;  // diffusers folder; may be empty when the files below supply every component
  // Per-component files in any layout of io/layouts.h (--diffusion-model, --text-encoder, --vae);
  // see io/model_sources.h for how they combine with model_dir.
  std::string diffusion_model_file, text_encoder_file, vae_file;
  std::string prompt;
  std::string negative_prompt;  // used only with guidance > 0 ("" like the reference)
  int width = 1024, height = 1024;
  int steps = 8;
  float guidance = 0.0f;           // CFG when > 0: pred = pos + g·(pos − neg)
  float cfg_normalization = 0.0f;  // 0: off; r > 0 caps ‖pred‖ at r·‖pos‖
  float cfg_truncation = 1.0f;     // CFG off at steps whose t_norm exceeds this
  uint64_t seed = 0;
  int max_sequence_length = 512;
  DType text_encoder_dtype = DType::BF16;  // weight storage; activations are f32 on the CPU
  DType transformer_dtype = DType::BF16;
  DType vae_dtype = DType::BF16;
  int vae_tile = 0;  // latent pixels per tile; 0: untiled; -1: pick from available memory
  std::vector<std::pair<std::string, float>> loras;  // (file, scale)
  bool lora_strict = false;  // adapter tensors matching no weight: an error instead of a warning
  std::string transformer_override;
  // How the text encoder's RoPE frequencies are held. F32 is what transformers does when a
  // model is loaded in bf16; BF16 reproduces the bundled fixtures, whose maker cast the
  // whole module (buffers included) to bf16 and back.
  DType text_rope_dtype = DType::F32;
  int64_t cache_limit_bytes = -1;  // bytes the allocator may keep cached after frees; -1: default
  // Where each phase runs (--device, --text-encoder-device, --vae-device), and the activation
  // dtype of the phases that run on CUDA (--precision; f32 is for checking against the CPU).
  Device text_encoder_device = Device::CPU;
  Device transformer_device = Device::CPU;
  Device vae_device = Device::CPU;
  DType precision = DType::BF16;

  // Image-conditioned modes (pipeline/edit.h). All empty: text-to-image.
  std::string init_image;      // --init-image: img2img, or inpainting with mask_image
  std::string mask_image;      // --mask: white repaints
  bool mask_binarize = false;  // --mask-binarize: accept grey masks, threshold at 0.5 like diffusers
  double strength = -1;        // --strength in (0, 1]; -1: the reference's default (img2img 0.6, inpaint 1.0)
  std::string control_image;   // --control-image
  std::string controlnet;      // --controlnet: diffusers folder or single .safetensors file
  double control_scale = 0.75; // --control-scale (diffusers' default controlnet_conditioning_scale)
  std::string control_preprocess;  // --control-preprocess: "" or "canny"
  double canny_low = 100, canny_high = 200;
  DType controlnet_dtype = DType::BF16;
  std::shared_ptr<const PromptEmbeddings> embeddings;  // see PromptEmbeddings; null: encode the prompt
  bool skip_preflight = false;  // the caller already ran preflight_generate() on these options
  // --vram: bytes of device memory the GPU phases may allocate (pipeline/memory_plan.h); -1:
  // none (everything resident, or a budget from free memory when the model does not fit).
  int64_t vram_bytes = -1;
  std::shared_ptr<const VramPlan> vram_plan;  // set by generate() from the above
  // --prefetch: the next phase's weights load on a thread (and, on the GPU, a stream) of their
  // own while the current phase computes: the transformer during the encode, the VAE during the
  // last step. Both components are then held at once, so the run's peak grows: Auto does it only
  // within an explicit --vram budget whose plan holds both (the current phase's predicted peak
  // plus the next weights); On whenever memory holds both (the budget, or the GPU's free memory
  // less the margin; on a CPU-only run always); Off never.
  enum class Prefetch { Auto, On, Off } prefetch = Prefetch::Auto;
};

struct Qwen3Encoder;
struct ZImageDit;
struct VaeDecoder;
struct ZImageControlNet;
class BpeTokenizer;

// Components kept resident between generate() calls (--keep-models, library users). Each is
// loaded on first use with the options of that call; pass the same cache only with the same
// model, dtypes, LoRAs and override.
struct ModelCache {
  ModelCache();
  ~ModelCache();
  ModelCache(const ModelCache&) = delete;
  ModelCache& operator=(const ModelCache&) = delete;
  std::unique_ptr<BpeTokenizer> tokenizer;
  std::unique_ptr<Qwen3Encoder> text_encoder;
  std::unique_ptr<ZImageDit> transformer;
  std::unique_ptr<VaeDecoder> vae;
  std::unique_ptr<ZImageControlNet> controlnet;
};

struct GenerateHooks {
  std::function<void(const std::string& phase)> on_phase_start;
  std::function<void(int step, int steps, double elapsed_seconds)> on_step;  // after each step
  std::function<void(int step, const Tensor& latents)> on_latents;          // [16, h, w] after step
  std::function<void(const std::string& phase, double seconds)> on_phase_end;
  // While a component's weights load: bytes read of its files so far, of total.
  std::function<void(const std::string& component, int64_t done, int64_t total)> on_load;
  const std::atomic<bool>* cancel = nullptr;
  // One-line notices (stray tensors in a file, LoRA keys matching no weight). Default: stderr.
  std::function<void(const std::string&)> on_notice;
};

// Where a GPU phase's loading time went (the load report, issue 19): the streamed upload (host
// mapping → pinned ring → device) and its parts, and the device allocations of the phase.
struct LoadDetail {
  int64_t upload_bytes = 0;
  double upload_seconds = 0;  // inside device::upload_convert
  double copy_seconds = 0;    //   copying the mapping into the pinned ring
  double wait_seconds = 0;    //   waiting for the bus (a ring slot still in flight)
  double alloc_seconds = 0;   // device allocations (weights and activations) during the phase
  double unmap_seconds = 0;   // giving the loaded tensors' mapped file pages back (MADV_DONTNEED)
  // The encode: how long it waited, its weights loaded, for its helper threads (parsing the
  // tokenizer and, on the GPU, the GEMM warm-ups; the VAE's warm-up) — part of load_seconds.
  double helper_wait_seconds = 0;
};

// A component loaded ahead of its phase (GenerateOptions::prefetch): how long its load took,
// how much of that the phase it was needed in still waited for (the rest overlapped the phase
// it loaded during).
struct PrefetchRecord {
  std::string component;     // "transformer", "vae"
  std::string during;        // the phase it loaded during: "encode", "denoise"
  double load_seconds = 0;   // from the start of its load to its end
  double waited_seconds = 0; // the phase that needed it waited this long at its start
};

struct GenerateResult {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;          // height·width·3, HWC
  Tensor decoded;                    // [3, H, W] f32, the decoder output in ≈[-1, 1]
  std::vector<int32_t> prompt_ids;   // the tokenized, templated prompt
  std::vector<PhaseRecord> phases;   // encode, [vae-encode,] denoise, decode
  std::vector<std::pair<std::string, int64_t>> component_weights;  // bytes of each component loaded, in load order
  int64_t peak_bytes = 0;            // max over the phases (accounted, CPU)
  std::vector<PhaseRecord> gpu_phases;  // the phases that ran on CUDA, from the GPU's accounting
  int64_t gpu_peak_bytes = 0;           // max over gpu_phases
  std::vector<double> load_seconds;     // per phase (as `phases`): weight loading
  std::vector<double> release_seconds;  // per phase: returning the freed GPU memory to the driver
  std::vector<LoadDetail> load_detail;  // per phase (as `phases`; zeros for CPU phases)
  double gpu_init_seconds = 0;          // creating the CUDA context (once per process: every run reports it)
  int64_t peak_rss_bytes = 0;
  int vae_tile_used = 0;  // latent pixels per decode tile (0: untiled), what "auto" resolved to
  std::shared_ptr<const VramPlan> vram_plan;  // the GPU phases' memory plan (null: no GPU phase)
  int64_t streamed_bytes = 0;                 // bytes the streamers copied host → device
  std::vector<PrefetchRecord> prefetched;     // the components loaded ahead of their phase
  std::shared_ptr<const PromptEmbeddings> embeddings;  // what the encode phase produced (reuse: --count)
};

// Checks sizes, steps and guidance before anything is allocated; throws zi::UsageError
// with the flag name (and, for absurd sizes, the memory that size would need).
void validate_generate_options(const GenerateOptions& o);

// Resolves and checks the model inputs (folder, component files and their layouts, LoRA
// files) without reading weights; returns the notices a run would print (stray tensors, ...).
// Throws zi::Error / zi::UsageError naming the file, tensor or flag.
std::vector<std::string> validate_model_inputs(const GenerateOptions& o);

// Everything a run will read, checked before any phase starts (issue 15), in well under a
// second for the real model: the model folder and configs, every safetensors header (shard
// completeness, truncation), each component's tensor names, shapes and dtypes against its
// config (nothing is read or allocated), LoRA files and their shapes against the transformer,
// the override file; in the image-conditioned modes also the input images, the mask and the
// ControlNet against the transformer (pipeline/edit.h). Throws the same zi::Error the load would throw later. generate() runs it
// first unless options.skip_preflight.
void preflight_generate(const GenerateOptions& o);

// One image. With `cache`, components are taken from it (and loaded into it when absent)
// instead of being loaded and freed per phase.
GenerateResult generate(const GenerateOptions& o, const GenerateHooks& hooks = {}, ModelCache* cache = nullptr);

// ---- Batches with resident models (zimage serve) ----
// Several images of the same size, steps and guidance settings denoised together: each step
// is one dit_forward_batch over every image still running. Each image's pixels are those
// generate() gives for its options (its own prompt, negative prompt and seed).
struct BatchItem {
  GenerateOptions options;
  const std::atomic<bool>* cancel = nullptr;  // this image only: dropped at the next step boundary
};

struct BatchItemResult {
  GenerateResult result;      // valid when !cancelled and !error
  bool cancelled = false;
  std::exception_ptr error;   // this image failed (the others may have finished)
};

struct BatchHooks {
  std::function<void(const std::string& phase)> on_phase_start;
  // after each step, with the number of images still running
  std::function<void(int step, int steps, double elapsed_seconds, int active)> on_step;
};

// Throws zi::UsageError when the items differ in what must be shared (model, size, steps,
// guidance, cfg settings, dtypes, devices); per-image failures are reported in the results.
// Components are taken from (and loaded into) `cache`; the caller decides what stays resident.
std::vector<BatchItemResult> generate_batch(const std::vector<BatchItem>& items, const BatchHooks& hooks,
                                            ModelCache& cache);

// Loads the chosen components into `cache` now (zimage serve loads its resident models at start).
void preload_models(const GenerateOptions& o, ModelCache& cache, bool text_encoder, bool transformer, bool vae);

// The --vram plan generate() would follow for `o` (its GPU phases; pipeline/memory_plan.h),
// from the model's configs, nothing loaded, whether a GPU is present or not (the options'
// other checks are validate_generate_options'). Throws zi::UsageError like generate() for a
// budget below the minimum.
VramPlan plan_generate_memory(const GenerateOptions& o);

// Tests: the plan has the VAE's warm-up (VramPlan::vae_warm_up(): run_encode runs it while the
// encoder loads) whether or not the text phase and a decode fit within the denoise's predicted
// peak (still on the GPU only, before an untiled decode, once per size, and never with
// ZI_WARM_VAE=0), so the tiny model, whose text phase alone exceeds its denoise, can show that
// it leaves the image unchanged.
void force_vae_warm_up(bool on);

// The bytes of host memory the OS reports as available (MemAvailable).
int64_t available_host_bytes();

}  // namespace zi
