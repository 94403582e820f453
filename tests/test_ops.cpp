// What the op table (tests/op_table.h: every op × shape × dtype × backend against the
// reference) does not cover: the CPU backend's GEMM paths, the fused ops' exact equality with
// their composed forms, strided convs against the sampled stride-1 conv, workspace release,
// argument checks and the tiled-decode pieces.
#include <gtest/gtest.h>

#include <random>

#include "backends/cpu/cpu_ops.h"
#include "core/allocator.h"
#include "core/check.h"
#include "core/parallel.h"
#include "ops/ops.h"
#include "ops/ops_ref.h"
#include "test_util.h"

using namespace zi;
using zi::test::max_abs_diff;
using zi::test::rel_l2;
using zi::test::rnd;

namespace {

// Uniform in ±[lo, hi] (never zero, random sign).

// Tolerances, relative L2 over the whole output (and max abs where stated).
constexpr double kTolGemm = 2e-6;   // linear / conv2d: f32 sums of up to ~600 products

void expect_close(const Tensor& got, const Tensor& ref, double tol, const std::string& what) {
  ASSERT_EQ(got.shape(), ref.shape()) << what;
  const double r = rel_l2(got, ref);
  EXPECT_LE(r, tol) << what << " rel_l2=" << r << " max_abs=" << max_abs_diff(got, ref);
}

const DType kWeightTypes[] = {DType::F32, DType::BF16, DType::F16};

// Runs a test body at 1, 2 and 3 threads (different panel/block partitions), then restores.
template <class F>
void for_threads(F&& f) {
  const int saved = num_threads();
  for (int t : {1, 2, 3}) {
    set_num_threads(t);
    SCOPED_TRACE("threads=" + std::to_string(t));
    f();
  }
  set_num_threads(saved);
}

}  // namespace

// The CPU backend's two GEMM paths (the op itself is in the op table, tests/op_table.h).
TEST(Ops, LinearGemmPaths) {
  struct Case { int64_t M, K, N; bool bias; };
  const Case cases[] = {{1, 1, 1, false}, {5, 7, 3, true},     {33, 65, 17, false}, {130, 300, 129, true},
                        {257, 96, 520, true}, {100, 64, 16, false}, {3, 600, 700, true}};
  for_threads([&] {
    uint32_t seed = 1;
    for (const Case& c : cases)
      for (DType dt : kWeightTypes) {
        Tensor x = rnd({c.M, c.K}, seed++), w = rnd({c.N, c.K}, seed++).to(dt), b = rnd({c.N}, seed++).to(dt);
        const Tensor* bp = c.bias ? &b : nullptr;
        const Tensor ref = ops_ref::linear(x, w, bp);
        const std::string what = str_cat("linear M=", c.M, " K=", c.K, " N=", c.N, " ", dtype_name(dt));
        for (cpu::GemmPath path : {cpu::GemmPath::Panels, cpu::GemmPath::BlasThreads}) {  // both backend paths
          Tensor y = Tensor::empty(ref.shape(), DType::F32);
          cpu::linear(x, w, bp, y, path);
          expect_close(y, ref, kTolGemm, what + (path == cpu::GemmPath::Panels ? " panels" : " blas threads"));
        }
      }
  });
}

// The fused forms of ops.h are, on the CPU, exactly the composed ops.
TEST(Ops, FusedEqualComposedOnCpu) {
  Tensor x = rnd({7, 3, 16}, 111), y = rnd({7, 3, 16}, 112), w = rnd({16}, 113).to(DType::BF16), g = rnd({16}, 114);
  Tensor a = ops::rms_norm(x, w, 1e-6f, &g), b = x.clone();
  ops::rms_norm_(b, w, 1e-6f);
  ops::mul_rows_(b, g);
  EXPECT_EQ(max_abs_diff(a, b), 0.0) << "rms_norm";
  Tensor x1 = x.clone(), y1 = y.clone(), x2 = x.clone(), y2 = y.clone();
  ops::rms_norm_add_(x1, y1, w, 1e-6f, &g);
  ops::rms_norm_(y2, w, 1e-6f);
  ops::add_gated_(x2, g, y2);
  EXPECT_EQ(max_abs_diff(x1, x2), 0.0) << "rms_norm_add_";
  Tensor cos = rnd({7, 8}, 115), sin = rnd({7, 8}, 116), r1 = x.clone(), r2 = x.clone();
  ops::rms_norm_rope_pairs_(r1, w, 1e-6f, cos, sin);
  ops::rms_norm_(r2, w, 1e-6f);
  ops::rope_pairs_(r2, cos, sin);
  EXPECT_EQ(max_abs_diff(r1, r2), 0.0) << "rms_norm_rope_pairs_";
  Tensor im = rnd({8, 5, 6}, 117), gw = rnd({8}, 118), gb = rnd({8}, 119), i1 = im.clone(), i2 = im.clone();
  ops::group_norm_silu_(i1, 4, gw, gb, 1e-6f);
  ops::group_norm_(i2, 4, gw, gb, 1e-6f);
  ops::silu_(i2);
  EXPECT_EQ(max_abs_diff(i1, i2), 0.0) << "group_norm_silu_";
}

