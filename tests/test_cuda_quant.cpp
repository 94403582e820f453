// Weight formats on the GPU (backends/cuda/quant.cu), against the CPU's dequantized weights:
// every format's linear in f32 activations within relative L2 1e-5 of an f32 GEMM on the CPU's
// dequantized values (the dequantized values are equal; only the summation order differs), in
// bf16 within 1e-2; and the tiny pipeline with GGUF weights on the GPU against the same run on
// the CPU. Skips without a GPU (ctest -L gpu runs it).
//
// The fp8 tensor-core path (quant.cu try_linear_fp8 + gemm_cublaslt.cpp linear_fp8, where
// cuBLASLt has an fp8 kernel: compute capability ≥ 8.9) quantizes the activation to e4m3 (per
// row with outer-vector scales, over the whole tensor with the alpha-vector or scalar scaling;
// each scaling cuBLASLt offers is run), so it is checked against a CPU reference made with the
// same quantized activation
// (rel L2 1e-2: only the bf16 output rounding and summation order differ), against the dequant
// path (rel L2 6e-2: e4m3 rounding of the activation, ≤ 2⁻⁴ relative per element, ≈ 3.6 % rms),
// through an identity weight (each output is one quantized activation value: equal to the CPU's
// e4m3 quantization within one bf16 rounding), and end to end on the tiny model. The fast
// dequant kernels (Q8_0, Q4_0, fp8 into bf16) must give the per-block kernels' result bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <tuple>

#include "backends/cpu/cpu_ops.h"
#include "backends/cuda/cuda_ops.h"
#include "core/quant.h"
#include "io/safetensors.h"
#include "ops/ops.h"
#include "pipeline/pipeline.h"
#include "fixture_cases.h"
#include "test_util.h"

using namespace zi;

namespace {

#define ZI_NEED_GPU() \
  if (!cuda::available()) GTEST_SKIP() << "no CUDA GPU"

using test::randn;
using test::rel_l2;

std::string data_dir() {
  const char* e = std::getenv("ZI_TEST_DATA_DIR");
  return e ? e : ZI_TEST_DATA;
}
std::string tiny_model_dir() {
  const char* e = std::getenv("ZI_TINY_MODEL_DIR");
  return e ? e : ZI_TINY_MODEL;
}

bool fp8_tensor_cores() { return cuda::compute_capability() >= 89; }

// x [M, K] f32 → quantized like quant.cu's activation quantization (bf16 first, then scale =
// max|x| / 448 per row, or over the whole tensor, e4m3 = rne(x / scale)), returned dequantized
// in f32.
Tensor quantize_act_ref(const Tensor& x, bool per_row) {
  Tensor xb = x.to(DType::BF16).to(DType::F32);
  const int64_t M = x.dim(0), K = x.dim(1);
  Tensor out = Tensor::empty({M, K}, DType::F32);
  float all = 0;
  for (int64_t i = 0; i < M * K; ++i) all = std::max(all, std::fabs(xb.f32()[i]));
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xb.f32() + m * K;
    float mx = all;
    if (per_row) {
      mx = 0;
      for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::fabs(r[k]));
    }
    const float s = mx > 0 ? mx / 448.0f : 1.0f;
    for (int64_t k = 0; k < K; ++k) out.f32()[m * K + k] = quant::e4m3_to_f32(quant::f32_to_e4m3(r[k] / s)) * s;
  }
  return out;
}

// The reference for the latest fp8 GEMM's activation quantization.
Tensor quantize_like_last_fp8(const Tensor& x) {
  return quantize_act_ref(x, std::string(cuda::linear_fp8_last_scaling()) == "outer-vector");
}

struct Fp8Reset {
  ~Fp8Reset() {
    cuda::set_e4m3_copies(true);  // the default
    cuda::set_e4m3_only(true);    // the default
    cuda::set_fp8_gemm(true);
    cuda::set_fast_dequant(true);
    cuda::force_fp8_scaling(-2);
  }
};

