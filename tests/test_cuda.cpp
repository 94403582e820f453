// The CUDA backend against the CPU backend (the oracle): every op of ops.h on random non-zero
// data in f32 and bf16 activations, the tensor plumbing (copies, permutes, conversions, the
// streamed upload), and the fixture cases end to end on the GPU. Every test skips when no GPU
// is present, so this file passes on CI machines; ctest -L gpu runs it on a GPU machine.
// Tolerances (relative L2 over the whole output unless stated): f32 1e-5 (different summation
// order only), bf16 1e-2 (inputs and output rounded to 8 bits of mantissa). Pipeline: with
// --precision f32 the 8-bit image within max |diff| <= 1 of the reference; in bf16 every
// step's latents within relative L2 3e-2 and the image within mean |diff| <= 2/255.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "backends/cpu/cpu_ops.h"
#include "backends/cuda/attention_sm90.h"
#include "backends/cuda/cuda_ops.h"
#include "io/checkpoint.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "models/qwen3_encoder.h"
#include "models/vae_decoder.h"
#include "models/zimage_dit.h"
#include "pipeline/memory_plan.h"
#include "ops/ops.h"
#include "pipeline/memory_report.h"
#include "pipeline/pipeline.h"
#include "fixture_cases.h"
#include "test_util.h"

using namespace zi;
using zi::test::max_abs_diff;
using zi::test::rel_l2;
using zi::test::rnd;

namespace {

#define ZI_REQUIRE_GPU() \
  if (!cuda::available()) GTEST_SKIP() << "no CUDA GPU"

// Fixture paths; a carried test binary is pointed at the tree it runs in by these variables.
std::string data_dir() {
  const char* e = std::getenv("ZI_TEST_DATA_DIR");
  return e ? e : ZI_TEST_DATA;
}
std::string tiny_model_dir() {
  const char* e = std::getenv("ZI_TINY_MODEL_DIR");
  return e ? e : ZI_TINY_MODEL;
}

// Uniform in ±[lo, hi] (never zero, random sign).

// A host f32 tensor rounded through `dt` (what the GPU sees in bf16), so both sides start equal.
Tensor rounded(const Tensor& t, DType dt) { return dt == DType::F32 ? t.clone() : t.to(dt).to(DType::F32); }
Tensor gpu(const Tensor& t, DType dt) { return t.to(dt).to_device(Device::CUDA); }
Tensor host(const Tensor& t) { return ops::to_host_f32(t); }

double tol(DType dt) { return dt == DType::F32 ? 1e-5 : 1e-2; }

void expect_close(const Tensor& got_dev, const Tensor& ref, DType dt, const std::string& what, double scale = 1.0) {
  Tensor got = host(got_dev);
  ASSERT_EQ(got.shape(), ref.shape()) << what;
  const double r = rel_l2(got, ref);
  EXPECT_LE(r, tol(dt) * scale) << what << " " << dtype_name(dt) << " rel_l2=" << r
                                << " max_abs=" << max_abs_diff(got, ref);
}

const DType kActs[] = {DType::F32, DType::BF16};

}  // namespace

// The device flags are checked before any work (exit 2 names the flag); no GPU needed.
TEST(CudaCli, DeviceFlagsAreChecked) {
  if (!std::filesystem::exists(ZI_BINARY)) GTEST_SKIP() << "no zimage binary at " << ZI_BINARY;
  auto status = [](const std::string& args) {
    const std::string cmd = std::string(ZI_BINARY) + " generate -q -p x -W 64 -H 64 -o /tmp/zi_cli_flag.png " + args +
                            " > /dev/null 2>&1";
    const int r = std::system(cmd.c_str());
    return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
  };
  EXPECT_EQ(status("--device tpu"), 2);
  EXPECT_EQ(status("--vae-device gpu"), 2);
  EXPECT_EQ(status("--precision f16"), 2);
  if (!cuda::available()) {
    EXPECT_EQ(status("--device cuda"), 2);
  }
}

TEST(Cuda, TensorPlumbing) {
  ZI_REQUIRE_GPU();
  std::printf("device: %s, cuDNN %s\n", cuda::device_description().c_str(), cuda::cudnn_available() ? "yes" : "no");
  Tensor a = rnd({3, 5, 7}, 1);
  Tensor d = a.to_device(Device::CUDA);
  EXPECT_EQ(d.device(), Device::CUDA);
  EXPECT_EQ(max_abs_diff(d.to_device(Device::CPU), a), 0.0);
  // Permute + contiguous on the device equals the host's.
  Tensor p = d.permute({2, 0, 1}).contiguous();
  EXPECT_EQ(max_abs_diff(p.to_device(Device::CPU), a.permute({2, 0, 1}).contiguous()), 0.0);
  // dtype conversion on the device rounds like the host's.
  EXPECT_EQ(max_abs_diff(d.to(DType::BF16).to(DType::F32).to_device(Device::CPU), a.to(DType::BF16).to(DType::F32)),
            0.0);
  EXPECT_EQ(max_abs_diff(Tensor::zeros({4, 4}, DType::F32, Tag::Activations, Device::CUDA).to_device(Device::CPU),
                         Tensor::zeros({4, 4}, DType::F32)),
            0.0);
  // A slice view, then clone.
  Tensor s = d.slice(1, 1, 4).contiguous().to_device(Device::CPU);
  EXPECT_EQ(max_abs_diff(s, a.slice(1, 1, 4).contiguous()), 0.0);
}

