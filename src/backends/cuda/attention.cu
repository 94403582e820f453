// Scaled dot-product attention on the GPU, two paths:
//  flash    bf16, head_dim 64 or 128, two kernels chosen by rule: W (attention_sm90a.cu: wgmma +
//           TMA, warp-specialised) for head_dim 128 without a causal mask on compute capability
//           9.0, where it runs 2× faster than any other; elsewhere the portable kernel below
//           (variant C of bench/gpu/experiments/): blocks of 4 warps own 128 queries of one head
//           and stream 64-key tiles of K and V through shared memory (cp.async, two stages,
//           XOR-swizzled rows so ldmatrix is conflict-free). S = QKᵀ and O += PV run on
//           mma.sync m16n8k16 with f32 accumulators; the softmax is online (running max and
//           sum per row, in f32, exp2 with the scale folded in). No S×S buffer exists.
//  blocked  any dtype or head size (f32 checks, the VAE's 512-wide single head): blocks of
//           queries, scores [heads, bq, keys] in f32 through cuBLAS strided-batched GEMMs,
//           a row softmax kernel, and P·V through cuBLAS again. Memory is bounded by
//           kScoreBudget, never S×S for a whole head at large S.
// Both honour GQA (head h reads kv head h / (Hq/Hkv)), causal masking and kv_len.
#include <cublas_v2.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "backends/cuda/attention_sm90.h"
#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"

namespace zi::cuda {
namespace {

bool g_force_blocked = false;

// ---- flash path -------------------------------------------------------------------------------

constexpr int kBM = 64, kBN = 64, kThreads = 128;

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c[16×8] += a[16×16] · b[16×8], bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Element offset of 16-byte chunk `c` of row `r` in a [rows, D] bf16 tile: chunks are XORed
// with the row's low 3 bits so the 8 rows an ldmatrix reads fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

// Copies rows [row0, row0 + 64) of a [rows, stride] bf16 matrix (head offset applied) into a
// swizzled tile; rows at or past `valid` are zero-filled.
template <int D>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* src, int64_t stride, int row0, int valid) {
  constexpr int CH = D / 8;
  for (int i = threadIdx.x; i < 64 * CH; i += kThreads) {
    const int r = i / CH, c = i % CH;
    const bool ok = row0 + r < valid;
    const bf16* g = ok ? src + int64_t(row0 + r) * stride + c * 8 : src;
    cp_async16(tile + swz<D>(r, c), g, ok ? 16 : 0);
  }
}

// Variant B: 128 queries per block, each warp owns two 16-row tiles, so every K/V fragment read
// from shared memory feeds two MMAs (half the shared-memory traffic per FLOP of variant A).
// Q stays in shared memory (re-read per key block) to leave registers for the two tiles'
// accumulators; one block of 4 warps per 96 KB, two blocks per SM.
// kSkipRescale (variant C): the accumulators are rescaled only when some row's running max moved
// in this key block (alpha != 1 in any lane, a warp-uniform branch); alpha == 1 exactly when
// the max stays, so skipping it changes nothing.
template <int D, bool kSkipRescale = false>
__global__ void __launch_bounds__(kThreads, 2) flash_fwd2(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                          const bf16* __restrict__ v, bf16* __restrict__ o, int Sq,
                                                          int Hq, int Hkv, int kv, int causal, float scale_log2) {
  constexpr int BM = 2 * kBM;
  extern __shared__ __align__(128) uint8_t smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);  // [128, D]
  bf16* sK = sQ + BM * D;                    // [2][64, D]
  bf16* sV = sK + 2 * kBN * D;               // [2][64, D]
  const int h = blockIdx.y, hk = h / (Hq / Hkv);
  const int q0 = blockIdx.x * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t qs = int64_t(Hq) * D, ks = int64_t(Hkv) * D;
  const bf16* qh = q + int64_t(h) * D;
  const bf16* kh = k + int64_t(hk) * D;
  const bf16* vh = v + int64_t(hk) * D;
  const int kend = causal ? min(kv, q0 + BM) : kv;
  const int nblk = (kend + kBN - 1) / kBN;

