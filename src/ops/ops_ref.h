// Plain-loop reference of every op in ops.h: slow, obvious, accumulating in double. The
// oracle of tests/test_ops.cpp; never used by the models. Same signatures and semantics
// as zi::ops (in-place ops are in place here too).
#pragma once
#include <vector>

#include "core/tensor.h"

namespace zi::ops_ref {

Tensor linear(const Tensor& x, const Tensor& w, const Tensor* bias = nullptr);
void rms_norm_(Tensor& x, const Tensor& weight, float eps);
void layer_norm_(Tensor& x, float eps);
void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps);
void silu_(Tensor& x);
void tanh_(Tensor& x);
Tensor silu_mul(const Tensor& a, const Tensor& b);
Tensor silu_mul_halves(const Tensor& y);
void add_(Tensor& x, const Tensor& y);
void mul_(Tensor& x, const Tensor& y);
void scale_(Tensor& x, float s);
void add_scalar_(Tensor& x, float s);
void scale_gate_rows_(Tensor& x);
void mul_rows_(Tensor& x, const Tensor& v);
void add_gated_(Tensor& x, const Tensor& v, const Tensor& y);
void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin);
void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin);
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal = false,
                 int64_t kv_len = -1);
Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride = 1);
Tensor pad2d(const Tensor& x, int64_t left, int64_t right, int64_t top, int64_t bottom);
Tensor upsample_nearest2x(const Tensor& x);
Tensor concat0(const std::vector<Tensor>& parts);
Tensor embedding(const Tensor& table, const std::vector<int32_t>& ids);

}  // namespace zi::ops_ref