TEST(Cuda, AccountingAndPool) {
  ZI_REQUIRE_GPU();
  MemoryStats& ms = memory_stats(Device::CUDA);
  const int64_t before = ms.total().current;
  {
    PhaseScope ph("test", Device::CUDA);
    Tensor t = Tensor::empty({1 << 20}, DType::F32, Tag::Activations, Device::CUDA);
    EXPECT_EQ(ms.total().current, before + (4 << 20));
    PhaseRecord r = ph.end();
    EXPECT_GE(r.peak_bytes, before + (4 << 20));
  }
  EXPECT_EQ(ms.total().current, before);
  cuda::synchronize();
  EXPECT_GT(cuda::pool_stats().reserved_high, 0);
}

// ops::warm_up_linears (the encoder's GEMM warm-up, on by default on the GPU) runs one GEMM per shape in
// bf16 and f32 from a second thread, as the pipeline does, and leaves no memory behind; a real
// linear of the same shape afterwards still computes right.
TEST(Cuda, WarmUpLinearsLeaveNothingBehind) {
  ZI_REQUIRE_GPU();
  MemoryStats& ms = memory_stats(Device::CUDA);
  const int64_t before = ms.total().current;
  for (DType act : {DType::BF16, DType::F32}) {
    const PhaseContext c = PhaseContext::on(Device::CUDA, act);
    std::thread t([&] { ops::warm_up_linears(c, {{37, 256, 128}, {37, 64, 256}, {0, 8, 8}}); });
    t.join();
    cuda::synchronize();
    EXPECT_EQ(ms.total().current, before);
    Tensor x = test::randn({37, 128}, 1.0f, 5), w = test::randn({256, 128}, 0.1f, 6);
    Tensor want = Tensor::empty({37, 256}, DType::F32);
    cpu::linear(x.to(act).to(DType::F32), w.to(act).to(DType::F32), nullptr, want);
    Tensor got = ops::to_host_f32(ops::linear(ops::to_compute(c, x), ops::to_compute(c, w)));
    EXPECT_LT(test::rel_l2(got, want), act == DType::BF16 ? 1e-2 : 1e-5);
  }
  // Its measured peak, over an encoder's shapes, is within what the text phase plans for it
  // (qwen3_warm_up_bytes, at 4 bytes an element: f32 is the larger case).
  Qwen3Config qc;
  qc.hidden_size = 128, qc.intermediate_size = 384, qc.num_attention_heads = 4, qc.num_key_value_heads = 2,
  qc.head_dim = 32;
  std::vector<std::array<int64_t, 3>> mnk;
  for (const auto& [N, K] : qwen3_linear_shapes(qc)) mnk.push_back({37, N, K});
  for (DType act : {DType::BF16, DType::F32}) {
    cuda::synchronize();
    ms.reset_peaks();
    const int64_t at = ms.total().current;
    ops::warm_up_linears(PhaseContext::on(Device::CUDA, act), mnk);
    cuda::synchronize();
    EXPECT_LE(ms.total().peak - at, qwen3_warm_up_bytes(qc, 37)) << dtype_name(act);
    EXPECT_GT(ms.total().peak - at, 0) << dtype_name(act);
  }
  // The CPU: nothing.
  ops::warm_up_linears(PhaseContext::on(Device::CPU), {{4, 4, 4}});
}

TEST(Cuda, StreamedUpload) {
  ZI_REQUIRE_GPU();
  // Larger than one staging slot, and an odd count, in every source/target dtype pair.
  const int64_t n = (int64_t(9) << 20) + 3;
  Tensor a = rnd({n}, 2);
  for (DType sdt : {DType::F32, DType::BF16, DType::F16})
    for (DType ddt : {DType::F32, DType::BF16, DType::F16}) {
      Tensor src = a.to(sdt);
      Tensor dst = Tensor::empty({n}, ddt, Tag::Activations, Device::CUDA);
      cuda::upload_convert(src.raw(), sdt, n, dst);
      EXPECT_EQ(max_abs_diff(dst.to_device(Device::CPU).to(DType::F32), src.to(ddt).to(DType::F32)), 0.0)
          << dtype_name(sdt) << " -> " << dtype_name(ddt);
    }
}

