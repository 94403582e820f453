// The host side of loading a streamed DiT block (issue 13: the --vram loads), real-size bf16
// shapes (q, k, v, out 3840², w1, w3, w2 3840 × 10240, adaLN 15360 × 256: ≈ 345 MB a block):
// each tensor is allocated on the host, filled from the "file" (parallel_copy from a buffer that
// stands for the page cache), copied into the block's "pinned" buffer (parallel_copy, as
// WeightStreamer::add_block does) and freed. Variants: fresh buffers per block (the pages are
// faulted in again every block) and HostReuseScope (the next block takes the freed buffers).
// Time per block; `bench_host_reuse --benchmark_repetitions=3`.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "core/allocator.h"
#include "core/parallel.h"

namespace {

const std::vector<size_t>& block_tensor_bytes() {
  static const std::vector<size_t> v = {
      size_t(3840) * 3840 * 2, size_t(3840) * 3840 * 2, size_t(3840) * 3840 * 2, size_t(3840) * 3840 * 2,
      size_t(10240) * 3840 * 2, size_t(10240) * 3840 * 2, size_t(3840) * 10240 * 2, size_t(4 * 3840) * 256 * 2};
  return v;
}

void load_blocks(benchmark::State& state, bool reuse) {
  size_t block = 0;
  for (size_t b : block_tensor_bytes()) block += b;
  std::vector<char> file(block, 1), pinned(block, 0);
  for (auto _ : state) {
    zi::HostReuseScope* scope = reuse ? new zi::HostReuseScope : nullptr;
    for (int blk = 0; blk < 4; ++blk) {
      size_t off = 0;
      for (size_t b : block_tensor_bytes()) {
        void* t = zi::host_alloc(b, zi::Tag::DitWeights);
        zi::parallel_copy(t, file.data() + off, b);
        zi::parallel_copy(pinned.data() + off, t, b);
        zi::host_free(t, b, zi::Tag::DitWeights);
        off += b;
      }
    }
    delete scope;
    benchmark::DoNotOptimize(pinned.data());
  }
  state.counters["s_per_block"] = benchmark::Counter(4, benchmark::Counter::kIsIterationInvariantRate |
                                                            benchmark::Counter::kInvert);
  state.SetBytesProcessed(int64_t(state.iterations()) * 4 * int64_t(block));
}

void BM_fresh_buffers(benchmark::State& s) { load_blocks(s, false); }
void BM_host_reuse_scope(benchmark::State& s) { load_blocks(s, true); }
BENCHMARK(BM_fresh_buffers)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_host_reuse_scope)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