// The tiny model's turbo fixture case on the GPU, bf16 activations, the transformer in `wdt`:
// the final latents (host f32) and the run's result.
std::pair<Tensor, GenerateResult> tiny_on_gpu(DType wdt) {
  GenerateOptions o = test::fixture_case_options(data_dir(), tiny_model_dir(), "turbo");
  o.text_encoder_device = o.transformer_device = o.vae_device = Device::CUDA;
  o.precision = DType::BF16;
  o.transformer_dtype = wdt;
  Tensor last;
  GenerateHooks hooks;
  hooks.on_latents = [&](int, const Tensor& lat) { last = ops::to_host_f32(lat).clone(Tag::Workspace); };
  GenerateResult r = generate(o, hooks);
  return {last, std::move(r)};
}

// An environment variable put back as it was (set or unset) at the end of a test that sets it.
struct EnvRestore {
  explicit EnvRestore(const char* name) : name_(name) {
    const char* v = std::getenv(name);
    had_ = v != nullptr;
    if (had_) value_ = v;
  }
  ~EnvRestore() { had_ ? setenv(name_, value_.c_str(), 1) : unsetenv(name_); }
  EnvRestore(const EnvRestore&) = delete;
  EnvRestore& operator=(const EnvRestore&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string value_;
};

constexpr cuda::Fp8Scaling kScalings[] = {cuda::Fp8Scaling::OuterVector, cuda::Fp8Scaling::AlphaVector,
                                          cuda::Fp8Scaling::Scalar};

}  // namespace

TEST(CudaQuant, LinearEveryFormat) {
  ZI_NEED_GPU();
  const int64_t M = 64, K = 512, N = 192;
  Tensor x = randn({M, K}, 1.0f, 1), w = randn({N, K}, 0.05f, 2), bias = randn({N}, 0.1f, 3);
  // Weights made here (Q8_0/Q4_0/Q5_0/fp8) and read from the GGUF fixture (K-quants).
  std::vector<Tensor> ws;
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q5_0, DType::F8_E4M3}) ws.push_back(quant::quantize(w, t, Tag::Workspace));
  SafetensorsFile g = SafetensorsFile::open(std::string(ZI_TEST_DATA) + "/gguf/quant_types.gguf");
  for (const char* n : {"Q4_K", "Q5_K", "Q6_K", "Q3_K"}) ws.push_back(g.load(*g.find(n), g.find(n)->format));
  for (const Tensor& q : ws) {
    SCOPED_TRACE(q.desc());
    const int64_t k = q.dim(1);
    Tensor xk = k == K ? x : randn({M, k}, 1.0f, 4);
    Tensor bq = bias.slice(0, 0, std::min<int64_t>(N, q.dim(0))).contiguous();
    Tensor ref = Tensor::empty({M, q.dim(0)}, DType::F32);
    cpu::linear(xk, quant::dequantize(q), &bq, ref);
    Tensor qg = q.to_device(Device::CUDA), bg = bq.to_device(Device::CUDA);
    Tensor y32 = ops::to_host_f32(ops::linear(xk.to_device(Device::CUDA), qg, &bg));
    EXPECT_LT(rel_l2(y32, ref), 1e-5);
    Tensor y16 = ops::to_host_f32(ops::linear(xk.to(DType::BF16).to_device(Device::CUDA), qg, &bg));
    if (std::string(cuda::linear_quant_last_path()) == "fp8") {
      // The activation went through e4m3 too: the reference quantizes it the same way.
      Tensor ref8 = Tensor::empty({M, q.dim(0)}, DType::F32);
      cpu::linear(quantize_like_last_fp8(xk), quant::dequantize(q), &bq, ref8);
      EXPECT_LT(rel_l2(y16, ref8), 1e-2);
      EXPECT_LT(rel_l2(y16, ref), 6e-2);
    } else {
      EXPECT_LT(rel_l2(y16, ref), 1e-2);
    }
  }
}