// The ops against the CPU are in the op table (test_cuda_ops_table.cpp); here the GPU kernel paths.

TEST(Cuda, Attention) {
  ZI_REQUIRE_GPU();
  struct Case { int64_t Sq, Sk, Hq, Hkv, D; bool causal; int64_t kv_len; };
  const Case cases[] = {{1, 1, 1, 1, 64, false, -1},     {70, 70, 2, 2, 128, false, -1}, {130, 130, 4, 2, 128, true, -1},
                        {200, 200, 3, 3, 64, false, 150}, {65, 300, 2, 1, 128, false, -1}, {257, 257, 2, 2, 128, true, 100},
                        {40, 40, 2, 2, 32, true, -1},     {33, 33, 1, 1, 96, false, -1},
                        // several 128-key tiles (H streams them through two stages), a partial last
                        // tile, GQA, query rows past a 128-row block
                        {300, 700, 4, 2, 128, false, 650}, {129, 1000, 2, 2, 128, false, -1}};
  uint32_t seed = 40;
  for (const Case& c : cases)
    for (DType act : kActs)
      // flash by rule (W on Hopper), W with 176-key tiles, W in 3 stages, the portable flash
      // kernel, blocked (W's variants are the rule's kernel elsewhere)
      for (int mode : {1, 3, 4, 2, 0}) {
        const bool force_blocked = mode == 0;
        cuda::set_portable_attention(mode == 2);
        cuda::set_flash_sm90w_variant(mode == 3 ? cuda::FlashW::N176 : mode == 4 ? cuda::FlashW::N128x3 : cuda::FlashW::N128);
        Tensor q = rnd({c.Sq, c.Hq, c.D}, seed++), k = rnd({c.Sk, c.Hkv, c.D}, seed++),
               v = rnd({c.Sk, c.Hkv, c.D}, seed++);
        const float scale = 1.0f / std::sqrt(float(c.D));
        Tensor ref = ops::attention(rounded(q, act), rounded(k, act), rounded(v, act), scale, c.causal, c.kv_len);
        cuda::set_force_blocked_attention(force_blocked);
        Tensor qd = gpu(q, act), kd = gpu(k, act);
        const std::string path = cuda::attention_path(qd, kd);
        Tensor o = ops::attention(qd, kd, gpu(v, act), scale, c.causal, c.kv_len);
        cuda::set_force_blocked_attention(false);
        cuda::set_portable_attention(false);
        cuda::set_flash_sm90w_variant(cuda::FlashW::N128);
        expect_close(o, ref, act,
                     str_cat("attention Sq=", c.Sq, " Sk=", c.Sk, " Hq=", c.Hq, " Hkv=", c.Hkv, " D=", c.D,
                             " causal=", c.causal, " kv_len=", c.kv_len, " path=", path, " mode=", mode));
      }
}

// The kernel chosen by rule (W on Hopper for the non-causal case) equals the portable kernel at
// the DiT's size, repeatedly. Non-causal and causal.
TEST(Cuda, AttentionRule) {
  ZI_REQUIRE_GPU();
  const int64_t S = 2100, H = 32, D = 128;  // 67 200 rows: triggers the measurement
  Tensor q = gpu(rnd({S, H, D}, 70), DType::BF16), k = gpu(rnd({S, H, D}, 71), DType::BF16),
         v = gpu(rnd({S, H, D}, 72), DType::BF16);
  const float scale = 1.0f / std::sqrt(float(D));
  for (bool causal : {false, true}) {
    cuda::set_portable_attention(true);
    const Tensor ref = host(ops::attention(q, k, v, scale, causal, -1));
    cuda::set_portable_attention(false);
    for (cuda::FlashW w : {cuda::FlashW::N128, cuda::FlashW::N176, cuda::FlashW::N128x3}) {
      cuda::set_flash_sm90w_variant(w);
      for (int run = 0; run < 2; ++run) {
        const Tensor o = host(ops::attention(q, k, v, scale, causal, -1));
        EXPECT_LE(rel_l2(o, ref), 1e-2) << "run " << run << " causal " << causal << " " << cuda::flash_sm90w_name(w);
      }
    }
    cuda::set_flash_sm90w_variant(cuda::FlashW::N128);
  }
}

