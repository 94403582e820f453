// Rotary position embedding in place, both layouts of ops.h: rotate-half (Qwen3: dims i
// and i + D/2 form a pair) and adjacent pairs (Z-Image DiT: dims 2m, 2m + 1).
#include "backends/cpu/cpu_ops.h"
#include "core/parallel.h"

namespace zi::cpu {
namespace {

ZI_CPU_CLONES void rot_halves(float* x, const float* c, const float* s, int64_t half) {
  float* x2 = x + half;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x2[i];
    x[i] = a * c[i] - b * s[i];
    x2[i] = b * c[i] + a * s[i];
  }
}

ZI_CPU_CLONES void rot_pairs(float* x, const float* c, const float* s, int64_t half) {
  for (int64_t m = 0; m < half; ++m) {
    const float a = x[2 * m], b = x[2 * m + 1];
    x[2 * m] = a * c[m] - b * s[m];
    x[2 * m + 1] = a * s[m] + b * c[m];
  }
}

// Applies rot(head, cos row, sin row, D/2) to every head of every position.
template <class Rot>
void rope_apply(Tensor& x, const Tensor& cos, const Tensor& sin, Rot rot) {
  const int64_t S = x.dim(0), H = x.dim(1), D = x.dim(2), half = D / 2;
  float* xp = x.data<float>();
  const float* cp = cos.data<float>();  // [S, D/2]
  const float* sp = sin.data<float>();  // [S, D/2]
  parallel_for(S, std::max<int64_t>(1, 16384 / (H * D)), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t h = 0; h < H; ++h) rot(xp + (s * H + h) * D, cp + s * half, sp + s * half, half);
  });
}

}  // namespace

void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin) { rope_apply(x, cos, sin, rot_halves); }
void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin) { rope_apply(x, cos, sin, rot_pairs); }

}  // namespace zi::cpu