// On sm_89+ the fp8 weight with bf16 activations takes the tensor-core path (the shapes of the
// DiT's big GEMMs: M a multiple of 16, no bias; M = 1 and biases where cuBLASLt allows); it
// agrees with the dequant path within the activation's e4m3 rounding.
TEST(CudaQuant, Fp8TensorCoresMatchDequantPath) {
  ZI_NEED_GPU();
  if (!fp8_tensor_cores()) GTEST_SKIP() << "no fp8 tensor cores (compute capability < 8.9)";
  Fp8Reset reset;
  struct Case {
    int64_t M, N, K;
    bool bias;
  };
  int big_on_tensor_cores = 0;
  for (cuda::Fp8Scaling sc : kScalings) {
    cuda::force_fp8_scaling(int(sc));
    for (Case c : {Case{1, 256, 128, true}, Case{37, 384, 256, false}, Case{208, 512, 384, true},
                   Case{1024, 1024, 640, false}, Case{1029, 512, 256, false}}) {
      SCOPED_TRACE(str_cat(cuda::fp8_scaling_name(sc), " M=", c.M, " N=", c.N, " K=", c.K, " bias=", c.bias));
      Tensor x = randn({c.M, c.K}, 1.0f, 11), w = randn({c.N, c.K}, 0.05f, 12), bias = randn({c.N}, 0.1f, 13);
      // One outlier column per row so the per-token scales differ widely.
      for (int64_t m = 0; m < c.M; ++m) x.f32()[m * c.K + (m % c.K)] *= float(1 + m % 7) * 4.0f;
      Tensor qg = quant::quantize(w, DType::F8_E4M3, Tag::Workspace).to_device(Device::CUDA);
      Tensor xg = x.to(DType::BF16).to_device(Device::CUDA), bg = bias.to(DType::BF16).to_device(Device::CUDA);
      cuda::set_fp8_gemm(true);
      Tensor y8 = ops::to_host_f32(ops::linear(xg, qg, c.bias ? &bg : nullptr));
      const std::string path = cuda::linear_quant_last_path();
      if (path != "fp8") {
        std::printf("fp8 GEMM %s M=%lld bias=%d: dequant path taken (%s)\n", cuda::fp8_scaling_name(sc),
                    (long long)c.M, int(c.bias), cuda::linear_fp8_last_refusal().c_str());
        continue;
      }
      ASSERT_STREQ(cuda::linear_fp8_last_scaling(), cuda::fp8_scaling_name(sc));
      if (c.M % 16 == 0 && !c.bias) ++big_on_tensor_cores;
      cuda::set_fp8_gemm(false);
      Tensor yd = ops::to_host_f32(ops::linear(xg, qg, c.bias ? &bg : nullptr));
      ASSERT_STREQ(cuda::linear_quant_last_path(), "dequant");
      Tensor ref8 = Tensor::empty({c.M, c.N}, DType::F32);
      Tensor bref = bias.to(DType::BF16).to(DType::F32);
      cpu::linear(quantize_act_ref(x, sc == cuda::Fp8Scaling::OuterVector),
                  quant::dequantize(qg.to_device(Device::CPU)), c.bias ? &bref : nullptr, ref8);
      const double e_ref = rel_l2(y8, ref8), e_deq = rel_l2(y8, yd);
      std::printf("fp8 GEMM %s M=%lld N=%lld K=%lld: rel L2 %.3g vs quantized-activation reference, %.3g vs dequant "
                  "path\n",
                  cuda::fp8_scaling_name(sc), (long long)c.M, (long long)c.N, (long long)c.K, e_ref, e_deq);
      EXPECT_LT(e_ref, 1e-2);
      // Per-tensor activation scales leave small rows fewer significant bits: ≤ 2⁻⁴ relative
      // per element still (e4m3 is floating point), plus subnormals for rows ≪ the outliers.
      EXPECT_LT(e_deq, 6e-2);
    }
  }
  // The DiT's big GEMMs (M a multiple of 16, no bias) must run on the fp8 tensor cores with at
  // least one scaling: that is what the fp8 format is for.
  EXPECT_GT(big_on_tensor_cores, 0) << "cuBLASLt ran no fp8 GEMM with any scaling";
}