TEST(Cuda, Conv2d) {
  ZI_REQUIRE_GPU();
  struct Case { int64_t Cin, H, W, Cout, k; int pad, stride = 1; };
  // The last four are strided: the VAE encoder's downsample (3×3, pad 0, stride 2 on an input
  // that pad2d made odd-sized), pad 1, a 1×1 kernel, and stride 3.
  const Case cases[] = {{3, 9, 11, 5, 3, 1},      {16, 20, 24, 32, 3, 1},   {8, 7, 5, 12, 1, 0},
                        {32, 16, 16, 32, 3, 1},   {16, 33, 33, 32, 3, 0, 2}, {8, 20, 24, 12, 3, 1, 2},
                        {8, 9, 7, 12, 1, 0, 2},   {4, 17, 14, 8, 3, 1, 3}};
  uint32_t seed = 60;
  for (const Case& c : cases)
    for (DType act : kActs)
      for (cuda::ConvPath path : {cuda::ConvPath::Auto, cuda::ConvPath::Cudnn, cuda::ConvPath::CudnnNhwc,
                                    cuda::ConvPath::Im2col, cuda::ConvPath::Direct}) {  // Auto: timed pick
        Tensor x = rnd({c.Cin, c.H, c.W}, seed++), w = rnd({c.Cout, c.Cin, c.k, c.k}, seed++).to(DType::BF16),
               b = rnd({c.Cout}, seed++);
        Tensor ref = ops::conv2d(rounded(x, act), w, &b, c.pad, c.stride);
        cuda::set_conv_path(path);
        Tensor bd = b.to_device(Device::CUDA);
        Tensor o = ops::conv2d(gpu(x, act), w.to_device(Device::CUDA), &bd, c.pad, c.stride);
        cuda::set_conv_path(cuda::ConvPath::Auto);
        expect_close(o, ref, act, str_cat("conv2d ", c.Cin, "x", c.H, "x", c.W, " -> ", c.Cout, " k", c.k,
                                          " pad ", c.pad, " stride ", c.stride, " path ", int(path)));
      }
}

// The NHWC path's layout changes at an image of more than 65535 × 32 pixels (the 2048² decode's
// last convolutions, 4 Mi pixels, failed there with "invalid argument" on 2026-12-07): the
// transpose's rows of tiles no longer fit gridDim.y.
TEST(Cuda, Conv2dNhwcBeyondTheGridRowLimit) {
  ZI_REQUIRE_GPU();
  const int64_t Cin = 4, H = 1500, W = 1500, Cout = 3;  // 2.25 Mi pixels > 65535 · 32
  Tensor x = rnd({Cin, H, W}, 90), w = rnd({Cout, Cin, 3, 3}, 91).to(DType::BF16), b = rnd({Cout}, 92);
  const Tensor ref = ops::conv2d(rounded(x, DType::BF16), w, &b, 1, 1);
  cuda::set_conv_path(cuda::ConvPath::CudnnNhwc);
  Tensor bd = b.to_device(Device::CUDA);
  Tensor o = ops::conv2d(gpu(x, DType::BF16), w.to_device(Device::CUDA), &bd, 1, 1);
  cuda::set_conv_path(cuda::ConvPath::Auto);
  expect_close(o, ref, DType::BF16, "conv2d 4x1500x1500 -> 3 nhwc");
}

TEST(Cuda, MixedDevicesAreAnError) {
  ZI_REQUIRE_GPU();
  Tensor x = rnd({4, 8}, 70), w = rnd({3, 8}, 71);
  EXPECT_THROW(ops::linear(x.to_device(Device::CUDA), w), Error);
  EXPECT_THROW(ops::linear(x, w.to_device(Device::CUDA)), Error);
}

// ---- the fixture cases on the GPU -------------------------------------------------------------