TEST(Ops, WorkspaceIsReleased) {
  const int64_t before = memory_stats().tag(Tag::Workspace).current;
  Tensor x = rnd({40, 64}, 71), w = rnd({300, 64}, 72).to(DType::BF16);
  Tensor y = ops::linear(x, w);
  Tensor q = rnd({70, 2, 16}, 73);
  Tensor a = ops::attention(q, q, q, 0.25f, true);
  Tensor c = ops::conv2d(rnd({4, 9, 9}, 74), rnd({3, 4, 3, 3}, 75).to(DType::F16), nullptr, 1);
  Tensor c2 = ops::conv2d(ops::pad2d(rnd({4, 9, 9}, 76), 0, 1, 0, 1), rnd({3, 4, 3, 3}, 77), nullptr, 0, 2);
  EXPECT_EQ(memory_stats().tag(Tag::Workspace).current, before);
}

// A strided conv is the stride-1 conv sampled at every stride-th row and column: exactly so in
// the reference (same sums in the same order), within the GEMM tolerance on the CPU backend. This
// ties the op table's strided rows to the stride-1 semantics, independently of ops_ref's stride
// (the VAE encoder's downsample used to be computed this way). Also pad2d + stride 2 (the
// downsample itself) against the reference conv with pad 1 cropped: zero padding either way.
TEST(Ops, StridedConvIsTheSampledStride1Conv) {
  struct Case { int64_t Cin, H, W, Cout, kh, kw; int pad, stride; };
  const Case cases[] = {{4, 11, 9, 3, 3, 3, 0, 2}, {4, 10, 12, 5, 3, 3, 1, 2}, {2, 13, 8, 3, 3, 2, 2, 3},
                        {3, 9, 9, 2, 1, 1, 0, 2}};
  uint32_t seed = 400;
  for (const Case& c : cases) {
    const Tensor x = rnd({c.Cin, c.H, c.W}, seed++), w = rnd({c.Cout, c.Cin, c.kh, c.kw}, seed++),
                 b = rnd({c.Cout}, seed++);
    const Tensor full = ops_ref::conv2d(x, w, &b, c.pad, 1), want = ops_ref::conv2d(x, w, &b, c.pad, c.stride);
    const int64_t Ho = want.dim(1), Wo = want.dim(2), Hf = full.dim(1), Wf = full.dim(2);
    ASSERT_EQ(Ho, (Hf - 1) / c.stride + 1);
    ASSERT_EQ(Wo, (Wf - 1) / c.stride + 1);
    for (int64_t co = 0; co < c.Cout; ++co)
      for (int64_t y = 0; y < Ho; ++y)
        for (int64_t xx = 0; xx < Wo; ++xx)
          ASSERT_EQ(want.f32()[(co * Ho + y) * Wo + xx], full.f32()[(co * Hf + y * c.stride) * Wf + xx * c.stride])
              << co << " " << y << " " << xx;
    for_threads([&] { expect_close(ops::conv2d(x, w, &b, c.pad, c.stride), want, kTolGemm, "strided conv2d"); });
  }
  // Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)), 3×3, stride 2 → [C, H/2, W/2]. Its rows and
  // columns sit where the pad-1 conv's odd ones do (tap offsets −1 vs 0), shifted by one.
  const Tensor x = rnd({4, 12, 10}, 450), w = rnd({4, 4, 3, 3}, 451), b = rnd({4}, 452);
  const Tensor down = ops::conv2d(ops::pad2d(x, 0, 1, 0, 1), w, &b, 0, 2);
  ASSERT_EQ(down.shape(), (Shape{4, 6, 5}));
  const Tensor p1 = ops_ref::conv2d(x, w, &b, 1, 1);  // [4, 12, 10]; p1[y', x'] reads rows y' − 1 … y' + 1
  Tensor want = Tensor::empty({4, 6, 5}, DType::F32);
  for (int64_t c = 0; c < 4; ++c)
    for (int64_t y = 0; y < 6; ++y)
      for (int64_t xx = 0; xx < 5; ++xx)
        want.f32()[(c * 6 + y) * 5 + xx] = p1.f32()[(c * 12 + 2 * y + 1) * 10 + 2 * xx + 1];
  expect_close(down, want, kTolGemm, "downsample");
}