// Identity weight (e4m3 1.0, scale 1): each output is one activation value after the e4m3
// quantization, so the producer's bytes and scales are checked one by one (and the scales'
// orientation: a swapped A/B scale would scale columns, not rows), for each scaling.
TEST(CudaQuant, Fp8ActivationQuantizationMatchesCpu) {
  ZI_NEED_GPU();
  if (!fp8_tensor_cores()) GTEST_SKIP() << "no fp8 tensor cores (compute capability < 8.9)";
  Fp8Reset reset;
  cuda::set_fp8_gemm(true);
  const int64_t M = 48, K = 256;
  Tensor x = randn({M, K}, 1.0f, 21);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x.f32()[m * K + k] *= std::ldexp(1.0f, int(m % 9) - 4);
  for (int64_t k = 0; k < K; ++k) x.f32()[5 * K + k] = 0.0f;  // a zero row: scale 1, zeros out
  Tensor eye = Tensor::empty({K, K}, DType::F32);
  for (int64_t i = 0; i < K * K; ++i) eye.f32()[i] = (i / K == i % K) ? 1.0f : 0.0f;
  // Per-channel scales that differ (2^c, exact): a channel pass or alpha vector that misses or
  // misplaces them shows.
  for (int64_t i = 0; i < K * K; ++i) eye.f32()[i] *= std::ldexp(1.0f, int((i / K) % 5) - 2);
  Tensor qg = quant::quantize(eye, DType::F8_E4M3, Tag::Workspace).to_device(Device::CUDA);
  Tensor xg = x.to(DType::BF16).to_device(Device::CUDA);
  int ran = 0;
  for (cuda::Fp8Scaling sc : kScalings) {
    SCOPED_TRACE(cuda::fp8_scaling_name(sc));
    cuda::force_fp8_scaling(int(sc));
    Tensor y = ops::to_host_f32(ops::linear(xg, qg));
    if (std::string(cuda::linear_quant_last_path()) != "fp8") {
      std::printf("fp8 %s: dequant path taken (%s)\n", cuda::fp8_scaling_name(sc),
                  cuda::linear_fp8_last_refusal().c_str());
      continue;
    }
    ++ran;
    Tensor want = quantize_act_ref(x, sc == cuda::Fp8Scaling::OuterVector);
    int64_t bad = 0;
    for (int64_t i = 0; i < M * K; ++i) {
      const float a = y.f32()[i], b = want.f32()[i] * std::ldexp(1.0f, int((i % K) % 5) - 2);
      if (std::fabs(a - b) > std::fabs(b) * (1.0f / 128.0f)) ++bad;  // bf16 rounding (twice: the channel pass)
    }
    EXPECT_EQ(bad, 0);
  }
  EXPECT_GT(ran, 0) << "cuBLASLt ran no fp8 GEMM with any scaling";
}

// The bandwidth-bound dequant kernels give the per-block kernels' bf16 weights: same GEMM, same
// output bit for bit.
TEST(CudaQuant, FastDequantEqualsBlockKernels) {
  ZI_NEED_GPU();
  Fp8Reset reset;
  cuda::set_fp8_gemm(false);
  const int64_t M = 40, K = 1024, N = 96;
  Tensor x = randn({M, K}, 1.0f, 31).to(DType::BF16).to_device(Device::CUDA), w = randn({N, K}, 0.05f, 32);
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::F8_E4M3}) {
    SCOPED_TRACE(dtype_name(t));
    Tensor qg = quant::quantize(w, t, Tag::Workspace).to_device(Device::CUDA);
    cuda::set_fast_dequant(true);
    Tensor a = ops::to_host_f32(ops::linear(x, qg));
    cuda::set_fast_dequant(false);
    Tensor b = ops::to_host_f32(ops::linear(x, qg));
    ASSERT_EQ(a.numel(), b.numel());
    EXPECT_EQ(std::memcmp(a.f32(), b.f32(), size_t(a.numel()) * 4), 0);
  }
}

