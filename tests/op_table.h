// The op table (ggml's test-backend-ops is the model): every op of ops.h × shapes × weight
// dtypes as rows, run on every backend × activation dtype against a reference:
//   CPU (f32)            vs ops_ref (plain loops in double), per-op tolerances below, at 1–3 threads;
//   CUDA (f32 and bf16)  vs the CPU backend on the same inputs rounded through the activation
//                        dtype (the CPU itself being checked against ops_ref), rel L2 ≤ 1e-5 (f32)
//                        or 1e-2 (bf16), times the row's gpu_scale.
// Error measure: rel L2 = sqrt(NMSE) over the whole output (NMSE is printed too). Both test files
// instantiate it: tests/test_ops_table.cpp (the CPU rows, CPU suite) and
// tests/test_cuda_ops_table.cpp (the GPU rows, label gpu, skipped without a GPU). A new op gets
// its rows here.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "backends/cpu/cpu_ops.h"
#include "core/check.h"
#include "core/parallel.h"
#include "core/quant.h"
#include "ops/ops.h"
#include "ops/ops_ref.h"
#include "test_util.h"

namespace zi::optable {

// Where a row runs: the device and activation dtype; `ref` selects ops_ref instead of ops.
struct Env {
  Device dev = Device::CPU;
  DType act = DType::F32;
  bool ref = false;
  DType round_to = DType::F32;  // inputs are rounded through this dtype first (a bf16 GPU run's reference)
  // An activation input: rounded, then in the activation dtype on the device.
  Tensor a(const Tensor& t) const {
    Tensor r = round_to == DType::F32 ? t.clone() : t.to(round_to).to(DType::F32);
    return dev == Device::CPU ? r : r.to(act).to_device(dev);
  }
  // A weight-like operand (norm weight, bias, table, cos/sin): its own dtype, on the device.
  Tensor w(const Tensor& t) const { return t.to_device(dev); }
};

// ops or ops_ref, by the environment.
#define ZI_OP_OR_REF(e, fn, ...) ((e).ref ? ops_ref::fn(__VA_ARGS__) : ops::fn(__VA_ARGS__))

struct Row {
  std::string op;     // op family (one test per family and backend)
  std::string what;   // the case, for messages
  double cpu_tol;     // rel L2 vs ops_ref on the CPU
  double cpu_max_abs = -1;  // also max |diff| vs ops_ref when >= 0
  bool on_gpu = true;       // the GPU rows take it (shapes the GPU kernels accept)
  double gpu_scale = 1.0;
  std::function<Tensor(const Env&)> run;  // the output (on the env's device)
};

constexpr double kTolGemm = 2e-6;  // linear / conv2d: f32 sums of up to ~600 products
constexpr double kTolNorm = 1e-6;  // statistics in double; f32 output rounding only
constexpr double kTolElem = 1e-6;  // elementwise, RoPE, exp_fast (≈2 ulp)
constexpr double kTolAttn = 2e-6;  // two sgemms + softmax with exp_fast
constexpr double kExact = 0.0;

using test::rnd;

// The rows of op family `only` (all when empty).
inline std::vector<Row> make_rows(const std::string& only = "") {
  std::vector<Row> R;
  auto want = [&](std::initializer_list<const char*> ops) {
    if (only.empty()) return true;
    for (const char* o : ops)
      if (only == o) return true;
    return false;
  };
  const DType wts[] = {DType::F32, DType::BF16, DType::F16};
  uint32_t seed = 1000;
  // ---- linear: the CPU cases (odd sizes, panels), then the GPU's (K a multiple of 8) ----
  if (want({"linear"})) {
  struct Lin { int64_t M, K, N; bool bias, gpu; };
  const Lin lins[] = {{1, 1, 1, false, false},   {5, 7, 3, true, false},     {33, 65, 17, false, false},
                      {130, 300, 129, true, false}, {257, 96, 520, true, true}, {100, 64, 16, false, true},
                      {3, 600, 700, true, true},   {1, 16, 8, true, true},     {5, 40, 24, false, true},
                      {33, 64, 48, true, true},    {130, 320, 136, true, true}};
  for (const Lin& c : lins)
    for (DType dt : wts) {
      const Tensor x = rnd({c.M, c.K}, seed++), w = rnd({c.N, c.K}, seed++).to(dt),
                   b = rnd({c.N}, seed++).to(c.gpu ? DType::F32 : dt);
      R.push_back({"linear", str_cat("M=", c.M, " K=", c.K, " N=", c.N, " w ", dtype_name(dt), c.bias ? " bias" : ""),
                   kTolGemm, -1, c.gpu, 1.0, [=](const Env& e) {
                     Tensor bb = e.w(b);
                     return ZI_OP_OR_REF(e, linear, e.a(x), e.w(w), c.bias ? &bb : nullptr);
                   }});
    }
  {  // leading dimensions are kept: [2, 3, K] → [2, 3, N]
    const Tensor x = rnd({2, 3, 8}, 99), w = rnd({5, 8}, 98);
    R.push_back({"linear", "3-d input", kTolGemm, -1, false, 1.0,
                 [=](const Env& e) { return ZI_OP_OR_REF(e, linear, e.a(x), e.w(w), nullptr); }});
  }
  }
  // ---- linear with a weight format (core/quant.h): the reference is ops_ref::linear on the
  // dequantized weight. On a CPU with AVX2 (or AVX-512 VNNI), Q8_0/Q4_0/Q5_0 take the int8 path
  // (x quantized to 8-bit blocks: rel L2 ~3e-3, bounded at 1e-2 like tests/test_quant.cpp); fp8
  // dequantizes panels (f32 sums). The int8 formats' rows stay off the GPU table because the CPU
  // result they would be compared with carries the int8 path's error (tests/test_cuda_quant.cpp
  // checks the GPU's dequantization of every format). ----
  if (want({"linear_quant"})) {
    struct LinQ { int64_t M, K, N; bool bias; };
    const LinQ lqs[] = {{1, 32, 8, true}, {5, 64, 24, true}, {33, 256, 40, false}};
    for (const LinQ& c : lqs)
      for (DType qt : {DType::Q8_0, DType::Q4_0, DType::Q5_0, DType::F8_E4M3}) {
        const Tensor x = rnd({c.M, c.K}, seed++), b = rnd({c.N}, seed++);
        const Tensor wq = quant::quantize(rnd({c.N, c.K}, seed++), qt, Tag::DitWeights);
        const bool int8 = qt == DType::Q8_0 || qt == DType::Q4_0 || qt == DType::Q5_0;
        R.push_back({"linear_quant",
                     str_cat("M=", c.M, " K=", c.K, " N=", c.N, " w ", dtype_name(qt), c.bias ? " bias" : ""),
                     int8 ? 1e-2 : kTolGemm, -1, !int8, 1.0, [=](const Env& e) {
                       Tensor bb = e.w(b);
                       if (e.ref) return ops_ref::linear(x, quant::dequantize(wq), c.bias ? &bb : nullptr);
                       return ops::linear(e.a(x), e.w(wq), c.bias ? &bb : nullptr);
                     }});
        if (int8)  // the same weights with the CPU's dequant path: rows the GPU compares with
          R.push_back({"linear_quant",
                       str_cat("M=", c.M, " K=", c.K, " N=", c.N, " w ", dtype_name(qt), c.bias ? " bias" : "",
                               ", cpu dequant path"),
                       kTolGemm, -1, true, 1.0, [=](const Env& e) {
                         Tensor bb = e.w(b);
                         if (e.ref) return ops_ref::linear(x, quant::dequantize(wq), c.bias ? &bb : nullptr);
                         if (e.dev != Device::CPU) return ops::linear(e.a(x), e.w(wq), c.bias ? &bb : nullptr);
                         Tensor xa = e.a(x), y = Tensor::empty({c.M, c.N}, DType::F32);
                         cpu::linear_quant(xa, wq, c.bias ? &bb : nullptr, y, cpu::QuantPath::Dequant);
                         return y;
                       }});
      }
  }
  // ---- norms ----
  if (want({"rms_norm_", "layer_norm_", "group_norm_", "group_norm_silu_"}))
  for (DType dt : wts) {
    for (Shape s : {Shape{1, 1}, Shape{7, 33}, Shape{130, 3840}, Shape{5, 4, 128}, Shape{37, 128}, Shape{37, 3000}}) {
      const bool gpu = s[0] == 37 && dt == DType::F32;  // the GPU suite's shapes
      const Tensor x = rnd(s, seed++), w = rnd({s.back()}, seed++).to(dt), c = rnd(s, seed++, 1.0f, 3.0f);
      R.push_back({"rms_norm_", shape_str(s) + " w " + dtype_name(dt), kTolNorm, 1e-5, gpu, 1.0, [=](const Env& e) {
                     Tensor t = e.a(x);
                     ZI_OP_OR_REF(e, rms_norm_, t, e.w(w), 1e-6f);
                     return t;
                   }});
      if (dt == DType::F32)  // mean far from 0: two-pass variance
        R.push_back({"layer_norm_", shape_str(s), kTolNorm, -1, gpu, 1.0, [=](const Env& e) {
                       Tensor t = e.a(c);
                       ZI_OP_OR_REF(e, layer_norm_, t, 1e-5f);
                       return t;
                     }});
    }
    // group_norm_ (+ SiLU): HW = 561 the GPU's scalar kernels, 1280 and 16384 its 16-byte vectors.
    for (Shape s : {Shape{4, 1, 1}, Shape{32, 9, 7}, Shape{64, 33, 40}, Shape{64, 33, 17}, Shape{64, 32, 40},
                    Shape{128, 128, 128}})
      for (bool silu : {false, true}) {
        if (silu && dt != DType::F32) continue;
        Tensor x = rnd(s, seed++, 0.5f, 2.0f);
        for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += 0.5f;  // a non-zero mean
        const Tensor w = rnd({s[0]}, seed++).to(dt), b = rnd({s[0]}, seed++).to(dt);
        const int groups = int(s[0] >= 32 ? 32 : 2);
        const bool gpu = s == Shape{64, 33, 17} || s == Shape{64, 32, 40} || s == Shape{128, 128, 128};
        R.push_back({silu ? "group_norm_silu_" : "group_norm_", shape_str(s) + " w " + dtype_name(dt), kTolNorm,
                     1e-5, gpu && dt == DType::F32, 1.0, [=](const Env& e) {
                       Tensor t = e.a(x);
                       if (!silu) ZI_OP_OR_REF(e, group_norm_, t, groups, e.w(w), e.w(b), 1e-6f);
                       else if (!e.ref) ops::group_norm_silu_(t, groups, e.w(w), e.w(b), 1e-6f);
                       else {
                         ops_ref::group_norm_(t, groups, w, b, 1e-6f);
                         ops_ref::silu_(t);
                       }
                       return t;
                     }});
      }
  }
  if (want({"rms_norm", "rms_norm_add_", "rms_norm_add_norm_", "rms_norm_rope_pairs_", "rms_norm_rope_pairs"})) {
  // ---- fused norms (the reference: the composed ops_ref sequence). 64/1000/2048/3840: the
  // GPU's row-in-registers kernels; 5000 and f32 3840: its two-pass kernels; 100: unaligned bf16 ----
  for (int64_t D : {int64_t(64), int64_t(3840), int64_t(100), int64_t(1000), int64_t(2048), int64_t(5000)})
    for (bool with : {false, true}) {
      const Tensor x = rnd({19, D}, seed++), y = rnd({19, D}, seed++), w = rnd({D}, seed++), g = rnd({D}, seed++);
      const std::string what = str_cat("D=", D, with ? " scale/gate" : "");
      R.push_back({"rms_norm", what, kTolNorm, -1, true, 1.0, [=](const Env& e) {
                     if (!e.ref) {
                       Tensor gg = e.w(g);
                       return ops::rms_norm(e.a(x), e.w(w), 1e-5f, with ? &gg : nullptr);
                     }
                     Tensor t = e.a(x);
                     ops_ref::rms_norm_(t, w, 1e-5f);
                     if (with) ops_ref::mul_rows_(t, g);
                     return t;
                   }});
      R.push_back({"rms_norm_add_", what, kTolNorm, -1, true, 1.0, [=](const Env& e) {
                     Tensor t = e.a(x), u = e.a(y);
                     if (!e.ref) {
                       Tensor gg = e.w(g);
                       ops::rms_norm_add_(t, u, e.w(w), 1e-5f, with ? &gg : nullptr);
                       return t;
                     }
                     ops_ref::rms_norm_(u, w, 1e-5f);
                     if (with) ops_ref::add_gated_(t, g, u);
                     else ops_ref::add_(t, u);
                     return t;
                   }});
      // The fused residual + pre-norm: x after the op (which = 0) and h (which = 1).
      const Tensor w2 = rnd({D}, seed++), sc = rnd({D}, seed++);
      for (int which : {0, 1})
        R.push_back({"rms_norm_add_norm_", str_cat(what, which ? " h" : " x"), kTolNorm, -1, true, 1.0,
                     [=](const Env& e) {
                       Tensor t = e.a(x), u = e.a(y);
                       if (!e.ref) {
                         Tensor gg = e.w(g), ss = e.w(sc);
                         Tensor h = ops::rms_norm_add_norm_(t, u, e.w(w), with ? &gg : nullptr, e.w(w2), with ? &ss : nullptr,
                                                            1e-5f);
                         return which ? h : t;
                       }
                       ops_ref::rms_norm_(u, w, 1e-5f);
                       if (with) ops_ref::add_gated_(t, g, u);
                       else ops_ref::add_(t, u);
                       if (!which) return t;
                       Tensor h = t.clone();
                       ops_ref::rms_norm_(h, w2, 1e-5f);
                       if (with) ops_ref::mul_rows_(h, sc);
                       return h;
                     }});
    }
  for (int64_t D : {int64_t(128), int64_t(64), int64_t(16)}) {  // 128: the GPU's vectorised kernel; 64: generic
    const Tensor x = rnd({21, 3, D}, seed++), w = rnd({D}, seed++), cs = rnd({21, D / 2}, seed++),
                 sn = rnd({21, D / 2}, seed++);
    R.push_back({"rms_norm_rope_pairs_", str_cat("D=", D), kTolNorm, -1, D >= 64, 1.0, [=](const Env& e) {
                   Tensor t = e.a(x);
                   if (!e.ref) {
                     ops::rms_norm_rope_pairs_(t, e.w(w), 1e-5f, e.w(cs), e.w(sn));
                     return t;
                   }
                   Tensor rows = t.reshape({t.dim(0) * t.dim(1), D});
                   ops_ref::rms_norm_(rows, w, 1e-5f);
                   ops_ref::rope_pairs_(t, cs, sn);
                   return t;
                 }});
  }
  // The out-of-place form on a column slice of a fused [S, 3·H·D] projection (rows strided),
  // the DiT's q and k: the reference runs the in-place composition on a contiguous copy.
  for (int64_t D : {int64_t(128), int64_t(64), int64_t(16)}) {
    const int64_t S = 21, H = 3;
    const Tensor y = rnd({S, 3 * H * D}, seed++), w = rnd({D}, seed++), cs = rnd({S, D / 2}, seed++),
                 sn = rnd({S, D / 2}, seed++);
    for (int64_t part : {int64_t(0), int64_t(1)})
      R.push_back({"rms_norm_rope_pairs", str_cat("D=", D, " part ", part, " of a fused [S, 3HD]"), kTolNorm, -1,
                   D >= 64, 1.0, [=](const Env& e) {
                     Tensor x = e.a(y).reshape({S, 3 * H, D}).slice(1, part * H, (part + 1) * H);
                     if (!e.ref) return ops::rms_norm_rope_pairs(x, e.w(w), 1e-5f, e.w(cs), e.w(sn));
                     Tensor t = x.contiguous();
                     Tensor rows = t.reshape({S * H, D});
                     ops_ref::rms_norm_(rows, w, 1e-5f);
                     ops_ref::rope_pairs_(t, cs, sn);
                     return t;
                   }});
  }
  }
  // ---- elementwise ----
  if (want({"scale_gate_rows_"}))  // rows in (scale, gate) pairs: a DiT block's [4, D], and more pairs
    for (Shape s : {Shape{4, 96}, Shape{2, 1}, Shape{6, 301}}) {
      const Tensor x = rnd(s, seed++, 0.01f, 3.0f);
      R.push_back({"scale_gate_rows_", shape_str(s), kTolElem, -1, s == Shape{4, 96}, 1.0, [=](const Env& e) {
                     Tensor t = e.a(x);
                     ZI_OP_OR_REF(e, scale_gate_rows_, t);
                     return t;
                   }});
    }
  if (want({"silu_", "tanh_", "add_", "mul_", "scale_", "add_scalar_", "silu_mul", "silu_mul_halves", "mul_rows_",
            "add_gated_"}))
  for (Shape s : {Shape{1}, Shape{3, 17}, Shape{257, 301}, Shape{17, 96}}) {
    const Tensor x = rnd(s, seed++, 0.01f, 30.0f), y = rnd(s, seed++);
    const std::string ss = shape_str(s);
    const bool gpu = s == Shape{17, 96};  // the GPU suite's shape
    auto unary = [&](const char* name, std::function<void(const Env&, Tensor&)> f, const Tensor& in, bool g = true) {
      R.push_back({name, ss, kTolElem, -1, gpu && g, 1.0, [=](const Env& e) {
                     Tensor t = e.a(in);
                     f(e, t);
                     return t;
                   }});
    };
    unary("silu_", [](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, silu_, t); }, x);
    unary("tanh_", [](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, tanh_, t); }, x);
    unary("add_", [y](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, add_, t, e.a(y)); }, x);
    unary("mul_", [y](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, mul_, t, e.a(y)); }, x);
    unary("scale_", [](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, scale_, t, -1.7f); }, x);
    unary("add_scalar_", [](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, add_scalar_, t, 1.5f); }, x);
    R.push_back({"silu_mul", ss, kTolElem, -1, gpu, 1.0,
                 [=](const Env& e) { return ZI_OP_OR_REF(e, silu_mul, e.a(x), e.a(y)); }});
    if (s.back() % 2 == 0)  // SwiGLU on the halves of a fused w1/w3 output
      R.push_back({"silu_mul_halves", ss, kTolElem, -1, gpu, 1.0,
                   [=](const Env& e) { return ZI_OP_OR_REF(e, silu_mul_halves, e.a(x)); }});
    for (DType dt : wts) {
      const Tensor v = rnd({s.back()}, seed++).to(dt);
      unary("mul_rows_", [v](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, mul_rows_, t, e.w(v)); }, x, dt == DType::F32);
      unary("add_gated_", [v, y](const Env& e, Tensor& t) { ZI_OP_OR_REF(e, add_gated_, t, e.w(v), e.a(y)); }, x,
            dt == DType::F32);
    }
  }
  if (want({"rope_halves_", "rope_pairs_"}))
  for (Shape s : {Shape{1, 1, 2}, Shape{9, 3, 16}, Shape{70, 4, 128}, Shape{9, 3, 32}}) {
    const bool gpu = s[2] == 32;  // the GPU suite's shape
    const Tensor cs = rnd({s[0], s[2] / 2}, seed++), sn = rnd({s[0], s[2] / 2}, seed++), x = rnd(s, seed++);
    for (bool halves : {true, false})
      R.push_back({halves ? "rope_halves_" : "rope_pairs_", shape_str(s), kTolElem, -1, gpu, 1.0, [=](const Env& e) {
                     Tensor t = e.a(x);
                     if (halves) ZI_OP_OR_REF(e, rope_halves_, t, e.w(cs), e.w(sn));
                     else ZI_OP_OR_REF(e, rope_pairs_, t, e.w(cs), e.w(sn));
                     return t;
                   }});
  }
  // ---- attention (the GPU's kernel choices by path are in test_cuda.cpp) ----
  if (want({"attention"})) {
  struct Att { int64_t Sq, Sk, Hq, Hkv, D; bool causal; int64_t kv_len; bool gpu; };
  const Att atts[] = {{1, 1, 1, 1, 1, false, -1, false},    {5, 9, 2, 2, 8, false, -1, false},
                      {70, 70, 4, 2, 16, true, -1, false},  {70, 70, 4, 1, 16, false, 50, false},
                      {130, 200, 3, 3, 64, false, -1, false}, {130, 130, 2, 1, 128, true, 100, false},
                      {65, 65, 2, 2, 32, true, -1, false},  {7, 11, 2, 1, 8, false, 0, false},
                      {600, 40, 2, 1, 32, false, 33, false},   // CPU: two query blocks of 304 + 296
                      {500, 5000, 1, 1, 8, false, -1, false},  // CPU: block capped by the 8 MB score budget
                      // the GPU suite's: flash (bf16, D 64/128) and blocked paths, GQA, several
                      // 128-key tiles, a partial last tile, query rows past a 128-row block
                      {1, 1, 1, 1, 64, false, -1, true},     {70, 70, 2, 2, 128, false, -1, true},
                      {130, 130, 4, 2, 128, true, -1, true},  {200, 200, 3, 3, 64, false, 150, true},
                      {65, 300, 2, 1, 128, false, -1, true},  {257, 257, 2, 2, 128, true, 100, true},
                      {40, 40, 2, 2, 32, true, -1, true},     {33, 33, 1, 1, 96, false, -1, true},
                      {300, 700, 4, 2, 128, false, 650, true}, {129, 1000, 2, 2, 128, false, -1, true}};
  for (const Att& c : atts) {
    const Tensor q = rnd({c.Sq, c.Hq, c.D}, seed++, 0.05f, 2.0f), k = rnd({c.Sk, c.Hkv, c.D}, seed++, 0.05f, 2.0f),
                 v = rnd({c.Sk, c.Hkv, c.D}, seed++);
    const float scale = 1.0f / std::sqrt(float(c.D));
    R.push_back({"attention",
                 str_cat("Sq=", c.Sq, " Sk=", c.Sk, " H=", c.Hq, "/", c.Hkv, " D=", c.D, c.causal ? " causal" : "",
                         " kv_len=", c.kv_len),
                 c.kv_len == 0 ? kExact : kTolAttn, -1, c.gpu, 1.0, [=](const Env& e) {
                   return ZI_OP_OR_REF(e, attention, e.a(q), e.a(k), e.a(v), scale, c.causal, c.kv_len);
                 }});
  }
  }
  // ---- conv2d ----
  if (want({"conv2d"})) {
  struct Conv { int64_t Cin, H, W, Cout, kh, kw; int pad; bool bias, gpu; int stride = 1; };
  const Conv convs[] = {{3, 9, 11, 5, 3, 3, 1, true, true}, {8, 6, 5, 4, 1, 1, 0, true, false},
                        {2, 7, 6, 3, 3, 2, 2, false, false}, {4, 5, 4, 6, 3, 3, 0, true, false},
                        {1, 1, 1, 1, 1, 1, 0, false, false}, {16, 40, 33, 8, 3, 3, 1, true, false},
                        {5, 4, 4, 2, 1, 1, 1, true, false},
                        {64, 40, 256, 4, 3, 3, 1, true, false},  // CPU: rows blocked by the 8 MB column budget
                        // the GPU suite's (its per-path runs are in test_cuda.cpp)
                        {16, 20, 24, 32, 3, 3, 1, true, true}, {8, 7, 5, 12, 1, 1, 0, true, true},
                        {32, 16, 16, 32, 3, 3, 1, true, true},
                        // strided: the VAE encoder's downsample (3×3, pad 0, stride 2 on an input
                        // padded to odd sizes by pad2d), pad 1, a 1×1 kernel (not the CPU's
                        // one-GEMM path), stride 3 with a 3×2 kernel, one where the stride leaves
                        // the last input column unused, and rows blocked by the column budget
                        {8, 9, 11, 6, 3, 3, 0, true, true, 2},    {3, 10, 7, 5, 3, 3, 1, true, true, 2},
                        {4, 8, 9, 3, 1, 1, 0, false, true, 2},    {2, 11, 13, 3, 3, 2, 2, true, false, 3},
                        {5, 8, 8, 4, 3, 3, 0, true, false, 2},    {16, 33, 33, 16, 3, 3, 0, true, true, 2},
                        {64, 81, 513, 4, 3, 3, 0, true, false, 2}};
  for (const Conv& c : convs)
    for (DType dt : wts) {
      const bool gpu = c.gpu && dt == DType::BF16;  // the GPU suite's: bf16 kernels, f32 bias
      const Tensor x = rnd({c.Cin, c.H, c.W}, seed++), w = rnd({c.Cout, c.Cin, c.kh, c.kw}, seed++).to(dt),
                   b = rnd({c.Cout}, seed++).to(gpu ? DType::F32 : dt);
      R.push_back({"conv2d",
                   str_cat("x=", shape_str(x.shape()), " w=", shape_str(w.shape()), " pad=", c.pad,
                           " stride=", c.stride, " ", dtype_name(dt)),
                   kTolGemm, -1, gpu, 1.0, [=](const Env& e) {
                     Tensor bb = e.w(b);
                     return ZI_OP_OR_REF(e, conv2d, e.a(x), e.w(w), c.bias ? &bb : nullptr, c.pad, c.stride);
                   }});
    }
  }
  // ---- pad2d (exact; built from zeros + paste_, so a strided view is padded as it lies) ----
  if (want({"pad2d"})) {
    struct Pad { int64_t C, H, W, l, r, t, b; bool view; };
    const Pad pads[] = {{3, 5, 7, 0, 1, 0, 1, false},  // the VAE encoder's downsample
                        {2, 4, 3, 2, 0, 3, 1, false},
                        {4, 6, 5, 0, 0, 0, 0, false},
                        {1, 1, 1, 1, 1, 1, 1, false},
                        {3, 8, 9, 1, 2, 0, 1, true}};  // input: the view [:, 1:6, 2:8]
    for (const Pad& c : pads) {
      const Tensor x = rnd({c.C, c.H, c.W}, seed++);
      R.push_back({"pad2d",
                   str_cat(shape_str(x.shape()), " l=", c.l, " r=", c.r, " t=", c.t, " b=", c.b,
                           c.view ? " view" : ""),
                   kExact, -1, true, 1.0, [=](const Env& e) {
                     Tensor in = e.a(x);
                     if (c.view) in = in.slice(1, 1, 6).slice(2, 2, 8);
                     return ZI_OP_OR_REF(e, pad2d, in, c.l, c.r, c.t, c.b);
                   }});
    }
  }
  // ---- copies (exact) ----
  if (want({"upsample_nearest2x", "concat0", "embedding"})) {
    const Tensor img = rnd({3, 5, 7}, seed++);
    R.push_back({"upsample_nearest2x", "[3, 5, 7]", kExact, -1, true, 1.0,
                 [=](const Env& e) { return ZI_OP_OR_REF(e, upsample_nearest2x, e.a(img)); }});
    const std::vector<Tensor> parts{rnd({2, 4}, seed++), rnd({1, 4}, seed++), rnd({5, 4}, seed++)};
    R.push_back({"concat0", "3 parts", kExact, -1, false, 1.0, [=](const Env& e) {
                   std::vector<Tensor> p;
                   for (const Tensor& t : parts) p.push_back(e.a(t));
                   return ZI_OP_OR_REF(e, concat0, p);
                 }});
    const Tensor a = rnd({17, 96}, seed++), b = rnd({17, 96}, seed++);  // the GPU suite's
    R.push_back({"concat0", "2 parts [17, 96]", kExact, -1, true, 1.0,
                 [=](const Env& e) { return ZI_OP_OR_REF(e, concat0, std::vector<Tensor>{e.a(a), e.a(b)}); }});
    const Tensor t = rnd({4, 2}, seed++), t2 = rnd({3, 4}, seed++);
    R.push_back({"concat0", "a non-contiguous part", kExact, -1, false, 1.0, [=](const Env& e) {
                   std::vector<Tensor> p{e.a(t).permute({1, 0}), e.a(t2)};
                   return ZI_OP_OR_REF(e, concat0, p);
                 }});
    const std::vector<int32_t> ids{3, 0, 9, 3};
    for (DType dt : wts) {
      const Tensor table = rnd({10, 6}, seed++).to(dt);
      R.push_back({"embedding", dtype_name(dt), kExact, -1, dt == DType::BF16, 1.0, [=](const Env& e) {
                     return e.ref ? ops_ref::embedding(table, ids) : ops::embedding(e.w(table), ids, DType::F32);
                   }});
    }
  }
  return R;
}

