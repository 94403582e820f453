// The one dispatch point of ops.h: every op checks its arguments here (shapes, dtypes,
// devices, contiguity, with a "[op] ..." message), allocates its result, and calls the
// backend of the tensors' device through ZI_OP: cpu:: (f32 activations) or cuda:: (f32 or
// bf16; the result has the activation's dtype). Both backends declare every op, fused ones
// included, with one signature (backends/cpu/cpu_ops.h, backends/cuda/cuda_ops.h).
#include "ops/ops.h"

#include <algorithm>

#include "backends/cpu/cpu_ops.h"
#include "backends/cuda/cuda_ops.h"
#include "core/check.h"
#include "core/quant.h"

namespace zi::ops {
namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

// The device an op runs on: that of its first (activation) operand. Every other operand must
// be on the same device; the CPU takes f32 activations, CUDA f32 or bf16.
Device device_of(const char* op, const Tensor& t) {
  ZI_CHECK(t.defined(), "[", op, "] undefined tensor");
  return t.device();
}

void require_device(const char* op, const Tensor& t, Device d) {
  ZI_CHECK(t.defined(), "[", op, "] undefined tensor");
  if (t.device() != d)
    fail(str_cat("[", op, "] ", t.desc(), " is on the ", device_name(t.device()), " but the op runs on the ",
                 device_name(d), " (mixed devices)"));
}

bool act_dtype_ok(const Tensor& t) {
  return t.dtype() == DType::F32 || (t.device() == Device::CUDA && t.dtype() == DType::BF16);
}

// An activation that the op writes in place: must be contiguous already.
void require_act_contiguous(const char* op, const Tensor& t) {
  ZI_CHECK(t.defined(), "[", op, "] undefined tensor");
  ZI_CHECK(act_dtype_ok(t) && t.is_contiguous(), "[", op, "] needs a contiguous ",
           t.device() == Device::CUDA ? "f32/bf16" : "f32", " tensor, got ", t.desc());
}

// An activation written in place: checked, and its e4m3 copy (if any) dropped, as it is stale now.
void require_act_inplace(const char* op, Tensor& t) {
  require_act_contiguous(op, t);
  ZI_CHECK(!t.values_in_e4m3_copy_only(), "[", op, "] ", t.desc(),
           " exists only as its e4m3 copy (for an fp8 linear): its producer should have kept the bf16 values");
  t.drop_e4m3_copy();
}

// An activation that is only read, on device d: a contiguous copy is made if needed. Only a
// linear may take one whose values exist in its e4m3 copy alone (copy_only_ok).
Tensor act_input(const char* op, const Tensor& t, Device d, bool copy_only_ok = false) {
  require_device(op, t, d);
  ZI_CHECK(act_dtype_ok(t), "[", op, "] expects an ", d == Device::CUDA ? "f32/bf16" : "f32", " activation, got ",
           t.desc());
  ZI_CHECK(copy_only_ok || !t.values_in_e4m3_copy_only(), "[", op, "] ", t.desc(),
           " exists only as its e4m3 copy (for an fp8 linear): its producer should have kept the bf16 values");
  return t.contiguous(Tag::Workspace);
}

// A weight-like operand (any float dtype) on device d, contiguous.
Tensor weight_input(const char* op, const char* what, const Tensor& t, Device d) {
  require_device(op, t, d);
  ZI_CHECK(is_float(t.dtype()), "[", op, "] ", what, " must be f32/bf16/f16, got ", t.desc());
  return t.contiguous(Tag::Workspace);
}

void require_vector(const char* op, const char* what, const Tensor& v, int64_t n) {
  ZI_CHECK(v.ndim() == 1 && v.dim(0) == n, "[", op, "] ", what, " must be [", n, "], got ", v.desc());
}

void require_same_shape(const char* op, const Tensor& a, const Tensor& b) {
  ZI_CHECK(a.shape() == b.shape(), "[", op, "] shape mismatch: ", a.desc(), " vs ", b.desc());
}

// The one dispatch point: runs the backend function `fn` of device d, cpu::fn or cuda::fn (the two
// backends give every op the same signature), the CUDA one timed as `op` under ZI_CUDA_PROFILE=1.
// A CPU-only build has no GPU tensors (their allocation fails), so it calls the CPU backend only.
#ifdef ZIMAGE_HAVE_CUDA
#define ZI_OP(op, d, fn, ...)       \
  do {                              \
    if ((d) == Device::CUDA) {      \
      cuda::OpTimer zi_prof_(op);   \
      cuda::fn(__VA_ARGS__);        \
    } else {                        \
      cpu::fn(__VA_ARGS__);         \
    }                               \
  } while (0)
#else
#define ZI_OP(op, d, fn, ...) ((void)(op), (void)(d), cpu::fn(__VA_ARGS__))
#endif

// The producers of an fp8 GEMM's input (rms_norm, rms_norm_add_norm_, silu_mul, silu_mul_halves
// with `e4m3_for`),
// returning their result of shape `shape` and dtype `dt`: when the consuming weight is fp8 and
// the result bf16 on the GPU with fp8 GEMMs on, `fused(out, q)` runs the producer's e4m3 variant
// into q (F8_E4M3 [rows, K] with row scales) and the copy is attached to out; otherwise, or where
// the variant does not take the shape, `plain(out)` runs. With `e4m3_only` (the caller's word
// that fp8 GEMMs on weights like e4m3_for are the only readers) where those GEMMs read the copy
// and cuda::e4m3_only_enabled(), out is bound to no memory and the variant writes the copy alone.
// (A CPU-only build's cuda::e4m3_copies_enabled() is false: the fused variants are never called.)
template <class Fused, class Plain>
Tensor produce_for(const Tensor* e4m3_for, bool e4m3_only, Device d, const Shape& shape, DType dt, const char* op,
                   Fused fused, Plain plain) {
  const int64_t numel = shape_numel(shape);
  if (e4m3_for && e4m3_for->dtype() == DType::F8_E4M3 && d == Device::CUDA && dt == DType::BF16 && numel > 0 &&
      cuda::e4m3_copies_enabled()) {
    const int64_t K = shape.back(), rows = numel / K;
    const bool only = e4m3_only && cuda::e4m3_only_enabled() && cuda::fp8_reads_copy(rows, *e4m3_for);
    Tensor out = only ? Tensor::unbound(shape, dt, d, Tag::Activations) : Tensor::empty(shape, dt, Tag::Activations, d);
    Tensor q = Tensor::empty({rows, K}, DType::F8_E4M3, Tag::Activations, d);
    q.set_row_scale(Tensor::empty({rows}, DType::F32, Tag::Activations, d));
#ifdef ZIMAGE_HAVE_CUDA
    cuda::OpTimer prof(op);
#else
    (void)op;
#endif
    if (fused(out, q)) {
      out.set_e4m3_copy(std::move(q));
      return out;
    }
  }
  Tensor out = Tensor::empty(shape, dt, Tag::Activations, d);
  plain(out);
  return out;
}

}  // namespace

