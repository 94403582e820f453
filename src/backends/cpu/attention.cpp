// Scaled dot-product attention, blockwise over queries: for each (head, block of bq
// queries) one thread computes the score block [bq, keys] with sgemm, a row softmax in
// place, and the output block with a second sgemm. Memory is O(bq · Sk) per thread (≤ 8 MB),
// never S × S per head. q/k/v stay in their [S, H, D] layout: a head is a strided
// matrix (leading dimension H·D), which sgemm reads directly.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "backends/cpu/cpu_ops.h"
#include "backends/cpu/vec_math.h"
#include "core/parallel.h"

namespace zi::cpu {
namespace {

// Queries per block. Larger blocks amortise sgemm's packing of K_h and V_h (repacked for
// every block) over more rows: at S = 4128 going from 64 to 256 rows took the kernel from
// ~77% to ~93% of the plain-sgemm ceiling. The score block is capped at kScoreBytes per
// thread. Causal attention uses small blocks: a block computes its whole diagonal square,
// half of it masked.
constexpr int64_t kMaxBlockQ = 512, kMinBlockQ = 32, kCausalBlockQ = 64;
constexpr int64_t kScoreBytes = int64_t(8) << 20;

// Rows per query block: at most the cap above, and blocks of equal size (S = 288 gives
// 2 × 144, not 256 + 32).
int64_t block_q(int64_t Sq, int64_t kv, bool causal) {
  int64_t cap = kCausalBlockQ;
  if (!causal) cap = std::clamp(kScoreBytes / (4 * std::max<int64_t>(kv, 1)) / 16 * 16, kMinBlockQ, kMaxBlockQ);
  const int64_t n = (Sq + cap - 1) / cap;
  return std::max<int64_t>(1, std::min(cap, ((Sq + n - 1) / n + 15) / 16 * 16));
}

ZI_CPU_CLONES float row_max(const float* s, int64_t n) {
  float m = s[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[j] ← exp(s[j] − m) for j < n; returns Σ s[j].
ZI_CPU_CLONES float exp_shift_sum(float* s, int64_t n, float m) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_fast(s[j] - m);
    s[j] = e;
    sum += e;
  }
  return sum;
}

ZI_CPU_CLONES void scale_row(float* o, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) o[j] *= a;
}

struct AttnShape {
  int64_t Sq, Sk, Hq, Hkv, D, kv;  // kv: visible keys (kv_len resolved)
  bool causal;
};

// One (head h, queries [q0, q1)) block. scores: [bq, kv] scratch of this thread.
void attend_block(const AttnShape& a, const float* q, const float* k, const float* v, float scale, int64_t h,
                  int64_t q0, int64_t q1, float* scores, float* out) {
  const int64_t hk = h / (a.Hq / a.Hkv), bq = q1 - q0;
  const int64_t ldq = a.Hq * a.D, ldk = a.Hkv * a.D;
  const int64_t kend = a.causal ? std::min(a.kv, q1) : a.kv;  // keys any row of the block sees
  float* o = out + q0 * ldq + h * a.D;                         // [bq, D], leading dim Hq·D
  if (kend <= 0) {
    for (int64_t i = 0; i < bq; ++i) std::memset(o + i * ldq, 0, size_t(a.D) * 4);
    return;
  }
  // scores[bq, kend] = scale · Q_h[q0:q1] · K_hk[0:kend]ᵀ
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(bq), int(kend), int(a.D), scale, q + q0 * ldq + h * a.D,
              int(ldq), k + hk * a.D, int(ldk), 0.0f, scores, int(kend));
  std::vector<float> inv_sum(size_t(bq), 0.0f);
  for (int64_t i = 0; i < bq; ++i) {
    float* s = scores + i * kend;
    const int64_t nvis = a.causal ? std::min(q0 + i + 1, a.kv) : a.kv;  // ≥ 1 here
    const float sum = exp_shift_sum(s, nvis, row_max(s, nvis));
    if (nvis < kend) std::memset(s + nvis, 0, size_t(kend - nvis) * 4);
    inv_sum[size_t(i)] = 1.0f / sum;
  }
  // out[bq, D] = P[bq, kend] · V_hk[0:kend], then each row divided by its softmax sum.
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(bq), int(a.D), int(kend), 1.0f, scores, int(kend),
              v + hk * a.D, int(ldk), 0.0f, o, int(ldq));
  for (int64_t i = 0; i < bq; ++i) scale_row(o + i * ldq, a.D, inv_sum[size_t(i)]);
}

}  // namespace

void attention(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int64_t kv_len,
               Tensor& out) {
  AttnShape a{q.dim(0), k.dim(0), q.dim(1), k.dim(1), q.dim(2), kv_len < 0 ? k.dim(0) : kv_len, causal};
  if (a.Sq == 0 || a.Hq == 0) return;
  const int64_t bq = block_q(a.Sq, a.kv, causal), n_qb = (a.Sq + bq - 1) / bq, tasks = a.Hq * n_qb;
  const int T = int(std::min<int64_t>(std::max(1, num_threads()), tasks));
  const int64_t scratch_per_thread = bq * std::max<int64_t>(a.kv, 1);  // [bq, kv] scores
  Tensor scratch = Tensor::empty({T, scratch_per_thread}, DType::F32, Tag::Workspace);
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  float* op = out.data<float>();
  BlasSingleThread single;
  // Task order: all query blocks of one head before the next head, so K_h and V_h stay in cache.
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t h = t / n_qb, qb = t % n_qb;
    const int64_t q0 = qb * bq, q1 = std::min(a.Sq, q0 + bq);
    float* scores = scratch.data<float>() + int64_t(omp_get_thread_num()) * scratch_per_thread;
    attend_block(a, qp, kp, vp, scale, h, q0, q1, scores, op);
  }
}

}  // namespace zi::cpu
