// Flash attention on Hopper's warpgroup MMA (wgmma, sm_90a), head_dim 128, non-causal: the
// DiT's attention (S = 4096 image + caption tokens, 30 heads). Kernel W, which attention.cu runs
// wherever it applies (584–590 TFLOP/s on H200/H100 against 219–273 for the mma.sync kernels
// and 376–383 for its predecessor H, now bench/gpu/experiments/03_flash_h_wgmma.cu):
//  W  two consumer warpgroups, each owning 64 of the block's 128 query rows, and a producer
//     warpgroup that issues TMA loads signalled on mbarriers; the consumers never meet; they
//     take turns issuing their MMAs ("ping-pong"), so one's softmax runs while the other's
//     products occupy the tensor cores.
// Shared: keys and values stream in tiles of 128 rows, laid out the way wgmma reads them with
// its 128-byte swizzle: a [128, 128] bf16 tile is two [128, 64] halves of 128-byte rows whose
// 16-byte chunks are XORed with (row & 7) (what TMA's 128-byte swizzle writes, too). S = Q·Kᵀ
// reads Q and K from shared memory (both K-major); O += P·V takes P from registers (the S
// accumulators, rounded to bf16, have the A-operand layout) and V from shared memory as an
// N-contiguous ("transposed") operand, so V is never transposed anywhere. Inside a warpgroup
// S_j = Q·K_jᵀ and O += P_{j−1}·V_{j−1} are issued together, and the softmax of S_j runs while
// the tensor cores finish P_{j−1}·V_{j−1}. The online softmax is attention.cu's (f32, row max on
// raw scores, exp2 with the scale folded in, accumulators rescaled only when a max moves).
// Shared memory: Q 32 KB + K 2×32 KB + V 2×32 KB = 160 KB, one block per SM.
#include "backends/cuda/attention_sm90.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "backends/cuda/common.cuh"