Tensor to_compute(const PhaseContext& c, const Tensor& t, bool fresh) {
  ZI_CHECK(t.defined() && is_float(t.dtype()), "[to_compute] needs a float tensor, got ",
           t.defined() ? t.desc() : std::string("undefined"));
  const DType act = c.device == Device::CPU ? DType::F32 : c.act;
  Tensor out = t.to_device(c.device);
  if (out.dtype() != act) return out.to(act);
  if (fresh && out.raw() == t.raw()) return out.clone();
  return out;
}

Tensor to_device(const PhaseContext& c, const Tensor& t) {
  ZI_CHECK(t.defined(), "[to_device] undefined tensor");
  return t.to_device(c.device);
}

Tensor to_host_f32(const Tensor& t) {
  ZI_CHECK(t.defined() && is_float(t.dtype()), "[to_host_f32] needs a float tensor");
  Tensor h = t.to_device(Device::CPU);
  return h.dtype() == DType::F32 ? h : h.to(DType::F32);
}

Tensor linear(const Tensor& x_in, const Tensor& w_in, const Tensor* bias) {
  const Device d = device_of("linear", x_in);
  Tensor x = act_input("linear", x_in, d, true), w;
  if (is_quantized(w_in.dtype())) {  // weight formats: contiguous [N, K] as loaded
    require_device("linear", w_in, d);
    ZI_CHECK(w_in.is_contiguous() && w_in.ndim() == 2, "[linear] a ", dtype_name(w_in.dtype()),
             " weight must be a contiguous [N, K], got ", w_in.desc());
    w = w_in;
  } else {
    w = weight_input("linear", "weight", w_in, d);
  }
  ZI_CHECK(w.ndim() == 2, "[linear] weight must be [N, K], got ", w.desc());
  ZI_CHECK(!x.values_in_e4m3_copy_only() || w.dtype() == DType::F8_E4M3, "[linear] ", x.desc(),
           " exists only as its e4m3 copy, which a ", dtype_name(w.dtype()),
           " weight cannot read: its producer should have kept the bf16 values");
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) == w.dim(1) && w.dim(1) > 0, "[linear] x ", x.desc(),
           " does not match weight ", w.desc(), " (x's last dim must equal K = w.dim(1) > 0)");
  Tensor b;
  if (bias) {
    b = weight_input("linear", "bias", *bias, d);
    require_vector("linear", "bias", b, w.dim(0));
  }
  Shape os = x.shape();
  os.back() = w.dim(0);
  Tensor y = Tensor::empty(os, x.dtype(), Tag::Activations, d);
  if (is_quantized(w.dtype()))
    ZI_OP("linear_quant", d, linear_quant, x, w, bias ? &b : nullptr, y);
  else
    ZI_OP("linear", d, linear, x, w, bias ? &b : nullptr, y);
  return y;
}

