// Every op the models use, one line each. Models call these and nothing else; the
// dispatch to a backend (cpu or cuda, by the device of the operands) happens in ops.cpp only
// (ZI_OP). A new op: declare it here, check its arguments in ops.cpp, implement it in
// backends/cpu/ and backends/cuda/ with one signature, add its rows to tests/op_table.h (an op
// made of other device ops, like pad2d, needs no backend function of its own).
//
// Conventions: activations are contiguous f32 tensors on the CPU, f32 or bf16 on CUDA (the
// result has the activation's dtype; bf16 ops compute in f32 and round once). Weight operands
// (`w`, norm weights, conv kernels) may be f32, bf16 or f16 and are widened on the fly, so a
// bf16 weight gives exactly the f32 result on the widened values. All operands of one op live
// on one device. Shapes are written [rows, cols]; `_` at the end of a name means in place.
// Results are new tensors tagged Tag::Activations.
#pragma once
#include <array>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace zi::device {
class Graph;
}

namespace zi::ops {

// Host data entering a model: a copy on the phase's device in its activation dtype (f32 on
// the CPU). May return `t` itself when nothing changes, unless `fresh`.
Tensor to_compute(const PhaseContext& c, const Tensor& t, bool fresh = false);
// The same, keeping the dtype (RoPE tables stay f32).
Tensor to_device(const PhaseContext& c, const Tensor& t);
// A host f32 copy (or `t` itself when it already is one): results leaving a model.
Tensor to_host_f32(const Tensor& t);

// y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]).  A Linear layer; w is stored [out, in].
Tensor linear(const Tensor& x, const Tensor& w, const Tensor* bias = nullptr);
// One linear per shape {M, N, K} on scratch operands of the context's activation dtype, the
// results discarded: on the GPU each GEMM's plan (algorithm choice) and its kernel's first load
// happen now — a warm-up while the weights are still loading — instead of at the first real
// call. Nothing on the CPU. Scratch: one [N, K] weight at a time, on the device.
void warm_up_linears(const PhaseContext& c, const std::vector<std::array<int64_t, 3>>& mnk);

// x[R, D] ← x / sqrt(mean(x², last dim) + eps) · weight[D]   (RMSNorm over the last dim).
void rms_norm_(Tensor& x, const Tensor& weight, float eps);
// Fused forms of the DiT's sequences, one pass each on the GPU; on the CPU exactly the
// composed ops (same order, same results):
//   y = RMSNorm(x)·weight (⊙ scale[D])        a new tensor, x unchanged   (= clone, rms_norm_, mul_rows_)
// e4m3_for (here and in rms_norm_add_norm_, silu_mul, silu_mul_halves): the weight of the linear that reads the
// result. When it is fp8 and the result bf16 on the GPU, the op also writes the result's e4m3
// copy (Tensor::e4m3_copy) and that linear skips its own quantization pass: same GEMM result.
// e4m3_only: the caller's word that every reader of the result is a linear whose weight has
// e4m3_for's format and shape; where those GEMMs read the copy, the op may then write the copy
// alone (cuda::e4m3_only_enabled: Tensor::values_in_e4m3_copy_only). Ignored on the CPU.
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor* scale = nullptr,
                const Tensor* e4m3_for = nullptr, bool e4m3_only = false);
//   x += gate[D] ⊙ RMSNorm(y)·weight          y is overwritten            (= rms_norm_(y), add_gated_/add_)
void rms_norm_add_(Tensor& x, Tensor& y, const Tensor& weight, float eps, const Tensor* gate = nullptr);
//   x += gate[D] ⊙ RMSNorm(y)·w_add, then h = RMSNorm(x)·w_norm (⊙ scale[D]), a new tensor; y is
//   overwritten: a DiT block's attention residual and its FFN's pre-norm, reading x once
//                                                       (= rms_norm_add_, then rms_norm; e4m3_for as there)
Tensor rms_norm_add_norm_(Tensor& x, Tensor& y, const Tensor& w_add, const Tensor* gate, const Tensor& w_norm,
                          const Tensor* scale, float eps, const Tensor* e4m3_for = nullptr, bool e4m3_only = false);
//   x [S, H, D]: per-head RMSNorm (weight [D]) then rope_pairs_
void rms_norm_rope_pairs_(Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin);
//   the same into a new contiguous [S, H, D], x unchanged; x's rows may be strided (a column
//   slice of a fused q/k/v projection viewed [S, H, D]: strides [any ≥ H·D, D, 1])
//                                                                       (= contiguous copy, rms_norm_rope_pairs_)
Tensor rms_norm_rope_pairs(const Tensor& x, const Tensor& weight, float eps, const Tensor& cos, const Tensor& sin);
// x[R, D] ← (x − mean) / sqrt(var + eps)   (LayerNorm over the last dim, no affine).
void layer_norm_(Tensor& x, float eps);
// x[C, H, W] ← GroupNorm(groups, eps) with affine weight[C], bias[C]. Biased variance.
void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps);
// group_norm_ then SiLU, in one pass over x on the GPU.
void group_norm_silu_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps);
// The tiled VAE decode's GroupNorm pieces (models/vae_tiled.h). For each group g of x [C, H, W]
// (C / groups consecutive channels), over rows [y0, y1) × cols [x0, x1): Σx, or with `mean`
// ([groups]) Σ(x − mean[g])²; in double, on the host.
std::vector<double> group_region_sums(const Tensor& x, int groups, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                                      const std::vector<double>& mean = {});
// x[c] ← (x[c] − mean[g]) · (rstd[g] · weight[c]) + bias[c]: GroupNorm with given statistics.
void group_norm_given_(Tensor& x, int groups, const std::vector<float>& mean, const std::vector<float>& rstd,
                       const Tensor& weight, const Tensor& bias);
