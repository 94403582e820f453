// The one dispatch point of ops.h: every op checks its arguments here (shapes, dtypes,
// contiguity, with a "[op] ..." message), allocates its result, and calls the backend of
// the tensors' device. Only the CPU backend exists yet; CUDA is reserved (issue 6).
#include "ops/ops.h"

#include <algorithm>

#include "backends/cpu/cpu_ops.h"
#include "core/check.h"

namespace zi::ops {
namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

// Every op runs on the CPU backend for now; a CUDA tensor is a clear error, not a crash.
void require_cpu(const char* op, const Tensor& t) {
  ZI_CHECK(t.defined(), "[", op, "] undefined tensor");
  if (t.device() == Device::CUDA) fail(str_cat("[", op, "] the CUDA backend is not built yet (", t.desc(), ")"));
}

// An f32 activation that the op writes in place: must be contiguous already.
void require_f32_inplace(const char* op, const Tensor& t) {
  require_cpu(op, t);
  ZI_CHECK(t.dtype() == DType::F32 && t.is_contiguous(), "[", op, "] needs a contiguous f32 tensor, got ",
           t.desc());
}

// An f32 input that is only read: a contiguous copy is made if needed.
Tensor f32_input(const char* op, const Tensor& t) {
  require_cpu(op, t);
  ZI_CHECK(t.dtype() == DType::F32, "[", op, "] expects an f32 activation, got ", t.desc());
  return t.contiguous(Tag::Workspace);
}

// A weight-like operand (any float dtype), contiguous.
Tensor weight_input(const char* op, const char* what, const Tensor& t) {
  require_cpu(op, t);
  ZI_CHECK(is_float(t.dtype()), "[", op, "] ", what, " must be f32/bf16/f16, got ", t.desc());
  return t.contiguous(Tag::Workspace);
}

void require_vector(const char* op, const char* what, const Tensor& v, int64_t n) {
  ZI_CHECK(v.ndim() == 1 && v.dim(0) == n, "[", op, "] ", what, " must be [", n, "], got ", v.desc());
}

void require_same_shape(const char* op, const Tensor& a, const Tensor& b) {
  ZI_CHECK(a.shape() == b.shape(), "[", op, "] shape mismatch: ", a.desc(), " vs ", b.desc());
}

}  // namespace

Tensor linear(const Tensor& x_in, const Tensor& w_in, const Tensor* bias) {
  Tensor x = f32_input("linear", x_in), w = weight_input("linear", "weight", w_in);
  ZI_CHECK(w.ndim() == 2, "[linear] weight must be [N, K], got ", w.desc());
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) == w.dim(1) && w.dim(1) > 0, "[linear] x ", x.desc(),
           " does not match weight ", w.desc(), " (x's last dim must equal K = w.dim(1) > 0)");
  Tensor b;
  if (bias) {
    b = weight_input("linear", "bias", *bias);
    require_vector("linear", "bias", b, w.dim(0));
  }
  Shape os = x.shape();
  os.back() = w.dim(0);
  Tensor y = Tensor::empty(os, DType::F32);
  cpu::linear(x, w, bias ? &b : nullptr, y);
  return y;
}

void rms_norm_(Tensor& x, const Tensor& weight, float eps) {
  require_f32_inplace("rms_norm_", x);
  Tensor w = weight_input("rms_norm_", "weight", weight);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[rms_norm_] bad input ", x.desc());
  require_vector("rms_norm_", "weight", w, x.dim(-1));
  cpu::rms_norm_(x, w, eps);
}

void layer_norm_(Tensor& x, float eps) {
  require_f32_inplace("layer_norm_", x);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[layer_norm_] bad input ", x.desc());
  cpu::layer_norm_(x, eps);
}

