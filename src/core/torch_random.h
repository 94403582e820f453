// Bit-exact reproduction of PyTorch's CPU normal sampler, so a seed gives the same initial
// latents as `torch.Generator('cpu').manual_seed(seed); torch.randn(shape)` (float32).
//
// What PyTorch does (CPUGeneratorImpl + aten/src/ATen/native/cpu/DistributionKernels.cpp),
// as reconstructed and verified bit for bit against torch 2.x on x86-64 (AVX2 and AVX-512
// kernels give the same values):
//  * engine: 32-bit mt19937 seeded with the low 32 bits of the seed (standard init_genrand);
//    random64() = (first draw << 32) | second draw.
//  * numel >= 16: fill every element with a uniform float u = (draw & 0xFFFFFF) * 2^-24 (one
//    32-bit draw each), then turn each block of 16 into normals in place, Box–Muller on the
//    pairs (j, j+8): u1 = 1 - d[j], u2 = d[j+8], r = sqrt(-2 log u1), θ = 2π·u2,
//    d[j] = r cos θ, d[j+8] = r sin θ. log/sin/cos are the float32 Cephes polynomials of
//    avx_mathfun.h as compiled into PyTorch (with the compiler's FMA contractions; see the
//    .cpp). When numel % 16 != 0, the last 16 elements are refilled with fresh uniforms and
//    transformed again (overlapping the previous block).
//  * numel < 16: per element, double Box–Muller with a cached second value: u1, u2 from
//    53-bit random64 doubles, r = sqrt(-2 log1p(-u2)), θ = 2π·u1; returns r cos θ and caches
//    r sin θ for the next element. Values are cast to float.
#pragma once
#include <cstdint>
#include <vector>

namespace zi {

// `numel` standard-normal float32 values, exactly as torch.randn on a freshly seeded CPU
// generator produces for any shape with that many elements.
std::vector<float> torch_randn(uint64_t seed, int64_t numel);
// Same, written into `out` (numel floats).
void torch_randn(uint64_t seed, float* out, int64_t numel);

// A generator whose draws continue one stream, like several torch.randn calls on one
// torch.Generator('cpu') (the pipelines that sample the VAE posterior draw that sample first,
// then the noise). randn(out, n) equals the next n values torch.randn would return.
class TorchGenerator;

// A fresh seed from std::random_device, for runs without --seed. Kept below 2^53 so it
// prints, parses and round-trips through JSON/double without loss.
uint64_t random_seed();

// PyTorch's CPU engine (mt19937), exposed for tests.
class TorchMt19937 {
 public:
  explicit TorchMt19937(uint64_t seed);
  uint32_t next_u32();
  uint64_t next_u64();  // (first << 32) | second, like CPUGeneratorImpl::random64

 private:
  void twist();
  uint32_t state_[624];
  int index_;
};

class TorchGenerator {
 public:
  explicit TorchGenerator(uint64_t seed) : g_(seed) {}
  void randn(float* out, int64_t numel);

 private:
  TorchMt19937 g_;
  bool have_cached_ = false;  // the generator's cached second normal (numel < 16 path)
  double cached_ = 0.0;
};

}  // namespace zi