  load_tile<D>(sQ, qh, qs, q0, Sq);
  load_tile<D>(sQ + kBM * D, qh, qs, q0 + kBM, Sq);
  if (nblk > 0) {
    load_tile<D>(sK, kh, ks, 0, kend);
    load_tile<D>(sV, vh, ks, 0, kend);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  float acc[2][D / 8][4];
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[t][i][0] = acc[t][i][1] = acc[t][i][2] = acc[t][i][3] = 0.0f;
  float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  const int rbase = q0 + warp * 32 + (lane >> 2);

  for (int j = 0; j < nblk; ++j) {
    const int st = j & 1, k0 = j * kBN;
    if (j + 1 < nblk) {
      load_tile<D>(sK + (st ^ 1) * kBN * D, kh, ks, k0 + kBN, kend);
      load_tile<D>(sV + (st ^ 1) * kBN * D, vh, ks, k0 + kBN, kend);
    }
    cp_async_commit();
    const bf16* tK = sK + st * kBN * D;
    const bf16* tV = sV + st * kBN * D;

    float s[2][kBN / 8][4];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) s[t][nt][0] = s[t][nt][1] = s[t][nt][2] = s[t][nt][3] = 0.0f;
#pragma unroll
    for (int kk2 = 0; kk2 < D / 32; ++kk2) {
      uint32_t qa[2][2][4];
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          ldmatrix_x4(qa[t][hh], sQ + swz<D>(warp * 32 + t * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                             (2 * kk2 + hh) * 2 + (lane >> 4)));
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        uint32_t b[4];
        ldmatrix_x4(b, tK + swz<D>(nt * 8 + (lane & 7), kk2 * 4 + (lane >> 3)));
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          mma_bf16(s[t][nt], qa[t][0], b[0], b[1]);
          mma_bf16(s[t][nt], qa[t][1], b[2], b[3]);
        }
      }
    }

#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int row0 = rbase + t * 16;
      if (causal || k0 + kBN > kend) {
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
            if (key >= kend || (causal && key > row0 + (e >> 1) * 8)) s[t][nt][e] = -INFINITY;
          }
      }
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[t][nt][0], s[t][nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[t][nt][2], s[t][nt][3]));
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float mnew = fmaxf(m[t][r], mx[r] * scale_log2);
        const float base = mnew == -INFINITY ? 0.0f : mnew;
        const float alpha = ex2(m[t][r] - base);
        m[t][r] = mnew;
        l[t][r] *= alpha;
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
          const float p0 = ex2(fmaf(s[t][nt][2 * r], scale_log2, -base));
          const float p1 = ex2(fmaf(s[t][nt][2 * r + 1], scale_log2, -base));
          s[t][nt][2 * r] = p0;
          s[t][nt][2 * r + 1] = p1;
          l[t][r] += p0 + p1;
        }
        if (!kSkipRescale || !__all_sync(0xffffffffu, alpha == 1.0f)) {
#pragma unroll
          for (int i = 0; i < D / 8; ++i) {
            acc[t][i][2 * r] *= alpha;
            acc[t][i][2 * r + 1] *= alpha;
          }
        }
      }
    }

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        a[t][0] = pack_bf16(s[t][2 * kk][0], s[t][2 * kk][1]);
        a[t][1] = pack_bf16(s[t][2 * kk][2], s[t][2 * kk][3]);
        a[t][2] = pack_bf16(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
        a[t][3] = pack_bf16(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nt2 = 0; nt2 < D / 16; ++nt2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, tV + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, nt2 * 2 + (lane >> 4)));
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          mma_bf16(acc[t][2 * nt2], a[t], b[0], b[1]);
          mma_bf16(acc[t][2 * nt2 + 1], a[t], b[2], b[3]);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();
  }

#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lt = l[t][r];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      const int row = rbase + t * 16 + r * 8;
      if (row >= Sq) continue;
      const float inv = lt > 0 ? 1.0f / lt : 0.0f;
      bf16* orow = o + int64_t(row) * qs + int64_t(h) * D + (lane & 3) * 2;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<uint32_t*>(orow + i * 8) = pack_bf16(acc[t][i][2 * r] * inv, acc[t][i][2 * r + 1] * inv);
    }
}