void warm_up_linears(const PhaseContext& c, const std::vector<std::array<int64_t, 3>>& mnk) {
  if (c.device == Device::CPU) return;
  for (const auto& [M, N, K] : mnk) {
    if (M < 1 || N < 1 || K < 1) continue;
    // Uninitialised: the values do not matter, and a memset would be one more synchronisation.
    const Tensor x = Tensor::empty({M, K}, c.act, Tag::Workspace, c.device);
    const Tensor w = Tensor::empty({N, K}, c.act, Tag::Workspace, c.device);
    (void)linear(x, w);
  }
}

void rms_norm_(Tensor& x, const Tensor& weight, float eps) {
  const Device d = device_of("rms_norm_", x);
  require_act_inplace("rms_norm_", x);
  Tensor w = weight_input("rms_norm_", "weight", weight, d);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[rms_norm_] bad input ", x.desc());
  require_vector("rms_norm_", "weight", w, x.dim(-1));
  ZI_OP("rms_norm_", d, rms_norm_, x, w, eps);
}

Tensor rms_norm(const Tensor& x_in, const Tensor& weight, float eps, const Tensor* scale, const Tensor* e4m3_for,
                bool e4m3_only) {
  const Device d = device_of("rms_norm", x_in);
  Tensor x = act_input("rms_norm", x_in, d);
  Tensor w = weight_input("rms_norm", "weight", weight, d);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[rms_norm] bad input ", x.desc());
  require_vector("rms_norm", "weight", w, x.dim(-1));
  Tensor s;
  if (scale) {
    s = weight_input("rms_norm", "scale", *scale, d);
    require_vector("rms_norm", "scale", s, x.dim(-1));
  }
  const Tensor* sp = scale ? &s : nullptr;
  return produce_for(
      e4m3_for, e4m3_only, d, x.shape(), x.dtype(), "rms_norm+e4m3",
      [&](Tensor& y, Tensor& q) { return cuda::rms_norm_e4m3(x, w, eps, sp, y, q); },
      [&](Tensor& y) { ZI_OP("rms_norm", d, rms_norm, x, w, eps, sp, y); });
}

void rms_norm_add_(Tensor& x, Tensor& y, const Tensor& weight, float eps, const Tensor* gate) {
  const Device d = device_of("rms_norm_add_", x);
  require_act_inplace("rms_norm_add_", x);
  require_device("rms_norm_add_", y, d);
  require_act_inplace("rms_norm_add_", y);
  require_same_shape("rms_norm_add_", x, y);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[rms_norm_add_] bad input ", x.desc());
  Tensor w = weight_input("rms_norm_add_", "weight", weight, d);
  require_vector("rms_norm_add_", "weight", w, x.dim(-1));
  Tensor g;
  if (gate) {
    g = weight_input("rms_norm_add_", "gate", *gate, d);
    require_vector("rms_norm_add_", "gate", g, x.dim(-1));
  }
  ZI_OP("rms_norm_add_", d, rms_norm_add_, x, y, w, eps, gate ? &g : nullptr);
}

