// The fused ops of ops.h on the CPU: exactly the composed ops, in the same order, so the CPU's
// results are those of the unfused sequence (the GPU runs each in one pass).
#include <cstring>

#include "backends/cpu/cpu_ops.h"

namespace zi::cpu {

void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps, bool silu) {
  group_norm_(x, groups, weight, bias, eps);
  if (silu) silu_(x);
}

void rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor* scale, Tensor& y) {
  std::memcpy(y.raw(), x.raw(), x.nbytes());
  rms_norm_(y, weight, eps);
  if (scale) mul_rows_(y, *scale);
}

void scale_gate_rows_(Tensor& x) {
  for (int64_t r = 0; r < x.dim(0); ++r) {
    Tensor row = x.slice(0, r, r + 1);
    if (r % 2 == 0) add_scalar_(row, 1.0f);
    else tanh_(row);
  }
}

void rms_norm_add_(Tensor& x, Tensor& y, const Tensor& weight, float eps, const Tensor* gate) {
  rms_norm_(y, weight, eps);
  if (gate) add_gated_(x, *gate, y);
  else add_(x, y);
}

void rms_norm_add_norm_(Tensor& x, Tensor& y, const Tensor& w_add, const Tensor* gate, const Tensor& w_norm,
                        const Tensor* scale, float eps, Tensor& h) {
  rms_norm_add_(x, y, w_add, eps, gate);
  rms_norm(x, w_norm, eps, scale, h);
}

void rms_norm_rope_pairs_(Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin) {
  Tensor rows = x.reshape({x.dim(0) * x.dim(1), x.dim(2)});
  rms_norm_(rows, weight, eps);
  rope_pairs_(x, cos, sin);
}

void rms_norm_rope_pairs(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin,
                         Tensor& out) {
  const int64_t S = x.dim(0), row = x.dim(1) * x.dim(2), stride = x.strides()[0];
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(out.raw());
  for (int64_t s = 0; s < S; ++s)
    std::memcpy(dst + size_t(s * row) * sizeof(float), src + size_t(s * stride) * sizeof(float), size_t(row) * sizeof(float));
  rms_norm_rope_pairs_(out, weight, eps, cos, sin);
}

}  // namespace zi::cpu
