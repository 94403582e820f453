// Quality of the quantized transformer (and text encoder) formats on the GPU against bf16
// weights, for BENCHMARKS.md's quality table (issue 14): one image per configuration with the
// same prompt, seed and size, everything on CUDA in bf16 activations, and for each:
//  - dit_rel_l2: a single DiT forward (the first step's prediction) against bf16's. The first
//    Euler step is lat1 = lat0 + (σ1 − σ0)·v with lat0 the seed's noise (torch_randn, as the
//    pipeline makes it), so ‖v − v_bf16‖ / ‖v_bf16‖ = ‖lat1 − lat1_bf16‖ / ‖lat1_bf16 − lat0‖;
//  - latents_rel_l2: the final latents' relative L2 against bf16's;
//  - psnr: the 8-bit image against bf16's (dB);
//  - the GPU peak of the run.
// Use: bench_quant MODEL_DIR PROMPT SIZE STEPS SEED CONFIG...
// CONFIG: NAME=TRANSFORMER_DTYPE[+TEXT_ENCODER_DTYPE][:dequant] (e.g. fp8=fp8, fp8-deq=fp8:dequant,
// q4te=q4_0+q8_0); the first must be the bf16 baseline. ":dequant" turns the fp8 tensor-core GEMM
// off (cuda::set_fp8_gemm(false)). Prints one `QUALITY name ...` line per configuration.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backends/cuda/cuda_ops.h"
#include "core/dtype.h"
#include "core/torch_random.h"
#include "ops/ops.h"
#include "pipeline/pipeline.h"

using namespace zi;

namespace {

struct Run {
  Tensor first, last;
  std::vector<uint8_t> rgb;
  int64_t gpu_peak = 0;
};

double rel_l2(const float* a, const float* b, const float* base, int64_t n) {
  double e = 0, d = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = double(a[i]) - b[i], y = double(b[i]) - (base ? base[i] : 0.0f);
    e += x * x;
    d += y * y;
  }
  return std::sqrt(e / d);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "use: bench_quant MODEL_DIR PROMPT SIZE STEPS SEED CONFIG...\n");
    return 2;
  }
  try {
    const int size = std::atoi(argv[3]), steps = std::atoi(argv[4]);
    const uint64_t seed = std::strtoull(argv[5], nullptr, 10);
    Run base;
    for (int a = 6; a < argc; ++a) {
      std::string spec = argv[a];
      const size_t eq = spec.find('=');
      const std::string name = spec.substr(0, eq);
      std::string fmt = eq == std::string::npos ? spec : spec.substr(eq + 1);
      bool dequant = false;
      if (fmt.size() > 8 && fmt.substr(fmt.size() - 8) == ":dequant") dequant = true, fmt.resize(fmt.size() - 8);
      const size_t plus = fmt.find('+');
      DType tdt = DType::BF16, edt = DType::BF16;
      if (!parse_weight_dtype(fmt.substr(0, plus), &tdt) ||
          (plus != std::string::npos && !parse_weight_dtype(fmt.substr(plus + 1), &edt))) {
        std::fprintf(stderr, "bench_quant: bad config '%s'\n", argv[a]);
        return 2;
      }
      cuda::set_fp8_gemm(!dequant);
      GenerateOptions o;
      o.model_dir = argv[1];
      o.prompt = argv[2];
      o.width = o.height = size;
      o.steps = steps;
      o.seed = seed;
      // ZI_BENCH_QUANT_CPU=1: everything on the CPU (a check of this program on a machine
      // without a GPU, e.g. with the tiny model).
      const Device dev = std::getenv("ZI_BENCH_QUANT_CPU") ? Device::CPU : Device::CUDA;
      o.text_encoder_device = o.transformer_device = o.vae_device = dev;
      o.precision = DType::BF16;
      o.transformer_dtype = tdt;
      o.text_encoder_dtype = edt;
      Run r;
      GenerateHooks hooks;
      hooks.on_latents = [&](int k, const Tensor& lat) {
        Tensor h = ops::to_host_f32(lat).clone(Tag::Workspace);
        if (k == 0) r.first = h;
        r.last = h;
      };
      GenerateResult g = generate(o, hooks);
      r.rgb = g.rgb;
      r.gpu_peak = g.gpu_peak_bytes;
      if (a == 6) {
        base = r;
        // ‖lat1 − lat0‖ / ‖lat0‖ = |σ1 − σ0|·‖v‖/‖lat0‖: well below 1 when lat0 is the pipeline's
        // noise (≈ 1.4 would mean it is not, and dit_rel_l2 would be meaningless).
        const int64_t n = r.first.numel();
        const std::vector<float> lat0 = torch_randn(seed, n);
        std::printf("QUALITY %-12s baseline; first step |lat1 - lat0| / |lat0| = %.3f; gpu peak %.2f GiB\n",
                    name.c_str(), rel_l2(r.first.f32(), lat0.data(), nullptr, n), double(r.gpu_peak) / (1 << 30));
        std::fflush(stdout);
        continue;
      }
      const int64_t n = r.first.numel();
      const std::vector<float> lat0 = torch_randn(seed, n);
      const double dit = rel_l2(r.first.f32(), base.first.f32(), lat0.data(), n);
      const double fin = rel_l2(r.last.f32(), base.last.f32(), nullptr, n);
      double mse = 0;
      for (size_t i = 0; i < r.rgb.size(); ++i) {
        const double d = double(r.rgb[i]) - base.rgb[i];
        mse += d * d;
      }
      mse /= double(r.rgb.size());
      const double psnr = mse > 0 ? 10.0 * std::log10(255.0 * 255.0 / mse) : INFINITY;
      std::printf("QUALITY %-12s dit_rel_l2 %.4f latents_rel_l2 %.4f psnr %.1f dB; gpu peak %.2f GiB\n", name.c_str(),
                  dit, fin, psnr, double(r.gpu_peak) / (1 << 30));
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_quant: %s\n", e.what());
    return 1;
  }
  return 0;
}