namespace {

GenerateOptions options_for_case(const std::string& name) {
  GenerateOptions o = test::fixture_case_options(data_dir(), tiny_model_dir(), name);
  o.text_encoder_device = o.transformer_device = o.vae_device = Device::CUDA;
  return o;
}

void run_gpu_case(const std::string& name, DType precision) {
  GenerateOptions o = options_for_case(name);
  o.precision = precision;
  SafetensorsFile ref = SafetensorsFile::open(data_dir() + "/expected/" + name + ".safetensors");
  GenerateHooks hooks;
  double worst_step = 0;
  hooks.on_latents = [&](int i, const Tensor& lat) {
    Tensor want = ref.load(str_cat("step", i, ".latents_after"), DType::F32);
    worst_step = std::max(worst_step, rel_l2(lat, want.reshape(lat.shape())));
  };
  const int64_t gpu_before = memory_stats(Device::CUDA).total().current;
  GenerateResult r = generate(o, hooks);
  int w = 0, h = 0;
  std::vector<uint8_t> png = read_png_rgb(data_dir() + "/expected/" + name + ".png", &w, &h);
  ASSERT_EQ(w, r.width);
  ASSERT_EQ(h, r.height);
  const test::PixelDiff pd = test::pixel_diff(png, r.rgb);
  const int maxd = pd.max;
  const double meand = pd.mean;
  std::printf("%s %s: worst step rel_l2 %.3g, image max |diff| %d, mean |diff| %.3f (of 255); gpu peak %.2f MiB\n",
              name.c_str(), dtype_name(precision), worst_step, maxd, meand, double(r.gpu_peak_bytes) / (1 << 20));
  if (precision == DType::F32) {
    EXPECT_LE(maxd, 1) << name;
    EXPECT_LT(worst_step, 1e-3) << name;
  } else {
    EXPECT_LT(worst_step, 3e-2) << name;
    EXPECT_LE(meand, 2.0) << name;
  }
  // Three GPU phases were measured, and every GPU byte of the run was given back.
  ASSERT_EQ(r.gpu_phases.size(), 3u);
  EXPECT_GT(r.gpu_peak_bytes, 0);
  for (const auto& p : r.gpu_phases) EXPECT_GT(p.weights_bytes, 0) << p.name;
  EXPECT_EQ(memory_stats(Device::CUDA).total().current, gpu_before);
  // The JSON report lists the GPU phases with their device.
  nlohmann::json j = nlohmann::json::parse(memory_report_json(r));
  int cuda_phases = 0;
  for (const auto& p : j["phases"]) cuda_phases += p["device"] == "cuda";
  EXPECT_EQ(cuda_phases, 3);
  EXPECT_EQ(j["gpu_peak_bytes"].get<int64_t>(), r.gpu_peak_bytes);
}

}  // namespace

TEST(CudaPipeline, TurboF32) { ZI_REQUIRE_GPU(); run_gpu_case("turbo", DType::F32); }
TEST(CudaPipeline, CfgF32) { ZI_REQUIRE_GPU(); run_gpu_case("cfg", DType::F32); }
TEST(CudaPipeline, TruncatedF32) { ZI_REQUIRE_GPU(); run_gpu_case("truncated", DType::F32); }
TEST(CudaPipeline, TurboBf16) { ZI_REQUIRE_GPU(); run_gpu_case("turbo", DType::BF16); }
TEST(CudaPipeline, CfgBf16) { ZI_REQUIRE_GPU(); run_gpu_case("cfg", DType::BF16); }
TEST(CudaPipeline, TruncatedBf16) { ZI_REQUIRE_GPU(); run_gpu_case("truncated", DType::BF16); }

// The text encoder and the VAE can stay on the CPU while the DiT runs on the GPU.
TEST(CudaPipeline, MixedDevices) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options_for_case("turbo");
  o.precision = DType::F32;
  o.text_encoder_device = o.vae_device = Device::CPU;
  GenerateResult r = generate(o);
  int w = 0, h = 0;
  std::vector<uint8_t> png = read_png_rgb(data_dir() + "/expected/turbo.png", &w, &h);
  int maxd = 0;
  for (size_t i = 0; i < png.size(); ++i) maxd = std::max(maxd, std::abs(int(png[i]) - int(r.rgb[i])));
  EXPECT_LE(maxd, 1);
  EXPECT_EQ(r.gpu_phases.size(), 1u);
}

// --keep-models on the GPU: two images through one ModelCache equal two without it, the second
// loads nothing, and the cached weights stay on the device until the cache goes.
TEST(CudaPipeline, KeepModels) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options_for_case("turbo");
  o.precision = DType::BF16;
  const GenerateResult plain = generate(o);
  const int64_t gpu_before = memory_stats(Device::CUDA).total().current;
  {
    ModelCache cache;
    const GenerateResult first = generate(o, {}, &cache);
    const GenerateResult second = generate(o, {}, &cache);
    // (GroupNorm's statistics are summed with atomics: the order, and so the last bit, may vary)
    auto maxdiff = [&](const GenerateResult& r) {
      int m = 0;
      for (size_t i = 0; i < r.rgb.size(); ++i) m = std::max(m, std::abs(int(r.rgb[i]) - int(plain.rgb[i])));
      return r.rgb.size() == plain.rgb.size() ? m : 256;
    };
    EXPECT_LE(maxdiff(first), 1);
    EXPECT_LE(maxdiff(second), 1);
    ASSERT_EQ(second.load_seconds.size(), 3u);
    for (double s : second.load_seconds) EXPECT_LT(s, 1e-3);
    ASSERT_TRUE(cache.transformer);
    EXPECT_GT(memory_stats(Device::CUDA).total().current, gpu_before);  // weights stay resident
  }
  EXPECT_EQ(memory_stats(Device::CUDA).total().current, gpu_before);
}

