// Elementwise ops, row broadcasts, concatenation and embedding lookup. All are memory
// bound: OpenMP over large chunks, and simple loops GCC vectorises (exp via exp_fast).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backends/cpu/cpu_ops.h"
#include "backends/cpu/vec_math.h"
#include "core/parallel.h"

namespace zi::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task: big enough to amortise a fork

ZI_CPU_CLONES void silu_span(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + exp_fast(-x[i]));
}

ZI_CPU_CLONES void silu_mul_span(const float* a, const float* b, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] / (1.0f + exp_fast(-a[i])) * b[i];
}

ZI_CPU_CLONES void add_span(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

ZI_CPU_CLONES void mul_span(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= y[i];
}

ZI_CPU_CLONES void affine_span(float* x, int64_t n, float s, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * s + a;
}

ZI_CPU_CLONES void fma_span(float* x, const float* v, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += v[i] * y[i];
}

// Runs fn(begin, end) over flat [0, n) in chunks.
template <class F>
void chunks(int64_t n, F&& fn) {
  parallel_for(n, kGrain, fn);
}

}  // namespace

void silu_(Tensor& x) {
  float* p = x.data<float>();
  chunks(x.numel(), [&](int64_t b, int64_t e) { silu_span(p + b, e - b); });
}

void tanh_(Tensor& x) {
  // Rare (no hot path uses it), so std::tanh's accuracy beats a vector approximation.
  float* p = x.data<float>();
  chunks(x.numel(), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p[i] = std::tanh(p[i]);
  });
}

void silu_mul(const Tensor& a, const Tensor& b, Tensor& out) {
  const float* ap = a.data<float>();
  const float* bp = b.data<float>();
  float* o = out.data<float>();
  chunks(a.numel(), [&](int64_t s, int64_t e) { silu_mul_span(ap + s, bp + s, o + s, e - s); });
}

void silu_mul_halves(const Tensor& y, Tensor& out) {
  const int64_t F = out.dim(-1), R = out.numel() / F;
  const float* yp = y.data<float>();
  float* o = out.data<float>();
  // Rows in parallel, each the silu_mul of its two halves (the same arithmetic as silu_mul).
  parallel_for(R, std::max<int64_t>(1, kGrain / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) silu_mul_span(yp + r * 2 * F, yp + r * 2 * F + F, o + r * F, F);
  });
}

void add_(Tensor& x, const Tensor& y) {
  float* p = x.data<float>();
  const float* q = y.data<float>();
  chunks(x.numel(), [&](int64_t b, int64_t e) { add_span(p + b, q + b, e - b); });
}

void mul_(Tensor& x, const Tensor& y) {
  float* p = x.data<float>();
  const float* q = y.data<float>();
  chunks(x.numel(), [&](int64_t b, int64_t e) { mul_span(p + b, q + b, e - b); });
}

void scale_(Tensor& x, float s) {
  float* p = x.data<float>();
  chunks(x.numel(), [&](int64_t b, int64_t e) { affine_span(p + b, e - b, s, 0.0f); });
}

void add_scalar_(Tensor& x, float s) {
  float* p = x.data<float>();
  chunks(x.numel(), [&](int64_t b, int64_t e) { affine_span(p + b, e - b, 1.0f, s); });
}

void mul_rows_(Tensor& x, const Tensor& v) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  Tensor vt = widen_vector(v);  // [D]
  const float* vp = vt.data<float>();
  float* p = x.data<float>();
  parallel_for(R, std::max<int64_t>(1, kGrain / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) mul_span(p + r * D, vp, D);
  });
}

void add_gated_(Tensor& x, const Tensor& v, const Tensor& y) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  Tensor vt = widen_vector(v);  // [D]
  const float* vp = vt.data<float>();
  const float* yp = y.data<float>();
  float* p = x.data<float>();
  parallel_for(R, std::max<int64_t>(1, kGrain / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fma_span(p + r * D, vp, yp + r * D, D);
  });
}

void concat0(const std::vector<Tensor>& parts, Tensor& out) {
  char* o = static_cast<char*>(out.raw());
  for (const Tensor& t : parts) {
    const size_t n = t.nbytes();
    if (n) std::memcpy(o, t.raw(), n);
    o += n;
  }
}

void embedding(const Tensor& table, const std::vector<int32_t>& ids, Tensor& out) {
  const int64_t D = table.dim(1);
  const size_t es = dtype_size(table.dtype());
  const char* tb = static_cast<const char*>(table.raw());
  float* o = out.data<float>();
  parallel_for(int64_t(ids.size()), std::max<int64_t>(1, kGrain / D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) widen(tb + size_t(ids[size_t(i)]) * size_t(D) * es, table.dtype(), o + i * D, D);
  });
}

void paste_(Tensor& dst, const Tensor& src, int64_t y0, int64_t x0) {
  const int64_t C = src.dim(0), h = src.dim(1), w = src.dim(2), H = dst.dim(1), W = dst.dim(2);
  const int64_t sc = src.strides()[0], sy = src.strides()[1], sx = src.strides()[2];
  const float* s = src.data<float>();
  float* d = dst.data<float>();
  parallel_for(C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) d[(c * H + y0 + y) * W + x0 + x] = s[c * sc + y * sy + x * sx];
  });
}

}  // namespace zi::cpu