Tensor rms_norm_add_norm_(Tensor& x, Tensor& y, const Tensor& w_add, const Tensor* gate, const Tensor& w_norm,
                          const Tensor* scale, float eps, const Tensor* e4m3_for, bool e4m3_only) {
  const char* op = "rms_norm_add_norm_";
  const Device d = device_of(op, x);
  require_act_inplace(op, x);
  require_device(op, y, d);
  require_act_inplace(op, y);
  require_same_shape(op, x, y);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[", op, "] bad input ", x.desc());
  const int64_t D = x.dim(-1);
  Tensor wa = weight_input(op, "w_add", w_add, d), wn = weight_input(op, "w_norm", w_norm, d), g, s;
  require_vector(op, "w_add", wa, D);
  require_vector(op, "w_norm", wn, D);
  if (gate) {
    g = weight_input(op, "gate", *gate, d);
    require_vector(op, "gate", g, D);
  }
  if (scale) {
    s = weight_input(op, "scale", *scale, d);
    require_vector(op, "scale", s, D);
  }
  const Tensor* gp = gate ? &g : nullptr;
  const Tensor* sp = scale ? &s : nullptr;
  return produce_for(
      e4m3_for, e4m3_only, d, x.shape(), x.dtype(), "rms_norm_add_norm_+e4m3",
      [&](Tensor& h, Tensor& q) { return cuda::rms_norm_add_norm_e4m3(x, y, wa, gp, wn, sp, eps, h, q); },
      [&](Tensor& h) { ZI_OP("rms_norm_add_norm_", d, rms_norm_add_norm_, x, y, wa, gp, wn, sp, eps, h); });
}

void layer_norm_(Tensor& x, float eps) {
  const Device d = device_of("layer_norm_", x);
  require_act_inplace("layer_norm_", x);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[layer_norm_] bad input ", x.desc());
  ZI_OP("layer_norm_", d, layer_norm_, x, eps);
}

static void group_norm_impl(const char* op, Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps,
                            bool silu) {
  const Device d = device_of(op, x);
  require_act_inplace(op, x);
  ZI_CHECK(x.ndim() == 3, "[", op, "] x must be [C, H, W], got ", x.desc());
  ZI_CHECK(groups > 0 && x.dim(0) % groups == 0, "[", op, "] ", groups, " groups do not divide C of ", x.desc());
  ZI_CHECK(x.dim(1) * x.dim(2) > 0, "[", op, "] empty plane in ", x.desc());
  Tensor w = weight_input(op, "weight", weight, d), b = weight_input(op, "bias", bias, d);
  require_vector(op, "weight", w, x.dim(0));
  require_vector(op, "bias", b, x.dim(0));
  ZI_OP(op, d, group_norm_, x, groups, w, b, eps, silu);
}

void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps) {
  group_norm_impl("group_norm_", x, groups, weight, bias, eps, false);
}

void group_norm_silu_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps) {
  group_norm_impl("group_norm_silu_", x, groups, weight, bias, eps, true);
}

std::vector<double> group_region_sums(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                                      const std::vector<double>& mean) {
  const char* op = "group_region_sums";
  const Device d = device_of(op, x);
  require_act_contiguous(op, x);
  ZI_CHECK(x.ndim() == 3, "[", op, "] x must be [C, H, W], got ", x.desc());
  ZI_CHECK(groups > 0 && x.dim(0) % groups == 0, "[", op, "] ", groups, " groups do not divide C of ", x.desc());
  ZI_CHECK(0 <= y0 && y0 <= y1 && y1 <= x.dim(1) && 0 <= x0 && x0 <= x1 && x1 <= x.dim(2), "[", op,
           "] bad region rows [", y0, ", ", y1, ") cols [", x0, ", ", x1, ") of ", x.desc());
  ZI_CHECK(mean.empty() || mean.size() == size_t(groups), "[", op, "] ", mean.size(), " means for ", groups, " groups");
  std::vector<double> out;
  ZI_OP(op, d, group_region_sums, x, groups, y0, y1, x0, x1, mean, out);
  return out;
}

void group_norm_given_(Tensor& x, int groups, const std::vector<float>& mean, const std::vector<float>& rstd,
                       const Tensor& weight, const Tensor& bias) {
  const char* op = "group_norm_given_";
  const Device d = device_of(op, x);
  require_act_inplace(op, x);
  ZI_CHECK(x.ndim() == 3, "[", op, "] x must be [C, H, W], got ", x.desc());
  ZI_CHECK(groups > 0 && x.dim(0) % groups == 0, "[", op, "] ", groups, " groups do not divide C of ", x.desc());
  ZI_CHECK(mean.size() == size_t(groups) && rstd.size() == size_t(groups), "[", op, "] ", mean.size(), " means and ",
           rstd.size(), " rstds for ", groups, " groups");
  Tensor w = weight_input(op, "weight", weight, d), b = weight_input(op, "bias", bias, d);
  require_vector(op, "weight", w, x.dim(0));
  require_vector(op, "bias", b, x.dim(0));
  ZI_OP(op, d, group_norm_given_, x, groups, mean, rstd, w, b);
}

