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
//   Int8Avx2 Q8_0 / Q4_0 on CPUs with AVX2 but no VNNI, and Q5_0 / Q4_K / Q5_K / Q6_K / Q3_K on
//            any AVX2 CPU: x's rows quantized the same way (kept signed, one scale per 32-block,
//            the sums of q per 16); each panel of w is repacked into
//            groups of 8 rows whose 32-byte vectors hold 4 consecutive k of each of the 8 rows,
//            so one vpmaddubsw serves 8 outputs of a row of x (its 4 values broadcast) and the
//            lanes are outputs, not k: no horizontal sums, one conversion and one FMA per
//            block and row for 8 outputs. Q8_0: vpmaddubsw(|w|, sign(x, w)) (pairs ≤ 2·128·127,
//            no saturation), vpmaddwd with ones, int32 adds over the block's 8 quads. Q4_0: the
//            nibbles q ∈ [0, 15] as the unsigned operand, x signed, 8 quads summed in int16
//            (≤ 8·2·15·127 < 2¹⁵), one vpmaddwd per block, then − 8·Σx of the block. The
//            block's int32 sums are exact, the same integers as the Int8 path's; only the f32
//            accumulation order differs (per block, k ascending, per output). The other
//            formats: q unsigned ≤ 63 with a scale and an offset per 16 values
//            (quant::unpack_block_unsigned), pairs of quads summed in int16, then
//            scale · Σ x·q − offset · Σx per 16 (Q6_K, Q3_K) or per 32 values.
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

// ---- AVX2 path: w repacked so that the vector lanes are 8 outputs ---------------------------

constexpr int kGroup = 8;   // rows of w (outputs) per packed group: one 8-lane vector
constexpr int kRows = 4;    // rows of x per kernel call (registers: 2 vectors per row)

// One 32-block of x → s8 q = roundf(x / d) with d = max|x| / 127 (round half away from zero:
// the nearest-even conversion, then the exact halves moved away from zero); sums[0], sums[1]:
// Σq of its two halves of 16.
ZI_AVX2 void quantize_block_avx2(const float* xb, float d, int8_t* q, int32_t* sums) {
  const float id = d != 0 ? 1.0f / d : 0.0f;
  const __m256 vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), vid);
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 tie = _mm256_cmp_ps(_mm256_andnot_ps(sign_bit, _mm256_sub_ps(v, t)), half, _CMP_EQ_OQ);
    const __m256 away = _mm256_add_ps(t, _mm256_or_ps(one, _mm256_and_ps(sign_bit, v)));  // t ± 1
    const __m256 r = _mm256_blendv_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), away, tie);
    qi[i] = _mm256_cvtps_epi32(r);
  }
  // int32 → int8 in order: packs interleave 128-bit lanes, the permute restores k order.
  const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
  const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p8);
  for (int h = 0; h < 2; ++h) {
    const __m256i s = _mm256_add_epi32(qi[2 * h], qi[2 * h + 1]);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    sums[h] = _mm_cvtsi128_si32(s4);
  }
}

ZI_AVX2 float block_amax_avx2(const float* xb) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(xb));
  for (int i = 1; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(xb + 8 * i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// x rows → s8 q (|q| ≤ 127), the scale of each 32-block and the sums of its q per 16 [M, K/16]
// (the formats' offsets): q = roundf(x / d) (test Quant.AvxActivationQuantizationIsRoundf).
void quantize_x_blocks(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, int32_t* xsum) {
  const int64_t nb = K / 32;
  parallel_for(M, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + r * K + b * 32;
        const float d = block_amax_avx2(xb) / 127;
        dx[r * nb + b] = d;
        quantize_block_avx2(xb, d, xq + r * K + b * 32, xsum + r * 2 * nb + 2 * b);
      }
  });
}