// dst[:, y0 : y0 + h, x0 : x0 + w] = src [C, h, w] (src may be a view, e.g. a slice).
void paste_(Tensor& dst, const Tensor& src, int64_t y0, int64_t x0);

void silu_(Tensor& x);                          // x·sigmoid(x)
void tanh_(Tensor& x);
// SiLU(a) ⊙ b, same shapes (SwiGLU)
Tensor silu_mul(const Tensor& a, const Tensor& b, const Tensor* e4m3_for = nullptr, bool e4m3_only = false);
// y[..., 2F] → [..., F]: SiLU(y[..., :F]) ⊙ y[..., F:] (SwiGLU on a fused w1/w3 projection's
// output; = silu_mul of the two halves, same results).
Tensor silu_mul_halves(const Tensor& y, const Tensor* e4m3_for = nullptr, bool e4m3_only = false);
void add_(Tensor& x, const Tensor& y);          // x += y, same shapes
void mul_(Tensor& x, const Tensor& y);          // x *= y, same shapes
void scale_(Tensor& x, float s);                // x *= s
void add_scalar_(Tensor& x, float s);           // x += s
// x [2·n, D], rows in pairs (scale, gate): each scale row += 1, each gate row = tanh(row) — a DiT
// block's modulation vectors (scale_msa, gate_msa, scale_mlp, gate_mlp) in one pass on the GPU;
// on the CPU exactly add_scalar_ and tanh_ on the rows (same results).
void scale_gate_rows_(Tensor& x);
// x[R, D] ⊙= v[D] (broadcast over rows).
void mul_rows_(Tensor& x, const Tensor& v);
// x[R, D] += v[D] ⊙ y[R, D]  (gated residual: v broadcast over rows).
void add_gated_(Tensor& x, const Tensor& v, const Tensor& y);

// RoPE, rotate-half form (Qwen3): for each row s and head h, dims i and i+D/2 rotate by the
// angle with cos[s, i], sin[s, i].  x [S, H, D], cos/sin [S, D/2] f32.
void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin);
// RoPE, adjacent-pairs form (Z-Image DiT): (x[2m], x[2m+1]) rotate by cos[s, m], sin[s, m].
void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin);

// Scaled dot-product attention, computed blockwise (never a full S×S matrix per head).
// q [Sq, Hq, D], k/v [Sk, Hkv, D] with Hq a multiple of Hkv (GQA: head h uses kv head
// h / (Hq/Hkv)). `causal`: query i sees keys j ≤ i. `kv_len`: only the first kv_len keys
// are visible (−1: all). Returns [Sq, Hq, D]. Softmax in f32.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal = false,
                 int64_t kv_len = -1);

// 2-D convolution, zero padding `pad` on each side, `stride` in both directions (no dilation).
// x [Cin, H, W], w [Cout, Cin, kh, kw], bias [Cout] or null → [Cout, Ho, Wo] with
// Ho = ⌊(H + 2p − kh) / stride⌋ + 1, Wo = ⌊(W + 2p − kw) / stride⌋ + 1 (PyTorch's Conv2d).
Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride = 1);
// Zero padding of x [C, H, W] → [C, top + H + bottom, left + W + right]: F.pad(x, (left, right,
// top, bottom)) with non-negative amounts. On x's device, in x's dtype (zeros, then paste_).
Tensor pad2d(const Tensor& x, int64_t left, int64_t right, int64_t top, int64_t bottom);
// Nearest-neighbour 2× upsampling: x [C, H, W] → [C, 2H, 2W].
Tensor upsample_nearest2x(const Tensor& x);

// Concatenates along dimension 0 (all other dimensions equal).
Tensor concat0(const std::vector<Tensor>& parts);
// out[i, :] = table[ids[i], :] in the activation dtype `act` (f32; bf16 on the GPU only).
// table [V, D] (f32/bf16/f16) → [n, D].
Tensor embedding(const Tensor& table, const std::vector<int32_t>& ids, DType act = DType::F32);

// ---- recorded work ----
// The ops `work` runs on the phase's device, recorded once (a CUDA graph: backends/device.h) and
// replayed with the same kernels on the same buffers: new inputs go into the tensors the
// recording read (Tensor::copy_from), results come from the tensors it wrote. Memory the work
// allocates belongs to the recording while it lives (accounted). `work` must only queue device
// ops: no host data in or out, and no freeing of tensors made before it.
class Recording {
 public:
  Recording();
  ~Recording();
  Recording(Recording&&) noexcept;
  Recording& operator=(Recording&&) noexcept;
  bool defined() const { return g_ != nullptr; }
  void replay() const;

 private:
  friend Recording record(const PhaseContext&, const std::function<void()>&, std::string*);
  std::unique_ptr<device::Graph> g_;
};
// Whether the phase's device can record (the GPU, unless ZI_CUDA_PROFILE times each op).
bool can_record(const PhaseContext& c);
// An undefined Recording, with the reason in *why, when it cannot (the device, or `work` did
// something a recording cannot hold); the device works as before either way.
Recording record(const PhaseContext& c, const std::function<void()>& work, std::string* why);

}  // namespace zi::ops
