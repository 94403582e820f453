// zimage serve: an HTTP server with resident models (src/server). Argument parsing, start-up
// report and the shutdown sequence only; the work is in src/server and src/pipeline.
#include <pthread.h>
#include <signal.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>

#include "backends/device.h"
#include "cli/common.h"
#include "core/check.h"
#include "core/parallel.h"
#include "models/lora.h"
#include "server/engine.h"
#include "server/http_server.h"
#include "server/scheduler.h"

namespace zi::cli {

namespace {

struct ServeArgs {
  std::string host = "127.0.0.1";
  int port = 8188;
  std::string model, api_key, resident = "all";
  int max_queue = 32, max_batch = 0, batch_wait_ms = 10, http_threads = 0, png_level = 1;
  int64_t max_pixels = 1024 * 1024;
  size_t max_body_bytes = 1 << 20, max_prompt_bytes = 8192;
  int max_n = 8, max_steps = 100;
  double shutdown_timeout = 30;
  // generate defaults
  int width = 1024, height = 1024, steps = 8, max_sequence_length = 512, threads = 0;
  float guidance = 0, cfg_normalization = 0, cfg_truncation = 1;
  std::string negative_prompt;
  std::string te_dtype = "bf16", dit_dtype = "bf16", vae_dtype = "bf16", vae_tile;
  std::string device, te_device, vae_device, precision = "bf16", vram;
  std::vector<std::string> loras;
  std::string transformer_override;
  bool quiet = false;
};

DType dtype_flag(const std::string& v, const char* flag) {
  DType d;
  if (!parse_dtype(v, &d)) throw UsageError(str_cat(flag, " must be f32, bf16 or f16, got '", v, "'"));
  return d;
}

void run_serve(ServeArgs& a) {
  if (a.port < 0 || a.port > 65535) throw UsageError(str_cat("--port must be from 0 to 65535, got ", a.port));
  if (a.max_queue < 1) throw UsageError(str_cat("--max-queue must be at least 1, got ", a.max_queue));
  if (a.max_batch < 0 || a.max_batch > 64) throw UsageError(str_cat("--max-batch must be from 0 (auto) to 64, got ", a.max_batch));
  if (a.max_pixels < 256) throw UsageError(str_cat("--max-pixels must be at least 256, got ", a.max_pixels));
  if (a.max_n < 1) throw UsageError(str_cat("--max-n must be at least 1, got ", a.max_n));
  if (a.max_steps < 1 || a.max_steps > 1000)
    throw UsageError(str_cat("--max-steps must be from 1 to 1000 (the pipeline's limit), got ", a.max_steps));
  if (a.png_level < 0 || a.png_level > 9) throw UsageError(str_cat("--png-level must be from 0 to 9, got ", a.png_level));
  if (a.batch_wait_ms < 0) throw UsageError(str_cat("--batch-wait-ms must not be negative, got ", a.batch_wait_ms));
  if (!(a.shutdown_timeout >= 0)) throw UsageError("--shutdown-timeout must not be negative");

  GenerateOptions d;
  d.width = a.width, d.height = a.height, d.steps = a.steps, d.guidance = a.guidance;
  d.cfg_normalization = a.cfg_normalization, d.cfg_truncation = a.cfg_truncation;
  d.negative_prompt = a.negative_prompt;
  d.max_sequence_length = a.max_sequence_length;
  d.text_encoder_dtype = dtype_flag(a.te_dtype, "--text-encoder-dtype");
  d.transformer_dtype = dtype_flag(a.dit_dtype, "--transformer-dtype");
  d.vae_dtype = dtype_flag(a.vae_dtype, "--vae-dtype");
  if (a.vae_tile.empty() || a.vae_tile == "0" || a.vae_tile == "off") d.vae_tile = 0;
  else if (a.vae_tile == "auto") d.vae_tile = -1;
  else {
    int px = 0;
    try {
      px = std::stoi(a.vae_tile);
    } catch (const std::exception&) {
      throw UsageError(str_cat("--vae-tile must be a number of pixels or 'auto', got '", a.vae_tile, "'"));
    }
    if (px < 128 || px % 8) throw UsageError(str_cat("--vae-tile must be a multiple of 8 of at least 128, got ", px));
    d.vae_tile = px / 8;
  }
  for (const std::string& l : a.loras) {
    const LoraSpec spec = parse_lora_arg(l);
    d.loras.emplace_back(spec.path, spec.scale);
  }
  d.transformer_override = a.transformer_override;
  const auto parse_device = parse_device_flag;
  const Device dev = parse_device(a.device, "--device", device::gpu_available() ? Device::CUDA : Device::CPU);
  d.transformer_device = dev;
  d.text_encoder_device = parse_device(a.te_device, "--text-encoder-device", dev);
  d.vae_device = parse_device(a.vae_device, "--vae-device", dev);
  if (a.precision == "bf16") d.precision = DType::BF16;
  else if (a.precision == "f32") d.precision = DType::F32;
  else throw UsageError(str_cat("--precision must be bf16 or f32, got '", a.precision, "'"));
  if (!a.vram.empty()) d.vram_bytes = parse_vram_flag(a.vram);
  bool bundled = false;
  d.model_dir = resolve_model_dir(a.model, &bundled);
  {
    GenerateOptions probe = d;
    probe.prompt = "x";
    validate_generate_options(probe);
    // Under a budget, one that cannot hold the default size fails now, naming the minimum.
    if (d.vram_bytes >= 0) (void)plan_generate_memory(probe);
  }
  if (int64_t(d.width) * d.height > a.max_pixels)
    throw UsageError(str_cat("the default size ", d.width, "x", d.height, " is above --max-pixels ", a.max_pixels));
  if (d.steps > a.max_steps) throw UsageError(str_cat("--steps ", d.steps, " is above --max-steps ", a.max_steps));
  if (bundled) notice_bundled_model(a.quiet);
  set_num_threads(a.threads);

  // SIGTERM and SIGINT are taken by sigwait below: block them before any thread starts.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  server::EngineOptions eo;
  eo.defaults = d;
  eo.resident = server::parse_residency(a.resident);
  eo.max_batch = a.max_batch;
  eo.max_pixels = a.max_pixels;
  eo.png_level = a.png_level;
  server::Engine engine(eo);
  const auto t0 = std::chrono::steady_clock::now();
  engine.load();
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int max_batch = engine.max_batch();

  server::SchedulerOptions so;
  so.max_queue = a.max_queue;
  so.max_batch = max_batch;
  so.batch_wait_ms = a.batch_wait_ms;
  if (!a.quiet) so.log = [](const std::string& line) { std::fprintf(stderr, "zimage serve: %s\n", line.c_str()); };
  server::Scheduler sched(so, [&engine](const server::BatchWork& w, const auto& progress) {
    return engine.run(w, progress);
  });

  server::HttpOptions ho;
  ho.host = a.host;
  ho.port = a.port;
  ho.api_key = a.api_key;
  ho.limits.max_body_bytes = a.max_body_bytes;
  ho.limits.max_prompt_bytes = a.max_prompt_bytes;
  ho.limits.max_n = a.max_n;
  ho.limits.max_pixels = a.max_pixels;
  ho.limits.max_steps = a.max_steps;
  ho.threads = a.http_threads;
  ho.max_queue = a.max_queue;
  server::HttpServer http(ho, sched, engine);
  const int port = http.bind();
  if (!a.quiet) {
    if (d.vram_bytes >= 0)
      std::fprintf(stderr, "zimage serve: model %s; --vram %.2f GiB: one request at a time, models load on first use\n",
                   d.model_dir.c_str(), double(d.vram_bytes) / double(int64_t(1) << 30));
    else
      std::fprintf(stderr, "zimage serve: model %s; resident: %s (loaded in %.2f s); device %s; max batch %d%s\n",
                   d.model_dir.c_str(), server::residency_str(eo.resident).c_str(), load_s,
                   dev == Device::CUDA ? "cuda" : "cpu", max_batch, a.max_batch ? "" : " (from free memory)");
    if (a.api_key.empty() && a.host != "127.0.0.1" && a.host != "localhost" && a.host != "::1")
      std::fprintf(stderr, "warning: listening on %s without --api-key\n", a.host.c_str());
  }
  // Tests and scripts read this line for the port (with --port 0).
  std::fprintf(stderr, "zimage serve: listening on http://%s:%d\n", a.host.c_str(), port);
  std::fflush(stderr);

  std::thread listener([&] { http.listen(); });
  int sig = 0;
  sigwait(&sigs, &sig);
  if (!a.quiet)
    std::fprintf(stderr, "zimage serve: %s: no new requests; finishing queued work (at most %.0f s)\n",
                 sig == SIGTERM ? "SIGTERM" : "SIGINT", a.shutdown_timeout);
  // New work is refused with 503 (and /health says so) while queued and running jobs finish;
  // past the deadline they are cancelled. Then the listening socket closes.
  sched.stop_accepting();
  sched.drain(std::chrono::steady_clock::now() +
              std::chrono::milliseconds(int64_t(a.shutdown_timeout * 1000)));
  http.stop();
  listener.join();
  if (!a.quiet) std::fprintf(stderr, "zimage serve: stopped\n");
}

}  // namespace

void add_serve(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* c = app.add_subcommand(
      "serve",
      "Serve images over HTTP with the models loaded once: OpenAI /v1/images/generations, A1111 "
      "/sdapi/v1/txt2img, async /v1/jobs with progress events, /metrics, and a web page at /.\n"
      "  zimage serve --model ~/models/Z-Image-Turbo            # http://127.0.0.1:8188/\n"
      "  zimage serve --host 0.0.0.0 --api-key SECRET --max-queue 64");
  c->add_option("--host", a->host, "address to listen on (default: localhost only)")->capture_default_str();
  c->add_option("--port", a->port, "TCP port; 0 picks a free one (printed)")->capture_default_str();
  c->add_option("--model", a->model,
                "diffusers-format Z-Image folder (default: $ZIMAGE_MODEL, else the bundled tiny random model)");
  c->add_option("--api-key", a->api_key,
                "require this key on every endpoint but /health (Authorization: Bearer KEY, or Basic auth with "
                "KEY as the password)");
  c->add_option("--resident", a->resident,
                "components kept loaded between requests: all, none, or a comma list of text-encoder, "
                "transformer, vae (the others load per batch)")
      ->capture_default_str();
  c->add_option("--max-queue", a->max_queue, "requests waiting before 429 Too Many Requests")->capture_default_str();
  c->add_option("--max-batch", a->max_batch, "images per DiT batch at most; 0: from free memory (1 to 16)")
      ->capture_default_str();
  c->add_option("--batch-wait-ms", a->batch_wait_ms,
                "how long the scheduler waits for requests of the same size and steps to batch with")
      ->capture_default_str();
  c->add_option("--png-level", a->png_level,
                "zlib level of the PNGs served, 0-9: the pixels are the same at every level; 1 is the fastest "
                "that compresses, 6 is the CLI's (smaller files, slower)")
      ->capture_default_str();
  c->add_option("--max-pixels", a->max_pixels, "largest width x height a request may ask for")->capture_default_str();
  c->add_option("--max-n", a->max_n, "images per request at most (n, batch_size x n_iter)")->capture_default_str();
  c->add_option("--max-steps", a->max_steps, "steps per request at most")->capture_default_str();
  c->add_option("--max-body-bytes", a->max_body_bytes, "request body size limit (413 above)")->capture_default_str();
  c->add_option("--max-prompt-bytes", a->max_prompt_bytes, "prompt and negative prompt length limit, UTF-8 bytes")
      ->capture_default_str();
  c->add_option("--http-threads", a->http_threads, "connection threads; 0: 2 x --max-queue + 16");
  c->add_option("--shutdown-timeout", a->shutdown_timeout,
                "on SIGTERM, seconds to finish queued and running jobs before cancelling them")
      ->capture_default_str();
  // The generate flags, as defaults for requests that do not set them.
  c->add_option("-W,--width", a->width, "default width")->capture_default_str();
  c->add_option("-H,--height", a->height, "default height")->capture_default_str();
  c->add_option("--steps", a->steps, "default steps")->capture_default_str();
  c->add_option("--guidance", a->guidance, "default guidance (0 = off, Turbo)")->capture_default_str();
  c->add_option("--negative-prompt", a->negative_prompt, "default negative prompt");
  c->add_option("--cfg-normalization", a->cfg_normalization, "as for generate")->capture_default_str();
  c->add_option("--cfg-truncation", a->cfg_truncation, "as for generate")->capture_default_str();
  c->add_option("--max-sequence-length", a->max_sequence_length, "prompt tokens kept")->capture_default_str();
  c->add_option("--threads", a->threads, "CPU threads (default: all cores)");
  c->add_option("--text-encoder-dtype", a->te_dtype, "as for generate")->capture_default_str();
  c->add_option("--transformer-dtype", a->dit_dtype, "as for generate")->capture_default_str();
  c->add_option("--vae-dtype", a->vae_dtype, "as for generate")->capture_default_str();
  c->add_option("--vae-tile", a->vae_tile, "as for generate");
  c->add_option("--lora", a->loras, "as for generate (merged at load, for every request)")->allow_extra_args(false);
  c->add_option("--transformer-override", a->transformer_override, "as for generate");
  c->add_option("--vram", a->vram,
                "GiB of GPU memory each request may allocate (as for generate): requests then run one at a "
                "time, each planned for its size, and kept models are released when a phase needs the room");
  c->add_option("--device", a->device, "cpu or cuda (default: cuda when a GPU is present)");
  c->add_option("--text-encoder-device", a->te_device, "as for generate");
  c->add_option("--vae-device", a->vae_device, "as for generate");
  c->add_option("--precision", a->precision, "as for generate")->capture_default_str();
  c->add_flag("-q,--quiet", a->quiet, "print only errors and the listening line");
  c->callback([a] { run_serve(*a); });
}

}  // namespace zi::cli
