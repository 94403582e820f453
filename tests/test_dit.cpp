// The Z-Image DiT (src/models/zimage_dit.*) against the diffusers reference fixtures made with
// the bundled tiny transformer (tests/data/expected, see shared/fixtures/README.md): unit
// batch, every Turbo step, both CFG branches; plus batching, loader errors and weight dtypes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include <cstdio>
#include <filesystem>
#include <string>
#include <unistd.h>

#include "core/check.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/zimage_dit.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace zi;
namespace fs = std::filesystem;

namespace {

constexpr double kTol = 1e-4;  // rel L2 vs the f32 reference on bf16-exact weights

std::string tiny_transformer() { return test::tiny_model() + "/transformer"; }

DitConfig tiny_config() {
  const std::string path = tiny_transformer() + "/config.json";
  return parse_dit_config(read_text_file(path), path);
}

// Loads the transformer in `dir` with the tiny config; finish() throws on any problem. `fused`:
// the context's fused_projections (-1: the default, separate projections).
ZImageDit load_dit(const std::string& dir, DType wdt, int fused = -1) {
  TensorStore store = TensorStore::open_dir(dir);
  PhaseContext ctx;
  ctx.fused_projections = fused;
  WeightLoader loader(store, Tag::DitWeights, "transformer", ctx);
  ZImageDit m = load_zimage_dit(loader, tiny_config(), wdt);
  loader.finish();
  return m;
}

// The tiny model in bf16, loaded once for all tests.
const ZImageDit& tiny_bf16() {
  static const ZImageDit m = load_dit(tiny_transformer(), DType::BF16);
  return m;
}

// The same with q/k/v and w1/w3 fused (one matrix each).
const ZImageDit& tiny_bf16_fused() {
  static const ZImageDit m = load_dit(tiny_transformer(), DType::BF16, 1);
  return m;
}

float scalar_at(const Tensor& t, int64_t i) { return t.contiguous().f32()[i]; }

// A copy of the tiny transformer in a fresh temp dir, with `edit` applied to its tensor list.
template <class Edit>
std::string modified_copy(const std::string& tag, Edit edit) {
  const fs::path dir = fs::temp_directory_path() / str_cat("zi_test_dit_", tag, "_", getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  TensorStore store = TensorStore::open_dir(tiny_transformer());
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& name : store.names()) {
    TensorStore::Entry e = store.find(name);
    tensors.emplace_back(name, e.file->load(name));
  }
  edit(tensors);
  write_safetensors((dir / "diffusion_pytorch_model.safetensors").string(), tensors);
  return dir.string();
}

std::string load_error(const std::string& dir) {
  try {
    load_dit(dir, DType::BF16);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Dit, DerivedSizesMatchTheReference) {
  const DitConfig c = tiny_config();
  EXPECT_EQ(dit_ffn_hidden(c), 170);  // int(64 / 3 * 8), in floating point
  EXPECT_EQ(dit_adaln_dim(c), 64);    // min(dim, 256)
  DitConfig real;
  EXPECT_EQ(dit_ffn_hidden(real), 10240);
  EXPECT_EQ(dit_adaln_dim(real), 256);
}

TEST(Dit, ComponentsBatchMatchesReference) {
  const ZImageDit& m = tiny_bf16();
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const Tensor t = f.load("dit.t", DType::F32);
  const std::vector<Tensor> out = dit_forward_batch(m, {f.load("dit.x0", DType::F32), f.load("dit.x1", DType::F32)},
                                                    {scalar_at(t, 0), scalar_at(t, 1)},
                                                    {f.load("dit.cap0", DType::F32), f.load("dit.cap1", DType::F32)});
  for (int i = 0; i < 2; ++i) {
    const Tensor ref = f.load(str_cat("dit.out", i), DType::F32);
    ASSERT_EQ(out[size_t(i)].shape(), ref.shape());
    const double err = test::rel_l2(out[size_t(i)], ref);
    std::printf("dit.out%d: rel L2 %.3g, max abs %.3g\n", i, err, test::max_abs_diff(out[size_t(i)], ref));
    EXPECT_LE(err, kTol) << "dit.out" << i;
  }
}

TEST(Dit, TurboStepsMatchReference) {
  const ZImageDit& m = tiny_bf16();
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/turbo.safetensors"));
  const Tensor cap = f.load("prompt_embeds0", DType::F32);
  for (int s = 0; s < 4; ++s) {
    const std::string p = str_cat("step", s, ".");
    const Tensor out = dit_forward(m, f.load(p + "x0", DType::F32), scalar_at(f.load(p + "timestep", DType::F32), 0), cap);
    const Tensor ref = f.load(p + "out0", DType::F32);
    const double err = test::rel_l2(out, ref);
    std::printf("turbo %sout0: rel L2 %.3g\n", p.c_str(), err);
    EXPECT_LE(err, kTol) << p;
  }
}

TEST(Dit, CfgStepsMatchReferenceForBothBranches) {
  const ZImageDit& m = tiny_bf16();
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/cfg.safetensors"));
  const Tensor caps[2] = {f.load("prompt_embeds0", DType::F32), f.load("negative_prompt_embeds0", DType::F32)};
  int branches = 0;
  for (int s = 0; f.find(str_cat("step", s, ".x0")); ++s) {
    const std::string p = str_cat("step", s, ".");
    const Tensor ts = f.load(p + "timestep", DType::F32);
    for (int b = 0; b < 2; ++b) {
      if (!f.find(str_cat(p, "x", b))) continue;  // the last steps run without guidance
      const Tensor out = dit_forward(m, f.load(str_cat(p, "x", b), DType::F32), scalar_at(ts, b), caps[b]);
      const double err = test::rel_l2(out, f.load(str_cat(p, "out", b), DType::F32));
      std::printf("cfg %sout%d: rel L2 %.3g\n", p.c_str(), b, err);
      EXPECT_LE(err, kTol) << p << "out" << b;
      ++branches;
    }
  }
  EXPECT_EQ(branches, 8);  // 5 positive + 3 negative
}

// The RoPE tables are cached for the last two geometries (a CFG step's two captions): three
// captions of different padded lengths in turn, then the first again (evicted by then), give
// the bits of a model whose cache is cold at every call.
TEST(Dit, RopeCacheOfSeveralGeometries) {
  const ZImageDit& m = tiny_bf16();
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const Tensor x = f.load("dit.x0", DType::F32), cap = f.load("dit.cap0", DType::F32);
  std::vector<Tensor> caps;
  for (int64_t rows : {int64_t(5), int64_t(40), int64_t(70)}) {
    Tensor c = Tensor::zeros({rows, cap.dim(1)}, DType::F32);
    for (int64_t i = 0; i < c.numel(); ++i) c.f32()[i] = cap.f32()[i % cap.numel()];
    caps.push_back(c);
  }
  std::vector<Tensor> want;
  for (const Tensor& c : caps) {
    m.rope_cache.reset();
    want.push_back(dit_forward(m, x, 0.4f, c));
  }
  m.rope_cache.reset();
  for (size_t k : {0, 1, 0, 1, 2, 0, 2}) EXPECT_EQ(test::max_abs_diff(dit_forward(m, x, 0.4f, caps[k]), want[k]), 0.0) << k;
}

// Recording the step is a GPU feature: on the CPU a context asking for it runs op by op, and
// ops::record says why it cannot record.
TEST(Dit, RecordingIsForTheGpuOnly) {
  const ZImageDit m = load_dit(tiny_transformer(), DType::BF16);
  ZImageDit asks = load_dit(tiny_transformer(), DType::BF16);
  asks.ctx.cuda_graphs = 1;
  EXPECT_FALSE(dit_records_steps(asks));
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const Tensor x = f.load("dit.x0", DType::F32), cap = f.load("dit.cap0", DType::F32);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(test::max_abs_diff(dit_forward(asks, x, 0.3f, cap), dit_forward(m, x, 0.3f, cap)), 0.0);
  EXPECT_EQ(dit_step_replays(asks), 0);
  std::string why;
  EXPECT_FALSE(ops::record(asks.ctx, [] {}, &why).defined());
  EXPECT_NE(why.find("GPU"), std::string::npos) << why;
}

TEST(Dit, BatchEqualsIndividualCallsExactly) {
  const ZImageDit& m = tiny_bf16();
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const std::vector<Tensor> xs = {f.load("dit.x0", DType::F32), f.load("dit.x1", DType::F32)};
  const std::vector<Tensor> caps = {f.load("dit.cap0", DType::F32), f.load("dit.cap1", DType::F32)};
  const std::vector<float> ts = {0.3f, 0.85f};
  const std::vector<Tensor> batch = dit_forward_batch(m, xs, ts, caps);
  ASSERT_EQ(batch.size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(test::max_abs_diff(batch[i], dit_forward(m, xs[i], ts[i], caps[i])), 0.0);
}

TEST(Dit, StackedBatchMatchesOneAtATime) {
  // One timestep and one size: stacked, the items' rows go through every linear layer together
  // and attention runs per item. Captions of different lengths (so different RoPE positions and
  // padding). Stacked, the result equals dit_forward's up to the GEMMs' summation order (OpenBLAS
  // reduces a row differently at another row count or position: rel L2 ~1e-7); the default on
  // the CPU (one at a time) is dit_forward's bit for bit.
  const ZImageDit& m = tiny_bf16();
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const Tensor x0 = f.load("dit.x0", DType::F32);
  Tensor x1 = x0.clone();
  for (int64_t i = 0; i < x1.numel(); ++i) x1.f32()[i] = 0.5f * x1.f32()[i] - 0.1f;
  const Tensor cap0 = f.load("dit.cap0", DType::F32), cap1 = f.load("dit.cap1", DType::F32);
  const Tensor cap2 = cap0.slice(0, 0, std::max<int64_t>(1, cap0.dim(0) / 3)).clone();
  Tensor cap3 = Tensor::empty({40, cap0.dim(1)}, DType::F32);  // past one 32-token pad block
  for (int64_t i = 0; i < cap3.numel(); ++i) cap3.f32()[i] = std::sin(0.37f * float(i));
  const std::vector<Tensor> xs = {x0, x1, x0, x1};
  const std::vector<Tensor> caps = {cap0, cap1, cap2, cap3};
  const std::vector<float> ts(4, 0.6f);
  std::vector<Tensor> ones;
  for (size_t i = 0; i < 4; ++i) ones.push_back(dit_forward(m, xs[i], ts[i], caps[i]));
  for (int rep = 0; rep < 2; ++rep) {  // the second call reuses the cached stacked RoPE tables
    const std::vector<Tensor> batch = dit_forward_batch(m, xs, ts, caps, BatchMode::Stacked);
    ASSERT_EQ(batch.size(), 4u);
    for (size_t i = 0; i < 4; ++i) {
      ASSERT_EQ(batch[i].shape(), ones[i].shape());
      const double err = test::rel_l2(batch[i], ones[i]);
      if (rep == 0) std::printf("stacked item %zu vs alone: rel L2 %.3g\n", i, err);
      EXPECT_LE(err, 1e-6) << "item " << i;
    }
  }
  const std::vector<Tensor> batch = dit_forward_batch(m, xs, ts, caps);  // Auto: one at a time on the CPU
  for (size_t i = 0; i < 4; ++i)
    EXPECT_EQ(std::memcmp(batch[i].raw(), ones[i].raw(), size_t(ones[i].numel()) * sizeof(float)), 0) << "item " << i;
  // A sub-batch through the stacked path.
  const std::vector<Tensor> two = dit_forward_batch(m, {x1, x0}, {0.6f, 0.6f}, {cap3, cap2}, BatchMode::Stacked);
  EXPECT_LE(test::rel_l2(two[0], ones[3]), 1e-6);
  EXPECT_LE(test::rel_l2(two[1], ones[2]), 1e-6);
}

TEST(Dit, F32WeightsGiveTheBf16Result) {
  // The stored weights are bf16, so loading them as f32 holds the same values.
  const ZImageDit m32 = load_dit(tiny_transformer(), DType::F32);
  EXPECT_EQ(m32.layers[0].w1.dtype(), DType::F32);
  EXPECT_EQ(tiny_bf16().layers[0].w1.dtype(), DType::BF16);
  EXPECT_EQ(tiny_bf16().layers[0].ffn_norm1.dtype(), DType::F32);
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const Tensor x = f.load("dit.x0", DType::F32), cap = f.load("dit.cap0", DType::F32);
  const double err = test::rel_l2(dit_forward(m32, x, 0.3f, cap), dit_forward(tiny_bf16(), x, 0.3f, cap));
  std::printf("f32 vs bf16 weights: rel L2 %.3g\n", err);
  EXPECT_LE(err, 1e-6);
}

// q/k/v and w1/w3 are bound as one matrix each, the file's tensors as rows in that order.
TEST(Dit, ProjectionsAreFusedRowsInOrder) {
  const DitConfig c = tiny_config();
  const int64_t D = c.dim, F = dit_ffn_hidden(c);
  const TensorStore store = TensorStore::open_dir(tiny_transformer());
  auto file = [&](const std::string& name) {
    const TensorStore::Entry e = store.find(name);
    return e.file->load(*e.info, DType::F32);
  };
  EXPECT_FALSE(tiny_bf16().layers[1].qkv.defined() || tiny_bf16().layers[1].w13.defined());  // the default
  for (const auto& [prefix, b] :
       {std::pair<std::string, const DitBlock*>{"layers.1.", &tiny_bf16_fused().layers[1]},
        {"context_refiner.0.", &tiny_bf16_fused().context_refiner[0]}}) {
    ASSERT_TRUE(b->qkv.defined() && b->w13.defined()) << prefix;
    EXPECT_FALSE(b->to_q.defined() || b->to_k.defined() || b->to_v.defined() || b->w1.defined() || b->w3.defined());
    EXPECT_EQ(b->qkv.shape(), (Shape{3 * D, D}));
    EXPECT_EQ(b->w13.shape(), (Shape{2 * F, D}));
    const char* qkv[] = {"to_q", "to_k", "to_v"};
    for (int i = 0; i < 3; ++i)
      EXPECT_EQ(test::max_abs_diff(b->qkv.slice(0, i * D, (i + 1) * D).to(DType::F32),
                                   file(prefix + "attention." + qkv[i] + ".weight")),
                0.0)
          << prefix << qkv[i];
    EXPECT_EQ(test::max_abs_diff(b->w13.slice(0, 0, F).to(DType::F32), file(prefix + "feed_forward.w1.weight")), 0.0);
    EXPECT_EQ(test::max_abs_diff(b->w13.slice(0, F, 2 * F).to(DType::F32), file(prefix + "feed_forward.w3.weight")),
              0.0);
  }
}

// The fused projections compute what the separate ones do (the same products, one GEMM each).
TEST(Dit, UnfusedProjectionsGiveTheFusedResult) {
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const Tensor x = f.load("dit.x0", DType::F32), cap = f.load("dit.cap0", DType::F32);
  const double err = test::rel_l2(dit_forward(tiny_bf16(), x, 0.3f, cap), dit_forward(tiny_bf16_fused(), x, 0.3f, cap));
  std::printf("unfused vs fused projections: rel L2 %.3g\n", err);
  EXPECT_LE(err, 1e-6);
}

// The attention residual and the FFN's pre-norm as one op (ops::rms_norm_add_norm_, the context's
// fused_add_norm) give the same bits as the two ops, with separate and fused projections (on the
// CPU the op is the two ops; on the GPU one kernel with their arithmetic: CudaPipeline checks it).
TEST(Dit, FusedResidualAndPreNormGiveTheSameBits) {
  const SafetensorsFile f = SafetensorsFile::open(test::data_path("expected/components.safetensors"));
  const Tensor x = f.load("dit.x0", DType::F32), cap = f.load("dit.cap0", DType::F32);
  for (int fused : {0, 1}) {
    ZImageDit m = load_dit(tiny_transformer(), DType::BF16, fused);
    const Tensor want = dit_forward(m, x, 0.3f, cap);
    m.ctx.fused_add_norm = 1;
    EXPECT_EQ(test::max_abs_diff(dit_forward(m, x, 0.3f, cap), want), 0.0) << "fused projections " << fused;
  }
}

TEST(Dit, ContextRefinerHasNoModulation) {
  const ZImageDit& m = tiny_bf16();
  ASSERT_EQ(m.context_refiner.size(), 2u);
  for (const DitBlock& b : m.context_refiner) EXPECT_FALSE(b.modulated());
  for (const DitBlock& b : m.noise_refiner) EXPECT_TRUE(b.modulated());
  ASSERT_EQ(m.layers.size(), 3u);
  EXPECT_EQ(m.layers[2].adaln_w.shape(), (Shape{256, 64}));
}

TEST(Dit, LoaderNamesAMissingTensor) {
  const std::string dir = modified_copy("missing", [](auto& ts) {
    std::erase_if(ts, [](const auto& p) { return p.first == "layers.1.feed_forward.w2.weight"; });
  });
  const std::string msg = load_error(dir);
  EXPECT_NE(msg.find("missing"), std::string::npos) << msg;
  EXPECT_NE(msg.find("layers.1.feed_forward.w2.weight"), std::string::npos) << msg;
  fs::remove_all(dir);
}

TEST(Dit, LoaderNamesAWrongShape) {
  const std::string dir = modified_copy("shape", [](auto& ts) {
    for (auto& [name, t] : ts)
      if (name == "noise_refiner.0.attention.norm_k.weight") t = Tensor::zeros({33}, DType::BF16);
  });
  const std::string msg = load_error(dir);
  EXPECT_NE(msg.find("noise_refiner.0.attention.norm_k.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[33]"), std::string::npos) << msg;
  fs::remove_all(dir);
}

TEST(Dit, LoaderNamesAnUnexpectedTensor) {
  // A context-refiner block carries no adaLN in the checkpoint; one that does is reported.
  const std::string dir = modified_copy("extra", [](auto& ts) {
    ts.emplace_back("context_refiner.0.adaLN_modulation.0.bias", Tensor::zeros({256}, DType::BF16));
  });
  const std::string msg = load_error(dir);
  EXPECT_NE(msg.find("context_refiner.0.adaLN_modulation.0.bias"), std::string::npos) << msg;
  fs::remove_all(dir);
}

TEST(Dit, RejectsBadInputs) {
  const ZImageDit& m = tiny_bf16();
  const Tensor cap = Tensor::zeros({5, 32}, DType::F32);
  EXPECT_THROW(dit_forward(m, Tensor::zeros({16, 1, 7, 8}, DType::F32), 0.5f, cap), Error);  // odd size
  EXPECT_THROW(dit_forward(m, Tensor::zeros({8, 1, 8, 8}, DType::F32), 0.5f, cap), Error);   // channels
  EXPECT_THROW(dit_forward(m, Tensor::zeros({16, 1, 8, 8}, DType::F32), 0.5f, Tensor::zeros({5, 31}, DType::F32)),
               Error);
  EXPECT_THROW(dit_forward_batch(m, {Tensor::zeros({16, 1, 8, 8}, DType::F32)}, {0.5f, 0.6f}, {cap}), Error);
}
