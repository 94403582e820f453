// DiT batching on the GPU (issue 18's serving question): seconds per image-step of
// dit_forward_batch for batch sizes 1, 2, 4, 8, 16 at one image size, on a real-size model
// folder (make-random-model), bf16 weights and activations. Shows how much stacking items'
// rows into one GEMM gains over one image at a time, before any server overhead.
// With ZI_CUDA_PROFILE=1 it prints the per-op GPU time of one step for the first and last
// batch size.   bench_dit_batch MODEL_DIR [SIZE=512] [BATCHES=1,2,4,8,16] [CAPTION_TOKENS=64]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backends/device.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/zimage_dit.h"

using namespace zi;

namespace {

Tensor randn(const Shape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(size_t(shape_numel(shape)));
  for (float& x : v) x = nd(rng);
  return Tensor::from_vector(v, shape);
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_dit_batch MODEL_DIR [SIZE=512] [BATCHES=1,2,4,8,16] [CAPTION_TOKENS=64]\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int size = argc > 2 ? std::atoi(argv[2]) : 512;
  std::vector<int> batches;
  {
    std::stringstream ss(argc > 3 ? argv[3] : "1,2,4,8,16");
    std::string tok;
    while (std::getline(ss, tok, ',')) batches.push_back(std::atoi(tok.c_str()));
  }
  const int64_t lc = argc > 4 ? std::atoll(argv[4]) : 64;
  try {
    const ModelFolder mf = open_model_folder(dir);
    const PhaseContext ctx = PhaseContext::on(Device::CUDA, DType::BF16);
    TensorStore store = TensorStore::open_dir(dir + "/transformer");
    WeightLoader loader(store, Tag::DitWeights, "transformer", ctx);
    const ZImageDit dit = load_zimage_dit(loader, mf.transformer, DType::BF16);
    loader.finish();
    const int64_t C = mf.transformer.in_channels, h = size / 8, w = size / 8;
    const int64_t cap_dim = mf.transformer.cap_feat_dim;
    std::printf("DIT_BATCH size=%d caption_tokens=%lld\n", size, (long long)lc);
    double base = 0;
    for (size_t bi = 0; bi < batches.size(); ++bi) {
      const int B = batches[bi];
      std::vector<Tensor> xs, caps;
      for (int i = 0; i < B; ++i) {
        xs.push_back(randn({C, 1, h, w}, 1 + i));
        caps.push_back(randn({lc, cap_dim}, 100 + i));
      }
      const std::vector<float> ts(size_t(B), 0.5f);
      dit_forward_batch(dit, xs, ts, caps);  // warm-up: attention pick, GEMM heuristics, pool
      device::synchronize(Device::CUDA);
      const bool prof = bi == 0 || bi + 1 == batches.size();
      if (prof) device::profile_report(Device::CUDA);  // clears what the warm-up recorded
      const int reps = 3;
      const double t0 = now_s();
      for (int r = 0; r < reps; ++r) dit_forward_batch(dit, xs, ts, caps);
      device::synchronize(Device::CUDA);
      const double per_step = (now_s() - t0) / reps, per_image = per_step / B;
      if (B == 1 || base == 0) base = per_image;
      std::printf("DIT_BATCH B=%d step %.2f ms  per image-step %.2f ms  gain vs B=1 %.2fx\n", B, per_step * 1e3,
                  per_image * 1e3, base / per_image);
      if (prof) {
        const std::string rep = device::profile_report(Device::CUDA);
        if (!rep.empty()) std::printf("profile B=%d (%d steps):\n%s\n", B, reps, rep.c_str());
      }
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