void paste_(Tensor& dst, const Tensor& src, int64_t y0, int64_t x0) {
  const char* op = "paste_";
  const Device d = device_of(op, dst);
  require_act_inplace(op, dst);
  ZI_CHECK(src.defined() && src.device() == d && src.dtype() == dst.dtype(), "[", op, "] src ", src.desc(),
           " must match dst ", dst.desc(), " in device and dtype");
  ZI_CHECK(dst.ndim() == 3 && src.ndim() == 3 && src.dim(0) == dst.dim(0) && y0 >= 0 && x0 >= 0 &&
               y0 + src.dim(1) <= dst.dim(1) && x0 + src.dim(2) <= dst.dim(2),
           "[", op, "] ", src.desc(), " does not fit into ", dst.desc(), " at (", y0, ", ", x0, ")");
  ZI_OP(op, d, paste_, dst, src, y0, x0);
}

void silu_(Tensor& x) {
  const Device d = device_of("silu_", x);
  require_act_inplace("silu_", x);
  ZI_OP("silu_", d, silu_, x);
}

void tanh_(Tensor& x) {
  const Device d = device_of("tanh_", x);
  require_act_inplace("tanh_", x);
  ZI_OP("tanh_", d, tanh_, x);
}

Tensor silu_mul(const Tensor& a_in, const Tensor& b_in, const Tensor* e4m3_for, bool e4m3_only) {
  const Device d = device_of("silu_mul", a_in);
  Tensor a = act_input("silu_mul", a_in, d), b = act_input("silu_mul", b_in, d);
  require_same_shape("silu_mul", a, b);
  ZI_CHECK(a.dtype() == b.dtype(), "[silu_mul] dtypes differ: ", a.desc(), " vs ", b.desc());
  return produce_for(
      e4m3_for, e4m3_only, d, a.shape(), a.dtype(), "silu_mul+e4m3",
      [&](Tensor& out, Tensor& q) { return cuda::silu_mul_e4m3(a, b, out, q); },
      [&](Tensor& out) { ZI_OP("silu_mul", d, silu_mul, a, b, out); });
}

Tensor silu_mul_halves(const Tensor& y_in, const Tensor* e4m3_for, bool e4m3_only) {
  const Device d = device_of("silu_mul_halves", y_in);
  Tensor y = act_input("silu_mul_halves", y_in, d);
  ZI_CHECK(y.ndim() >= 1 && y.dim(-1) % 2 == 0, "[silu_mul_halves] the last dimension must be even, got ", y.desc());
  Shape os = y.shape();
  os.back() /= 2;
  return produce_for(
      e4m3_for, e4m3_only, d, os, y.dtype(), "silu_mul_halves+e4m3",
      [&](Tensor& out, Tensor& q) { return cuda::silu_mul_halves_e4m3(y, out, q); },
      [&](Tensor& out) {
        if (out.numel() > 0) ZI_OP("silu_mul_halves", d, silu_mul_halves, y, out);
      });
}

void add_(Tensor& x, const Tensor& y_in) {
  const Device d = device_of("add_", x);
  require_act_inplace("add_", x);
  Tensor y = act_input("add_", y_in, d);
  require_same_shape("add_", x, y);
  ZI_OP("add_", d, add_, x, y);
}

void mul_(Tensor& x, const Tensor& y_in) {
  const Device d = device_of("mul_", x);
  require_act_inplace("mul_", x);
  Tensor y = act_input("mul_", y_in, d);
  require_same_shape("mul_", x, y);
  ZI_OP("mul_", d, mul_, x, y);
}

void scale_(Tensor& x, float s) {
  const Device d = device_of("scale_", x);
  require_act_inplace("scale_", x);
  ZI_OP("scale_", d, scale_, x, s);
}

void add_scalar_(Tensor& x, float s) {
  const Device d = device_of("add_scalar_", x);
  require_act_inplace("add_scalar_", x);
  ZI_OP("add_scalar_", d, add_scalar_, x, s);
}