// The ops of the table, one test each (a test checks that this list and the rows agree). Rows
// are built inside each test, so no tensor outlives it.
inline std::vector<std::string> op_names() {
  return {"linear", "linear_quant", "rms_norm_", "layer_norm_", "group_norm_", "group_norm_silu_", "rms_norm", "rms_norm_add_",
          "rms_norm_add_norm_", "rms_norm_rope_pairs_", "rms_norm_rope_pairs", "silu_", "tanh_", "add_", "mul_", "scale_", "add_scalar_", "scale_gate_rows_",
          "silu_mul", "silu_mul_halves", "mul_rows_",
          "add_gated_", "rope_halves_", "rope_pairs_", "attention", "conv2d", "pad2d", "upsample_nearest2x", "concat0",
          "embedding"};
}


// Runs every row of `op` on the CPU against ops_ref, at 1, 2 and 3 threads.
inline void run_cpu(const std::string& op) {
  const int saved = num_threads();
  int n = 0;
  for (const Row& r : make_rows(op)) {
    if (r.op != op) continue;
    ++n;
    const Env cpu{Device::CPU, DType::F32, false, DType::F32}, ref{Device::CPU, DType::F32, true, DType::F32};
    const Tensor want = r.run(ref);
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      const Tensor got = r.run(cpu);
      ASSERT_EQ(got.shape(), want.shape()) << op << " " << r.what;
      const double rl = test::rel_l2(got, want), ma = test::max_abs_diff(got, want);
      const std::string msg = str_cat(op, " ", r.what, " threads=", threads, ": NMSE ", rl * rl, ", rel L2 ", rl,
                                      ", max |diff| ", ma);
      if (r.cpu_tol == kExact) EXPECT_EQ(ma, 0.0) << msg;
      else EXPECT_LE(rl, r.cpu_tol) << msg;
      if (r.cpu_max_abs >= 0) {
        EXPECT_LE(ma, r.cpu_max_abs) << msg;
      }
    }
  }
  set_num_threads(saved);
  EXPECT_GT(n, 0) << "no rows for " << op;
}

// Runs every GPU row of `op` in activation dtype `act` against the CPU backend on the same
// (rounded) inputs.
inline void run_gpu(const std::string& op, DType act) {
  int n = 0;
  for (const Row& r : make_rows(op)) {
    if (r.op != op || !r.on_gpu) continue;
    ++n;
    const Env gpu{Device::CUDA, act, false, act}, cpu{Device::CPU, DType::F32, false, act};
    const Tensor got = ops::to_host_f32(r.run(gpu)), want = r.run(cpu);
    ASSERT_EQ(got.shape(), want.shape()) << op << " " << r.what;
    const double rl = test::rel_l2(got, want);
    const double tol = (act == DType::F32 ? 1e-5 : 1e-2) * r.gpu_scale;
    EXPECT_LE(rl, tol) << op << " " << r.what << " " << dtype_name(act) << ": NMSE " << rl * rl << ", rel L2 " << rl
                       << ", max |diff| " << test::max_abs_diff(got, want);
  }
  EXPECT_GT(n, 0) << "no GPU rows for " << op;
}

inline std::string test_name(const ::testing::TestParamInfo<std::string>& i) {
  std::string s = i.param;
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

}  // namespace zi::optable