// The producers that write their output's e4m3 copy (rms_norm, silu_mul, silu_mul_halves with
// e4m3_for; the DiT's inputs of q/k/v, w1/w3 and w2) give the same bf16 output as the plain op
// and the same bytes to the fp8 GEMM as its own quantization pass: the GEMM results are equal
// bit for bit, at the DiT's widths (3840, 10240) and at small ones (other register layouts),
// with zero rows and outliers. An op writing into the output in place drops the copy.
TEST(CudaQuant, ProducersE4m3CopyGivesTheSameGemm) {
  ZI_NEED_GPU();
  if (!fp8_tensor_cores()) GTEST_SKIP() << "no fp8 tensor cores (compute capability < 8.9)";
  Fp8Reset reset;
  cuda::set_fp8_gemm(true);
  cuda::set_e4m3_copies(true);
  cuda::force_fp8_scaling(int(cuda::Fp8Scaling::OuterVector));
  auto bytes_equal = [](const Tensor& a, const Tensor& b) {
    Tensor ha = a.to_device(Device::CPU), hb = b.to_device(Device::CPU);
    return ha.nbytes() == hb.nbytes() && std::memcmp(ha.raw(), hb.raw(), ha.nbytes()) == 0;
  };
  // rows × width bf16 with a zero row and one outlier per row (per-row scales differ).
  auto act = [](int64_t M, int64_t K, uint32_t seed) {
    Tensor x = randn({M, K}, 1.0f, seed);
    for (int64_t m = 0; m < M; ++m) x.f32()[m * K + (m * 7) % K] *= float(1 + m % 5) * 8.0f;
    for (int64_t k = 0; k < K; ++k) x.f32()[3 * K + k] = 0.0f;
    return x.to(DType::BF16).to_device(Device::CUDA);
  };
  auto fp8_weight = [](int64_t N, int64_t K, uint32_t seed) {
    return quant::quantize(randn({N, K}, 0.05f, seed), DType::F8_E4M3, Tag::Workspace).to_device(Device::CUDA);
  };
  // out = linear(y, w) with y's copy, against linear on the plain op's output.
  auto check = [&](const Tensor& plain, Tensor fused, const Tensor& w) {
    ASSERT_NE(fused.e4m3_copy(), nullptr) << "the producer wrote no e4m3 copy";
    EXPECT_EQ(plain.e4m3_copy(), nullptr);
    EXPECT_TRUE(bytes_equal(plain, fused)) << "the bf16 output differs from the plain op's";
    const int64_t used = cuda::linear_fp8_copies_used();
    Tensor y_plain = ops::linear(plain, w);
    ASSERT_STREQ(cuda::linear_quant_last_path(), "fp8") << cuda::linear_fp8_last_refusal();
    EXPECT_EQ(cuda::linear_fp8_copies_used(), used);
    Tensor y_fused = ops::linear(fused, w);
    ASSERT_STREQ(cuda::linear_quant_last_path(), "fp8") << cuda::linear_fp8_last_refusal();
    EXPECT_EQ(cuda::linear_fp8_copies_used(), used + 1) << "the GEMM did not read the copy";
    EXPECT_TRUE(bytes_equal(y_plain, y_fused)) << "the GEMM on the copy differs from the GEMM on its own pass";
    ops::scale_(fused, 2.0f);
    EXPECT_EQ(fused.e4m3_copy(), nullptr) << "an in-place op kept a stale copy";
  };
  // The same producer told its readers are fp8 GEMMs alone: the copy only, the same GEMM result,
  // and its copy's bytes and scales equal to those written beside the bf16 values.
  auto check_only = [&](const Tensor& with_values, const Tensor& only, const Tensor& w) {
    ASSERT_TRUE(only.values_in_e4m3_copy_only()) << "the producer kept its bf16 values";
    ASSERT_NE(with_values.e4m3_copy(), nullptr);
    EXPECT_FALSE(with_values.values_in_e4m3_copy_only());
    EXPECT_TRUE(bytes_equal(*with_values.e4m3_copy(), *only.e4m3_copy()));
    EXPECT_TRUE(bytes_equal(*with_values.e4m3_copy()->row_scale(), *only.e4m3_copy()->row_scale()));
    Tensor y_values = ops::linear(with_values, w), y_only = ops::linear(only, w);
    EXPECT_TRUE(bytes_equal(y_values, y_only)) << "the GEMM on a copy-only input differs";
  };
  for (int64_t D : {int64_t(256), int64_t(1024), int64_t(3840)}) {
    SCOPED_TRACE(str_cat("rms_norm D=", D));
    const int64_t M = 203;
    Tensor x = act(M, D, 41);
    Tensor nw = randn({D}, 0.5f, 42).to_device(Device::CUDA), sc = randn({D}, 1.0f, 43).to_device(Device::CUDA);
    Tensor w = fp8_weight(128, D, 44);
    for (const Tensor* scale : std::initializer_list<const Tensor*>{nullptr, &sc}) {
      check(ops::rms_norm(x, nw, 1e-6f, scale), ops::rms_norm(x, nw, 1e-6f, scale, &w), w);
      cuda::set_e4m3_only(true);
      check_only(ops::rms_norm(x, nw, 1e-6f, scale, &w), ops::rms_norm(x, nw, 1e-6f, scale, &w, true), w);
      cuda::set_e4m3_only(false);
      EXPECT_FALSE(ops::rms_norm(x, nw, 1e-6f, scale, &w, true).values_in_e4m3_copy_only()) << "switched off";
    }
  }
  for (int64_t F : {int64_t(160), int64_t(2048), int64_t(10240)}) {
    SCOPED_TRACE(str_cat("silu_mul F=", F));
    const int64_t M = 75;
    Tensor a = act(M, F, 51), b = act(M, F, 52), gu = act(M, 2 * F, 53);
    Tensor w = fp8_weight(64, F, 54);
    check(ops::silu_mul(a, b), ops::silu_mul(a, b, &w), w);
    check(ops::silu_mul_halves(gu), ops::silu_mul_halves(gu, &w), w);
    cuda::set_e4m3_only(true);
    check_only(ops::silu_mul(a, b, &w), ops::silu_mul(a, b, &w, true), w);
    check_only(ops::silu_mul_halves(gu, &w), ops::silu_mul_halves(gu, &w, true), w);
    cuda::set_e4m3_only(false);
  }
  {  // A copy-only input reaching a linear that cannot read its copy: a clear error, no garbage.
    cuda::set_e4m3_only(true);
    Tensor x = act(16, 256, 71), nw = randn({256}, 0.5f, 72).to_device(Device::CUDA);
    Tensor w8 = fp8_weight(64, 256, 73);
    Tensor only = ops::rms_norm(x, nw, 1e-6f, nullptr, &w8, true);
    ASSERT_TRUE(only.values_in_e4m3_copy_only());
    Tensor wb = randn({64, 256}, 0.05f, 74).to(DType::BF16).to_device(Device::CUDA);
    EXPECT_THROW(ops::linear(only, wb), Error);
    EXPECT_THROW(ops::silu_mul(only, only), Error);
    EXPECT_THROW(ops::scale_(only, 2.0f), Error);
    cuda::force_fp8_scaling(int(cuda::Fp8Scaling::Scalar));
    EXPECT_THROW(ops::linear(only, w8), Error);
    cuda::force_fp8_scaling(int(cuda::Fp8Scaling::OuterVector));
    // Where the GEMM would not read the copy, the producer keeps its values.
    cuda::force_fp8_scaling(int(cuda::Fp8Scaling::Scalar));
    EXPECT_FALSE(ops::rms_norm(x, nw, 1e-6f, nullptr, &w8, true).values_in_e4m3_copy_only());
    cuda::force_fp8_scaling(int(cuda::Fp8Scaling::OuterVector));
    cuda::set_e4m3_only(false);
  }
  // A bf16 consumer weight, or f32 activations: no copy.
  Tensor x = act(8, 256, 61), nw = randn({256}, 0.5f, 62).to_device(Device::CUDA);
  Tensor wb = randn({64, 256}, 0.05f, 63).to(DType::BF16).to_device(Device::CUDA);
  EXPECT_EQ(ops::rms_norm(x, nw, 1e-6f, nullptr, &wb).e4m3_copy(), nullptr);
  Tensor w8 = fp8_weight(64, 256, 64);
  EXPECT_EQ(ops::rms_norm(x.to(DType::F32), nw, 1e-6f, nullptr, &w8).e4m3_copy(), nullptr);
}

