// Core: dtype conversions, tensor views, and the allocator's accounting.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/allocator.h"
#include "core/check.h"
#include "core/dtype.h"
#include "core/tensor.h"

using namespace zi;

TEST(DType, Bf16RoundTripAndRounding) {
  // Exactly representable values survive; ties go to even.
  for (float v : {0.0f, 1.0f, -2.5f, 3.140625f, 65280.0f}) EXPECT_EQ(bf16_to_f32(f32_to_bf16(v)), v);
  uint32_t u = 0x3f808000u;  // 1.00390625: halfway between two bf16 values, lower is even
  float f;
  std::memcpy(&f, &u, 4);
  EXPECT_EQ(f32_to_bf16(f), 0x3f80);
  u = 0x3f818000u;  // halfway, upper is even
  std::memcpy(&f, &u, 4);
  EXPECT_EQ(f32_to_bf16(f), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, F16MatchesReferenceOnAllHalfValues) {
  // Every f16 bit pattern converts to f32 and back unchanged (NaNs stay NaN).
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), uint16_t(h)) << "h=" << h;
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f32_to_f16(70000.0f), 0x7c00);               // overflow -> inf
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);               // rounds down to max
  // Round to nearest even against a double reference on random floats.
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-70000.0f, 70000.0f);
  for (int i = 0; i < 100000; ++i) {
    float v = dist(rng) * (i % 2 ? 1e-4f : 1.0f);
    float r = f16_to_f32(f32_to_f16(v));
    if (std::isinf(r)) continue;
    // The nearest neighbour in f16 must not be closer than r.
    uint16_t h = f32_to_f16(v);
    float up = f16_to_f32(uint16_t(h + 1)), dn = f16_to_f32(uint16_t(h - 1));
    if ((h & 0x7fff) != 0 && (h & 0x7fff) < 0x7bff) {
      EXPECT_LE(std::fabs(double(r) - v), std::fabs(double(up) - v));
      EXPECT_LE(std::fabs(double(r) - v), std::fabs(double(dn) - v));
    }
  }
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_vector({0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor r = t.reshape({3, -1});
  EXPECT_EQ(r.shape(), (Shape{3, 2}));
  Tensor s = t.slice(1, 1, 3);
  EXPECT_FALSE(s.is_contiguous());
  Tensor c = s.contiguous();
  EXPECT_EQ(c.f32()[0], 1);
  EXPECT_EQ(c.f32()[3], 5);
  Tensor p = t.permute({1, 0}).contiguous();
  EXPECT_EQ(p.shape(), (Shape{3, 2}));
  EXPECT_EQ(p.f32()[1], 3);
  Tensor b = t.to(DType::BF16).to(DType::F32);
  EXPECT_EQ(b.f32()[5], 5);
  EXPECT_THROW(t.reshape({4, 2}), Error);
}

// The e4m3 copy a producer attaches to bf16 activations (for fp8 GEMMs): shape-checked, kept by
// reshape and by no other view or copy. (That in-place ops drop it: CudaQuant tests, where
// copies are made.)
TEST(Tensor, E4m3CopyIsKeptOnlyWhereTheValuesAreTheSame) {
  Tensor x = Tensor::from_vector(std::vector<float>(64, 1.0f), {4, 16}).to(DType::BF16);
  auto copy_of = [](int64_t rows, int64_t K) {
    Tensor q = Tensor::empty({rows, K}, DType::F8_E4M3);
    q.set_row_scale(Tensor::empty({rows}, DType::F32));
    return q;
  };
  EXPECT_THROW(x.set_e4m3_copy(copy_of(4, 8)), Error);  // wrong width
  EXPECT_THROW(x.set_e4m3_copy(Tensor::empty({4, 16}, DType::F8_E4M3)), Error);  // no row scales
  EXPECT_THROW(x.to(DType::F32).set_e4m3_copy(copy_of(4, 16)), Error);  // not bf16
  x.set_e4m3_copy(copy_of(4, 16));
  ASSERT_NE(x.e4m3_copy(), nullptr);
  Tensor y = x;
  EXPECT_EQ(y.e4m3_copy(), x.e4m3_copy());
  EXPECT_EQ(x.reshape({1, 4, 16}).e4m3_copy(), x.e4m3_copy());
  EXPECT_EQ(x.contiguous().e4m3_copy(), x.e4m3_copy());  // the same tensor
  EXPECT_EQ(x.slice(0, 0, 2).e4m3_copy(), nullptr);
  EXPECT_EQ(x.slice(1, 0, 8).e4m3_copy(), nullptr);
  EXPECT_EQ(x.permute({1, 0}).e4m3_copy(), nullptr);
  EXPECT_EQ(x.clone().e4m3_copy(), nullptr);
  EXPECT_EQ(x.to(DType::F32).e4m3_copy(), nullptr);
  y.drop_e4m3_copy();
  EXPECT_EQ(y.e4m3_copy(), nullptr);
  EXPECT_NE(x.e4m3_copy(), nullptr);
}

// HostReuseScope: a freed buffer of a page or more stays accounted and the next allocation of
// its size on this thread takes it; smaller ones and frees outside a scope go at once; the
// outermost scope's end frees what is kept; an inner scope keeps nothing of its own.
TEST(Allocator, HostReuseScopeKeepsFreedBuffersForTheSameSize) {
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t base = ms.total().current;
  const size_t big = size_t(3) << 20, small = 1000;
  const int64_t reused0 = host_buffers_reused();
  {
    void* a = host_alloc(big, Tag::DitWeights);
    host_free(a, big, Tag::DitWeights);
    EXPECT_EQ(ms.total().current, base) << "no scope: freed at once";
  }
  {
    HostReuseScope scope;
    void* a = host_alloc(big, Tag::DitWeights);
    std::memset(a, 1, big);
    host_free(a, big, Tag::DitWeights);
    EXPECT_EQ(ms.total().current - base, int64_t(big)) << "kept: still accounted";
    {
      HostReuseScope inner;  // nested: the outer scope keeps
      void* b = host_alloc(big - 10, Tag::Workspace);  // the same rounded size
      EXPECT_EQ(b, a);
      EXPECT_EQ(host_buffers_reused(), reused0 + 1);
      EXPECT_EQ(ms.total().current - base, int64_t(big - 10)) << "accounted as the new request";
      host_free(b, big - 10, Tag::Workspace);
    }
    EXPECT_EQ(ms.total().current - base, int64_t(big - 10)) << "the inner scope's end frees nothing";
    void* c = host_alloc(2 * big, Tag::DitWeights);  // another size: a fresh buffer
    EXPECT_NE(c, a);
    EXPECT_EQ(host_buffers_reused(), reused0 + 1);
    host_free(c, 2 * big, Tag::DitWeights);
    void* d = host_alloc(small, Tag::DitWeights);
    host_free(d, small, Tag::DitWeights);
    EXPECT_EQ(ms.total().current - base, int64_t(big - 10) + int64_t(2 * big)) << "small buffers are not kept";
  }
  EXPECT_EQ(ms.total().current, base) << "the scope's end frees what it kept";
  EXPECT_EQ(host_buffers_reused(), reused0 + 1);
}

TEST(Allocator, ScriptedSequenceCurrentPeakAndPhases) {
  MemoryStats& ms = memory_stats(Device::CPU);
  const int64_t base = ms.total().current;
  const int64_t base_w = ms.tag(Tag::DitWeights).current;
  ms.reset_peaks();
  ms.clear_phases();
  {
    PhaseScope phase("load");
    Tensor w = Tensor::empty({1000}, DType::F32, Tag::DitWeights);  // 4000 bytes
    EXPECT_EQ(ms.tag(Tag::DitWeights).current - base_w, 4000);
    {
      PhaseScope inner("step");
      Tensor a = Tensor::empty({500}, DType::F32, Tag::Activations);  // +2000
      Tensor b = Tensor::empty({250}, DType::BF16, Tag::Activations);  // +500
      EXPECT_EQ(ms.total().current - base, 6500);
    }
    EXPECT_EQ(ms.total().current - base, 4000);
    Tensor c = Tensor::empty({100}, DType::F32, Tag::Activations);  // +400, below the earlier peak
  }
  auto phases = ms.finished_phases();
  ASSERT_EQ(phases.size(), 2u);
  EXPECT_EQ(phases[0].name, "step");
  EXPECT_EQ(phases[0].peak_bytes - base, 6500);
  EXPECT_EQ(phases[0].end_bytes - base, 4000);
  EXPECT_EQ(phases[0].start_bytes - base, 4000);
  EXPECT_EQ(phases[1].name, "load");
  EXPECT_EQ(phases[1].peak_bytes - base, 6500);
  EXPECT_EQ(phases[1].weights_bytes - base_w, 4000);
  EXPECT_EQ(phases[1].end_bytes - base, 0);
  EXPECT_EQ(ms.total().current, base);
  EXPECT_EQ(ms.total().peak - base, 6500);
  EXPECT_GE(ms.tag(Tag::Activations).freed, 2900);
}