// zimage serve's batches on the GPU: three images denoised as one stacked DiT batch against
// generate() one at a time. cuBLASLt may pick other kernels for the larger row count, so the
// comparison allows rounding: in f32 the images agree within 1/255.
TEST(CudaPipeline, BatchMatchesOneAtATime) {
  ZI_REQUIRE_GPU();
  std::vector<BatchItem> items;
  for (int i = 0; i < 3; ++i) {
    GenerateOptions o = options_for_case("turbo");
    o.precision = DType::F32;
    o.seed = uint64_t(100 + i);
    if (i == 1) o.prompt = "a much longer prompt that gives the caption a different length than the others";
    items.push_back({o, nullptr});
  }
  ModelCache cache;
  const std::vector<BatchItemResult> res = generate_batch(items, {}, cache);
  for (size_t i = 0; i < items.size(); ++i) {
    ASSERT_FALSE(res[i].error) << i;
    const GenerateResult one = generate(items[i].options);
    ASSERT_EQ(res[i].result.rgb.size(), one.rgb.size());
    int maxd = 0;
    for (size_t k = 0; k < one.rgb.size(); ++k) maxd = std::max(maxd, std::abs(int(res[i].result.rgb[k]) - int(one.rgb[k])));
    std::printf("batched image %zu vs one at a time: max |diff| %d\n", i, maxd);
    EXPECT_LE(maxd, 1) << i;
  }
}

// The denoise step recorded as a CUDA graph and replayed (issue 19): per activation dtype, the
// tiny DiT's forwards over several steps with two captions of different padded lengths (a CFG
// step's two geometries) give exactly the eager model's bits; after each geometry's first
// (eager) forward every forward is a replay; the graph memory is accounted while the recordings
// live and given back by dit_release_recordings; and a released model records again.
TEST(CudaPipeline, RecordedStepsGiveTheEagerBits) {
  ZI_REQUIRE_GPU();
  const ModelFolder mf = open_model_folder(tiny_model_dir());
  for (DType act : kActs) {
    SCOPED_TRACE(dtype_name(act));
    auto dit = [&](int graphs) {
      PhaseContext ctx = PhaseContext::on(Device::CUDA, act);
      ctx.cuda_graphs = graphs;
      TensorStore store = TensorStore::open_dir(mf.transformer_dir);
      WeightLoader ld(store, Tag::DitWeights, "transformer", ctx);
      ZImageDit m = load_zimage_dit(ld, mf.transformer, DType::BF16);
      ld.finish();
      return m;
    };
    auto bytes = [](const Tensor& t) {
      const Tensor h = ops::to_host_f32(t);
      return std::vector<float>(h.f32(), h.f32() + h.numel());
    };
    const ZImageDit eager = dit(0);
    const ZImageDit rec = dit(1);
    ASSERT_FALSE(dit_records_steps(eager));
    ASSERT_TRUE(dit_records_steps(rec));
    std::vector<Tensor> caps;
    for (int64_t len : {6, 40}) {  // padded to 32 and 64 rows
      Tensor cap = Tensor::zeros({len, mf.transformer.cap_feat_dim}, DType::F32);
      for (int64_t i = 0; i < cap.numel(); ++i) cap.f32()[i] = float((i * 7 + len) % 13) / 13.0f - 0.5f;
      caps.push_back(cap);
    }
    int64_t after_first = 0;
    for (int step = 0; step < 4; ++step) {
      Tensor latent = Tensor::zeros({mf.transformer.in_channels, 1, 16, 24}, DType::F32);
      for (int64_t i = 0; i < latent.numel(); ++i) latent.f32()[i] = float((i + 5 * step) % 17) / 17.0f - 0.5f;
      const float t = 0.1f + 0.2f * float(step);
      for (const Tensor& cap : caps)
        EXPECT_EQ(bytes(dit_forward(rec, latent, t, cap)), bytes(dit_forward(eager, latent, t, cap))) << "step " << step;
      if (step == 0) after_first = memory_stats(Device::CUDA).total().current;
      else EXPECT_GT(memory_stats(Device::CUDA).total().current, after_first) << "the recordings' memory is accounted";
    }
    EXPECT_EQ(dit_recording_failure(rec), "");
    EXPECT_EQ(dit_step_replays(rec), 2 * 3);
    dit_release_recordings(rec);
    EXPECT_EQ(memory_stats(Device::CUDA).total().current, after_first);
    // Released, the model records again at the next forward, with the same bits.
    Tensor latent = Tensor::zeros({mf.transformer.in_channels, 1, 16, 24}, DType::F32);
    EXPECT_EQ(bytes(dit_forward(rec, latent, 0.5f, caps[0])), bytes(dit_forward(eager, latent, 0.5f, caps[0])));
    EXPECT_EQ(dit_step_replays(rec), 2 * 3 + 1);
  }
}

