// Flash attention on Hopper's warpgroup MMA (wgmma, sm_90a), head_dim 128, non-causal: the
// DiT's attention (S = 4096 image + caption tokens, 30 heads).
//
// A block of 256 threads is two warpgroups; each owns 64 query rows, the block 128. Keys and
// values stream in tiles of 128 rows through shared memory (cp.async, two stages each), laid
// out the way wgmma reads them with its 128-byte swizzle: a [128, 128] bf16 tile is two
// [128, 64] halves of 128-byte rows whose 16-byte chunks are XORed with (row & 7). S = Q·Kᵀ
// reads Q and K from shared memory (both K-major); O += P·V takes P from registers (the S
// accumulators, rounded to bf16, have the A-operand layout) and V from shared memory as an
// N-contiguous ("transposed") operand, so V is never transposed anywhere.
//
// Inside each warpgroup the products of two key tiles overlap the softmax: S_j = Q·K_jᵀ and
// O += P_{j−1}·V_{j−1} are issued together; the softmax of S_j runs on the ALUs/MUFU while the
// tensor cores finish P_{j−1}·V_{j−1}. The online softmax is the one of attention.cu (f32, row
// max on raw scores, exp2 with the scale folded in, accumulators rescaled when a max moves).
// Shared memory: Q 32 KB + K 2×32 KB + V 2×32 KB = 160 KB, one block per SM.
#include "backends/cuda/attention_sm90.h"

#include <cmath>
#include <cstdlib>

#include "backends/cuda/common.cuh"

