// Weight formats (core/quant.h), the GGUF reader (io/gguf.h) and the quantized linear
// (backends/cpu/quant_gemm.cpp). Fixtures: tests/data/gguf, made by the gguf Python package
// (tests/data/makers/make_gguf_fixtures.py).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <unistd.h>

#include "backends/cpu/cpu_ops.h"
#include "core/parallel.h"
#include "core/quant.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "io/weight_loader.h"
#include "ops/ops.h"
#include "pipeline/pipeline.h"
#include <nlohmann/json.hpp>
#include "fixture_cases.h"
#include "test_util.h"

using namespace zi;
namespace fs = std::filesystem;

namespace {

const std::string kDir = std::string(ZI_TEST_DATA) + "/gguf/";

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

using test::randn;
using test::rel_l2;

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

// The integer form (scale · q − offset per 16 values) that the CPU's int8 GEMM uses gives the
// dequantized values of every unsigned block format.
TEST(Quant, UnsignedIntegerFormEqualsDequantization) {
  SafetensorsFile g = SafetensorsFile::open(kDir + "quant_types.gguf");
  for (DType t : {DType::Q4_0, DType::Q5_0, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::Q3_K}) {
    SCOPED_TRACE(dtype_name(t));
    std::string name = dtype_name(t);
    for (char& c : name) c = char(std::toupper(c));
    const TensorInfo* ti = g.find(name);
    ASSERT_NE(ti, nullptr);
    Tensor w = g.load(*ti, t);
    Tensor want = quant::dequantize(w);
    const int64_t bs = dtype_block(t), nblocks = w.numel() / bs;
    std::vector<uint8_t> q(static_cast<size_t>(bs));
    std::vector<float> sc(static_cast<size_t>(bs / 16)), off(static_cast<size_t>(bs / 16));
    double worst = 0;
    int64_t top = 0;
    for (int64_t i = 0; i < nblocks; ++i) {
      const uint8_t* blk = static_cast<const uint8_t*>(w.raw()) + size_t(i) * dtype_block_bytes(t);
      ASSERT_TRUE(quant::unpack_block_unsigned(t, blk, q.data(), sc.data(), off.data()));
      for (int64_t j = 0; j < bs; ++j) {
        EXPECT_LE(q[size_t(j)], 63);
        const double v = double(sc[size_t(j / 16)]) * q[size_t(j)] - off[size_t(j / 16)];
        const double ref = want.f32()[i * bs + j];
        worst = std::max(worst, std::fabs(v - ref) / std::max(1e-30, double(std::fabs(sc[size_t(j / 16)]))));
        top = std::max<int64_t>(top, q[size_t(j)]);
      }
    }
    EXPECT_LT(worst, 1e-4) << "in units of the sub-block's scale";
    EXPECT_GT(top, 0);
  }
  uint8_t q[32];
  float sc[2], off[2];
  EXPECT_FALSE(quant::unpack_block_unsigned(DType::Q8_0, nullptr, q, sc, off));
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
  const int64_t M = 37, K = 544, N = 96;  // K = 17 blocks: the int8 kernel's half-vector tail
  Tensor x = randn({M, K}, 1.0f, 1), w = randn({N, K}, 0.05f, 2);
  Tensor bias = randn({N}, 0.1f, 3);
  for (DType t : {DType::Q8_0, DType::Q4_0, DType::Q5_0, DType::F8_E4M3}) {
    SCOPED_TRACE(dtype_name(t));
    Tensor q = quant::quantize(w, t, Tag::Workspace);
    // GGUF files may hold −128 in a Q8_0 block (zimage's quantizer stays within ±127): the int8
    // kernels must take it (AVX2: |−128| is 128 unsigned in vpmaddubsw).
    if (t == DType::Q8_0) static_cast<uint8_t*>(q.raw())[2] = 0x80;
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
    if (cpu::quant_int8_avx2_available(t)) {  // forced here even where VNNI is present
      Tensor a1 = Tensor::empty({M, N}, DType::F32), a2 = Tensor::empty({M, N}, DType::F32);
      set_num_threads(1);
      cpu::linear_quant(x, q, &bias, a1, cpu::QuantPath::Int8Avx2);
      set_num_threads(2);
      cpu::linear_quant(x, q, &bias, a2, cpu::QuantPath::Int8Avx2);
      EXPECT_TRUE(bit_equal(a1, a2));
      const double e = rel_l2(a1, ref);
      EXPECT_LT(e, 0.01) << "AVX2 int8 path vs dequantized weights";
      EXPECT_GT(e, 0.0);
      if (cpu::quant_int8_available(t)) {  // the same integer sums as VNNI: only f32 summation order differs
        cpu::linear_quant(x, q, &bias, y1, cpu::QuantPath::Int8);
        EXPECT_LT(rel_l2(a1, y1), 1e-6) << "AVX2 vs VNNI int8 paths";
      }
      // A row's result does not depend on the rows beside it (a server batch equals single runs):
      // row 33 alone (the last full tile of 4 is rows 32–35) and rows 36.. (the tail) equal the full run's.
      for (int64_t r0 : {int64_t(33), int64_t(36)}) {
        Tensor xs = x.slice(0, r0, r0 + 1).contiguous(), ys = Tensor::empty({1, N}, DType::F32);
        cpu::linear_quant(xs, q, &bias, ys, cpu::QuantPath::Int8Avx2);
        EXPECT_TRUE(bit_equal(ys, a1.slice(0, r0, r0 + 1).contiguous())) << "row " << r0;
      }
    }
    // Through ops::linear (the models' entry point).
    Tensor y = ops::linear(x, q, &bias);
    EXPECT_LT(rel_l2(y, ref), 0.01);
  }
  set_num_threads(0);
}

// The AVX2 activation quantization rounds like roundf (half away from zero), exact halves and
// the float just below one half included.
TEST(Quant, AvxActivationQuantizationIsRoundf) {
  if (!cpu::quant_int8_avx2_available(DType::Q8_0)) GTEST_SKIP() << "no AVX2";
  const int64_t M = 3, K = 96;
  Tensor x = randn({M, K}, 30.0f, 7);
  float* p = x.f32();
  // Row 0, block 0: max 127 makes d = 1, so x / d is x itself.
  const float special[] = {127.0f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 126.5f, -126.5f, 0.49999997f, -0.49999997f,
                           3.4999998f, 0.0f, -0.0f};
  for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); ++i) p[i] = special[i];
  for (int64_t k = 32; k < 64; ++k) p[k] = 0.0f;  // an all-zero block: d = 0
  std::vector<int8_t> q(size_t(M * K));
  std::vector<float> d(size_t(M * K / 32));
  std::vector<int32_t> sum(size_t(M * K / 16));
  cpu::quantize_activation_blocks(p, M, K, q.data(), d.data(), sum.data());
  int bad = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < K / 32; ++b) {
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(p[r * K + b * 32 + j]));
      const float want_d = amax / 127, id = want_d != 0 ? 1.0f / want_d : 0.0f;
      EXPECT_EQ(d[size_t(r * (K / 32) + b)], want_d);
      int32_t want_sum[2] = {0, 0};
      for (int j = 0; j < 32; ++j) {
        const int want = int(std::roundf(p[r * K + b * 32 + j] * id));
        want_sum[j / 16] += want;
        bad += q[size_t(r * K + b * 32 + j)] != want;
      }
      EXPECT_EQ(sum[size_t(r * (K / 16) + 2 * b)], want_sum[0]);
      EXPECT_EQ(sum[size_t(r * (K / 16) + 2 * b + 1)], want_sum[1]);
    }
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(q[1], 1);    // 0.5 → 1
  EXPECT_EQ(q[2], -1);   // −0.5 → −1
  EXPECT_EQ(q[5], 3);    // 2.5 → 3 (nearest-even would give 2)
  EXPECT_EQ(q[9], 0);    // 0.49999997 → 0
}

