// Reference ops: one loop nest per op, in double, no threads, no BLAS. Inputs are assumed
// valid (the tests call the real ops for the error cases).
#include "ops/ops_ref.h"

#include <cmath>
#include <cstring>

#include "core/check.h"

namespace zi::ops_ref {
namespace {

// Element i of a contiguous float tensor of any float dtype, as double.
double at(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::F32: return t.data<float>()[i];
    case DType::BF16: return bf16_to_f32(t.data<uint16_t>()[i]);
    case DType::F16: return f16_to_f32(t.data<uint16_t>()[i]);
    default: fail("[ops_ref] not a float tensor");
  }
}

std::vector<double> to_double(const Tensor& t) {
  Tensor c = t.contiguous();
  std::vector<double> v(size_t(c.numel()));
  for (int64_t i = 0; i < c.numel(); ++i) v[size_t(i)] = at(c, i);
  return v;
}

Tensor from_double(const std::vector<double>& v, const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::F32);
  for (size_t i = 0; i < v.size(); ++i) t.data<float>()[i] = float(v[i]);
  return t;
}

double silu(double a) { return a / (1.0 + std::exp(-a)); }

}  // namespace

Tensor linear(const Tensor& x, const Tensor& w, const Tensor* bias) {
  const int64_t N = w.dim(0), K = w.dim(1), M = x.numel() / K;
  std::vector<double> xv = to_double(x), wv = to_double(w), y(size_t(M * N));
  std::vector<double> bv = bias ? to_double(*bias) : std::vector<double>(size_t(N), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = bv[size_t(n)];
      for (int64_t k = 0; k < K; ++k) s += xv[size_t(m * K + k)] * wv[size_t(n * K + k)];
      y[size_t(m * N + n)] = s;
    }
  Shape os = x.shape();
  os.back() = N;
  return from_double(y, os);
}

void rms_norm_(Tensor& x, const Tensor& weight, float eps) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  std::vector<double> w = to_double(weight);
  float* p = x.f32();
  for (int64_t r = 0; r < R; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(p[r * D + i]) * p[r * D + i];
    const double inv = 1.0 / std::sqrt(ss / double(D) + eps);
    for (int64_t i = 0; i < D; ++i) p[r * D + i] = float(p[r * D + i] * inv * w[size_t(i)]);
  }
}

void layer_norm_(Tensor& x, float eps) {
  const int64_t D = x.dim(-1), R = x.numel() / D;
  float* p = x.f32();
  for (int64_t r = 0; r < R; ++r) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < D; ++i) mean += p[r * D + i];
    mean /= double(D);
    for (int64_t i = 0; i < D; ++i) var += (p[r * D + i] - mean) * (p[r * D + i] - mean);
    var /= double(D);
    for (int64_t i = 0; i < D; ++i) p[r * D + i] = float((p[r * D + i] - mean) / std::sqrt(var + eps));
  }
}

void group_norm_(Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps) {
  const int64_t C = x.dim(0), HW = x.dim(1) * x.dim(2), cpg = C / groups, n = cpg * HW;
  std::vector<double> w = to_double(weight), b = to_double(bias);
  float* p = x.f32();
  for (int64_t g = 0; g < groups; ++g) {
    float* gp = p + g * n;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; ++i) mean += gp[i];
    mean /= double(n);
    for (int64_t i = 0; i < n; ++i) var += (gp[i] - mean) * (gp[i] - mean);
    var /= double(n);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < n; ++i) {
      const size_t c = size_t(g * cpg + i / HW);
      gp[i] = float((gp[i] - mean) * inv * w[c] + b[c]);
    }
  }
}

void silu_(Tensor& x) {
  float* p = x.f32();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] = float(silu(p[i]));
}

void tanh_(Tensor& x) {
  float* p = x.f32();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] = float(std::tanh(double(p[i])));
}

Tensor silu_mul(const Tensor& a, const Tensor& b) {
  Tensor o = Tensor::empty(a.shape(), DType::F32);
  for (int64_t i = 0; i < a.numel(); ++i) o.data<float>()[i] = float(silu(a.f32()[i]) * b.f32()[i]);
  return o;
}

Tensor silu_mul_halves(const Tensor& y) {
  const int64_t F = y.dim(-1) / 2, R = y.numel() / y.dim(-1);
  Shape os = y.shape();
  os.back() = F;
  Tensor o = Tensor::empty(os, DType::F32);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < F; ++i)
      o.data<float>()[r * F + i] = float(silu(y.f32()[r * 2 * F + i]) * y.f32()[r * 2 * F + F + i]);
  return o;
}

void add_(Tensor& x, const Tensor& y) {
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += y.f32()[i];
}

void mul_(Tensor& x, const Tensor& y) {
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] *= y.f32()[i];
}

void scale_(Tensor& x, float s) {
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] *= s;
}

void add_scalar_(Tensor& x, float s) {
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += s;
}

void scale_gate_rows_(Tensor& x) {
  const int64_t D = x.dim(1);
  float* p = x.f32();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] = (i / D) % 2 == 0 ? p[i] + 1.0f : float(std::tanh(double(p[i])));
}

void mul_rows_(Tensor& x, const Tensor& v) {
  const int64_t D = x.dim(-1);
  std::vector<double> vv = to_double(v);
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = float(x.f32()[i] * vv[size_t(i % D)]);
}

void add_gated_(Tensor& x, const Tensor& v, const Tensor& y) {
  const int64_t D = x.dim(-1);
  std::vector<double> vv = to_double(v);
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = float(x.f32()[i] + vv[size_t(i % D)] * y.f32()[i]);
}