// The VNNI path's form of the same quantization: rows → u8 (q + 128) and per-lane (4 values)
// scales dx of their 32-block (VNNI CPUs have AVX2).
void quantize_x(const float* x, int64_t M, int64_t K, uint8_t* xu, float* dxe) {
  parallel_for(M, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < K / 32; ++b) {
        const float* xb = x + r * K + b * 32;
        const float d = block_amax_avx2(xb) / 127;
        uint8_t* q = xu + r * K + b * 32;
        int32_t sums[2];
        quantize_block_avx2(xb, d, reinterpret_cast<int8_t*>(q), sums);
        for (int j = 0; j < 32; ++j) q[j] ^= 0x80;  // s8 q → u8 q + 128
        for (int l = 0; l < 8; ++l) dxe[r * (K / 4) + b * 8 + l] = d;
      }
  });
}

// Rows [n0, n0 + np) of w → groups of kGroup rows; per group and 32-block, 8 vectors (one per
// quad of k) of [row][4 values] bytes: Q8_0 the signed values, Q4_0 the nibbles q (value q − 8);
// and the block's 8 scales. Rows past np are zero with scale 0.
void pack_panel_avx2(const Tensor& w, int64_t n0, int64_t np, int64_t K, int8_t* pw, float* pd) {
  const uint8_t* base = static_cast<const uint8_t*>(w.raw());
  const size_t bb = dtype_block_bytes(w.dtype()), rb = dtype_bytes(w.dtype(), K);
  const int64_t nb = K / 32, ng = (np + kGroup - 1) / kGroup;
  const bool q8 = w.dtype() == DType::Q8_0;
  for (int64_t g = 0; g < ng; ++g)
    for (int c = 0; c < kGroup; ++c) {
      const int64_t r = g * kGroup + c;
      const uint8_t* src = r < np ? base + size_t(n0 + r) * rb : nullptr;
      for (int64_t b = 0; b < nb; ++b) {
        int8_t* dst = pw + (g * nb + b) * 256 + c * 4;
        float& scale = pd[(g * nb + b) * kGroup + c];
        if (!src) {
          for (int q = 0; q < 8; ++q) std::memset(dst + q * 32, 0, 4);
          scale = 0;
          continue;
        }
        const uint8_t* blk = src + size_t(b) * bb;
        uint16_t h;
        std::memcpy(&h, blk, 2);
        scale = f16_to_f32(h);
        int8_t v[32];
        if (q8) {
          std::memcpy(v, blk + 2, 32);
        } else {
          for (int j = 0; j < 16; ++j) {
            v[j] = int8_t(blk[2 + j] & 0x0F);
            v[16 + j] = int8_t(blk[2 + j] >> 4);
          }
        }
        for (int q = 0; q < 8; ++q) std::memcpy(dst + q * 32, v + 4 * q, 4);
      }
    }
}

// y[r, 0..nc) = bias + acc[r] for the R rows of one packed group.
template <int R>
ZI_AVX2 void store_rows(const __m256* acc, const float* bias, int nc, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r) {
    alignas(32) float t[kGroup];
    _mm256_store_ps(t, acc[r]);
    for (int c = 0; c < nc; ++c) y[r * ldy + c] = bias ? bias[c] + t[c] : t[c];
  }
}

// y[r, 0..nc) = bias + Σ_k x[r, k] · w[c, k] for R rows of x and one packed group (nc ≤ 8 outputs).
template <int R, bool Q4>
ZI_AVX2 void group_avx2(const int8_t* xq, const float* dx, const int32_t* xsum, int64_t K, const int8_t* pw,
                        const float* pd, const float* bias, int nc, float* y, int64_t ldy) {
  const int64_t nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = pw + b * 256;
    for (int l = 0; l < 256; l += 64) _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * 256 + l), _MM_HINT_T0);
    __m256i s[R];  // Q8_0: int32 sums per output; Q4_0: int16 pair sums
    for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_si256();
    _Pragma("GCC unroll 4") for (int q = 0; q < 8; ++q) {
      const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + q * 32));
      if constexpr (Q4) {
        for (int r = 0; r < R; ++r) {
          int32_t a4;
          std::memcpy(&a4, xq + r * K + b * 32 + q * 4, 4);
          s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(a4)));
        }
      } else {
        const __m256i wa = _mm256_abs_epi8(wv);  // −128 → 0x80 = 128 unsigned
        for (int r = 0; r < R; ++r) {
          int32_t a4;
          std::memcpy(&a4, xq + r * K + b * 32 + q * 4, 4);
          const __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(_mm256_set1_epi32(a4), wv));
          s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(p, ones));
        }
      }
    }
    const __m256 ws = _mm256_load_ps(pd + b * kGroup);
    for (int r = 0; r < R; ++r) {
      __m256i t = s[r];
      if constexpr (Q4)
        t = _mm256_sub_epi32(_mm256_madd_epi16(t, ones),
                             _mm256_set1_epi32(8 * (xsum[r * 2 * nb + 2 * b] + xsum[r * 2 * nb + 2 * b + 1])));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(ws, _mm256_set1_ps(dx[r * nb + b])), acc[r]);
    }
  }
  store_rows<R>(acc, bias, nc, y, ldy);
}

