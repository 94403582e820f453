// linear with a weight-format w (core/quant.h): y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias).
// Two paths (QuantPath; bench: `zimage bench-qlinear`, numbers in BENCHMARKS.md):
//   Dequant  any format: OpenMP over fixed panels of 64 rows of w; each thread dequantizes its
//            panel into an f32 buffer and runs a single-threaded sgemm on it. y equals an f32
//            GEMM on the dequantized weights (exactly the same numbers as a bf16/f32 weight
//            holding those values).
//   Int8     Q8_0 / Q4_0 on CPUs with AVX-512 VNNI: the rows of x are quantized like Q8_0
//            (32-value blocks, scale max|x|/127 kept in f32, round half away from zero); each
//            panel of w is unpacked to int8 (Q4_0: q − 8) with its lane corrections; the
//            kernel multiplies 4 rows of x by 4 rows of w with vpdpbusd (x + 128 as u8 × w as
//            s8, started from −128·Σw so the int32 lanes hold Σ x·w exactly), converts each
//            2-block int32 vector to f32 and accumulates it times dx·dw. Partial sums are
//            reduced per 1024-wide K chunk in a fixed order.
//   Int8Avx2 the same on CPUs with AVX2 but no VNNI: x's bytes back to signed q, then per
//            32-block vpmaddubsw(|w|, sign(x, w)) (pairs of products: |sum| ≤ 2·128·127, no
//            saturation) and vpmaddwd with ones, so each int32 lane holds the same 4-value sum
//            as vpdpbusd's; scales, order of the chunks and of the tiles as Int8 (the lanes'
//            final reduction differs: 8-wide vectors instead of 16).
// Both are deterministic for any thread count: panels and chunks do not depend on it.
#include <cblas.h>
// GCC 12's AVX-512 masked-load intrinsics start from an "undefined" vector it then reports.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backends/cpu/cpu_ops.h"
#include "core/check.h"
#include "core/parallel.h"
#include "core/quant.h"

namespace zi::cpu {
namespace {

constexpr int64_t kPanel = 64;      // rows of w per task (both paths)
constexpr int64_t kChunk = 1024;    // K values per reduction chunk (int8 path)

void linear_dequant(const float* x, const Tensor& w, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t tasks = (N + kPanel - 1) / kPanel;
  const int T = int(std::min<int64_t>(std::max(1, num_threads()), tasks));
  Tensor buf = Tensor::empty({T, kPanel * K}, DType::F32, Tag::Workspace);
  BlasSingleThread single;
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n0 = t * kPanel, np = std::min(kPanel, N - n0);
    float* panel = buf.data<float>() + int64_t(omp_get_thread_num()) * kPanel * K;
    quant::dequantize_rows(w, n0, n0 + np, panel);
    float* yc = y + n0;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(np), int(K), 1.0f, x, int(K), panel, int(K),
                0.0f, yc, int(N));
    if (bias)
      for (int64_t r = 0; r < M; ++r)
        for (int64_t j = 0; j < np; ++j) yc[r * N + j] += bias[n0 + j];
  }
}

// ---- int8 path ------------------------------------------------------------------------------

// x rows → u8 (q + 128) and per-lane (4 values) scales dx of their 32-block.
void quantize_x(const float* x, int64_t M, int64_t K, uint8_t* xu, float* dxe) {
  parallel_for(M, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * K;
      for (int64_t b = 0; b < K / 32; ++b) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xr[b * 32 + j]));
        const float d = amax / 127, id = d != 0 ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; ++j)
          xu[r * K + b * 32 + j] = uint8_t(int(std::roundf(xr[b * 32 + j] * id)) + 128);
        for (int l = 0; l < 8; ++l) dxe[r * (K / 4) + b * 8 + l] = d;
      }
    }
  });
}