void scale_gate_rows_(Tensor& x) {
  const Device d = device_of("scale_gate_rows_", x);
  require_act_inplace("scale_gate_rows_", x);
  ZI_CHECK(x.ndim() == 2 && x.dim(0) % 2 == 0, "[scale_gate_rows_] needs [2·n, D] (scale and gate rows in pairs), got ",
           x.desc());
  ZI_OP("scale_gate_rows_", d, scale_gate_rows_, x);
}

void mul_rows_(Tensor& x, const Tensor& v_in) {
  const Device d = device_of("mul_rows_", x);
  require_act_inplace("mul_rows_", x);
  Tensor v = weight_input("mul_rows_", "v", v_in, d);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[mul_rows_] bad input ", x.desc());
  require_vector("mul_rows_", "v", v, x.dim(-1));
  ZI_OP("mul_rows_", d, mul_rows_, x, v);
}

void add_gated_(Tensor& x, const Tensor& v_in, const Tensor& y_in) {
  const Device d = device_of("add_gated_", x);
  require_act_inplace("add_gated_", x);
  Tensor v = weight_input("add_gated_", "gate", v_in, d), y = act_input("add_gated_", y_in, d);
  ZI_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[add_gated_] bad input ", x.desc());
  require_same_shape("add_gated_", x, y);
  require_vector("add_gated_", "gate", v, x.dim(-1));
  ZI_OP("add_gated_", d, add_gated_, x, v, y);
}

// Shared checks of both RoPE forms: x [S, H, D] with D even, cos/sin [S, D/2] f32.
static Device check_rope(const char* op, Tensor& x, const Tensor& cos, const Tensor& sin) {
  const Device d = device_of(op, x);
  require_act_inplace(op, x);
  ZI_CHECK(x.ndim() == 3 && x.dim(2) % 2 == 0, "[", op, "] x must be [S, H, D] with D even, got ", x.desc());
  const Shape cs{x.dim(0), x.dim(2) / 2};
  for (const Tensor* t : {&cos, &sin}) {
    require_device(op, *t, d);
    ZI_CHECK(t->dtype() == DType::F32 && t->is_contiguous() && t->shape() == cs, "[", op,
             "] cos/sin must be contiguous f32 ", shape_str(cs), " for x ", x.desc(), ", got ", t->desc());
  }
  return d;
}

void rms_norm_rope_pairs_(Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin) {
  const Device d = check_rope("rms_norm_rope_pairs_", x, cos, sin);
  Tensor w = weight_input("rms_norm_rope_pairs_", "weight", weight, d);
  require_vector("rms_norm_rope_pairs_", "weight", w, x.dim(2));
  ZI_OP("rms_norm_rope_pairs_", d, rms_norm_rope_pairs_, x, w, eps, cos, sin);
}

Tensor rms_norm_rope_pairs(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin) {
  const Device d = device_of("rms_norm_rope_pairs", x);
  require_device("rms_norm_rope_pairs", x, d);
  ZI_CHECK(act_dtype_ok(x), "[rms_norm_rope_pairs] expects an ", d == Device::CUDA ? "f32/bf16" : "f32",
           " activation, got ", x.desc());
  ZI_CHECK(x.ndim() == 3 && x.dim(2) % 2 == 0, "[rms_norm_rope_pairs] x must be [S, H, D] with D even, got ",
           x.desc());
  ZI_CHECK(x.strides()[2] == 1 && x.strides()[1] == x.dim(2) && x.strides()[0] >= x.dim(1) * x.dim(2),
           "[rms_norm_rope_pairs] x's heads must be contiguous within a row (strides [≥ H·D, D, 1]), got strides ",
           shape_str(x.strides()), " for ", x.desc());
  // cos/sin are checked against a contiguous tensor of x's shape (check_rope wants one in place).
  Tensor out = Tensor::empty(x.shape(), x.dtype(), Tag::Activations, d);
  check_rope("rms_norm_rope_pairs", out, cos, sin);
  Tensor w = weight_input("rms_norm_rope_pairs", "weight", weight, d);
  require_vector("rms_norm_rope_pairs", "weight", w, x.dim(2));
  if (out.numel() > 0) ZI_OP("rms_norm_rope_pairs", d, rms_norm_rope_pairs, x, w, eps, cos, sin, out);
  return out;
}