void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps) {
  require_f32_inplace("group_norm_", x);
  ZI_CHECK(x.ndim() == 3, "[group_norm_] x must be [C, H, W], got ", x.desc());
  ZI_CHECK(groups > 0 && x.dim(0) % groups == 0, "[group_norm_] ", groups, " groups do not divide C of ",
           x.desc());
  ZI_CHECK(x.dim(1) * x.dim(2) > 0, "[group_norm_] empty plane in ", x.desc());
  Tensor w = weight_input("group_norm_", "weight", weight), b = weight_input("group_norm_", "bias", bias);
  require_vector("group_norm_", "weight", w, x.dim(0));
  require_vector("group_norm_", "bias", b, x.dim(0));
  cpu::group_norm_(x, groups, w, b, eps);
}

void silu_(Tensor& x) {
  require_f32_inplace("silu_", x);
  cpu::silu_(x);
}

void tanh_(Tensor& x) {
  require_f32_inplace("tanh_", x);
  cpu::tanh_(x);
}

Tensor silu_mul(const Tensor& a_in, const Tensor& b_in) {
  Tensor a = f32_input("silu_mul", a_in), b = f32_input("silu_mul", b_in);
  require_same_shape("silu_mul", a, b);
  Tensor out = Tensor::empty(a.shape(), DType::F32);
  cpu::silu_mul(a, b, out);
  return out;
}

void add_(Tensor& x, const Tensor& y_in) {
  require_f32_inplace("add_", x);
  Tensor y = f32_input("add_", y_in);
  require_same_shape("add_", x, y);
  cpu::add_(x, y);
}

void mul_(Tensor& x, const Tensor& y_in) {
  require_f32_inplace("mul_", x);
  Tensor y = f32_input("mul_", y_in);
  require_same_shape("mul_", x, y);
  cpu::mul_(x, y);
}

void scale_(Tensor& x, float s) {
  require_f32_inplace("scale_", x);
  cpu::scale_(x, s);
}

void add_scalar_(Tensor& x, float s) {
  require_f32_inplace("add_scalar_", x);
  cpu::add_scalar_(x, s);
}

void mul_rows_(Tensor& x, const Tensor& v_in) {
  require_f32_inplace("mul_rows_", x);
  Tensor v = weight_input("mul_rows_", "v", v_in);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[mul_rows_] bad input ", x.desc());
  require_vector("mul_rows_", "v", v, x.dim(-1));
  cpu::mul_rows_(x, v);
}

void add_gated_(Tensor& x, const Tensor& v_in, const Tensor& y_in) {
  require_f32_inplace("add_gated_", x);
  Tensor v = weight_input("add_gated_", "gate", v_in), y = f32_input("add_gated_", y_in);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[add_gated_] bad input ", x.desc());
  require_same_shape("add_gated_", x, y);
  require_vector("add_gated_", "gate", v, x.dim(-1));
  cpu::add_gated_(x, v, y);
}

// Shared checks of both RoPE forms: x [S, H, D] with D even, cos/sin [S, D/2] f32.
static void check_rope(const char* op, const Tensor& x, const Tensor& cos, const Tensor& sin) {
  require_f32_inplace(op, x);
  ZI_CHECK(x.ndim() == 3 && x.dim(2) % 2 == 0, "[", op, "] x must be [S, H, D] with D even, got ", x.desc());
  const Shape cs{x.dim(0), x.dim(2) / 2};
  for (const Tensor* t : {&cos, &sin}) {
    require_cpu(op, *t);
    ZI_CHECK(t->dtype() == DType::F32 && t->is_contiguous() && t->shape() == cs, "[", op,
             "] cos/sin must be contiguous f32 ", shape_str(cs), " for x ", x.desc(), ", got ", t->desc());
  }
}

void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  check_rope("rope_halves_", x, cos, sin);
  cpu::rope_halves_(x, cos, sin);
}

void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  check_rope("rope_pairs_", x, cos, sin);
  cpu::rope_pairs_(x, cos, sin);
}