void rope_halves_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t S = x.dim(0), H = x.dim(1), D = x.dim(2), half = D / 2;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h) {
      float* r = x.f32() + (s * H + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const double c = cos.f32()[s * half + i], sn = sin.f32()[s * half + i], a = r[i], b = r[i + half];
        r[i] = float(a * c - b * sn);
        r[i + half] = float(b * c + a * sn);
      }
    }
}

void rope_pairs_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t S = x.dim(0), H = x.dim(1), D = x.dim(2), half = D / 2;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h) {
      float* r = x.f32() + (s * H + h) * D;
      for (int64_t m = 0; m < half; ++m) {
        const double c = cos.f32()[s * half + m], sn = sin.f32()[s * half + m], a = r[2 * m], b = r[2 * m + 1];
        r[2 * m] = float(a * c - b * sn);
        r[2 * m + 1] = float(a * sn + b * c);
      }
    }
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int64_t kv_len) {
  const int64_t Sq = q.dim(0), Sk = k.dim(0), Hq = q.dim(1), Hkv = k.dim(1), D = q.dim(2);
  const int64_t kv = kv_len < 0 ? Sk : kv_len;
  Tensor out = Tensor::zeros(q.shape(), DType::F32);
  std::vector<double> p(static_cast<size_t>(Sk));
  for (int64_t h = 0; h < Hq; ++h) {
    const int64_t hk = h / (Hq / Hkv);
    for (int64_t i = 0; i < Sq; ++i) {
      const int64_t nvis = causal ? std::min(i + 1, kv) : kv;
      const float* qi = q.f32() + (i * Hq + h) * D;
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j < nvis; ++j) {
        const float* kj = k.f32() + (j * Hkv + hk) * D;
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(qi[d]) * kj[d];
        p[size_t(j)] = s * scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      for (int64_t j = 0; j < nvis; ++j) sum += p[size_t(j)] = std::exp(p[size_t(j)] - mx);
      float* o = out.f32() + (i * Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < nvis; ++j) acc += p[size_t(j)] * v.f32()[(j * Hkv + hk) * D + d];
        o[d] = nvis ? float(acc / sum) : 0.0f;
      }
    }
  }
  return out;
}

Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride) {
  const int64_t Cin = x.dim(0), H = x.dim(1), W = x.dim(2), Cout = w.dim(0), kh = w.dim(2), kw = w.dim(3);
  const int64_t Ho = (H + 2 * pad - kh) / stride + 1, Wo = (W + 2 * pad - kw) / stride + 1;
  std::vector<double> wv = to_double(w), bv = bias ? to_double(*bias) : std::vector<double>(size_t(Cout), 0.0);
  std::vector<double> o(size_t(Cout * Ho * Wo));
  const float* xp = x.f32();
  for (int64_t co = 0; co < Cout; ++co)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox) {
        double s = bv[size_t(co)];
        for (int64_t ci = 0; ci < Cin; ++ci)
          for (int64_t ky = 0; ky < kh; ++ky)
            for (int64_t kx = 0; kx < kw; ++kx) {
              const int64_t iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              s += xp[(ci * H + iy) * W + ix] * wv[size_t(((co * Cin + ci) * kh + ky) * kw + kx)];
            }
        o[size_t((co * Ho + oy) * Wo + ox)] = s;
      }
  return from_double(o, {Cout, Ho, Wo});
}

Tensor pad2d(const Tensor& x, int64_t left, int64_t right, int64_t top, int64_t bottom) {
  const int64_t C = x.dim(0), H = x.dim(1), W = x.dim(2), Ho = top + H + bottom, Wo = left + W + right;
  Tensor c = x.contiguous(), o = Tensor::zeros({C, Ho, Wo}, DType::F32);
  for (int64_t ch = 0; ch < C; ++ch)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t xx = 0; xx < W; ++xx) o.f32()[(ch * Ho + top + y) * Wo + left + xx] = c.f32()[(ch * H + y) * W + xx];
  return o;
}

Tensor upsample_nearest2x(const Tensor& x) {
  const int64_t C = x.dim(0), H = x.dim(1), W = x.dim(2);
  Tensor o = Tensor::empty({C, 2 * H, 2 * W}, DType::F32);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t y = 0; y < 2 * H; ++y)
      for (int64_t xx = 0; xx < 2 * W; ++xx)
        o.f32()[(c * 2 * H + y) * 2 * W + xx] = x.f32()[(c * H + y / 2) * W + xx / 2];
  return o;
}

Tensor concat0(const std::vector<Tensor>& parts) {
  Shape s = parts[0].shape();
  s[0] = 0;
  for (const Tensor& p : parts) s[0] += p.dim(0);
  Tensor o = Tensor::empty(s, parts[0].dtype());
  size_t off = 0;
  for (const Tensor& p : parts) {
    Tensor c = p.contiguous();
    std::memcpy(static_cast<char*>(o.raw()) + off, c.raw(), c.nbytes());
    off += c.nbytes();
  }
  return o;
}

Tensor embedding(const Tensor& table, const std::vector<int32_t>& ids) {
  const int64_t D = table.dim(1);
  Tensor o = Tensor::empty({int64_t(ids.size()), D}, DType::F32);
  for (size_t i = 0; i < ids.size(); ++i)
    for (int64_t d = 0; d < D; ++d) o.f32()[int64_t(i) * D + d] = float(at(table, ids[i] * D + d));
  return o;
}

}  // namespace zi::ops_ref