// The other block formats (Q5_0, Q4_K, Q5_K, Q6_K, Q3_K; core/quant.h unpack_block_unsigned):
// the same quad layout of unsigned q ≤ 63, and per group and 32-block 32 floats: the 8 rows'
// scales of the first 16 values, of the second 16, then their offsets likewise
// (value = scale · q − offset).
void pack_panel_unsigned(const Tensor& w, int64_t n0, int64_t np, int64_t K, int8_t* pw, float* pd) {
  const DType t = w.dtype();
  const uint8_t* base = static_cast<const uint8_t*>(w.raw());
  const int64_t bs = dtype_block(t), rb = int64_t(dtype_bytes(t, K)), bb = int64_t(dtype_block_bytes(t));
  const int64_t nb = K / 32, ng = (np + kGroup - 1) / kGroup;
  uint8_t q[256];
  float sc[16], off[16];
  for (int64_t g = 0; g < ng; ++g)
    for (int c = 0; c < kGroup; ++c) {
      const int64_t r = g * kGroup + c;
      for (int64_t k0 = 0; k0 < K; k0 += bs) {  // one block of the format: bs / 32 blocks of ours
        if (r < np) {  // t is one of unpack_block_unsigned's formats (quant_int8_avx2_available)
          quant::unpack_block_unsigned(t, base + (n0 + r) * rb + (k0 / bs) * bb, q, sc, off);
        } else {
          std::memset(q, 0, size_t(bs));
          std::fill(sc, sc + bs / 16, 0.0f);
          std::fill(off, off + bs / 16, 0.0f);
        }
        for (int64_t j = 0; j < bs / 32; ++j) {
          const int64_t b = k0 / 32 + j;
          int8_t* dst = pw + (g * nb + b) * 256 + c * 4;
          for (int qd = 0; qd < 8; ++qd) std::memcpy(dst + qd * 32, q + 32 * j + 4 * qd, 4);
          float* f = pd + (g * nb + b) * 32;
          for (int h = 0; h < 2; ++h) {
            f[h * kGroup + c] = sc[2 * j + h];
            f[16 + h * kGroup + c] = off[2 * j + h];
          }
        }
      }
    }
}

