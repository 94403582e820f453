// End to end with a new prompt for every image, in one process (issue 13's "end to end, load
// excluded" as diffusers' bench times it: its timed runs encode their prompt again). The CLI's
// --count encodes its one prompt once, so its second image has no encode; here each image has
// its own prompt, so each pays its encode (under a --vram budget: the encoder's streamed layers
// too), and the first image's first-use costs show apart from the later ones'.
// Use: bench_prompts MODEL_DIR SIZE STEPS IMAGES VRAM_GIB|none [TRANSFORMER_DTYPE]
// Prints one line per image: each phase's compute (its time less its load and its release), their
// sum, and the GPU peak; then the later images' best sum.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/dtype.h"
#include "pipeline/pipeline.h"

using namespace zi;

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "use: bench_prompts MODEL_DIR SIZE STEPS IMAGES VRAM_GIB|none [TRANSFORMER_DTYPE]\n");
    return 2;
  }
  try {
    GenerateOptions o;
    o.model_dir = argv[1];
    o.width = o.height = std::atoi(argv[2]);
    o.steps = std::atoi(argv[3]);
    const int images = std::max(1, std::atoi(argv[4]));
    const std::string vram = argv[5];
    if (vram != "none") o.vram_bytes = int64_t(std::atof(vram.c_str()) * double(int64_t(1) << 30));
    if (argc > 6 && !parse_weight_dtype(argv[6], &o.transformer_dtype)) {
      std::fprintf(stderr, "bench_prompts: bad transformer dtype '%s'\n", argv[6]);
      return 2;
    }
    // ZI_BENCH_PROMPTS_CPU=1: on the CPU, with "none" (a check of this program without a GPU).
    const Device dev = std::getenv("ZI_BENCH_PROMPTS_CPU") ? Device::CPU : Device::CUDA;
    o.text_encoder_device = o.transformer_device = o.vae_device = dev;
    o.precision = DType::BF16;
    const char* subjects[] = {"a red fox standing in fresh snow at dawn", "a lighthouse on a cliff in a storm",
                              "a bowl of ramen on a wooden table", "an astronaut reading in a library",
                              "a field of sunflowers under a blue sky", "a cat asleep on a stack of books"};
    double best_later = 0;
    for (int k = 0; k < images; ++k) {
      o.prompt = std::string("A cinematic photo of ") + subjects[k % 6] + ", soft light, highly detailed, 85mm lens";
      o.seed = uint64_t(k + 1);
      const GenerateResult r = generate(o);
      double sum = 0;
      std::string parts;
      for (size_t i = 0; i < r.phases.size(); ++i) {
        const double load = i < r.load_seconds.size() ? r.load_seconds[i] : 0.0;
        const double rel = i < r.release_seconds.size() ? r.release_seconds[i] : 0.0;
        const double compute = r.phases[i].seconds - load - rel;
        sum += compute;
        char buf[96];
        std::snprintf(buf, sizeof buf, " %s %.3f s (load %.3f, release %.3f);", r.phases[i].name.c_str(), compute, load,
                      rel);
        parts += buf;
      }
      std::printf("PROMPTS image %d/%d vram %s:%s end to end %.3f s; GPU peak %.2f GiB\n", k + 1, images, vram.c_str(),
                  parts.c_str(), sum, double(r.gpu_peak_bytes) / double(int64_t(1) << 30));
      std::fflush(stdout);
      if (k > 0) best_later = best_later > 0 ? std::min(best_later, sum) : sum;
    }
    if (images > 1) std::printf("PROMPTS vram %s best of images 2..%d: %.3f s end to end\n", vram.c_str(), images, best_later);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_prompts: %s\n", e.what());
    return 1;
  }
  return 0;
}