// The tiny model end to end in bf16 on the GPU: fp8 transformer weights (the tensor-core path
// where the shapes allow it, the dequant path for the rest) against bf16 weights, and against
// the same fp8 weights through the dequant path only.
TEST(CudaQuant, TinyPipelineFp8VsBf16) {
  ZI_NEED_GPU();
  Fp8Reset reset;
  auto run = [&](DType wdt, bool fp8_gemm) {
    cuda::set_fp8_gemm(fp8_gemm);
    auto [last, r] = tiny_on_gpu(wdt);
    int64_t dit_bytes = -1;  // the denoise phase's weights on the GPU
    for (const auto& p : r.gpu_phases)
      if (p.name == "denoise") dit_bytes = p.weights_bytes;
    return std::make_tuple(last, r.rgb, dit_bytes);
  };
  auto [lb, ib, wb] = run(DType::BF16, true);
  auto [l8, i8, w8] = run(DType::F8_E4M3, true);
  auto [ld, id, wd] = run(DType::F8_E4M3, false);
  // fp8 holds the matrices in one byte per value (plus a scale per row) instead of two.
  std::printf("tiny turbo, denoise weights on the GPU: bf16 %lld B, fp8 %lld B\n", (long long)wb, (long long)w8);
  EXPECT_GT(w8, 0);
  EXPECT_LT(double(w8), 0.75 * double(wb));
  EXPECT_EQ(w8, wd);
  auto mean_diff = [](const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += std::abs(int(a[i]) - int(b[i]));
    return s / double(a.size());
  };
  const double e8 = rel_l2(l8, lb), ed = rel_l2(ld, lb), e8d = rel_l2(l8, ld);
  std::printf("tiny turbo, final latents rel L2: fp8 tensor cores vs bf16 %.3g, fp8 dequant vs bf16 %.3g, "
              "tensor cores vs dequant %.3g; image mean |diff| vs bf16 %.2f / %.2f (of 255)\n",
              e8, ed, e8d, mean_diff(i8, ib), mean_diff(id, ib));
  // Bounds: fp8 weights alone cost ≈ 0.04 on this model (BENCHMARKS.md, CPU); the e4m3
  // activations add about as much again. A wrong scale or layout gives errors near 1.
  EXPECT_LT(ed, 0.1);
  EXPECT_LT(e8, 0.15);
  EXPECT_LT(e8d, 0.12);
  EXPECT_LE(mean_diff(i8, ib), 6.0);
}