// The whole pipeline with recorded steps (ZI_CUDA_GRAPHS=1): the CFG fixture case (two captions
// per step) gives the image of the op-by-op run, byte for byte, and every GPU byte is given back.
TEST(CudaPipeline, RecordedStepsInThePipeline) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options_for_case("cfg");
  o.precision = DType::BF16;
  ::setenv("ZI_CUDA_GRAPHS", "0", 1);
  const GenerateResult plain = generate(o);
  const int64_t gpu_before = memory_stats(Device::CUDA).total().current;
  ::setenv("ZI_CUDA_GRAPHS", "1", 1);
  std::vector<std::string> notices;
  GenerateHooks h;
  h.on_notice = [&](const std::string& n) { notices.push_back(n); };
  const GenerateResult r = generate(o, h);
  ::unsetenv("ZI_CUDA_GRAPHS");
  EXPECT_EQ(r.rgb, plain.rgb);
  for (const std::string& n : notices) EXPECT_EQ(n.find("could not be recorded"), std::string::npos) << n;
  EXPECT_EQ(memory_stats(Device::CUDA).total().current, gpu_before);
}

// The VAE's warm-up (on by default) leaves the image as it was. The tiny model's text phase
// alone exceeds its denoise, so the pipeline would never warm it up: forced here
// (force_vae_warm_up); its peak then adds at most one decode's to the run's.
TEST(CudaPipeline, VaeWarmUpGivesTheSameImage) {
  ZI_REQUIRE_GPU();
  GenerateOptions o = options_for_case("turbo");
  o.precision = DType::BF16;
  o.width = o.height = 320;  // a size no other test warms
  const VramPlan p = plan_generate_memory(o);
  ::setenv("ZI_WARM_VAE", "0", 1);
  const int64_t before = vae_warm_ups_run();
  const GenerateResult plain = generate(o);
  ::unsetenv("ZI_WARM_VAE");
  EXPECT_EQ(vae_warm_ups_run(), before) << "ZI_WARM_VAE=0 turns it off";
  force_vae_warm_up(true);
  const GenerateResult warmed = generate(o);
  const GenerateResult again = generate(o);
  force_vae_warm_up(false);
  EXPECT_EQ(vae_warm_ups_run(), before + 1) << "warmed once for the size";
  EXPECT_EQ(warmed.rgb, plain.rgb);
  EXPECT_EQ(again.rgb, plain.rgb);
  EXPECT_LE(warmed.gpu_peak_bytes, plain.gpu_peak_bytes + p.vae_peak_bytes);
}

// The next phase's weights loaded ahead on a side stream (issue 19, GenerateOptions::prefetch):
// without a budget, Auto loads phase by phase and On prefetches the transformer during the
// encode and the VAE during the last step; the image is the phase-by-phase run's, byte for
// byte, in both precisions and with recorded steps; the GPU is left as it was.
TEST(CudaPipeline, PrefetchGivesTheSameBits) {
  ZI_REQUIRE_GPU();
  for (DType act : kActs) {
    SCOPED_TRACE(dtype_name(act));
    GenerateOptions o = options_for_case("cfg");
    o.precision = act;
    const GenerateResult plain = generate(o);
    EXPECT_TRUE(plain.prefetched.empty()) << "Auto without --vram";
    const int64_t gpu_before = memory_stats(Device::CUDA).total().current;
    for (const char* graphs : {"0", "1"}) {
      ::setenv("ZI_CUDA_GRAPHS", graphs, 1);
      o.prefetch = GenerateOptions::Prefetch::On;
      const GenerateResult r = generate(o);
      ::unsetenv("ZI_CUDA_GRAPHS");
      EXPECT_EQ(r.rgb, plain.rgb) << "graphs " << graphs;
      ASSERT_EQ(r.prefetched.size(), 2u);
      EXPECT_EQ(r.prefetched[0].component, "transformer");
      EXPECT_EQ(r.prefetched[0].during, "encode");
      EXPECT_EQ(r.prefetched[1].component, "vae");
      EXPECT_EQ(r.prefetched[1].during, "denoise");
      EXPECT_EQ(memory_stats(Device::CUDA).total().current, gpu_before);
    }
  }
  // Under budgets from the minimum up, Auto prefetches the transformer exactly when the plan
  // holds it beside the encode phase's peak, and every run stays within its budget with the
  // image of the same budget's run without prefetching.
  GenerateOptions o = options_for_case("turbo");
  o.precision = DType::BF16;
  const int64_t minimum = plan_generate_memory(o).minimum_bytes;
  bool any = false;
  for (int64_t budget : {minimum, minimum * 3 / 2, minimum * 3, minimum * 100 + (int64_t(128) << 20)}) {
    o.vram_bytes = budget;
    const VramPlan p = plan_generate_memory(o);
    const bool fits = p.dit.ring_slots == 0 && p.text.predicted_peak_bytes + p.dit.resident_bytes +
                                                     std::max<int64_t>(int64_t(64) << 20, budget / 20) <= budget;
    o.prefetch = GenerateOptions::Prefetch::Off;
    const GenerateResult plain = generate(o);
    o.prefetch = GenerateOptions::Prefetch::Auto;
    const GenerateResult r = generate(o);
    bool prefetched = false;
    for (const PrefetchRecord& pf : r.prefetched) prefetched = prefetched || pf.component == "transformer";
    EXPECT_EQ(prefetched, fits) << "budget " << budget;
    any = any || prefetched;
    EXPECT_LE(r.gpu_peak_bytes, budget);
    EXPECT_EQ(r.rgb, plain.rgb) << "budget " << budget;
  }
  EXPECT_TRUE(any) << "the largest budget holds both";
}