// group_avx2 for pack_panel_unsigned's layout: pairs of quads summed in int16
// (≤ 2 · 2 · 63 · 127 < 2¹⁵), one vpmaddwd per pair, then scale · Σ(a·q) − offset · Σa in f32,
// per half block (Q6_K, Q3_K: scales per 16) or per block (the others: Halves = false).
template <int R, bool Halves>
ZI_AVX2 void group_avx2_unsigned(const int8_t* xq, const float* dx, const int32_t* xsum, int64_t K, const int8_t* pw,
                                 const float* pd, const float* bias, int nc, float* y, int64_t ldy) {
  const int64_t nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = pw + b * 256;
    const float* f = pd + b * 32;
    for (int l = 0; l < 256; l += 64) _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * 256 + l), _MM_HINT_T0);
    constexpr int parts = Halves ? 2 : 1, quads = 8 / parts;
    for (int h = 0; h < parts; ++h) {
      __m256i s[R];
      for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_si256();
      for (int qd = quads * h; qd < quads * h + quads; qd += 2) {
        const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + qd * 32));
        const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + qd * 32 + 32));
        for (int r = 0; r < R; ++r) {
          int32_t a0, a1;
          std::memcpy(&a0, xq + r * K + b * 32 + qd * 4, 4);
          std::memcpy(&a1, xq + r * K + b * 32 + qd * 4 + 4, 4);
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, _mm256_set1_epi32(a0)),
                                             _mm256_maddubs_epi16(w1, _mm256_set1_epi32(a1)));
          s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(p, ones));
        }
      }
      const __m256 sc = _mm256_load_ps(f + h * kGroup), off = _mm256_load_ps(f + 16 + h * kGroup);
      for (int r = 0; r < R; ++r) {
        const float d = dx[r * nb + b];
        const int32_t* xs = xsum + r * 2 * nb + 2 * b;
        const int32_t sum = Halves ? xs[h] : xs[0] + xs[1];
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_mul_ps(sc, _mm256_set1_ps(d)), acc[r]);
        acc[r] = _mm256_fnmadd_ps(off, _mm256_set1_ps(d * float(sum)), acc[r]);
      }
    }
  }
  store_rows<R>(acc, bias, nc, y, ldy);
}

// Q8_0; Q4_0; pack_panel_unsigned's formats with a scale per 32 (Q5_0, Q4_K, Q5_K) or per 16 (Q6_K, Q3_K).
enum class Avx2Kind { Signed8, Nibble, Unsigned32, Unsigned16 };

template <Avx2Kind Kd, int R>
void run_group(const int8_t* xq, const float* dx, const int32_t* xsum, int64_t K, const int8_t* gw, const float* gd,
               const float* gb, int nc, float* yo, int64_t ldy) {
  if constexpr (Kd == Avx2Kind::Unsigned32 || Kd == Avx2Kind::Unsigned16)
    group_avx2_unsigned<R, Kd == Avx2Kind::Unsigned16>(xq, dx, xsum, K, gw, gd, gb, nc, yo, ldy);
  else
    group_avx2<R, Kd == Avx2Kind::Nibble>(xq, dx, xsum, K, gw, gd, gb, nc, yo, ldy);
}

template <Avx2Kind Kd>
void linear_avx2(const float* x, const Tensor& w, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t nb = K / 32;
  Tensor xq = Tensor::empty({M, K}, DType::U8, Tag::Workspace);  // s8 values
  Tensor dx = Tensor::empty({M, nb}, DType::F32, Tag::Workspace);
  Tensor xsum = Tensor::empty({M, 2 * nb}, DType::I32, Tag::Workspace);
  quantize_x_blocks(x, M, K, static_cast<int8_t*>(xq.raw()), dx.data<float>(), xsum.data<int32_t>());
  const int64_t tasks = (N + kPanel - 1) / kPanel;
  const int T = int(std::min<int64_t>(std::max(1, num_threads()), tasks));
  // Per thread: the packed panel [P, K] bytes and its floats, per group and 32-block 8 (scales)
  // or 32 (scales and offsets per half) (P = kPanel, a multiple of kGroup).
  static_assert(kPanel % kGroup == 0);
  constexpr bool unsigned_form = Kd == Avx2Kind::Unsigned32 || Kd == Avx2Kind::Unsigned16;
  const int64_t floats_per = unsigned_form ? 32 : kGroup;
  const int64_t per = kPanel * K + (kPanel / kGroup) * nb * floats_per * int64_t(sizeof(float));
  Tensor buf = Tensor::empty({T, per}, DType::U8, Tag::Workspace);
  const int8_t* xqp = static_cast<const int8_t*>(xq.raw());
  const float* dxp = dx.data<float>();
  const int32_t* xsp = xsum.data<int32_t>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n0 = t * kPanel, np = std::min(kPanel, N - n0);
    uint8_t* mine = buf.data<uint8_t>() + int64_t(omp_get_thread_num()) * per;  // per % 32 == 0: K % 32 == 0
    int8_t* pw = reinterpret_cast<int8_t*>(mine);
    float* pd = reinterpret_cast<float*>(mine + kPanel * K);
    if constexpr (unsigned_form)
      pack_panel_unsigned(w, n0, np, K, pw, pd);
    else
      pack_panel_avx2(w, n0, np, K, pw, pd);
    const int64_t ng = (np + kGroup - 1) / kGroup;
    // Rows of x outer, groups inner: R rows of x (R·K bytes) stay in L1 across the panel.
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int rows = int(std::min<int64_t>(kRows, M - m0));
      for (int64_t g = 0; g < ng; ++g) {
        const int nc = int(std::min<int64_t>(kGroup, np - g * kGroup));
        const int8_t* gw = pw + g * nb * 256;
        const float* gd = pd + g * nb * floats_per;
        const float* gb = bias ? bias + n0 + g * kGroup : nullptr;
        float* yo = y + m0 * N + n0 + g * kGroup;
        if (rows == kRows) {
          run_group<Kd, kRows>(xqp + m0 * K, dxp + m0 * nb, xsp + m0 * 2 * nb, K, gw, gd, gb, nc, yo, N);
        } else {  // each row alone: the same arithmetic per row as in a full tile
          for (int r = 0; r < rows; ++r)
            run_group<Kd, 1>(xqp + (m0 + r) * K, dxp + (m0 + r) * nb, xsp + (m0 + r) * 2 * nb, K, gw, gd, gb, nc,
                             yo + r * N, N);
        }
      }
    }
  }
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