bool g_portable_only = false;  // tests: the portable kernel even where the Hopper one applies

template <int D, bool kSkip = false>
void launch_flash2(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int kv, Tensor& out) {
  const int Sq = int(q.dim(0)), Hq = int(q.dim(1)), Hkv = int(k.dim(1));
  const size_t smem = size_t(2 * kBM + 4 * kBN) * D * 2;
  static bool configured = false;
  if (!configured) {
    ZI_CUDA(cudaFuncSetAttribute(flash_fwd2<D, kSkip>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    configured = true;
  }
  const dim3 grid(unsigned(cdiv(Sq, 2 * kBM)), unsigned(Hq));
  flash_fwd2<D, kSkip><<<grid, kThreads, smem, stream()>>>(q.data<bf16>(), k.data<bf16>(), v.data<bf16>(), out.data<bf16>(),
                                                    Sq, Hq, Hkv, kv, causal ? 1 : 0, scale * 1.4426950408889634f);
  ZI_CUDA_LAUNCHED();
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0; }

bool flash_ok(const Tensor& q, const Tensor& k) {
  const int64_t D = q.dim(2);
  auto aligned = aligned16;
  return !g_force_blocked && q.dtype() == DType::BF16 && k.dtype() == DType::BF16 && (D == 64 || D == 128) &&
         aligned(q) && aligned(k) && q.dim(0) < (int64_t(1) << 31) && k.dim(0) < (int64_t(1) << 31);
}

// ---- blocked path -----------------------------------------------------------------------------

constexpr int64_t kScoreBudget = int64_t(256) << 20;  // bytes of f32 scores per query block

void blas_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(str_cat("[cublas] ", what, " failed with status ", int(s)));
}

cublasHandle_t blas() {
  static cublasHandle_t h = [] {
    cublasHandle_t x;
    ensure_init();
    blas_check(cublasCreate(&x), "cublasCreate");
    blas_check(cublasSetStream(x, stream()), "cublasSetStream");
    return x;
  }();
  return h;
}

// P[row, :kend] = softmax(scores[row, :visible]) with 0 past `visible`, rows = batch·bq.
// scores f32 [rows, kend]; p (type T, may alias scores when T is f32) [rows, kend].
template <class T>
__global__ void softmax_rows(const float* scores, T* p, int64_t bq, int64_t kend, int64_t q0, int64_t kv,
                             int causal) {
  const int64_t rowi = blockIdx.x, qi = q0 + rowi % bq;
  const int64_t visible = causal ? min(kv, qi + 1) : kv;
  const float* s = scores + rowi * kend;
  T* pr = p + rowi * kend;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < visible; j += blockDim.x) mx = fmaxf(mx, s[j]);
  __shared__ float red[32];
  mx = warp_max(mx);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  mx = (threadIdx.x & 31) < blockDim.x / 32 ? red[threadIdx.x & 31] : -INFINITY;  // every warp: all partials
  mx = warp_max(mx);
  float sum = 0;
  for (int64_t j = threadIdx.x; j < visible; j += blockDim.x) sum += __expf(s[j] - mx);
  sum = block_sum(sum);
  const float inv = sum > 0 ? 1.0f / sum : 0.0f;
  __syncthreads();  // all reads of s done before p (which may alias it) is written
  for (int64_t j = threadIdx.x; j < kend; j += blockDim.x) st<T>(pr, j, j < visible ? __expf(s[j] - mx) * inv : 0.0f);
}

