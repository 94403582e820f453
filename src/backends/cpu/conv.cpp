// conv2d (zero padding, any stride) as im2col + sgemm, and nearest 2× upsampling.
// The output rows are cut into blocks; each OpenMP thread unfolds one block of rows into
// its own column buffer [Cin·kh·kw, rows·Wo] (≤ 8 MB unless one row needs more, so a
// [128, 1024, 1024] input never needs its 4.8 GB full unfolding) and multiplies it by
// the widened kernel [Cout, Cin·kh·kw] with a single-threaded sgemm.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "backends/cpu/cpu_ops.h"
#include "core/parallel.h"

namespace zi::cpu {
namespace {

// Column buffer per thread. Small enough that the buffer is still in cache when sgemm packs
// it (L3 is 32 MB here); one output row of the VAE's widest layer (128·9 × 1024) is 4.7 MB.
constexpr int64_t kColBytesPerThread = int64_t(8) << 20;

struct ConvShape {
  int64_t Cin, H, W, Cout, kh, kw, pad, stride, Ho, Wo;
};

// col[(c·kh + ky)·kw + kx, (oy − r0)·Wo + ox] = x[c, oy·s + ky − pad, ox·s + kx − pad] (0 outside;
// s the stride). Stride 1 copies each row's inside run with memcpy, a larger stride gathers it.
void im2col_rows(const ConvShape& s, const float* x, int64_t r0, int64_t r1, float* col) {
  const int64_t n = (r1 - r0) * s.Wo, st = s.stride;
  for (int64_t c = 0; c < s.Cin; ++c)
    for (int64_t ky = 0; ky < s.kh; ++ky)
      for (int64_t kx = 0; kx < s.kw; ++kx) {
        float* dst = col + ((c * s.kh + ky) * s.kw + kx) * n;
        // The first ox whose column ox·s + kx − pad is at least v, in [0, Wo].
        auto first_ox = [&](int64_t v) {
          const int64_t num = v + s.pad - kx;
          return std::clamp<int64_t>(num <= 0 ? 0 : (num + st - 1) / st, 0, s.Wo);
        };
        const int64_t lo = first_ox(0);                  // first ox inside
        const int64_t hi = std::max(lo, first_ox(s.W));  // one past last
        for (int64_t oy = r0; oy < r1; ++oy, dst += s.Wo) {
          const int64_t iy = oy * st + ky - s.pad;
          if (iy < 0 || iy >= s.H) {
            std::memset(dst, 0, size_t(s.Wo) * 4);
            continue;
          }
          std::memset(dst, 0, size_t(lo) * 4);
          const float* row = x + (c * s.H + iy) * s.W;
          const int64_t off = kx - s.pad;  // dst[ox] = row[ox·s + off]
          if (st == 1) {
            std::memcpy(dst + lo, row + lo + off, size_t(hi - lo) * 4);
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) dst[ox] = row[ox * st + off];
          }
          std::memset(dst + hi, 0, size_t(s.Wo - hi) * 4);
        }
      }
}

void add_bias_planes(float* out, const float* b, int64_t Cout, int64_t plane, int64_t off, int64_t n) {
  for (int64_t co = 0; co < Cout; ++co) {
    float* o = out + co * plane + off;
    for (int64_t i = 0; i < n; ++i) o[i] += b[co];
  }
}

void conv_im2col(const ConvShape& s, const float* x, const float* w, const float* b, float* out) {
  const int T = std::max(1, num_threads());
  const int64_t ckk = s.Cin * s.kh * s.kw, plane = s.Ho * s.Wo;
  const int64_t row_bytes = ckk * s.Wo * 4;
  const int64_t max_rows = std::max<int64_t>(1, kColBytesPerThread / row_bytes);
  // Blocks depend on the shape only (not on T): each output element is reduced by one
  // single-threaded sgemm of the same shape whatever the thread count.
  int64_t n_blocks = std::max<int64_t>((s.Ho + max_rows - 1) / max_rows, 16);
  n_blocks = std::min(n_blocks, s.Ho);
  const int64_t rows = (s.Ho + n_blocks - 1) / n_blocks;
  n_blocks = (s.Ho + rows - 1) / rows;
  const int nthreads = int(std::min<int64_t>(T, n_blocks));
  Tensor col = Tensor::empty({nthreads, ckk * rows * s.Wo}, DType::F32, Tag::Workspace);
  BlasSingleThread single;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t r0 = blk * rows, r1 = std::min(s.Ho, r0 + rows), n = (r1 - r0) * s.Wo;
    float* cb = col.data<float>() + int64_t(omp_get_thread_num()) * ckk * rows * s.Wo;  // [ckk, n]
    im2col_rows(s, x, r0, r1, cb);
    // out[:, r0·Wo : r1·Wo] = w[Cout, ckk] · col[ckk, n]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(s.Cout), int(n), int(ckk), 1.0f, w, int(ckk), cb,
                int(n), 0.0f, out + r0 * s.Wo, int(plane));
    if (b) add_bias_planes(out, b, s.Cout, plane, r0 * s.Wo, n);
  }
}

}  // namespace

void conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, int pad, int stride, Tensor& out) {
  ConvShape s{x.dim(0), x.dim(1), x.dim(2), w.dim(0), w.dim(2), w.dim(3), pad, stride, out.dim(1), out.dim(2)};
  if (s.Cout == 0 || s.Ho == 0 || s.Wo == 0) return;
  Tensor wt = widen_vector(w);  // [Cout, Cin, kh, kw] f32; conv kernels are small (≤ 9.4 MB)
  Tensor bt = bias ? widen_vector(*bias) : Tensor();
  const float* bp = bias ? bt.data<float>() : nullptr;
  const int64_t plane = s.Ho * s.Wo;
  if (s.kh == 1 && s.kw == 1 && pad == 0 && stride == 1) {
    // A 1×1 convolution is one GEMM on the input as it lies: [Cout, Cin] · [Cin, H·W].
    // Column chunks of a fixed width (not a function of the thread count), one
    // single-threaded sgemm each.
    const int64_t chunk = 1024;
    float* o = out.data<float>();
    const float* xp = x.data<float>();
    const float* wp = wt.data<float>();
    BlasSingleThread single;
    parallel_for(plane, chunk, [&](int64_t c0, int64_t c1) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(s.Cout), int(c1 - c0), int(s.Cin), 1.0f, wp,
                  int(s.Cin), xp + c0, int(plane), 0.0f, o + c0, int(plane));
      if (bp) add_bias_planes(o, bp, s.Cout, plane, c0, c1 - c0);
    });
    return;
  }
  conv_im2col(s, x.data<float>(), wt.data<float>(), bp, out.data<float>());
}

void upsample_nearest2x(const Tensor& x, Tensor& out) {
  const int64_t C = x.dim(0), H = x.dim(1), W = x.dim(2);
  const float* xp = x.data<float>();
  float* op = out.data<float>();
  parallel_for(C * H, std::max<int64_t>(1, 8192 / std::max<int64_t>(W, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = xp + r * W;
      float* d0 = op + (2 * r) * (2 * W);  // row 2y of channel c: index (c·2H + 2y)·2W = 2r·2W
      for (int64_t i = 0; i < W; ++i) d0[2 * i] = d0[2 * i + 1] = src[i];
      std::memcpy(d0 + 2 * W, d0, size_t(2 * W) * 4);
    }
  });
}

}  // namespace zi::cpu