// Weights uploaded by reading the files (pread into the pinned ring, ZI_UPLOAD_READ=1) instead of
// copying from their mappings: the same image, byte for byte, both precisions (issue 19).
TEST(CudaPipeline, UploadByReadGivesTheSameBits) {
  ZI_REQUIRE_GPU();
  for (DType act : kActs) {
    GenerateOptions o = options_for_case("turbo");
    o.precision = act;
    const GenerateResult mapped = generate(o);
    ::setenv("ZI_UPLOAD_READ", "1", 1);
    const GenerateResult read = generate(o);
    ::unsetenv("ZI_UPLOAD_READ");
    EXPECT_EQ(read.rgb, mapped.rgb) << dtype_name(act);
    EXPECT_GT(read.load_detail[0].upload_bytes, 0) << "the encoder's weights went through the upload";
  }
}

// The tiled VAE decode on the GPU: the pieces against the CPU, and the tiled image against the
// whole one (both on the GPU; the tiles see whole-image GroupNorm statistics, so only rounding
// differs).
TEST(CudaVae, TiledDecodeMatchesWhole) {
  ZI_REQUIRE_GPU();
  const Tensor x = rnd({8, 9, 11}, 310);
  const std::vector<double> sc = ops::group_region_sums(x, 4, 2, 7, 3, 11);
  const std::vector<double> sg = ops::group_region_sums(gpu(x, DType::F32), 4, 2, 7, 3, 11);
  for (size_t g = 0; g < sc.size(); ++g) EXPECT_NEAR(sg[g], sc[g], 1e-9 * (1 + std::fabs(sc[g])));
  const Tensor w = rnd({8}, 311), b = rnd({8}, 312);
  const std::vector<float> mean{0.1f, -0.2f, 0.3f, 0.0f}, rstd{1.5f, 0.7f, 1.0f, 2.0f};
  for (DType act : kActs) {
    Tensor c = rounded(x, act), d = gpu(x, act);
    ops::group_norm_given_(c, 4, mean, rstd, w, b);
    ops::group_norm_given_(d, 4, mean, rstd, w.to_device(Device::CUDA), b.to_device(Device::CUDA));
    expect_close(d, c, act, "group_norm_given_");
    Tensor pc = Tensor::zeros({8, 12, 14}, DType::F32), pd = gpu(Tensor::zeros({8, 12, 14}, DType::F32), act);
    ops::paste_(pc, rounded(x, act).slice(1, 2, 7).slice(2, 3, 11), 4, 5);
    ops::paste_(pd, gpu(x, act).slice(1, 2, 7).slice(2, 3, 11), 4, 5);
    EXPECT_EQ(test::max_abs_diff(host(pd), pc), 0.0) << "paste_ " << dtype_name(act);
  }

  const ModelFolder mf = open_model_folder(tiny_model_dir());
  TensorStore store = TensorStore::open_dir(mf.vae_dir);
  const Tensor z = rnd({16, 40, 24}, 313);
  for (DType act : kActs) {
    WeightLoader loader(store, Tag::VaeWeights, "vae", PhaseContext::on(Device::CUDA, act));
    const VaeDecoder m = load_vae_decoder(loader, mf.vae, DType::BF16);
    loader.finish();
    const Tensor whole = vae_decode(m, z), tiled = vae_decode_tiled(m, z, 16, 0);  // 3 × 2 tiles
    ASSERT_EQ(tiled.shape(), whole.shape());
    const double rel = rel_l2(tiled, whole);
    std::printf("gpu vae tiled vs whole (%s): rel L2 %.3g, max |diff| %.3g\n", dtype_name(act), rel,
                test::max_abs_diff(tiled, whole));
    EXPECT_LT(rel, act == DType::F32 ? 1e-5 : 3e-2) << dtype_name(act);  // bf16: 1.4 % on an H200
  }
}