// e4m3-only producers (ZI_E4M3_ONLY) change nothing but the bf16 writes nobody reads: the fp8
// tiny model's latents and image are bit for bit those with the bf16 values kept, with the
// fused projections and without.
TEST(CudaQuant, E4m3OnlyProducersGiveTheSameImage) {
  ZI_NEED_GPU();
  if (!fp8_tensor_cores()) GTEST_SKIP() << "no fp8 tensor cores (compute capability < 8.9)";
  Fp8Reset reset;
  // The fused projections are chosen at load from ZI_FUSED_PROJECTIONS (zimage_dit.cpp).
  const EnvRestore restore("ZI_FUSED_PROJECTIONS");
  auto run = [&](bool only, bool fused) {
    cuda::set_e4m3_only(only);
    setenv("ZI_FUSED_PROJECTIONS", fused ? "1" : "0", 1);
    const int64_t used = cuda::linear_fp8_copies_used();
    auto [last, r] = tiny_on_gpu(DType::F8_E4M3);
    return std::make_tuple(last, r.rgb, cuda::linear_fp8_copies_used() - used);
  };
  for (bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused projections" : "separate projections");
    auto [lk, ik, uk] = run(false, fused);
    auto [lo, io, uo] = run(true, fused);
    EXPECT_GT(uk, 0) << "no GEMM read a producer's copy: the test exercises nothing";
    EXPECT_EQ(uo, uk);
    EXPECT_EQ(test::max_abs_diff(lo, lk), 0.0);
    EXPECT_TRUE(io == ik) << "the image differs with e4m3-only producers";
  }
}