// Rows [n0, n0 + np) of w → int8 values, −128·(sum of each lane's 4 values), per-lane scales.
void unpack_panel(const Tensor& w, int64_t n0, int64_t np, int64_t K, int8_t* w8, int32_t* negc, float* dwe) {
  const uint8_t* base = static_cast<const uint8_t*>(w.raw());
  const size_t bb = dtype_block_bytes(w.dtype()), rb = dtype_bytes(w.dtype(), K);
  for (int64_t r = 0; r < np; ++r) {
    const uint8_t* src = base + size_t(n0 + r) * rb;
    int8_t* q = w8 + r * K;
    for (int64_t b = 0; b < K / 32; ++b) {
      const uint8_t* blk = src + size_t(b) * bb;
      uint16_t h;
      std::memcpy(&h, blk, 2);
      const float d = f16_to_f32(h);
      if (w.dtype() == DType::Q8_0) {
        std::memcpy(q + b * 32, blk + 2, 32);
      } else {  // Q4_0
        for (int j = 0; j < 16; ++j) {
          q[b * 32 + j] = int8_t(int(blk[2 + j] & 0x0F) - 8);
          q[b * 32 + 16 + j] = int8_t(int(blk[2 + j] >> 4) - 8);
        }
      }
      for (int l = 0; l < 8; ++l) {
        const int8_t* g = q + b * 32 + 4 * l;
        negc[r * (K / 4) + b * 8 + l] = -128 * (int32_t(g[0]) + g[1] + g[2] + g[3]);
        dwe[r * (K / 4) + b * 8 + l] = d;
      }
    }
  }
}

#define ZI_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// y[m, n] += Σ over K range [k0, k1) for a tile of mr ≤ 4 rows of x and nr ≤ 4 rows of w.
ZI_VNNI void tile_vnni(const uint8_t* xu, const float* dxe, const int8_t* w8, const int32_t* negc, const float* dwe,
                       int64_t K, int64_t k0, int64_t k1, int mr, int nr, float* y, int64_t ldy) {
  __m512 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K4 = K / 4;
  for (int64_t k = k0; k < k1; k += 64) {
    // K is a multiple of 32: a last step of one block loads half vectors (the rest zero).
    const bool half = k + 64 > k1;
    const __mmask64 mb = half ? __mmask64(0xFFFFFFFFull) : ~__mmask64(0);
    const __mmask16 ml = half ? __mmask16(0x00FF) : __mmask16(0xFFFF);
    __m512i xv[4];
    __m512 xs[4];
    for (int i = 0; i < 4; ++i) {
      const int ii = i < mr ? i : 0;
      xv[i] = _mm512_maskz_loadu_epi8(mb, xu + ii * K + k);
      xs[i] = _mm512_maskz_loadu_ps(ml, dxe + ii * K4 + k / 4);
    }
    for (int j = 0; j < 4; ++j) {
      if (j >= nr) break;
      const __m512i wv = _mm512_maskz_loadu_epi8(mb, w8 + j * K + k);
      const __m512i cv = _mm512_maskz_loadu_epi32(ml, negc + j * K4 + k / 4);
      const __m512 ws = _mm512_maskz_loadu_ps(ml, dwe + j * K4 + k / 4);
      for (int i = 0; i < 4; ++i) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cv, xv[i], wv));
        acc[i][j] = _mm512_fmadd_ps(f, _mm512_mul_ps(xs[i], ws), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) y[i * ldy + j] += _mm512_reduce_add_ps(acc[i][j]);
}

#define ZI_AVX2 __attribute__((target("avx2,fma")))

ZI_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// tile_vnni's arithmetic on AVX2: one 32-block (8 lanes of 4 values) per step.
ZI_AVX2 void tile_avx2(const uint8_t* xu, const float* dxe, const int8_t* w8, const float* dwe, int64_t K, int64_t k0,
                       int64_t k1, int mr, int nr, float* y, int64_t ldy) {
  __m256 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K4 = K / 4;
  const __m256i flip = _mm256_set1_epi8(char(0x80)), ones = _mm256_set1_epi16(1);
  for (int64_t k = k0; k < k1; k += 32) {
    __m256i xv[4];
    __m256 xs[4];
    for (int i = 0; i < 4; ++i) {
      const int ii = i < mr ? i : 0;
      // u8 (q + 128) → s8 q, |q| ≤ 127.
      xv[i] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xu + ii * K + k)), flip);
      xs[i] = _mm256_loadu_ps(dxe + ii * K4 + k / 4);
    }
    for (int j = 0; j < 4; ++j) {
      if (j >= nr) break;
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w8 + j * K + k));
      const __m256i wabs = _mm256_sign_epi8(wv, wv);  // −128 stays 0x80 = 128 unsigned
      const __m256 ws = _mm256_loadu_ps(dwe + j * K4 + k / 4);
      for (int i = 0; i < 4; ++i) {
        const __m256i p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv[i], wv));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[i][j] = _mm256_fmadd_ps(f, _mm256_mul_ps(xs[i], ws), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) y[i * ldy + j] += hsum256(acc[i][j]);
}