void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  const Device d = check_rope("rope_halves_", x, cos, sin);
  ZI_OP("rope_halves_", d, rope_halves_, x, cos, sin);
}

void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  const Device d = check_rope("rope_pairs_", x, cos, sin);
  ZI_OP("rope_pairs_", d, rope_pairs_, x, cos, sin);
}

Tensor attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, float scale, bool causal,
                 int64_t kv_len) {
  const Device d = device_of("attention", q_in);
  Tensor q = act_input("attention", q_in, d), k = act_input("attention", k_in, d),
         v = act_input("attention", v_in, d);
  ZI_CHECK(q.ndim() == 3 && k.ndim() == 3, "[attention] q and k must be [S, H, D], got q ", q.desc(), " k ",
           k.desc());
  require_same_shape("attention", k, v);
  ZI_CHECK(q.dtype() == k.dtype() && k.dtype() == v.dtype(), "[attention] q, k, v dtypes differ: ", q.desc(), " ",
           k.desc(), " ", v.desc());
  ZI_CHECK(q.dim(2) == k.dim(2) && q.dim(2) > 0, "[attention] head dim differs: q ", q.desc(), " k ", k.desc());
  ZI_CHECK(k.dim(1) > 0 && q.dim(1) % k.dim(1) == 0, "[attention] q heads must be a multiple of kv heads: q ",
           q.desc(), " k ", k.desc());
  ZI_CHECK(kv_len >= -1 && kv_len <= k.dim(0), "[attention] kv_len ", kv_len, " outside [-1, ", k.dim(0),
           "] for k ", k.desc());
  Tensor out = Tensor::empty(q.shape(), q.dtype(), Tag::Activations, d);
  ZI_OP("attention", d, attention, q, k, v, scale, causal, kv_len, out);
  return out;
}

Tensor conv2d(const Tensor& x_in, const Tensor& w_in, const Tensor* bias, int pad, int stride) {
  const Device d = device_of("conv2d", x_in);
  Tensor x = act_input("conv2d", x_in, d), w = weight_input("conv2d", "weight", w_in, d);
  ZI_CHECK(x.ndim() == 3 && w.ndim() == 4 && w.dim(1) == x.dim(0), "[conv2d] x ", x.desc(),
           " does not match weight ", w.desc(), " (x [Cin, H, W], w [Cout, Cin, kh, kw])");
  ZI_CHECK(pad >= 0, "[conv2d] negative padding ", pad);
  ZI_CHECK(stride >= 1, "[conv2d] stride must be >= 1, got ", stride);
  // The last tap of the kernel must fit the padded input; Ho = (H + 2p − kh) / stride + 1.
  const int64_t hs = x.dim(1) + 2 * pad - w.dim(2), ws = x.dim(2) + 2 * pad - w.dim(3);
  ZI_CHECK(hs >= 0 && ws >= 0, "[conv2d] kernel ", w.desc(), " larger than padded input ", x.desc(), " (pad ", pad,
           ")");
  const int64_t ho = hs / stride + 1, wo = ws / stride + 1;
  Tensor b;
  if (bias) {
    b = weight_input("conv2d", "bias", *bias, d);
    require_vector("conv2d", "bias", b, w.dim(0));
  }
  Tensor out = Tensor::empty({w.dim(0), ho, wo}, x.dtype(), Tag::Activations, d);
  ZI_OP("conv2d", d, conv2d, x, w, bias ? &b : nullptr, pad, stride, out);
  return out;
}

// Built from two device ops (a zeroed tensor, paste_), so no backend has a kernel of its own.
Tensor pad2d(const Tensor& x, int64_t left, int64_t right, int64_t top, int64_t bottom) {
  const char* op = "pad2d";
  const Device d = device_of(op, x);
  ZI_CHECK(act_dtype_ok(x), "[", op, "] expects an ", d == Device::CUDA ? "f32/bf16" : "f32", " activation, got ",
           x.desc());
  ZI_CHECK(x.ndim() == 3, "[", op, "] x must be [C, H, W], got ", x.desc());
  ZI_CHECK(left >= 0 && right >= 0 && top >= 0 && bottom >= 0, "[", op, "] negative padding (left ", left,
           ", right ", right, ", top ", top, ", bottom ", bottom, ")");
  Tensor out = Tensor::zeros({x.dim(0), top + x.dim(1) + bottom, left + x.dim(2) + right}, x.dtype(),
                             Tag::Activations, d);
  if (x.numel()) ZI_OP(op, d, paste_, out, x, top, left);  // x may be a strided view: paste_ reads it as it lies
  return out;
}