TEST(Ops, ArgumentErrors) {
  Tensor x = rnd({4, 8}, 81), w = rnd({5, 8}, 82);
  EXPECT_THROW(ops::linear(x, rnd({5, 7}, 83)), Error);
  Tensor bad_bias = rnd({4}, 84);
  EXPECT_THROW(ops::linear(x, w, &bad_bias), Error);
  EXPECT_THROW(ops::linear(x, Tensor::zeros({5, 8}, DType::I32)), Error);
  Tensor y = rnd({4, 7}, 85);
  EXPECT_THROW(ops::add_(x, y), Error);
  EXPECT_THROW(ops::mul_(x, y), Error);
  EXPECT_THROW(ops::silu_mul(x, y), Error);
  EXPECT_THROW(ops::mul_rows_(x, rnd({7}, 86)), Error);
  EXPECT_THROW(ops::add_gated_(x, rnd({8}, 86), y), Error);
  EXPECT_THROW(ops::rms_norm_(x, rnd({7}, 87), 1e-6f), Error);
  Tensor xt = x.permute({1, 0});  // in-place ops need contiguous tensors
  EXPECT_THROW(ops::silu_(xt), Error);
  Tensor img = rnd({6, 4, 4}, 88);
  EXPECT_THROW(ops::group_norm_(img, 4, rnd({6}, 89), rnd({6}, 90), 1e-6f), Error);
  EXPECT_THROW(ops::group_norm_(img, 3, rnd({5}, 89), rnd({6}, 90), 1e-6f), Error);
  EXPECT_THROW(ops::conv2d(img, rnd({2, 5, 3, 3}, 91), nullptr, 1), Error);
  EXPECT_THROW(ops::conv2d(img, rnd({2, 6, 7, 7}, 91), nullptr, 1), Error);
  EXPECT_THROW(ops::conv2d(img, rnd({2, 6, 3, 3}, 91), nullptr, 1, 0), Error);   // stride 0
  EXPECT_THROW(ops::conv2d(img, rnd({2, 6, 5, 5}, 91), nullptr, 0, 2), Error);   // 5×5 kernel on 4×4, no pad
  EXPECT_EQ(ops::conv2d(img, rnd({2, 6, 3, 3}, 91), nullptr, 0, 2).shape(), (Shape{2, 1, 1}));  // ⌊(4 − 3) / 2⌋ + 1
  EXPECT_EQ(ops::conv2d(img, rnd({2, 6, 3, 3}, 91), nullptr, 1, 3).shape(), (Shape{2, 2, 2}));  // ⌊(6 − 3) / 3⌋ + 1
  EXPECT_EQ(ops::pad2d(img, 0, 1, 2, 3).shape(), (Shape{6, 9, 5}));
  EXPECT_THROW(ops::pad2d(img, -1, 0, 0, 0), Error);
  EXPECT_THROW(ops::pad2d(x, 1, 1, 1, 1), Error);  // not [C, H, W]
  Tensor q = rnd({5, 3, 8}, 92), k = rnd({5, 2, 8}, 93);
  EXPECT_THROW(ops::attention(q, k, k, 1.0f), Error);                      // 3 heads over 2 kv heads
  EXPECT_THROW(ops::attention(q, q, rnd({5, 3, 4}, 94), 1.0f), Error);      // v shape
  EXPECT_THROW(ops::attention(q, q, q, 1.0f, false, 6), Error);            // kv_len > Sk
  Tensor s = rnd({5, 3, 8}, 95);
  EXPECT_THROW(ops::rope_pairs_(s, rnd({5, 3}, 96), rnd({5, 4}, 97)), Error);
  EXPECT_THROW(ops::rope_halves_(s, rnd({4, 4}, 96), rnd({4, 4}, 97)), Error);
  EXPECT_THROW(ops::concat0({rnd({2, 3}, 98), rnd({2, 4}, 99)}), Error);
  EXPECT_THROW(ops::embedding(rnd({10, 4}, 100), {1, 10}), Error);
  EXPECT_THROW(ops::embedding(rnd({10, 4}, 100), {-1}), Error);
  try {
    ops::linear(x, rnd({5, 7}, 83));
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[linear]"), std::string::npos) << e.what();
  }
}

