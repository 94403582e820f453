// Fuzz target: the config parsers. Each input is parsed as a text encoder, transformer, VAE
// and scheduler config; a config they accept must also give a schedule and sizes without
// overflow.
#include <cstdint>
#include <string>

#include "core/check.h"
#include "io/checkpoint.h"
#include "scheduler/flow_match_euler.h"

using namespace zi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    Qwen3Config c = parse_qwen3_config(text, "text_encoder/config.json");
    (void)c;
  } catch (const Error&) {
  }
  try {
    DitConfig c = parse_dit_config(text, "transformer/config.json");
    volatile int h = c.head_dim() + c.ffn_hidden();
    (void)h;
  } catch (const Error&) {
  }
  try {
    VaeConfig c = parse_vae_config(text, "vae/config.json");
    volatile int s = c.scale_factor();
    (void)s;
  } catch (const Error&) {
  }
  try {
    SchedulerConfig c = parse_scheduler_config(text, "scheduler/scheduler_config.json");
    for (int steps : {1, 8}) {
      Schedule s = make_schedule(c, steps, 4096);
      (void)model_time(s, 0);
    }
  } catch (const Error&) {
  }
  return 0;
}