// Q8_0's load-time quantizer rounds half away from zero like ggml's roundf (exact halves, the
// float just below one half, negative zero).
TEST(Quant, Q8_0RoundsLikeRoundf) {
  Tensor w = Tensor::empty({1, 32}, DType::F32);
  const float v[32] = {127.0f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 126.5f, -126.5f, 0.49999997f, -0.49999997f,
                       3.4999998f, -3.4999998f, 0.0f, -0.0f, 64.5f, -64.5f, 100.25f, -100.75f, 7.0f};
  std::copy(v, v + 32, w.f32());  // max |x| = 127: d = 1, so x / d is x itself
  Tensor q = quant::quantize(w, DType::Q8_0, Tag::Workspace);
  const int8_t* qs = reinterpret_cast<const int8_t*>(static_cast<const uint8_t*>(q.raw()) + 2);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(int(qs[j]), int(std::roundf(v[j]))) << "x = " << v[j];
}

// The K-quants and Q5_0 on the AVX2 int8 path (their integer form, per-16 scales and offsets):
// within the activation rounding of the dequantized-weight GEMM, the same for 1 and 2 threads,
// and a row's result independent of the rows beside it. The gguf package's blocks, 4 rows
// repeated to 12 (one full group of 8 and a part group).
TEST(Quant, KQuantsOnTheAvx2Int8Path) {
  SafetensorsFile g = SafetensorsFile::open(kDir + "quant_types.gguf");
  for (DType t : {DType::Q5_0, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::Q3_K}) {
    SCOPED_TRACE(dtype_name(t));
    if (!cpu::quant_int8_avx2_available(t)) GTEST_SKIP() << "no AVX2";
    std::string name = dtype_name(t);
    for (char& c : name) c = char(std::toupper(c));
    const TensorInfo* ti = g.find(name);
    ASSERT_NE(ti, nullptr);
    Tensor w4 = g.load(*ti, t);
    const int64_t K = w4.dim(1), N = 12, M = 9;
    Tensor w = Tensor::empty({N, K}, t, Tag::Workspace);
    const size_t rb = dtype_bytes(t, K);
    for (int64_t r = 0; r < N; ++r)
      std::memcpy(static_cast<uint8_t*>(w.raw()) + size_t(r) * rb, static_cast<const uint8_t*>(w4.raw()) + size_t(r % 4) * rb, rb);
    Tensor x = randn({M, K}, 1.0f, 11), bias = randn({N}, 0.1f, 12);
    Tensor ref = Tensor::empty({M, N}, DType::F32), a1 = Tensor::empty({M, N}, DType::F32),
           a2 = Tensor::empty({M, N}, DType::F32);
    cpu::linear_quant(x, w, &bias, ref, cpu::QuantPath::Dequant);
    set_num_threads(1);
    cpu::linear_quant(x, w, &bias, a1, cpu::QuantPath::Int8Avx2);
    set_num_threads(2);
    cpu::linear_quant(x, w, &bias, a2, cpu::QuantPath::Int8Avx2);
    EXPECT_TRUE(bit_equal(a1, a2));
    const double e = rel_l2(a1, ref);
    EXPECT_LT(e, 0.01) << "AVX2 int8 path vs dequantized weights";
    EXPECT_GT(e, 0.0);
    Tensor y = ops::linear(x, w, &bias);  // the models' entry point (Auto)
    EXPECT_LT(rel_l2(y, ref), 0.01);
    Tensor xs = x.slice(0, 5, 6).contiguous(), ys = Tensor::empty({1, N}, DType::F32);  // row 5: in the tile of rows 4–7
    cpu::linear_quant(xs, w, &bias, ys, cpu::QuantPath::Int8Avx2);
    EXPECT_TRUE(bit_equal(ys, a1.slice(0, 5, 6).contiguous()));
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

// A GGUF transformer (ComfyUI names, Q8_0) and text encoder (llama.cpp names, Q4_0) made by the
// gguf package from the tiny model give the image of zimage's own load-time quantization.
TEST(Quant, GgufTinyModelEqualsLoadTimeQuantization) {
  const std::string tiny = ZI_TINY_MODEL;
  const fs::path dir = fs::temp_directory_path() / ("zi_gguf_model_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "transformer");
  fs::create_directories(dir / "text_encoder");
  for (const char* d : {"scheduler", "tokenizer", "vae"}) fs::create_directory_symlink(fs::path(tiny) / d, dir / d);
  fs::copy_file(fs::path(tiny) / "model_index.json", dir / "model_index.json");
  fs::copy_file(fs::path(tiny) / "transformer/config.json", dir / "transformer/config.json");
  fs::copy_file(fs::path(tiny) / "text_encoder/config.json", dir / "text_encoder/config.json");
  fs::create_symlink(kDir + "tiny_dit_q8_0.gguf", dir / "transformer/tiny_dit_q8_0.gguf");
  fs::create_symlink(kDir + "tiny_te_q4_0.gguf", dir / "text_encoder/tiny_te_q4_0.gguf");

  GenerateOptions o;
  o.prompt = "a red fox in the snow";
  o.width = o.height = 64;
  o.steps = 2;
  o.seed = 7;
  o.model_dir = dir.string();
  GenerateResult g = generate(o);  // default dtypes: the files' formats are kept
  o.model_dir = tiny;
  o.transformer_dtype = DType::Q8_0;
  o.text_encoder_dtype = DType::Q4_0;
  GenerateResult own = generate(o);
  fs::remove_all(dir);
  ASSERT_EQ(g.rgb.size(), own.rgb.size());
  EXPECT_TRUE(g.rgb == own.rgb);
  EXPECT_TRUE(bit_equal(g.decoded, own.decoded));
  // ... and the quantization did change the image (the test can fail).
  o.transformer_dtype = o.text_encoder_dtype = DType::BF16;
  GenerateResult bf = generate(o);
  EXPECT_FALSE(bit_equal(bf.decoded, own.decoded));
}

namespace {

// A small valid GGUF image built by hand: 2 metadata pairs, tensors "a" (F32 [2, 4]) and
// "b" (Q8_0 [1, 32]), alignment 32.
struct GgufImage {
  std::string bytes;
  size_t pos_version = 4, pos_ntensors = 8, pos_nkv = 16, pos_align_value = 0;
  size_t pos_a_ndims = 0, pos_a_type = 0, pos_a_offset = 0, pos_b_offset = 0, pos_b_type = 0, pos_b_ne0 = 0;
  size_t data_start = 0;
  template <class T>
  void put(T v) { bytes.append(reinterpret_cast<const char*>(&v), sizeof(T)); }
  void str(const std::string& s) { put<uint64_t>(s.size()); bytes += s; }
  GgufImage() {
    bytes = "GGUF";
    put<uint32_t>(3);
    put<uint64_t>(2);
    put<uint64_t>(2);
    str("general.architecture");
    put<uint32_t>(8);
    str("test");
    str("general.alignment");
    put<uint32_t>(4);
    pos_align_value = bytes.size();
    put<uint32_t>(32);
    str("a");
    pos_a_ndims = bytes.size();
    put<uint32_t>(2);
    put<uint64_t>(4);
    put<uint64_t>(2);
    pos_a_type = bytes.size();
    put<uint32_t>(0);
    pos_a_offset = bytes.size();
    put<uint64_t>(0);
    str("b");
    put<uint32_t>(2);
    pos_b_ne0 = bytes.size();
    put<uint64_t>(32);
    put<uint64_t>(1);
    pos_b_type = bytes.size();
    put<uint32_t>(8);
    pos_b_offset = bytes.size();
    put<uint64_t>(32);
    while (bytes.size() % 32) bytes += '\0';
    data_start = bytes.size();
    for (int i = 0; i < 8; ++i) put<float>(float(i));
    bytes.append(32 - 32, '\0');
    const uint16_t d = f32_to_f16(0.5f);
    put<uint16_t>(d);
    for (int i = 0; i < 32; ++i) put<int8_t>(int8_t(i - 16));
  }
  template <class T>
  GgufImage& set(size_t pos, T v) {
    std::memcpy(&bytes[pos], &v, sizeof(T));
    return *this;
  }
};

std::string gguf_error(const std::string& bytes) {
  const std::string path = (fs::temp_directory_path() / ("zi_bad_" + std::to_string(::getpid()) + ".gguf")).string();
  {
    std::ofstream os(path, std::ios::binary);
    os.write(bytes.data(), std::streamsize(bytes.size()));
  }
  std::string msg;
  try {
    SafetensorsFile f = SafetensorsFile::open(path);
    for (const TensorInfo& t : f.tensors()) (void)f.load(t, DType::F32);
  } catch (const Error& e) {
    msg = e.what();
  }
  fs::remove(path);
  return msg;
}

}  // namespace

TEST(Gguf, ValidImageReads) {
  GgufImage g;
  EXPECT_EQ(gguf_error(g.bytes), "");
  GgufParsed p = parse_gguf(reinterpret_cast<const uint8_t*>(g.bytes.data()), g.bytes.size(), "x.gguf");
  ASSERT_EQ(p.tensors.size(), 2u);
  EXPECT_EQ(p.tensors[0].shape, (Shape{2, 4}));
  EXPECT_EQ(p.tensors[1].format, DType::Q8_0);
  EXPECT_EQ(p.metadata.at("general.architecture"), "test");
  EXPECT_EQ(p.data_start, g.data_start);
}

// Every kind of malformed file gives one line naming the file and what is wrong.
TEST(Gguf, MalformedFilesGiveOneLineErrors) {
  struct Case {
    std::string bytes, expect;
  };
  std::vector<Case> cases;
  auto mk = [] { return GgufImage(); };
  {
    auto g = mk();
    g.bytes[0] = 'X';
    cases.push_back({g.bytes, "header length"});  // no GGUF magic: read as a safetensors file
  }
  cases.push_back({mk().set<uint32_t>(4, 1).bytes, "GGUF version 1"});
  cases.push_back({mk().set<uint32_t>(4, 4).bytes, "GGUF version 4"});
  cases.push_back({mk().set<uint64_t>(8, uint64_t(1) << 60).bytes, "tensor count"});
  cases.push_back({mk().set<uint64_t>(16, uint64_t(1) << 60).bytes, "metadata count"});
  cases.push_back({mk().set<uint64_t>(24, uint64_t(1) << 40).bytes, "string of"});
  {
    auto g = mk();
    cases.push_back({g.set<uint32_t>(g.pos_align_value, 24).bytes, "alignment 24"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint32_t>(g.pos_align_value, 0).bytes, "alignment 0"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint32_t>(g.pos_a_ndims, 0).bytes, "0 dimensions"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint32_t>(g.pos_a_type, 99).bytes, "unknown ggml type id 99"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint64_t>(g.pos_a_offset, 8).bytes, "not a multiple of the alignment"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint64_t>(g.pos_b_offset, 1 << 20).bytes, "runs past the end of the data"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint64_t>(g.pos_b_offset, 0).bytes, "overlaps"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint64_t>(g.pos_b_ne0, 48).bytes, "not a multiple of Q8_0's block"});
  }
  {
    auto g = mk();
    cases.push_back({g.set<uint32_t>(g.pos_b_type, 10).bytes, "Q2_K"});  // known to ggml, not to zimage
  }
  {
    auto g = mk();
    cases.push_back({g.bytes.substr(0, g.bytes.size() - 5), "runs past the end of the data"});  // truncated data
  }
  {
    auto g = mk();
    cases.push_back({g.bytes.substr(0, 90), "truncated"});  // truncated header
  }
  {
    auto g = mk();
    // the second tensor renamed to "a": a duplicate
    const size_t pos = g.bytes.find(std::string("\x01\0\0\0\0\0\0\0b", 9));
    ASSERT_NE(pos, std::string::npos);
    g.bytes[pos + 8] = 'a';
    cases.push_back({g.bytes, "appears twice"});
  }
  for (const Case& c : cases) {
    const std::string msg = gguf_error(c.bytes);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "expected '" << c.expect << "' in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_NE(msg.find(".gguf"), std::string::npos) << msg;  // names the file
  }
}

// The quality table of BENCHMARKS.md (tiny fixture cases): each weight format for both the
// transformer and the text encoder against bf16 weights: the final latents' relative L2 and the
// image's PSNR. Bounds are loose (the tiny model's random weights amplify errors), they catch
// a broken format, not a small regression.
TEST(Quant, QualityOnFixtureCases) {
  struct Row {
    DType t;
    double max_rel, min_psnr;
  };
  const Row rows[] = {{DType::Q8_0, 0.05, 30}, {DType::Q5_0, 0.2, 20}, {DType::Q4_0, 0.5, 14}, {DType::F8_E4M3, 0.2, 20}};
  for (const char* name : {"turbo", "cfg"}) {
    GenerateOptions o = test::fixture_case_options(ZI_TEST_DATA, ZI_TINY_MODEL, name);
    auto run = [&](DType t, Tensor* lat) {
      GenerateOptions oo = o;
      oo.transformer_dtype = oo.text_encoder_dtype = t;
      GenerateHooks h;
      h.on_latents = [&](int, const Tensor& l) { *lat = ops::to_host_f32(l).clone(); };
      return generate(oo, h);
    };
    Tensor lb;
    GenerateResult base = run(DType::BF16, &lb);
    for (const Row& r : rows) {
      Tensor lq;
      GenerateResult q = run(r.t, &lq);
      double se = 0;
      for (size_t i = 0; i < q.rgb.size(); ++i) se += (double(q.rgb[i]) - base.rgb[i]) * (double(q.rgb[i]) - base.rgb[i]);
      const double mse = se / double(q.rgb.size());
      const double psnr = mse > 0 ? 10 * std::log10(255.0 * 255.0 / mse) : 99.0;
      const double rel = rel_l2(lq, lb);
      std::printf("quality %-6s %-5s latents rel L2 %.4f  image PSNR %.2f dB\n", name, dtype_name(r.t), rel, psnr);
      EXPECT_LT(rel, r.max_rel) << name << " " << dtype_name(r.t);
      EXPECT_GT(psnr, r.min_psnr) << name << " " << dtype_name(r.t);
      EXPECT_GT(rel, 0.0);
    }
  }
}

// ComfyUI fp8 safetensors: F8_E4M3 weights kept in fp8 for a block matrix, with the per-tensor
// `scale_weight` multiplying the values; without one the scale is 1; other loads widen.
TEST(Quant, ComfyFp8Safetensors) {
  const std::string path = (fs::temp_directory_path() / ("zi_fp8_" + std::to_string(::getpid()) + ".safetensors")).string();
  Tensor w8 = Tensor::empty({4, 32}, DType::F8_E4M3);
  for (int i = 0; i < 128; ++i) w8.data<uint8_t>()[i] = uint8_t((i * 37) % 126);
  Tensor u8 = Tensor::empty({4, 32}, DType::F8_E4M3);
  std::memcpy(u8.raw(), w8.raw(), 128);
  Tensor sc = Tensor::from_vector({0.25f}, {});
  write_safetensors(path, {{"a.weight", w8}, {"a.scale_weight", sc}, {"b.weight", u8}});
  TensorStore store = TensorStore::open_file(path);
  WeightLoader ld(store, Tag::DitWeights, "test");
  Tensor a = ld.load_matrix("a.weight", {4, 32}, DType::BF16);
  Tensor b = ld.load_matrix("b.weight", {4, 32}, DType::BF16);
  Tensor bf = ld.load("b.weight", {4, 32}, DType::F32);
  EXPECT_NO_THROW(ld.finish());
  fs::remove(path);
  ASSERT_EQ(a.dtype(), DType::F8_E4M3);
  ASSERT_NE(a.row_scale(), nullptr);
  Tensor ad = quant::dequantize(a), bd = quant::dequantize(b);
  for (int i = 0; i < 128; ++i) {
    const float v = quant::e4m3_to_f32(uint8_t((i * 37) % 126));
    EXPECT_EQ(ad.f32()[i], v * 0.25f);
    EXPECT_EQ(bd.f32()[i], v);
    EXPECT_EQ(bf.f32()[i], v);
  }
}

// WeightLoader::load_matrix_rows (the DiT's fused q/k/v and w1/w3): each part loads as
// load_matrix would and lands in its rows, fp8 row scales included; parts that would come out in
// different dtypes are returned unfused; a patch reaches its own part's rows only.
TEST(Quant, FusedRowsKeepEachPartsFormatScaleAndPatch) {
  const std::string path = (fs::temp_directory_path() / ("zi_fused_" + std::to_string(::getpid()) + ".safetensors")).string();
  Tensor w8 = Tensor::empty({4, 32}, DType::F8_E4M3), u8 = Tensor::empty({4, 32}, DType::F8_E4M3);
  for (int i = 0; i < 128; ++i) w8.data<uint8_t>()[i] = uint8_t((i * 37) % 126), u8.data<uint8_t>()[i] = uint8_t((i * 11) % 120);
  const Tensor c = test::rnd({2, 32}, 5), d = test::rnd({3, 32}, 6);
  write_safetensors(path, {{"a.weight", w8}, {"a.scale_weight", Tensor::from_vector({0.25f}, {})}, {"b.weight", u8},
                           {"c.weight", c}, {"d.weight", d}});
  TensorStore store = TensorStore::open_file(path);
  WeightLoader ld(store, Tag::DitWeights, "test"), one(store, Tag::DitWeights, "test");
  std::vector<Tensor> parts;
  auto same = [](const Tensor& fused, int64_t r0, const Tensor& part) {
    const Tensor rows = fused.slice(0, r0, r0 + part.dim(0));
    const Tensor a = is_quantized(fused.dtype()) ? quant::dequantize(rows) : rows.to(DType::F32);
    const Tensor b = is_quantized(part.dtype()) ? quant::dequantize(part) : part.to(DType::F32);
    return test::max_abs_diff(a, b) == 0.0;
  };
  // Stored fp8 parts: kept, each with its own scale.
  Tensor ab = ld.load_matrix_rows({"a.weight", "b.weight"}, {{4, 32}, {4, 32}}, DType::BF16, &parts);
  ASSERT_TRUE(ab.defined());
  EXPECT_TRUE(parts.empty());
  ASSERT_EQ(ab.dtype(), DType::F8_E4M3);
  ASSERT_EQ(ab.shape(), (Shape{8, 32}));
  ASSERT_NE(ab.row_scale(), nullptr);
  EXPECT_EQ(ab.row_scale()->data<float>()[0], 0.25f);
  EXPECT_EQ(ab.row_scale()->data<float>()[7], 1.0f);
  EXPECT_TRUE(same(ab, 0, one.load_matrix("a.weight", {4, 32}, DType::BF16)));
  EXPECT_TRUE(same(ab, 4, one.load_matrix("b.weight", {4, 32}, DType::BF16)));
  // Float parts made into one format (and plain float).
  for (DType t : {DType::Q8_0, DType::F8_E4M3, DType::BF16, DType::F32}) {
    Tensor cd = ld.load_matrix_rows({"c.weight", "d.weight"}, {{2, 32}, {3, 32}}, t, &parts);
    ASSERT_TRUE(cd.defined()) << dtype_name(t);
    EXPECT_EQ(cd.dtype(), t);
    EXPECT_TRUE(same(cd, 0, one.load_matrix("c.weight", {2, 32}, t))) << dtype_name(t);
    EXPECT_TRUE(same(cd, 2, one.load_matrix("d.weight", {3, 32}, t))) << dtype_name(t);
  }
  // fp8 kept beside a float part made bf16: two dtypes, so the parts come back unfused.
  Tensor ac = ld.load_matrix_rows({"a.weight", "c.weight"}, {{4, 32}, {2, 32}}, DType::BF16, &parts);
  EXPECT_FALSE(ac.defined());
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].dtype(), DType::F8_E4M3);
  EXPECT_EQ(parts[1].dtype(), DType::BF16);
  // A patch on d: its rows only.
  WeightLoader::Patch p;
  p.wants = [](const std::string& n) { return n == "d.weight"; };
  p.apply = [](const std::string&, Tensor& f32) {
    for (int64_t i = 0; i < f32.numel(); ++i) f32.f32()[i] += 1.0f;
  };
  ld.add_patch(p);
  Tensor cd = ld.load_matrix_rows({"c.weight", "d.weight"}, {{2, 32}, {3, 32}}, DType::F32, &parts);
  ASSERT_TRUE(cd.defined());
  EXPECT_EQ(test::max_abs_diff(cd.slice(0, 0, 2), c), 0.0);
  Tensor d1 = d.clone();
  for (int64_t i = 0; i < d1.numel(); ++i) d1.f32()[i] += 1.0f;
  EXPECT_EQ(test::max_abs_diff(cd.slice(0, 2, 5), d1), 0.0);
  EXPECT_NO_THROW(ld.finish());
  fs::remove(path);
}
