// Shared helpers of the CPU backend: exact widening of bf16/f16 to f32, and the OpenBLAS
// thread guard used when sgemm is called from inside our own OpenMP regions.
#include <cblas.h>
#include <cpuid.h>
#include <immintrin.h>

#include "backends/cpu/cpu_ops.h"
#include "core/check.h"

namespace zi {
void set_blas_threads(int n) { openblas_set_num_threads(n); }
}  // namespace zi

namespace zi::cpu {
namespace {

// bf16 is the top half of an f32: widening is a shift.
ZI_CPU_CLONES void widen_bf16(const uint16_t* s, float* d, int64_t n) {
  uint32_t* du = reinterpret_cast<uint32_t*>(d);
  for (int64_t i = 0; i < n; ++i) du[i] = uint32_t(s[i]) << 16;
}

// F16C converts 8 halves per instruction, exactly (every f16 is an f32).
__attribute__((target("avx2,f16c"))) void widen_f16_f16c(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) d[i] = f16_to_f32(s[i]);
}

// F16C through cpuid (leaf 1, ecx): clang 14's __builtin_cpu_supports does not know "f16c", and
// the fuzz core (fuzz/, clang) carries this backend for the LoRA merge.
bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
const bool g_has_f16c = cpu_has_f16c() && __builtin_cpu_supports("avx2");

}  // namespace

void widen(const void* src, DType dt, float* dst, int64_t n) {
  switch (dt) {
    case DType::F32:
      if (src != dst) std::memcpy(dst, src, size_t(n) * 4);
      return;
    case DType::BF16: widen_bf16(static_cast<const uint16_t*>(src), dst, n); return;
    case DType::F16:
      if (g_has_f16c) {
        widen_f16_f16c(static_cast<const uint16_t*>(src), dst, n);
      } else {
        const uint16_t* s = static_cast<const uint16_t*>(src);
        for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      }
      return;
    default: fail(str_cat("[widen] unsupported dtype ", dtype_name(dt)));
  }
}

Tensor widen_vector(const Tensor& v) {
  Tensor c = v.contiguous(Tag::Workspace);
  if (c.dtype() == DType::F32) return c;
  Tensor out = Tensor::empty(c.shape(), DType::F32, Tag::Workspace);
  widen(c.raw(), c.dtype(), out.data<float>(), c.numel());
  return out;
}

BlasSingleThread::BlasSingleThread() : saved_(openblas_get_num_threads()) {
  if (saved_ != 1) openblas_set_num_threads(1);
}

BlasSingleThread::~BlasSingleThread() {
  if (saved_ != 1) openblas_set_num_threads(saved_);
}

}  // namespace zi::cpu