// The attention residual and the FFN's pre-norm as one kernel (ZI_FUSED_ADD_NORM=1) give the bits
// of the two kernels: the tiny model's latents and image are the same with bf16 weights, and with
// fp8 weights (the fused kernel then also writes the FFN input's e4m3 copy), with e4m3-only
// producers too.
TEST(CudaQuant, FusedResidualAndPreNormGiveTheSameImage) {
  ZI_NEED_GPU();
  Fp8Reset reset;
  const EnvRestore restore("ZI_FUSED_ADD_NORM");
  auto run = [&](DType wdt, bool fused, bool only) {
    cuda::set_e4m3_only(only);
    setenv("ZI_FUSED_ADD_NORM", fused ? "1" : "0", 1);
    auto [last, r] = tiny_on_gpu(wdt);
    return std::make_pair(last, r.rgb);
  };
  std::vector<std::pair<DType, bool>> cases = {{DType::BF16, false}};
  if (fp8_tensor_cores()) cases.insert(cases.end(), {{DType::F8_E4M3, false}, {DType::F8_E4M3, true}});
  for (const auto& [wdt, only] : cases) {
    SCOPED_TRACE(str_cat(dtype_name(wdt), only ? ", e4m3-only producers" : ""));
    auto [lk, ik] = run(wdt, false, only);
    auto [lf, iff] = run(wdt, true, only);
    EXPECT_EQ(test::max_abs_diff(lf, lk), 0.0);
    EXPECT_TRUE(iff == ik) << "the image differs with the fused residual + pre-norm";
  }
}

// ZI_GEMM_TUNE (experiment): timing the heuristic's candidates and keeping the fastest changes
// nothing but the algorithm — bf16 and fp8 linears (with and without bias) agree with the
// untimed plans' results within bf16 rounding, and plans were actually timed. New shapes, so
// that the plans are made here.
TEST(CudaQuant, TunedGemmAlgorithmsAgreeWithTheHeuristicsFirst) {
  ZI_NEED_GPU();
  Fp8Reset reset;
  struct Tuning {
    ~Tuning() { cuda::set_gemm_tuning(false); }
  } tuning;
  struct Case {
    int64_t M, N, K;
    bool bias;
  };
  const Case cases[] = {{77, 528, 272, true}, {1040, 1056, 688, false}};
  std::vector<Tensor> plain;
  auto run = [&](std::vector<Tensor>& out) {
    uint64_t seed = 41;
    for (const Case& c : cases) {
      Tensor x = randn({c.M, c.K}, 1.0f, seed++), w = randn({c.N, c.K}, 0.05f, seed++), b = randn({c.N}, 0.1f, seed++);
      Tensor xg = x.to(DType::BF16).to_device(Device::CUDA), bg = b.to(DType::BF16).to_device(Device::CUDA);
      Tensor wg = w.to(DType::BF16).to_device(Device::CUDA);
      out.push_back(ops::to_host_f32(ops::linear(xg, wg, c.bias ? &bg : nullptr)));
      if (fp8_tensor_cores()) {
        Tensor qg = quant::quantize(w, DType::F8_E4M3, Tag::Workspace).to_device(Device::CUDA);
        out.push_back(ops::to_host_f32(ops::linear(xg, qg, c.bias ? &bg : nullptr)));
      }
    }
  };
  cuda::set_gemm_tuning(false);
  run(plain);
  // The same shapes again with timing on: the plans exist, untimed, and are timed at this launch.
  cuda::set_gemm_tuning(true);
  const int before = cuda::gemm_tuned_plans();
  std::vector<Tensor> tuned;
  run(tuned);
  ASSERT_EQ(tuned.size(), plain.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    const double e = rel_l2(tuned[i], plain[i]);
    std::printf("tuned GEMM %zu: rel L2 %.3g against the heuristic's first algorithm\n", i, e);
    EXPECT_LT(e, 1e-2) << i;
  }
  std::printf("plans timed: %d\n", cuda::gemm_tuned_plans() - before);
  EXPECT_GT(cuda::gemm_tuned_plans(), before) << "no plan had more than one candidate to time";
}