Tensor attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, float scale, bool causal,
                 int64_t kv_len) {
  Tensor q = f32_input("attention", q_in), k = f32_input("attention", k_in), v = f32_input("attention", v_in);
  ZI_CHECK(q.ndim() == 3 && k.ndim() == 3, "[attention] q and k must be [S, H, D], got q ", q.desc(), " k ",
           k.desc());
  require_same_shape("attention", k, v);
  ZI_CHECK(q.dim(2) == k.dim(2) && q.dim(2) > 0, "[attention] head dim differs: q ", q.desc(), " k ", k.desc());
  ZI_CHECK(k.dim(1) > 0 && q.dim(1) % k.dim(1) == 0, "[attention] q heads must be a multiple of kv heads: q ",
           q.desc(), " k ", k.desc());
  ZI_CHECK(kv_len >= -1 && kv_len <= k.dim(0), "[attention] kv_len ", kv_len, " outside [-1, ", k.dim(0),
           "] for k ", k.desc());
  Tensor out = Tensor::empty(q.shape(), DType::F32);
  cpu::attention(q, k, v, scale, causal, kv_len, out);
  return out;
}

Tensor conv2d(const Tensor& x_in, const Tensor& w_in, const Tensor* bias, int pad) {
  Tensor x = f32_input("conv2d", x_in), w = weight_input("conv2d", "weight", w_in);
  ZI_CHECK(x.ndim() == 3 && w.ndim() == 4 && w.dim(1) == x.dim(0), "[conv2d] x ", x.desc(),
           " does not match weight ", w.desc(), " (x [Cin, H, W], w [Cout, Cin, kh, kw])");
  ZI_CHECK(pad >= 0, "[conv2d] negative padding ", pad);
  const int64_t ho = x.dim(1) + 2 * pad - w.dim(2) + 1, wo = x.dim(2) + 2 * pad - w.dim(3) + 1;
  ZI_CHECK(ho > 0 && wo > 0, "[conv2d] kernel ", w.desc(), " larger than padded input ", x.desc(), " (pad ", pad,
           ")");
  Tensor b;
  if (bias) {
    b = weight_input("conv2d", "bias", *bias);
    require_vector("conv2d", "bias", b, w.dim(0));
  }
  Tensor out = Tensor::empty({w.dim(0), ho, wo}, DType::F32);
  cpu::conv2d(x, w, bias ? &b : nullptr, pad, out);
  return out;
}

Tensor upsample_nearest2x(const Tensor& x_in) {
  Tensor x = f32_input("upsample_nearest2x", x_in);
  ZI_CHECK(x.ndim() == 3, "[upsample_nearest2x] x must be [C, H, W], got ", x.desc());
  Tensor out = Tensor::empty({x.dim(0), 2 * x.dim(1), 2 * x.dim(2)}, DType::F32);
  cpu::upsample_nearest2x(x, out);
  return out;
}

Tensor concat0(const std::vector<Tensor>& parts_in) {
  ZI_CHECK(!parts_in.empty(), "[concat0] no tensors");
  std::vector<Tensor> parts;
  Shape os = parts_in[0].shape();
  ZI_CHECK(!os.empty(), "[concat0] scalars cannot be concatenated");
  os[0] = 0;
  for (const Tensor& p : parts_in) {
    require_cpu("concat0", p);
    Shape a = p.shape(), b = parts_in[0].shape();
    ZI_CHECK(p.dtype() == parts_in[0].dtype() && a.size() == b.size() &&
                 std::equal(a.begin() + 1, a.end(), b.begin() + 1),
             "[concat0] ", p.desc(), " does not match ", parts_in[0].desc(), " outside dimension 0");
    os[0] += p.dim(0);
    parts.push_back(p.contiguous(Tag::Workspace));
  }
  Tensor out = Tensor::empty(os, parts_in[0].dtype());
  cpu::concat0(parts, out);
  return out;
}

Tensor embedding(const Tensor& table_in, const std::vector<int32_t>& ids) {
  Tensor table = weight_input("embedding", "table", table_in);
  ZI_CHECK(table.ndim() == 2, "[embedding] table must be [V, D], got ", table.desc());
  for (int32_t id : ids)
    ZI_CHECK(id >= 0 && id < table.dim(0), "[embedding] id ", id, " outside the table ", table.desc());
  Tensor out = Tensor::empty({int64_t(ids.size()), table.dim(1)}, DType::F32);
  cpu::embedding(table, ids, out);
  return out;
}

}  // namespace zi::ops