void linear_int8(const float* x, const Tensor& w, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
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
          tile_vnni(xu.data<uint8_t>() + m0 * K, dxe.data<float>() + m0 * (K / 4), w8 + j0 * K,
                    negc + j0 * (K / 4), dwe + j0 * (K / 4), K, k0, k1, mr, nr, y + m0 * N + n0 + j0, N);
        }
      }
    }
  }
}

}  // namespace

bool quant_int8_available(DType t) {
  return (t == DType::Q8_0 || t == DType::Q4_0) && have_vnni();
}
void quantize_activation_blocks(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* sum) {
  ZI_CHECK(have_avx2() && K % 32 == 0, "[quantize_activation_blocks] needs AVX2 and K a multiple of 32");
  quantize_x_blocks(x, M, K, q, d, sum);
}
bool quant_int8_avx2_available(DType t) {
  const bool fmt = t == DType::Q8_0 || t == DType::Q4_0 || t == DType::Q5_0 || t == DType::Q4_K || t == DType::Q5_K ||
                   t == DType::Q6_K || t == DType::Q3_K;
  return fmt && have_avx2();
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
    linear_int8(x.data<float>(), w, bp, y.data<float>(), M, N, K);
  } else if (path == QuantPath::Int8Avx2) {
    ZI_CHECK(quant_int8_avx2_available(w.dtype()), "[linear] the AVX2 int8 path needs block-format weights (Q8_0 … Q3_K, not ",
             dtype_name(w.dtype()), ") and AVX2");
    if (w.dtype() == DType::Q8_0)
      linear_avx2<Avx2Kind::Signed8>(x.data<float>(), w, bp, y.data<float>(), M, N, K);
    else if (w.dtype() == DType::Q4_0)
      linear_avx2<Avx2Kind::Nibble>(x.data<float>(), w, bp, y.data<float>(), M, N, K);
    else if (w.dtype() == DType::Q6_K || w.dtype() == DType::Q3_K)
      linear_avx2<Avx2Kind::Unsigned16>(x.data<float>(), w, bp, y.data<float>(), M, N, K);
    else
      linear_avx2<Avx2Kind::Unsigned32>(x.data<float>(), w, bp, y.data<float>(), M, N, K);
  } else {
    linear_dequant(x.data<float>(), w, bp, y.data<float>(), M, N, K);
  }
}

}  // namespace zi::cpu
