// Block streaming (io/weight_stream.h) on the CPU: the ring's slots are host memory there and
// the copies memcpy, so the streamer's bookkeeping (packing, rebinding, the prefetch sequence,
// restarts out of order) runs without a GPU. The models' output with streamed blocks must be
// bit-identical to the resident run's. The GPU side (copy stream, events, device peak) is
// tests/test_cuda_stream.cpp.
#include <gtest/gtest.h>

#include <cstring>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "io/weight_stream.h"
#include "models/qwen3_encoder.h"
#include "models/zimage_dit.h"
#include "test_util.h"

using namespace zi;

namespace {

const ModelFolder& tiny() {
  static const ModelFolder mf = open_model_folder(test::tiny_model());
  return mf;
}

ZImageDit load_dit(const std::vector<bool>& streamed, int slots) {
  TensorStore store = TensorStore::open_dir(tiny().transformer_dir);
  WeightLoader loader(store, Tag::DitWeights, "transformer");
  if (!streamed.empty()) loader.set_streamed_blocks(streamed, slots);
  ZImageDit m = load_zimage_dit(loader, tiny().transformer, DType::BF16);
  loader.finish();
  return m;
}

Qwen3Encoder load_encoder(const std::vector<bool>& streamed, int slots) {
  TensorStore store = TensorStore::open_dir(tiny().text_encoder_dir);
  WeightLoader loader(store, Tag::TextWeights, "text_encoder");
  if (!streamed.empty()) loader.set_streamed_blocks(streamed, slots);
  Qwen3Encoder m = load_qwen3_encoder(loader, tiny().text_encoder, DType::BF16);
  loader.finish();
  return m;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

Tensor random_input(const Shape& s, uint64_t seed) {
  Tensor t = Tensor::empty(s, DType::F32);
  uint64_t x = seed;
  for (int64_t i = 0; i < t.numel(); ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    t.f32()[i] = float(int64_t(x >> 40) % 2001 - 1000) / 1000.0f;
  }
  return t;
}

// Streamed patterns over n blocks: none, every one, alternating, the first, the last few.
std::vector<std::vector<bool>> patterns(size_t n) {
  std::vector<std::vector<bool>> v;
  v.push_back(std::vector<bool>(n, true));
  std::vector<bool> alt(n), first(n), tail(n);
  for (size_t i = 0; i < n; ++i) {
    alt[i] = i % 2 == 1;
    first[i] = i == 0;
    tail[i] = i + 2 >= n;
  }
  v.push_back(alt);
  v.push_back(first);
  v.push_back(tail);
  return v;
}

}  // namespace

TEST(WeightStream, StreamedTransformerGivesTheResidentBits) {
  const ZImageDit resident = load_dit({}, 0);
  const size_t n = resident.noise_refiner.size() + resident.context_refiner.size() + resident.layers.size();
  const DitConfig& c = tiny().transformer;
  const Tensor latent = random_input({c.in_channels, 1, 8, 8}, 1);
  const Tensor cap = random_input({7, c.cap_feat_dim}, 2);
  const Tensor want0 = dit_forward(resident, latent, 0.3f, cap);
  const Tensor want1 = dit_forward(resident, latent, 0.7f, cap);
  for (const std::vector<bool>& p : patterns(n))
    for (int slots : {2, 3, 4}) {
      SCOPED_TRACE(testing::Message() << "slots " << slots << ", block 0 streamed " << p[0]);
      ZImageDit m = load_dit(p, slots);
      ASSERT_TRUE(m.streamer);
      int streamed = 0;
      for (bool b : p) streamed += b;
      EXPECT_EQ(m.streamer->streamed_blocks(), streamed);
      // Two steps: the second runs on prefetches queued at the end of the first.
      EXPECT_TRUE(same_bytes(dit_forward(m, latent, 0.3f, cap), want0));
      EXPECT_TRUE(same_bytes(dit_forward(m, latent, 0.7f, cap), want1));
      // Every streamed block was copied at least once per pass.
      int64_t per_pass = 0;
      EXPECT_GT(m.streamer->pinned_bytes(), 0);
      per_pass = m.streamer->pinned_bytes();
      EXPECT_GE(m.streamer->bytes_copied(), 2 * per_pass);
    }
}

TEST(WeightStream, StreamedBatchAndOutOfOrderUseGiveTheResidentBits) {
  const ZImageDit resident = load_dit({}, 0);
  const size_t n = resident.noise_refiner.size() + resident.context_refiner.size() + resident.layers.size();
  const DitConfig& c = tiny().transformer;
  const std::vector<Tensor> lat = {random_input({c.in_channels, 1, 8, 8}, 3), random_input({c.in_channels, 1, 8, 8}, 4)};
  const std::vector<Tensor> caps = {random_input({5, c.cap_feat_dim}, 5), random_input({9, c.cap_feat_dim}, 6)};
  const std::vector<Tensor> want = dit_forward_batch(resident, lat, {0.5f, 0.5f}, caps, BatchMode::Stacked);
  ZImageDit m = load_dit(std::vector<bool>(n, true), 3);
  // A forward abandoned after a few blocks (as an exception would) leaves the ring mid-sequence.
  m.streamer->ensure_resident(0);
  m.streamer->release(0);
  m.streamer->ensure_resident(5);  // out of order: restarts there
  m.streamer->release(5);
  const std::vector<Tensor> got = dit_forward_batch(m, lat, {0.5f, 0.5f}, caps, BatchMode::Stacked);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(same_bytes(got[i], want[i])) << i;
}

TEST(WeightStream, StreamedTextEncoderGivesTheResidentBits) {
  const Qwen3Encoder resident = load_encoder({}, 0);
  const std::vector<int32_t> ids = {151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198};
  const Tensor want = qwen3_encode(resident, ids);
  for (const std::vector<bool>& p : patterns(resident.layers.size()))
    for (int slots : {2, 3}) {
      Qwen3Encoder m = load_encoder(p, slots);
      EXPECT_TRUE(same_bytes(qwen3_encode(m, ids), want));
      EXPECT_TRUE(same_bytes(qwen3_encode(m, ids), want));  // again: the wrapped prefetch
    }
}

TEST(WeightStream, PinnedCopyIsTheOnlyHostCopy) {
  // The streamed blocks' host tensors are freed once packed: the DiT weights held on the host
  // after the load are the resident blocks + the pinned copy, not more.
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t before = ms.tag(Tag::DitWeights).current;
  int64_t resident_bytes = 0;
  {
    const ZImageDit r = load_dit({}, 0);
    resident_bytes = ms.tag(Tag::DitWeights).current - before;
  }
  const size_t n = 2 * size_t(tiny().transformer.n_refiner_layers) + size_t(tiny().transformer.n_layers);
  const int64_t reused = host_buffers_reused();
  ZImageDit m = load_dit(std::vector<bool>(n, true), 2);
  const int64_t held = ms.tag(Tag::DitWeights).current - before;
  // Each block after the first loads into the host buffers the one before freed (HostReuseScope).
  EXPECT_GE(host_buffers_reused() - reused, int64_t(n - 1) * 4);
  // The pinned copy pads each tensor to 256 bytes; no block is held twice.
  EXPECT_LE(held, resident_bytes + int64_t(n) * 16 * 256);
  EXPECT_GE(held, resident_bytes);
  // The ring's slots (host memory on the CPU) appear with the first use.
  dit_forward(m, random_input({tiny().transformer.in_channels, 1, 8, 8}, 9), 0.5f,
              random_input({4, tiny().transformer.cap_feat_dim}, 10));
  EXPECT_EQ(ms.tag(Tag::DitWeights).current - before, held + 2 * m.streamer->slot_bytes());
}

TEST(WeightStream, MisuseIsAnError) {
  const size_t n = 2 * size_t(tiny().transformer.n_refiner_layers) + size_t(tiny().transformer.n_layers);
  ZImageDit m = load_dit(std::vector<bool>(n, true), 2);
  m.streamer->ensure_resident(0);
  EXPECT_THROW(m.streamer->ensure_resident(1), Error);  // two in use at once
  m.streamer->release(0);
  EXPECT_THROW(m.streamer->release(0), Error);  // not in use
  EXPECT_THROW(WeightStreamer(Device::CPU, 1, Tag::DitWeights), Error);
}