// Work is issued per kv head g with its G = Hq/Hkv query heads as the batch (Hq == Hkv: all
// heads in one batch, K/V strided by D).
void attention_blocked(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int64_t kv,
                       Tensor& out) {
  const int64_t Sq = q.dim(0), Hq = q.dim(1), Hkv = k.dim(1), D = q.dim(2), G = Hq / Hkv;
  const bool all_heads = G == 1;
  const int64_t batch = all_heads ? Hq : G, loops = all_heads ? 1 : Hkv;
  const bool f32 = q.dtype() == DType::F32;
  const cudaDataType_t t = f32 ? CUDA_R_32F : CUDA_R_16BF;
  const size_t es = dtype_size(q.dtype());
  if (kv <= 0) {
    ZI_CUDA(cudaMemsetAsync(out.raw(), 0, out.nbytes(), stream()));
    return;
  }
  int64_t bq = std::max<int64_t>(16, kScoreBudget / (4 * batch * kv));
  bq = std::min(bq, Sq);
  Tensor scores = scratch(4 * batch * bq * kv);
  Tensor probs = f32 ? Tensor() : scratch(int64_t(es) * batch * bq * kv);
  const float one = 1.0f, zero = 0.0f;
  cublasHandle_t hb = blas();
  for (int64_t q0 = 0; q0 < Sq; q0 += bq) {
    const int64_t nq = std::min(bq, Sq - q0);
    const int64_t kend = causal ? std::min(kv, q0 + nq) : kv;
    for (int64_t g = 0; g < loops; ++g) {
      const char* qp = static_cast<const char*>(q.raw()) + size_t((q0 * Hq + g * G) * D) * es;
      const char* kp = static_cast<const char*>(k.raw()) + size_t(g * D) * es;
      const char* vp = static_cast<const char*>(v.raw()) + size_t(g * D) * es;
      char* op = static_cast<char*>(out.raw()) + size_t((q0 * Hq + g * G) * D) * es;
      const long long kstride = all_heads ? D : 0;
      float* sc = static_cast<float*>(scores.raw());
      // scoresᵀ (kend × nq, column-major, ld kend) per head = scale · K_g (kend × D) · Q_hᵀ (D × nq).
      blas_check(cublasGemmStridedBatchedEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, int(kend), int(nq), int(D), &scale, kp, t,
                                            int(Hkv * D), kstride, qp, t, int(Hq * D), D, &zero, sc, CUDA_R_32F,
                                            int(kend), kend * nq, int(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "scores");
      void* pp = f32 ? static_cast<void*>(sc) : probs.raw();
      if (f32) {
        softmax_rows<float><<<unsigned(batch * nq), 256, 0, stream()>>>(sc, static_cast<float*>(pp), nq, kend, q0,
                                                                        kv, causal);
      } else {
        softmax_rows<bf16><<<unsigned(batch * nq), 256, 0, stream()>>>(sc, static_cast<bf16*>(pp), nq, kend, q0, kv,
                                                                       causal);
      }
      ZI_CUDA_LAUNCHED();
      // Oᵀ (D × nq, ld Hq·D) per head = Vᵀ (D × kend) · Pᵀ (kend × nq, ld kend).
      blas_check(cublasGemmStridedBatchedEx(hb, CUBLAS_OP_N, CUBLAS_OP_N, int(D), int(nq), int(kend), &one, vp, t,
                                            int(Hkv * D), kstride, pp, t, int(kend), kend * nq, &zero, op, t,
                                            int(Hq * D), D, int(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "values");
    }
  }
}

}  // namespace

void set_force_blocked_attention(bool on) { g_force_blocked = on; }
void set_portable_attention(bool on) { g_portable_only = on; }

const char* attention_path(const Tensor& q, const Tensor& k) { return flash_ok(q, k) ? "flash" : "blocked"; }

void attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int64_t kv_len,
               Tensor& out) {
  const int64_t kv = kv_len < 0 ? k.dim(0) : kv_len;
  if (q.dim(0) == 0 || q.dim(1) == 0) return;
  if (flash_ok(q, k) && aligned16(v) && aligned16(out)) {  // 16-byte loads/stores, TMA
    // By rule: the Hopper kernel (W) where it applies, the portable mma.sync one (C) elsewhere.
    const bool d128 = q.dim(2) == 128;
    if (d128 && !causal && kv > 0 && !g_portable_only && flash_sm90w_available()) flash_sm90w(q, k, v, scale, int(kv), out);
    else if (d128) launch_flash2<128, true>(q, k, v, scale, causal, int(kv), out);
    else launch_flash2<64, true>(q, k, v, scale, causal, int(kv), out);
    return;
  }
  attention_blocked(q, k, v, scale, causal, kv, out);
}

}  // namespace zi::cuda