bool have_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}

bool have_vnni() {
  static const bool v = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
  return v;
}

void linear_int8(const float* x, const Tensor& w, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                 bool vnni) {
  Tensor xu = Tensor::empty({M, K}, DType::U8, Tag::Workspace);
  Tensor dxe = Tensor::empty({M, K / 4}, DType::F32, Tag::Workspace);
  quantize_x(x, M, K, xu.data<uint8_t>(), dxe.data<float>());
  const int64_t tasks = (N + kPanel - 1) / kPanel;
  const int T = int(std::min<int64_t>(std::max(1, num_threads()), tasks));
  // Per thread: int8 panel [P, K], lane corrections and lane scales [P, K/4] each.
  const int64_t per = kPanel * K + kPanel * (K / 4) * 8;
  Tensor buf = Tensor::empty({T, per}, DType::U8, Tag::Workspace);
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n0 = t * kPanel, np = std::min(kPanel, N - n0);
    uint8_t* mine = buf.data<uint8_t>() + int64_t(omp_get_thread_num()) * per;
    int8_t* w8 = reinterpret_cast<int8_t*>(mine);
    int32_t* negc = reinterpret_cast<int32_t*>(mine + kPanel * K);
    float* dwe = reinterpret_cast<float*>(mine + kPanel * K + kPanel * (K / 4) * 4);
    unpack_panel(w, n0, np, K, w8, negc, dwe);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < np; ++j) y[r * N + n0 + j] = bias ? bias[n0 + j] : 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t k1 = std::min(K, k0 + kChunk);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = int(std::min<int64_t>(4, M - m0));
        for (int64_t j0 = 0; j0 < np; j0 += 4) {
          const int nr = int(std::min<int64_t>(4, np - j0));
          if (vnni)
            tile_vnni(xu.data<uint8_t>() + m0 * K, dxe.data<float>() + m0 * (K / 4), w8 + j0 * K,
                      negc + j0 * (K / 4), dwe + j0 * (K / 4), K, k0, k1, mr, nr, y + m0 * N + n0 + j0, N);
          else
            tile_avx2(xu.data<uint8_t>() + m0 * K, dxe.data<float>() + m0 * (K / 4), w8 + j0 * K,
                      dwe + j0 * (K / 4), K, k0, k1, mr, nr, y + m0 * N + n0 + j0, N);
        }
      }
    }
  }
}

}  // namespace

bool quant_int8_available(DType t) {
  return (t == DType::Q8_0 || t == DType::Q4_0) && have_vnni();
}
bool quant_int8_avx2_available(DType t) {
  return (t == DType::Q8_0 || t == DType::Q4_0) && have_avx2();
}

void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, QuantPath path) {
  const int64_t N = w.dim(0), K = w.dim(1), M = x.numel() / K;
  if (M == 0 || N == 0) return;
  Tensor b = bias ? widen_vector(*bias) : Tensor();
  const float* bp = bias ? b.data<float>() : nullptr;
  if (path == QuantPath::Auto)
    path = quant_int8_available(w.dtype())        ? QuantPath::Int8
           : quant_int8_avx2_available(w.dtype()) ? QuantPath::Int8Avx2
                                                  : QuantPath::Dequant;
  if (path == QuantPath::Int8) {
    ZI_CHECK(quant_int8_available(w.dtype()), "[linear] the int8 path needs Q8_0/Q4_0 weights and AVX-512 VNNI");
    linear_int8(x.data<float>(), w, bp, y.data<float>(), M, N, K, true);
  } else if (path == QuantPath::Int8Avx2) {
    ZI_CHECK(quant_int8_avx2_available(w.dtype()), "[linear] the AVX2 int8 path needs Q8_0/Q4_0 weights and AVX2");
    linear_int8(x.data<float>(), w, bp, y.data<float>(), M, N, K, false);
  } else {
    linear_dequant(x.data<float>(), w, bp, y.data<float>(), M, N, K);
  }
}

}  // namespace zi::cpu