Tensor upsample_nearest2x(const Tensor& x_in) {
  const Device d = device_of("upsample_nearest2x", x_in);
  Tensor x = act_input("upsample_nearest2x", x_in, d);
  ZI_CHECK(x.ndim() == 3, "[upsample_nearest2x] x must be [C, H, W], got ", x.desc());
  Tensor out = Tensor::empty({x.dim(0), 2 * x.dim(1), 2 * x.dim(2)}, x.dtype(), Tag::Activations, d);
  ZI_OP("upsample_nearest2x", d, upsample_nearest2x, x, out);
  return out;
}

Tensor concat0(const std::vector<Tensor>& parts_in) {
  ZI_CHECK(!parts_in.empty(), "[concat0] no tensors");
  const Device d = device_of("concat0", parts_in[0]);
  std::vector<Tensor> parts;
  Shape os = parts_in[0].shape();
  ZI_CHECK(!os.empty(), "[concat0] scalars cannot be concatenated");
  os[0] = 0;
  for (const Tensor& p : parts_in) {
    require_device("concat0", p, d);
    Shape a = p.shape(), b = parts_in[0].shape();
    ZI_CHECK(p.dtype() == parts_in[0].dtype() && a.size() == b.size() &&
                 std::equal(a.begin() + 1, a.end(), b.begin() + 1),
             "[concat0] ", p.desc(), " does not match ", parts_in[0].desc(), " outside dimension 0");
    os[0] += p.dim(0);
    parts.push_back(p.contiguous(Tag::Workspace));
  }
  Tensor out = Tensor::empty(os, parts_in[0].dtype(), Tag::Activations, d);
  ZI_OP("concat0", d, concat0, parts, out);
  return out;
}

Tensor embedding(const Tensor& table_in, const std::vector<int32_t>& ids, DType act_in) {
  const Device d = device_of("embedding", table_in);
  if (is_quantized(table_in.dtype())) {  // weight formats (CPU): each row dequantized
    ZI_CHECK(d == Device::CPU && table_in.ndim() == 2 && table_in.is_contiguous(), "[embedding] a ",
             dtype_name(table_in.dtype()), " table must be a contiguous [V, D] host tensor, got ", table_in.desc());
    for (int32_t id : ids)
      ZI_CHECK(id >= 0 && id < table_in.dim(0), "[embedding] id ", id, " outside the table ", table_in.desc());
    Tensor out = Tensor::empty({int64_t(ids.size()), table_in.dim(1)}, DType::F32, Tag::Activations, d);
    for (size_t i = 0; i < ids.size(); ++i)
      quant::dequantize_rows(table_in, ids[i], ids[i] + 1, out.data<float>() + int64_t(i) * table_in.dim(1));
    return out;
  }
  Tensor table = weight_input("embedding", "table", table_in, d);
  ZI_CHECK(table.ndim() == 2, "[embedding] table must be [V, D], got ", table.desc());
  for (int32_t id : ids)
    ZI_CHECK(id >= 0 && id < table.dim(0), "[embedding] id ", id, " outside the table ", table.desc());
  // On the GPU the rows come out in the phase's activation dtype; on the CPU in f32.
  const DType act = d == Device::CPU ? DType::F32 : act_in;
  ZI_CHECK(act == DType::F32 || act == DType::BF16, "[embedding] activations must be f32 or bf16, got ",
           dtype_name(act));
  Tensor out = Tensor::empty({int64_t(ids.size()), table.dim(1)}, act, Tag::Activations, d);
  ZI_OP("embedding", d, embedding, table, ids, out);
  return out;
}

// ---- recorded work ----

Recording::Recording() = default;
Recording::~Recording() = default;
Recording::Recording(Recording&&) noexcept = default;
Recording& Recording::operator=(Recording&&) noexcept = default;
void Recording::replay() const {
  ZI_CHECK(g_, "[record] replay of an empty recording");
  g_->launch();
}
bool can_record(const PhaseContext& c) { return device::can_record(c.device); }
Recording record(const PhaseContext& c, const std::function<void()>& work, std::string* why) {
  Recording r;
  r.g_ = device::record(c.device, work, why);
  return r;
}

}  // namespace zi::ops
