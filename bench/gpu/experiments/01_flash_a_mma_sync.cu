// Experiment 01 — flash attention variant A (mma.sync, sm_80+), removed from the product by
// issue 12. Reference source only: not built (it needs the helpers of
// src/backends/cuda/attention.cu: cp_async16, ldmatrix_x4, mma_bf16, swz, load_tile, kBM/kBN).
//
// One block of 4 warps owns 64 queries of one head; 64-key K/V tiles stream through shared
// memory in two stages (Q borrows K's second stage); 3 blocks per SM.
// Measured (bench_kernels, S = 4128, 30 heads, D = 128, bf16): 183 TFLOP/s on H200 at v1,
// 220 TFLOP/s after v3 (bench/gpu/NOTES.md); the mma.sync family spans 219–273 TFLOP/s on
// H200/H100 (BENCHMARKS.md). Lost to variant B (264) and C (270–273), and to W (584–590) on
// Hopper. The portable kernel kept in the product is C (flash_fwd2<D, true>).
// Removed at commit f56d15d's state of src/backends/cuda/attention.cu, byte for byte:

// Resident blocks per SM the register budget is capped for: 3 × 4 warps with 64 KB of shared
// memory each (D = 128) instead of 2, so one block's softmax overlaps another's MMAs.
template <int D>
__global__ void __launch_bounds__(kThreads, 3) flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                      const bf16* __restrict__ v, bf16* __restrict__ o, int Sq,
                                                      int Hq, int Hkv, int kv, int causal, float scale_log2) {
  extern __shared__ __align__(128) uint8_t smem[];
  bf16* sK = reinterpret_cast<bf16*>(smem);  // [2][64, D]
  bf16* sV = sK + 2 * kBN * D;               // [2][64, D]
  bf16* sQ = sK + kBN * D;  // [64, D]: K's second stage, free until the loop's first prefetch
  const int h = blockIdx.y, hk = h / (Hq / Hkv);
  const int q0 = blockIdx.x * kBM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t qs = int64_t(Hq) * D, ks = int64_t(Hkv) * D;
  const bf16* qh = q + int64_t(h) * D;
  const bf16* kh = k + int64_t(hk) * D;
  const bf16* vh = v + int64_t(hk) * D;
  const int kend = causal ? min(kv, q0 + kBM) : kv;  // keys any row of this block sees
  const int nblk = (kend + kBN - 1) / kBN;

  load_tile<D>(sQ, qh, qs, q0, Sq);
  if (nblk > 0) {
    load_tile<D>(sK, kh, ks, 0, kend);
    load_tile<D>(sV, vh, ks, 0, kend);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qf[kk], sQ + swz<D>(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
  __syncthreads();  // every warp holds its Q fragments before the first prefetch overwrites sQ

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const int row[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};

  for (int j = 0; j < nblk; ++j) {
    const int st = j & 1, k0 = j * kBN;
    if (j + 1 < nblk) {
      load_tile<D>(sK + (st ^ 1) * kBN * D, kh, ks, k0 + kBN, kend);
      load_tile<D>(sV + (st ^ 1) * kBN * D, vh, ks, k0 + kBN, kend);
    }
    cp_async_commit();
    const bf16* tK = sK + st * kBN * D;
    const bf16* tV = sV + st * kBN * D;

    float s[kBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk2 = 0; kk2 < D / 32; ++kk2) {
        uint32_t b[4];
        ldmatrix_x4(b, tK + swz<D>(nt * 8 + (lane & 7), kk2 * 4 + (lane >> 3)));
        mma_bf16(s[nt], qf[2 * kk2], b[0], b[1]);
        mma_bf16(s[nt], qf[2 * kk2 + 1], b[2], b[3]);
      }
    }

    // Mask (only blocks that reach past kv or cross the diagonal), then the online softmax
    // update of both rows this thread holds. The max is taken on raw scores (scale > 0), and
    // p = 2^(s·scale·log2 e − m) is one FFMA and one MUFU op.
    if (causal || k0 + kBN > kend) {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          if (key >= kend || (causal && key > row[e >> 1])) s[nt][e] = -INFINITY;
        }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float mnew = fmaxf(m[r], mx[r] * scale_log2);
      const float base = mnew == -INFINITY ? 0.0f : mnew;
      alpha[r] = ex2(m[r] - base);  // m = −inf gives 0: nothing accumulated yet
      m[r] = mnew;
      l[r] *= alpha[r];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        const float p0 = ex2(fmaf(s[nt][2 * r], scale_log2, -base));
        const float p1 = ex2(fmaf(s[nt][2 * r + 1], scale_log2, -base));
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
        l[r] += p0 + p1;
      }
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      acc[i][0] *= alpha[0];
      acc[i][1] *= alpha[0];
      acc[i][2] *= alpha[1];
      acc[i][3] *= alpha[1];
    }

    // O += P · V: P's accumulators become A fragments in registers.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                             pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nt2 = 0; nt2 < D / 16; ++nt2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, tV + swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, nt2 * 2 + (lane >> 4)));
        mma_bf16(acc[2 * nt2], a, b[0], b[1]);
        mma_bf16(acc[2 * nt2 + 1], a, b[2], b[3]);
      }
    }
    cp_async_wait_all();
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const float inv[2] = {l[0] > 0 ? 1.0f / l[0] : 0.0f, l[1] > 0 ? 1.0f / l[1] : 0.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= Sq) continue;
    bf16* orow = o + int64_t(row[r]) * qs + int64_t(h) * D + (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(orow + i * 8) = pack_bf16(acc[i][2 * r] * inv[r], acc[i][2 * r + 1] * inv[r]);
  }
}


template <int D>
void launch_flash(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal, int kv, Tensor& out) {
  const int Sq = int(q.dim(0)), Hq = int(q.dim(1)), Hkv = int(k.dim(1));
  const size_t smem = size_t(4 * kBN) * D * 2;  // K and V, two stages each (Q borrows K's second)
  static bool configured = false;
  if (!configured) {
    ZI_CUDA(cudaFuncSetAttribute(flash_fwd<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    configured = true;
  }
  const dim3 grid(unsigned(cdiv(Sq, kBM)), unsigned(Hq));
  flash_fwd<D><<<grid, kThreads, smem, stream()>>>(q.data<bf16>(), k.data<bf16>(), v.data<bf16>(), out.data<bf16>(),
                                                   Sq, Hq, Hkv, kv, causal ? 1 : 0, scale * 1.4426950408889634f);
  ZI_CUDA_LAUNCHED();
}