// The tiled VAE decode's pieces: region sums against a direct double sum, the given-statistics
// GroupNorm against group_norm_ fed its own statistics, and paste_ from a strided view.
TEST(Ops, TiledGroupNormPieces) {
  const int groups = 4;
  const Tensor x = rnd({8, 9, 11}, 300);
  const int64_t y0 = 2, y1 = 7, x0 = 3, x1 = 11, cpg = 2;
  const std::vector<double> s = ops::group_region_sums(x, groups, y0, y1, x0, x1);
  std::vector<double> mean(static_cast<size_t>(groups));
  for (int g = 0; g < groups; ++g) {
    double want = 0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t xx = x0; xx < x1; ++xx) want += double(x.f32()[(c * 9 + y) * 11 + xx]);
    EXPECT_NEAR(s[size_t(g)], want, 1e-12 * (1 + std::fabs(want))) << "group " << g;
    mean[size_t(g)] = want / double(cpg * (y1 - y0) * (x1 - x0));
  }
  const std::vector<double> m2 = ops::group_region_sums(x, groups, y0, y1, x0, x1, mean);
  for (int g = 0; g < groups; ++g) EXPECT_GT(m2[size_t(g)], 0.0);
  EXPECT_THROW(ops::group_region_sums(x, groups, 0, 10, 0, 11), Error);  // rows past H

  // Whole-image statistics given back must reproduce group_norm_ exactly.
  const Tensor w = rnd({8}, 301), b = rnd({8}, 302);
  const std::vector<double> sw = ops::group_region_sums(x, groups, 0, 9, 0, 11);
  std::vector<double> mw(static_cast<size_t>(groups));
  for (int g = 0; g < groups; ++g) mw[size_t(g)] = sw[size_t(g)] / double(cpg * 99);
  const std::vector<double> vw = ops::group_region_sums(x, groups, 0, 9, 0, 11, mw);
  std::vector<float> fm(static_cast<size_t>(groups)), fr(static_cast<size_t>(groups));
  for (int g = 0; g < groups; ++g) {
    fm[size_t(g)] = float(mw[size_t(g)]);
    fr[size_t(g)] = float(1.0 / std::sqrt(vw[size_t(g)] / double(cpg * 99) + 1e-6));
  }
  Tensor a = x.clone(), c = x.clone();
  ops::group_norm_given_(a, groups, fm, fr, w, b);
  ops::group_norm_(c, groups, w, b, 1e-6f);
  EXPECT_LE(test::max_abs_diff(a, c), 1e-6);

  Tensor dst = Tensor::zeros({8, 12, 14}, DType::F32);
  ops::paste_(dst, x.slice(1, 2, 7).slice(2, 3, 11), 4, 5);  // 5 × 8 interior at (4, 5)
  for (int64_t ch = 0; ch < 8; ++ch)
    for (int64_t y = 0; y < 12; ++y)
      for (int64_t xx = 0; xx < 14; ++xx) {
        const bool in = y >= 4 && y < 9 && xx >= 5 && xx < 13;
        const float want = in ? x.f32()[(ch * 9 + (y - 4 + 2)) * 11 + (xx - 5 + 3)] : 0.0f;
        ASSERT_EQ(dst.f32()[(ch * 12 + y) * 14 + xx], want) << ch << " " << y << " " << xx;
      }
  EXPECT_THROW(ops::paste_(dst, x, 4, 5), Error);  // does not fit
}
