// Weight formats (core/quant.h), the GGUF reader (io/gguf.h) and the quantized linear
// (backends/cpu/quant_gemm.cpp). Fixtures: tests/data/gguf, made by the gguf Python package
// (tests/data/makers/make_gguf_fixtures.py).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "backends/cpu/cpu_ops.h"
#include "core/parallel.h"
#include "core/quant.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "ops/ops.h"
#include "pipeline/pipeline.h"

using namespace zi;
namespace fs = std::filesystem;

namespace {

const std::string kDir = std::string(ZI_TEST_DATA) + "/gguf/";

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

Tensor randn(const Shape& s, float scale, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  Tensor t = Tensor::empty(s, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = nd(g) * scale;
  return t;
}

double rel_l2(const Tensor& a, const Tensor& b) {
  double e = 0, n = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = double(a.f32()[i]) - b.f32()[i];
    e += d * d;
    n += double(b.f32()[i]) * b.f32()[i];
  }
  return std::sqrt(e / n);
}

}  // namespace

// Every block type's dequantized values equal gguf.quants.dequantize's, bit for bit.
TEST(Quant, DequantizeEqualsGgufPackage) {
  SafetensorsFile g = SafetensorsFile::open(kDir + "quant_types.gguf");
  SafetensorsFile ex = SafetensorsFile::open(kDir + "quant_expected.safetensors");
  ASSERT_TRUE(g.is_gguf());
  int checked = 0;
  for (const char* name : {"Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "F32", "F16", "BF16"}) {
    const TensorInfo* t = g.find(name);
    ASSERT_NE(t, nullptr) << name;
    Tensor got = g.load(*t, DType::F32);
    Tensor want = ex.load(name, DType::F32);
    ASSERT_EQ(got.shape(), want.shape()) << name;
    EXPECT_TRUE(bit_equal(got, want)) << name << " dequantized values differ from gguf.quants";
    // The kept format dequantizes to the same values too (the path the models use).
    if (t->quantized()) {
      Tensor q = g.load(*t, t->format);
      EXPECT_EQ(q.dtype(), t->format);
      EXPECT_TRUE(bit_equal(quant::dequantize(q), want)) << name;
    }
    ++checked;
  }
  EXPECT_EQ(checked, 10);
}

// zimage's load-time quantizers give the bytes of gguf.quants.quantize (ggml's reference).
TEST(Quant, QuantizeEqualsGgufPackage) {
  SafetensorsFile g = SafetensorsFile::open(kDir + "quant_types.gguf");
  SafetensorsFile ex = SafetensorsFile::open(kDir + "quant_expected.safetensors");
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q5_0}) {
    std::string name = dtype_name(t);
    for (char& c : name) c = char(std::toupper(c));
    Tensor src = ex.load("src." + name, DType::F32);
    Tensor mine = quant::quantize(src, t, Tag::Workspace);
    const TensorInfo* gt = g.find(name);
    ASSERT_NE(gt, nullptr);
    ASSERT_EQ(mine.nbytes(), gt->nbytes());
    EXPECT_EQ(std::memcmp(mine.raw(), g.data(*gt), mine.nbytes()), 0) << name << " bytes differ from gguf.quants";
  }
}

// fp8: every finite e4m3 code round-trips, and encoding rounds like torch's float8_e4m3fn.
TEST(Quant, Fp8MatchesTorch) {
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7F) == 0x7F) continue;  // NaN
    EXPECT_EQ(quant::f32_to_e4m3(quant::e4m3_to_f32(uint8_t(b))), b == 0x80 ? 0x80 : b) << b;
  }
  EXPECT_EQ(quant::e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(quant::e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  SafetensorsFile ex = SafetensorsFile::open(kDir + "quant_expected.safetensors");
  Tensor src = ex.load("fp8.src", DType::F32);
  const TensorInfo* bt = ex.find("fp8.bytes");
  ASSERT_NE(bt, nullptr);
  const uint8_t* want = ex.data(*bt);
  int bad = 0;
  for (int64_t i = 0; i < src.numel(); ++i) bad += quant::f32_to_e4m3(src.f32()[i]) != want[i];
  EXPECT_EQ(bad, 0) << "of " << src.numel();
}

// The quantized linear: the dequant path equals an f32 GEMM on the dequantized weights (to
// rounding of the GEMM's blocking); the int8 path is within the activation quantization error;
// both are bit-identical for 1 and 2 threads.
TEST(Quant, LinearPaths) {
  const int64_t M = 37, K = 512, N = 96;
  Tensor x = randn({M, K}, 1.0f, 1), w = randn({N, K}, 0.05f, 2);
  Tensor bias = randn({N}, 0.1f, 3);
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q5_0, DType::F8_E4M3}) {
    SCOPED_TRACE(dtype_name(t));
    Tensor q = quant::quantize(w, t, Tag::Workspace);
    Tensor wf = quant::dequantize(q);
    Tensor ref = Tensor::empty({M, N}, DType::F32);
    cpu::linear(x, wf, &bias, ref);
    // The weight error itself: Q8_0 ≈ 0.4 %, Q4_0 ≈ 10 %, fp8 ≈ 2.5 % (normal weights).
    Tensor exact = Tensor::empty({M, N}, DType::F32);
    cpu::linear(x, w, &bias, exact);
    const double werr = rel_l2(ref, exact);
    EXPECT_LT(werr, t == DType::Q4_0 ? 0.12 : t == DType::Q5_0 ? 0.06 : 0.04);
    Tensor y1 = Tensor::empty({M, N}, DType::F32), y2 = Tensor::empty({M, N}, DType::F32);
    set_num_threads(1);
    cpu::linear_quant(x, q, &bias, y1, cpu::QuantPath::Dequant);
    set_num_threads(2);
    cpu::linear_quant(x, q, &bias, y2, cpu::QuantPath::Dequant);
    EXPECT_TRUE(bit_equal(y1, y2));
    EXPECT_LT(rel_l2(y1, ref), 1e-6);
    if (cpu::quant_int8_available(t)) {
      set_num_threads(1);
      cpu::linear_quant(x, q, &bias, y1, cpu::QuantPath::Int8);
      set_num_threads(2);
      cpu::linear_quant(x, q, &bias, y2, cpu::QuantPath::Int8);
      EXPECT_TRUE(bit_equal(y1, y2));
      const double e = rel_l2(y1, ref);
      EXPECT_LT(e, 0.01) << "int8 path vs dequantized weights";
      EXPECT_GT(e, 0.0);  // it does quantize the activations
    }
    // Through ops::linear (the models' entry point).
    Tensor y = ops::linear(x, q, &bias);
    EXPECT_LT(rel_l2(y, ref), 0.01);
  }
  set_num_threads(0);
}

TEST(Quant, QwenNamesFromLlama) {
  EXPECT_EQ(qwen3_name_from_llama("token_embd.weight"), "embed_tokens.weight");
  EXPECT_EQ(qwen3_name_from_llama("blk.12.attn_q.weight"), "layers.12.self_attn.q_proj.weight");
  EXPECT_EQ(qwen3_name_from_llama("blk.0.ffn_norm.weight"), "layers.0.post_attention_layernorm.weight");
  EXPECT_EQ(qwen3_name_from_llama("blk.3.attn_k_norm.weight"), "layers.3.self_attn.k_norm.weight");
  EXPECT_EQ(qwen3_name_from_llama("blk.x.attn_q.weight"), "");
  EXPECT_EQ(qwen3_name_from_llama("something"), "");
}
