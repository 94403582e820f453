// bench/layouts_load.cpp: loads the real-size transformer from a diffusers folder or a single file
// (bf16), as the pipeline does; prints load seconds, weights, accounted peak and peak RSS. Built
// and run by bench/layouts_real_size.sh (not part of the CMake build).
#include <chrono>
#include <cstdio>
#include <string>
#include "core/allocator.h"
#include "io/layouts.h"
#include "io/model_sources.h"
#include "io/weight_loader.h"
#include "models/zimage_dit.h"
using namespace zi;
int main(int argc, char** argv) {
  ModelSpec spec{argv[1], argc > 2 ? argv[2] : "", "", ""};
  const auto t0 = std::chrono::steady_clock::now();
  ModelSources src = resolve_model_sources(spec);
  int64_t w = 0;
  {
    PhaseScope phase("load");
    TensorStore store = src.open(Component::Transformer);
    WeightLoader loader(store, Tag::DitWeights, "transformer");
    ZImageDit dit = load_zimage_dit(loader, src.folder.transformer, DType::BF16);
    loader.finish();
    w = loader.bytes_loaded();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto ph = memory_stats(Device::CPU).finished_phases();
  std::printf("%s: load %.1f s, weights %.1f MiB, accounted peak %.1f MiB, peak RSS %.1f MiB\n",
              argc > 2 ? "comfy single file" : "diffusers folder", s, double(w) / (1 << 20),
              double(ph.back().peak_bytes) / (1 << 20), double(peak_rss_bytes()) / (1 << 20));
}