namespace zi::cuda {
namespace {

constexpr int kD = 128, kBM = 128, kThreads = 256;
constexpr uint32_t kTileQ = kBM * kD * 2;  // bytes of the [128, 128] bf16 query tile
constexpr uint32_t kHalfQ = kBM * 128;     // bytes of one 64-dim half of it (128-byte rows)
// A key/value tile of kN rows: two 64-dim halves of kN 128-byte rows.
template <int kN>
constexpr uint32_t kTileKVBytes = uint32_t(kN) * kD * 2;
template <int kN>
constexpr uint32_t kHalfKVBytes = uint32_t(kN) * 128;
// Q, K and V in kSt stages each, room to align to 1 KB, and the mbarriers.
template <int kN, int kSt>
constexpr size_t smem_bytes() { return kTileQ + 2 * size_t(kSt) * kTileKVBytes<kN> + 1024 + 128; }
static_assert(smem_bytes<176, 2>() <= 232448 && smem_bytes<128, 3>() <= 232448, "227 KB of shared memory per block");

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ZI_SM90A 1
#endif

#ifdef ZI_SM90A

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
template <int N>
__device__ __forceinline__ void reg_fence(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (PTX ISA, "Matrix Descriptor Format" of wgmma).
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// D[64×N] (+)= A[64×16] · B[16×N]; A and B from shared memory (descriptors), both K-major. N is
// the key tile: 128 or 176 keys (each thread holds N / 2 accumulators).
template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate);
template <>
__device__ __forceinline__ void wgmma_ss<128>(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

template <>
__device__ __forceinline__ void wgmma_ss<176>(float (&d)[88], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, %88, %89, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
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


// mbarriers (shared-memory transaction barriers), the tensor-memory-access (TMA) tile load, and
// named barriers between the two consumer warpgroups.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra WAIT;\nDONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Box {64 dims, rows} at (col, row) of a 2-D tensor map into shared memory (128-byte swizzle:
// the tile layout above), completing `bytes` on mbarrier `bar`. Rows past the end are zeros.
__device__ __forceinline__ void tma_load(uint32_t dst, const void* map, int col, int row, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(map), "r"(col), "r"(row), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

// ---- the pieces both kernels share (one consumer warpgroup's view: 64 query rows) -------------

// s = Q_rows · K_tileᵀ in 8 steps of 16 dims; Q and K are K-major, so a step is 32 bytes into
// a 128-byte swizzled row (the hardware applies the XOR on the address); a tile's two 64-dim
// halves lie one after the other (16 KB apart in Q, kN · 128 bytes in K).
template <int kN>
__device__ __forceinline__ void mma_qk(float (&s)[kN / 2], uint32_t qrows, uint32_t kt) {
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint32_t step = uint32_t(kk & 3) * 32, half = uint32_t(kk >> 2);
    wgmma_ss<kN>(s, desc(qrows + half * kHalfQ + step, 16, 1024), desc(kt + half * kHalfKVBytes<kN> + step, 16, 1024),
                 kk);
  }
  wg_commit();
}

// acc += P · V_tile in kN / 16 steps of 16 keys. V is N-contiguous (MN-major): the leading byte
// offset steps between the 64-dim halves, the stride byte offset between groups of 8 keys.
template <int kN>
__device__ __forceinline__ void mma_pv(float (&acc)[64], const uint32_t (&p)[kN / 16][4], uint32_t vt) {
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
    wgmma_rs(acc, p[kk], desc(vt + uint32_t(kk) * 2048, kHalfKVBytes<kN>, 1024));
  wg_commit();
}

// The online softmax of one key tile. s[4·nt + e] is row (lane/4 + 8·(e/2)) of the warp's 16,
// key k0 + 8·nt + 2·(lane%4) + (e%2); keys >= kv are masked. s becomes probabilities
// relative to the new running max m; l gets this thread's partial row sums; alpha is the
// factor the accumulators must be scaled by.
template <int kN>
__device__ __forceinline__ void softmax_tile(float (&s)[kN / 2], float (&m)[2], float (&l)[2], float (&alpha)[2], int k0,
                                             int kv, int lane, float scale_log2) {
  if (k0 + kN > kv) {
#pragma unroll
    for (int i = 0; i < kN / 2; ++i)
      if (k0 + (i >> 2) * 8 + (lane & 3) * 2 + (i & 1) >= kv) s[i] = -INFINITY;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mnew = fmaxf(m[r], mx * scale_log2);
    const float b = mnew == -INFINITY ? 0.0f : mnew;
    alpha[r] = ex2(m[r] - b);
    m[r] = mnew;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
      const float p0 = ex2(fmaf(s[4 * nt + 2 * r], scale_log2, -b));
      const float p1 = ex2(fmaf(s[4 * nt + 2 * r + 1], scale_log2, -b));
      s[4 * nt + 2 * r] = p0;
      s[4 * nt + 2 * r + 1] = p1;
      sum += p0 + p1;
    }
    l[r] = l[r] * alpha[r] + sum;
  }
}

// Probabilities → bf16 A fragments (key steps of 16: the accumulator layout is the A layout).
template <int kN>
__device__ __forceinline__ void to_bf16(const float (&s)[kN / 2], uint32_t (&p)[kN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    p[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
    p[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
    p[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
    p[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Skipped when no row max moved in the whole warp (alpha == 1 exactly: nothing would change).
__device__ __forceinline__ void rescale(float (&acc)[64], const float (&alpha)[2]) {
  if (__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) return;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] *= alpha[(i >> 1) & 1];
}

// O rows = acc / row sum, bf16, for this thread's two rows of the warp's 16 (row0 = first row).
__device__ __forceinline__ void store_rows(const float (&acc)[64], const float (&l)[2], bf16* o, int row0, int Sq,
                                           int64_t qs, int h, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lt = l[r];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int row = row0 + (lane >> 2) + 8 * r;
    if (row >= Sq) continue;
    const float inv = lt > 0 ? 1.0f / lt : 0.0f;
    bf16* orow = o + int64_t(row) * qs + int64_t(h) * kD + (lane & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
      *reinterpret_cast<uint32_t*>(orow + nt * 8) = pack_bf16(acc[4 * nt + 2 * r] * inv, acc[4 * nt + 2 * r + 1] * inv);
  }
}
#endif  // ZI_SM90A

// ---- variant W: warp-specialised --------------------------------------------------------------
// A third warpgroup is the producer (it gives its registers to the consumers: setmaxnreg 24 and
// 240): one thread issues TMA loads of Q, then K_j and V_j into kSt stages each, each signalled
// on a "full" mbarrier (transaction bytes) and refilled once the consumers arrive on its "empty"
// one. The two consumer warpgroups never meet at a CTA-wide barrier; instead they take turns
// issuing their MMAs (named barriers 1 and 2, "ping-pong"), so one warpgroup's softmax runs while
// the other's products occupy the tensor cores. Key tiles of kN rows: 128 (the default), or 176
// (FlashAttention-3's choice for head_dim 128: fewer tiles per row, 88 score registers).

struct TmaMaps {
  CUtensorMap q, k, v;
};

constexpr int kThreadsW = kThreads + 128;  // a producer warpgroup: registers are shared per warpgroup

template <int kN, int kSt>
__global__ void __launch_bounds__(kThreadsW, 1)
    flash_sm90w_kernel(const __grid_constant__ TmaMaps maps, bf16* __restrict__ o, int Sq, int Hq, int Hkv, int kv,
                       float scale_log2) {
#ifdef ZI_SM90A
  constexpr uint32_t kTileKV = kTileKVBytes<kN>, kHalfKV = kHalfKVBytes<kN>;
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = base + kTileQ, sV = sK + kSt * kTileKV;
  // mbarriers after the tiles: full Q, full K[kSt], full V[kSt], empty K[kSt], empty V[kSt]
  const uint32_t bars = sV + kSt * kTileKV;
  const uint32_t fullQ = bars, fullK = bars + 8, fullV = fullK + 8 * kSt, emptyK = fullV + 8 * kSt,
                 emptyV = emptyK + 8 * kSt;
  const int h = int(blockIdx.y), hk = h / (Hq / Hkv), q0 = int(blockIdx.x) * kBM;
  const int nblk = (kv + kN - 1) / kN;
  const int warp_all = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;

  if (threadIdx.x == 0) {
    mbar_init(fullQ, 1);
    for (int st = 0; st < kSt; ++st) {
      mbar_init(fullK + 8 * st, 1);
      mbar_init(fullV + 8 * st, 1);
      mbar_init(emptyK + 8 * st, kThreads);
      mbar_init(emptyV + 8 * st, kThreads);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp_all >= 8) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (warp_all == 8 && lane == 0) {
      const void* mq = &maps.q;
      const void* mk = &maps.k;
      const void* mv = &maps.v;
      mbar_expect_tx(fullQ, kTileQ);
      tma_load(sQ, mq, h * kD, q0, fullQ);
      tma_load(sQ + kHalfQ, mq, h * kD + 64, q0, fullQ);
      for (int j = 0; j < nblk; ++j) {
        const int st = j % kSt;
        const uint32_t use = uint32_t(j / kSt);  // how many times this stage was filled before
        if (use > 0) mbar_wait(emptyK + 8 * st, (use - 1) & 1);
        mbar_expect_tx(fullK + 8 * st, kTileKV);
        tma_load(sK + st * kTileKV, mk, hk * kD, j * kN, fullK + 8 * st);
        tma_load(sK + st * kTileKV + kHalfKV, mk, hk * kD + 64, j * kN, fullK + 8 * st);
        if (use > 0) mbar_wait(emptyV + 8 * st, (use - 1) & 1);
        mbar_expect_tx(fullV + 8 * st, kTileKV);
        tma_load(sV + st * kTileKV, mv, hk * kD, j * kN, fullV + 8 * st);
        tma_load(sV + st * kTileKV + kHalfKV, mv, hk * kD + 64, j * kN, fullV + 8 * st);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  const int wg = warp_all >> 2, warp = warp_all & 3;
  const int my_turn = 1 + wg, other_turn = 2 - wg;  // named barrier ids (0 is __syncthreads)
  float s[kN / 2], acc[64];
  uint32_t p[kN / 16][4];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2];
  const uint32_t qrows = sQ + uint32_t(wg) * 64 * 128;

  if (wg == 1) named_arrive(1);  // warpgroup 0 issues first
  mbar_wait(fullQ, 0);
  mbar_wait(fullK, 0);
  named_sync(my_turn);
  mma_qk<kN>(s, qrows, sK);
  named_arrive(other_turn);
  wg_wait<0>();
  reg_fence(s);
  mbar_arrive(emptyK);
  softmax_tile<kN>(s, m, l, alpha, 0, kv, lane, scale_log2);
  to_bf16<kN>(s, p);

  for (int j = 1; j < nblk; ++j) {
    const int st = j % kSt, pst = (j - 1) % kSt;
    mbar_wait(fullK + 8 * st, uint32_t(j / kSt) & 1);
    mbar_wait(fullV + 8 * pst, uint32_t((j - 1) / kSt) & 1);
    named_sync(my_turn);
    mma_qk<kN>(s, qrows, sK + uint32_t(st) * kTileKV);
    mma_pv<kN>(acc, p, sV + uint32_t(pst) * kTileKV);
    named_arrive(other_turn);
    wg_wait<1>();
    reg_fence(s);
    mbar_arrive(emptyK + 8 * st);
    softmax_tile<kN>(s, m, l, alpha, j * kN, kv, lane, scale_log2);
    wg_wait<0>();
    reg_fence(acc);
    reg_fence(p);
    mbar_arrive(emptyV + 8 * pst);
    rescale(acc, alpha);
    to_bf16<kN>(s, p);
  }
  const int lst = (nblk - 1) % kSt;
  mbar_wait(fullV + 8 * lst, uint32_t((nblk - 1) / kSt) & 1);
  named_sync(my_turn);
  mma_pv<kN>(acc, p, sV + uint32_t(lst) * kTileKV);
  if (wg == 0) named_arrive(other_turn);  // warpgroup 1's last turn needs it; 0 gets none back
  wg_wait<0>();
  reg_fence(acc);
  reg_fence(p);
  store_rows(acc, l, o, q0 + wg * 64 + warp * 16, Sq, int64_t(Hq) * kD, h, lane);
#endif  // ZI_SM90A
}

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A [rows, heads·128] bf16 matrix as a 2-D tensor map with {64, box_rows} boxes, 128-byte swizzle.
CUtensorMap tile_map(const Tensor& t, int box_rows) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {cuuint64_t(t.dim(1) * kD), cuuint64_t(t.dim(0))};
  const cuuint64_t strides[1] = {cuuint64_t(t.dim(1) * kD * 2)};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)}, estr[2] = {1, 1};
  const CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(t.raw()), dims, strides,
                                    box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  ZI_CHECK(r == CUDA_SUCCESS, "[cuda] cuTensorMapEncodeTiled failed with ", int(r), " for ", t.desc());
  return m;
}

template <int kN, int kSt>
void launch_w(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int kv, Tensor& out) {
  const int Sq = int(q.dim(0)), Hq = int(q.dim(1)), Hkv = int(k.dim(1));
  constexpr size_t smem = smem_bytes<kN, kSt>();
  static const bool configured = [] {
    ZI_CUDA(cudaFuncSetAttribute(flash_sm90w_kernel<kN, kSt>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)configured;
  const TmaMaps maps{tile_map(q, kBM), tile_map(k, kN), tile_map(v, kN)};
  const dim3 grid(unsigned(cdiv(Sq, kBM)), unsigned(Hq));
  flash_sm90w_kernel<kN, kSt><<<grid, kThreadsW, smem, stream()>>>(maps, out.data<bf16>(), Sq, Hq, Hkv, kv,
                                                                    scale * 1.4426950408889634f);
  ZI_CUDA_LAUNCHED();
}

// -1: not decided (environment ZI_FLASH_W), else a FlashW value.
std::atomic<int> g_variant{-1};

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

bool flash_sm90w_available() { return flash_sm90_available() && encode_tiled() != nullptr; }

FlashW flash_sm90w_variant() {
  int v = g_variant.load();
  if (v < 0) {
    const char* e = std::getenv("ZI_FLASH_W");
    const std::string s = e ? e : "";
    v = s == "176" ? int(FlashW::N176) : s == "128x3" ? int(FlashW::N128x3) : int(FlashW::N128);
    g_variant.store(v);
  }
  return FlashW(v);
}

void set_flash_sm90w_variant(FlashW v) { g_variant.store(int(v)); }

const char* flash_sm90w_name(FlashW v) {
  switch (v) {
    case FlashW::N176: return "W 128x176, 2 stages";
    case FlashW::N128x3: return "W 128x128, 3 stages";
    default: return "W 128x128, 2 stages";
  }
}

void flash_sm90w(const Tensor& q, const Tensor& k, const Tensor& v, float scale, int kv, Tensor& out) {
  switch (flash_sm90w_variant()) {
    case FlashW::N176: return launch_w<176, 2>(q, k, v, scale, kv, out);
    case FlashW::N128x3: return launch_w<128, 3>(q, k, v, scale, kv, out);
    default: return launch_w<128, 2>(q, k, v, scale, kv, out);
  }
}

}  // namespace zi::cuda
