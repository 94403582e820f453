// Experiment 03 — Hopper flash attention variant H (wgmma + cp.async, sm_90a), removed from
// the product by issue 12. Reference source only: not built (it needs the helpers of
// src/backends/cuda/attention_sm90a.cu, which the product's kernel W still uses).
//
// 256 threads = two warpgroups, each owning 64 of the block's 128 query rows; all threads load
// K/V tiles with cp.async (two stages) and meet at one barrier per key tile; S_j is issued with
// P_{j-1}·V_{j-1} so the softmax overlaps the second product.
// Measured (bench_kernels, S = 4128, 30 heads, D = 128, bf16): 376 TFLOP/s on H200, 383 on H100
// (BENCHMARKS.md; commit c0ca284: 381 vs 270 for the best mma.sync variant). Superseded by W,
// the warp-specialised version (TMA producer, ping-pong consumers): 584–590 TFLOP/s, which the
// product runs wherever either applies. Removed byte for byte from attention_sm90a.cu (f56d15d):

// ---- variant H: all 256 threads load (cp.async) and compute; one barrier per key tile ----------

__global__ void __launch_bounds__(kThreads, 1)
    flash_sm90_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                      bf16* __restrict__ o, int Sq, int Hq, int Hkv, int kv, float scale_log2) {
#ifdef ZI_SM90A
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = base + kTile, sV = base + 3 * kTile;
  const int wg = int(threadIdx.x) >> 7, warp = (int(threadIdx.x) >> 5) & 3, lane = int(threadIdx.x) & 31;
  const int h = int(blockIdx.y), hk = h / (Hq / Hkv), q0 = int(blockIdx.x) * kBM;
  const int64_t qs = int64_t(Hq) * kD, ks = int64_t(Hkv) * kD;
  const bf16* qh = q + int64_t(h) * kD;
  const bf16* kh = k + int64_t(hk) * kD;
  const bf16* vh = v + int64_t(hk) * kD;
  const int nblk = (kv + kBN - 1) / kBN;

  load_tile(sQ, qh, qs, q0, Sq);
  load_tile(sK, kh, ks, 0, kv);
  if (nblk > 1) load_tile(sK + kTile, kh, ks, kBN, kv);
  load_tile(sV, vh, ks, 0, kv);
  cp_commit();
  cp_wait_all();
  fence_async_smem();
  __syncthreads();

  float s[64], acc[64];
  uint32_t p[8][4];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2];
  const uint32_t qrows = sQ + uint32_t(wg) * 64 * 128;  // this warpgroup's 64 rows of Q

  // Key tile 0. Stages: K_j and V_j live in stage j % 2.
  mma_qk(s, qrows, sK);
  wg_wait<0>();
  reg_fence(s);
  softmax_tile(s, m, l, alpha, 0, kv, lane, scale_log2);
  to_bf16(s, p);
  __syncthreads();  // both warpgroups are done with K_0

  for (int j = 1; j < nblk; ++j) {
    // K_j and V_{j−1} are resident and visible. Issue S_j and P_{j−1}·V_{j−1}, then, while the
    // tensor cores run them, the loads of K_{j+1} (into K_{j−1}'s stage) and V_j (into
    // V_{j−2}'s): both stages were released by the barrier that ended the previous round.
    mma_qk(s, qrows, sK + uint32_t(j & 1) * kTile);
    mma_pv(acc, p, sV + uint32_t((j - 1) & 1) * kTile);
    if (j + 1 < nblk) load_tile(sK + uint32_t((j + 1) & 1) * kTile, kh, ks, (j + 1) * kBN, kv);
    load_tile(sV + uint32_t(j & 1) * kTile, vh, ks, j * kBN, kv);
    cp_commit();
    wg_wait<1>();  // S_j is done; P_{j−1}·V_{j−1} may still run
    reg_fence(s);
    softmax_tile(s, m, l, alpha, j * kBN, kv, lane, scale_log2);
    wg_wait<0>();
    reg_fence(acc);
    reg_fence(p);
    rescale(acc, alpha);
    to_bf16(s, p);
    cp_wait_all();
    fence_async_smem();
    __syncthreads();  // K_j and V_{j−1} are free in both warpgroups; K_{j+1}, V_j are visible
  }
  mma_pv(acc, p, sV + uint32_t((nblk - 1) & 1) * kTile);
  wg_wait<0>();
  reg_fence(acc);
  reg_fence(p);
  store_rows(acc, l, o, q0 + wg * 64 + warp * 16, Sq, qs, h, lane);
#endif  // ZI_SM90A
}


void flash_sm90(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int kv, Tensor& out) {
  const int Sq = int(q.dim(0)), Hq = int(q.dim(1)), Hkv = int(k.dim(1));
  static const bool configured = [] {
    ZI_CUDA(cudaFuncSetAttribute(flash_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
    return true;
  }();
  (void)configured;
  const dim3 grid(unsigned(cdiv(Sq, kBM)), unsigned(Hq));
  flash_sm90_kernel<<<grid, kThreads, kSmem, stream()>>>(q.data<bf16>(), k.data<bf16>(), v.data<bf16>(),
                                                          out.data<bf16>(), Sq, Hq, Hkv, kv,
                                                          scale * 1.4426950408889634f);
  ZI_CUDA_LAUNCHED();
}