namespace zi::cuda {
namespace {

constexpr int kD = 128, kBM = 128, kBN = 128, kThreads = 256;
constexpr uint32_t kTile = 128 * 128 * 2;         // bytes of one [128, 128] bf16 tile
constexpr uint32_t kHalf = 128 * 128;             // bytes of one 64-dim half of a tile
constexpr size_t kSmem = 5 * size_t(kTile) + 1024;  // Q, K ×2, V ×2, and room to align to 1 KB

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ZI_SM90A 1
#endif

#ifdef ZI_SM90A
__device__ __forceinline__ uint32_t saddr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void cp16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Makes this thread's shared-memory writes (generic proxy: cp.async) visible to wgmma (async proxy).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers an asynchronous wgmma reads or writes: the compiler may neither move their
// uses across this point nor reuse them while the MMA is in flight.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void reg_fence(uint32_t (&r)[8][4]) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (PTX ISA, "Matrix Descriptor Format" of wgmma).
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// D[64×128] (+)= A[64×16] · B[16×128]; A and B from shared memory (descriptors), both K-major.
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D[64×128] += A[64×16] · B[16×128]; A from registers (the accumulator layout of a previous
// product), B from shared memory stored N-contiguous (transposed: V as [keys, dims]).
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Byte offset of 16-byte chunk c (dims 8c..8c+7) of row r in a tile (layout: see the top).
__device__ __forceinline__ uint32_t tile_off(int r, int c) {
  return uint32_t(c >> 3) * kHalf + uint32_t(r) * 128 + (uint32_t((c & 7) ^ (r & 7)) << 4);
}

// Rows [row0, row0 + 128) of a [rows, stride] bf16 matrix into a tile; rows >= valid are zeros.
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* src, int64_t stride, int row0, int valid) {
#pragma unroll
  for (int it = 0; it < 128 * 16 / kThreads; ++it) {
    const int i = it * kThreads + int(threadIdx.x), r = i >> 4, c = i & 15;
    const bool ok = row0 + r < valid;
    cp16(dst + tile_off(r, c), ok ? src + int64_t(row0 + r) * stride + c * 8 : src, ok ? 16 : 0);
  }
}
#endif  // ZI_SM90A

// vmode selects the leading/stride byte offsets of V's (N-contiguous) descriptor: 0 = LBO
// between the 64-dim halves, SBO between 8-key groups (PTX ISA's MN-major convention).
__global__ void __launch_bounds__(kThreads, 1)
    flash_sm90_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                      bf16* __restrict__ o, int Sq, int Hq, int Hkv, int kv, float scale_log2, int vmode) {
#ifdef ZI_SM90A
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = (saddr(smem) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = base + kTile, sV = base + 3 * kTile;
  const int wg = int(threadIdx.x) >> 7, warp = (int(threadIdx.x) >> 5) & 3, lane = int(threadIdx.x) & 31;
  const int h = int(blockIdx.y), hk = h / (Hq / Hkv), q0 = int(blockIdx.x) * kBM;
  const int64_t qs = int64_t(Hq) * kD, ks = int64_t(Hkv) * kD;
  const bf16* qh = q + int64_t(h) * kD;
  const bf16* kh = k + int64_t(hk) * kD;
  const bf16* vh = v + int64_t(hk) * kD;
  const int nblk = (kv + kBN - 1) / kBN;
  const uint32_t v_lbo = vmode == 0 ? kHalf : 1024, v_sbo = vmode == 0 ? 1024 : kHalf;

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
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2] = {1.0f, 1.0f};
  const uint32_t qrows = sQ + uint32_t(wg) * 64 * 128;  // this warpgroup's 64 rows of Q

  auto qk = [&](uint32_t kt) {  // s = Q_wg · K_tileᵀ, 8 steps of 16 dims
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t off = uint32_t(kk >> 2) * kHalf + uint32_t(kk & 3) * 32;
      wgmma_ss(s, desc(qrows + off, 16, 1024), desc(kt + off, 16, 1024), kk);
    }
    wg_commit();
  };
  auto pv = [&](uint32_t vt) {  // acc += P · V_tile, 8 steps of 16 keys
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) wgmma_rs(acc, p[kk], desc(vt + uint32_t(kk) * 2048, v_lbo, v_sbo));
    wg_commit();
  };
  // s holds this thread's scores of key tile j: s[4·nt + e] is row (lane/4 + 8·(e/2)) of the
  // warp's 16, key 8·nt + 2·(lane%4) + (e%2) of the tile. Turns them into probabilities.
  auto softmax = [&](int j) {
    const int k0 = j * kBN;
    if (k0 + kBN > kv) {
#pragma unroll
      for (int i = 0; i < 64; ++i)
        if (k0 + (i >> 2) * 8 + (lane & 3) * 2 + (i & 1) >= kv) s[i] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(m[r], mx * scale_log2);
      const float b = mnew == -INFINITY ? 0.0f : mnew;
      alpha[r] = ex2(m[r] - b);
      m[r] = mnew;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const float p0 = ex2(fmaf(s[4 * nt + 2 * r], scale_log2, -b));
        const float p1 = ex2(fmaf(s[4 * nt + 2 * r + 1], scale_log2, -b));
        s[4 * nt + 2 * r] = p0;
        s[4 * nt + 2 * r + 1] = p1;
        sum += p0 + p1;
      }
      l[r] = l[r] * alpha[r] + sum;
    }
  };
  auto to_p = [&] {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      p[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
      p[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
      p[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
      p[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  // Key tile 0, then the loads of K_2 and V_1 (stages: K_j and V_j live in stage j % 2).
  qk(sK);
  wg_wait<0>();
  reg_fence(s);
  softmax(0);
  to_p();
  __syncthreads();  // both warpgroups are done with K_0
  if (nblk > 2) load_tile(sK, kh, ks, 2 * kBN, kv);
  if (nblk > 1) load_tile(sV + kTile, vh, ks, kBN, kv);
  cp_commit();

  for (int j = 1; j < nblk; ++j) {
    // K_j and V_{j−1} are resident; K_{j+1} and V_j landed at the end of the previous round.
    qk(sK + uint32_t(j & 1) * kTile);
    pv(sV + uint32_t((j - 1) & 1) * kTile);
    wg_wait<1>();  // S_j is done; P_{j−1}·V_{j−1} may still run
    reg_fence(s);
    softmax(j);
    wg_wait<0>();
    reg_fence(acc);
    reg_fence(p);
    if (!__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) {
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] *= alpha[(i >> 1) & 1];
    }
    to_p();
    cp_wait_all();
    fence_async_smem();
    __syncthreads();  // K_j and V_{j−1} are free in both warpgroups; K_{j+1}, V_j are visible
    if (j + 2 < nblk) load_tile(sK + uint32_t(j & 1) * kTile, kh, ks, (j + 2) * kBN, kv);
    if (j + 1 < nblk) load_tile(sV + uint32_t((j + 1) & 1) * kTile, vh, ks, (j + 1) * kBN, kv);
    cp_commit();
  }
  pv(sV + uint32_t((nblk - 1) & 1) * kTile);
  wg_wait<0>();
  reg_fence(acc);
  reg_fence(p);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lt = l[r];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int row = q0 + wg * 64 + warp * 16 + (lane >> 2) + 8 * r;
    if (row >= Sq) continue;
    const float inv = lt > 0 ? 1.0f / lt : 0.0f;
    bf16* orow = o + int64_t(row) * qs + int64_t(h) * kD + (lane & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
      *reinterpret_cast<uint32_t*>(orow + nt * 8) = pack_bf16(acc[4 * nt + 2 * r] * inv, acc[4 * nt + 2 * r + 1] * inv);
  }
#endif  // ZI_SM90A
}

}  // namespace

bool flash_sm90_available() {
  static const bool ok = [] {
    ensure_init();
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return major == 9 && minor == 0;
  }();
  return ok;
}

void flash_sm90(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int kv, Tensor& out) {
  const int Sq = int(q.dim(0)), Hq = int(q.dim(1)), Hkv = int(k.dim(1));
  static const bool configured = [] {
    ZI_CUDA(cudaFuncSetAttribute(flash_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
    return true;
  }();
  (void)configured;
  static const int vmode = [] {
    const char* e = std::getenv("ZI_SM90_VMODE");
    return e ? std::atoi(e) : 0;
  }();
  const dim3 grid(unsigned(cdiv(Sq, kBM)), unsigned(Hq));
  flash_sm90_kernel<<<grid, kThreads, kSmem, stream()>>>(q.data<bf16>(), k.data<bf16>(), v.data<bf16>(),
                                                          out.data<bf16>(), Sq, Hq, Hkv, kv,
                                                          scale * 1.4426950408889634f, vmode);
  ZI_CUDA_LAUNCHED();
}

}  // namespace zi::cuda
