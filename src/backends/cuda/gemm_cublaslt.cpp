// linear on cuBLASLt: y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias). Row-major y is column-major yᵀ, so
// the call is yᵀ[N, M] = op(w)ᵀ… : A = w (K×N column-major, transposed), B = x (K×M column-
// major), C = D = yᵀ (N×M, ld N). bf16 operands accumulate in f32 on the tensor cores; f32
// operands use CUBLAS_COMPUTE_32F (no TF32), so the f32 path matches the CPU to rounding. The
// bias is the cuBLASLt epilogue (in y's dtype). Descriptors and the heuristic's algorithm are
// cached per shape, dtype and pointer alignment.
//
// linear_fp8: both operands e4m3 (the weight's bytes as loaded, the activation quantized by
// quant.cu), the TN layout cuBLASLt's fp8 kernels require, f32 accumulation, bf16 D (and C). The
// scales go in one of three ways (cuda_ops.h Fp8Scaling): as CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_
// VEC_32F vectors (A's = the weight's, one per output channel = row of D; B's = the activation's,
// one per token = column of D); as a device alpha vector (CUBLASLT_POINTER_MODE_ALPHA_DEVICE_
// VECTOR_BETA_ZERO, one per row of D); or as B's scalar scale alone (the caller scales the
// channels). Whether cuBLASLt has a kernel for a scaling (outer vectors need a cuBLASLt that knows
// them; the alpha vector has none for fp8 on Hopper) is asked once per shape and scaling, with the
// scale pointers the scaling needs already set (stand-ins; the heuristic refuses outer vectors
// without them): a plan that fails is remembered with its reason, and the caller takes the next
// scaling or the dequantizing path. Nothing is timed. Hopper's fast accumulation is on
// (ZI_FP8_FAST_ACCUM=0: off).
#include <cublasLt.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"
#include "core/env.h"

namespace zi::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

void lt_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(str_cat("[cublasLt] ", what, " failed with status ", int(s)));
}

constexpr int kCandidates = 8;  // the heuristic's algorithms timed per plan with ZI_GEMM_TUNE=1

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};  // the heuristic's first, or the fastest of its candidates (ZI_GEMM_TUNE)
  bool tuned = false;
};

// ZI_GEMM_TUNE=1 (an experiment, off by default): at a plan's first launch outside a recording,
// its candidates are timed on the call's own operands and the fastest is kept for the process.
std::atomic<int> g_tuning{-1};  // -1: not read from the environment yet
std::atomic<int> g_tuned_plans{0};
bool gemm_tuning() { return env_switch(g_tuning, "ZI_GEMM_TUNE", false); }

bool recording(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &st) != cudaSuccess || st != cudaStreamCaptureStatusNone;
}

using Key = std::tuple<int64_t, int64_t, int64_t, int, bool, int, int, int, int>;

struct Lt {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  // Stand-in scale pointers for fp8 plans: cuBLASLt's heuristic wants the scale pointers a
  // scaling mode needs set (outer vectors: "requires a custom pointer"), 16-byte aligned like the
  // real ones that replace them at launch. Never read.
  void* scale_stub = nullptr;
  std::map<Key, Plan> plans;
  std::mutex mu;
};

Lt& lt() {
  static Lt* s = [] {
    auto* l = new Lt;  // lives for the process: handles outlive every tensor
    ensure_init();
    lt_check(cublasLtCreate(&l->handle), "cublasLtCreate");
    ZI_CUDA(cudaMalloc(&l->workspace, kWorkspaceBytes));
    ZI_CUDA(cudaMalloc(&l->scale_stub, 256));
    return l;
  }();
  return *s;
}

}  // namespace

void blas_warm_up() { (void)lt(); }

namespace {

int alignment(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % uintptr_t(a)) a /= 2;
  return a;
}

// The heuristic's algorithms for this operation within the workspace, given the pointers'
// alignments (A, B, C = D), best first (at most `count` ≤ kCandidates); empty when there is none.
std::vector<cublasLtMatmulAlgo_t> heuristic_algos(cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                                  cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, const void* A,
                                                  const void* B, const void* C, int count = 1) {
  cublasLtMatmulPreference_t pref;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
  const uint64_t ws = kWorkspaceBytes;
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws), "ws");
  const uint32_t aa = uint32_t(alignment(A)), ab = uint32_t(alignment(B)), ac = uint32_t(alignment(C));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof ac);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof ac);
  cublasLtMatmulHeuristicResult_t res[kCandidates]{};
  int found = 0;
  lt_check(cublasLtMatmulAlgoGetHeuristic(lt().handle, op, a, b, c, c, pref, std::min(count, kCandidates), res, &found),
           "AlgoGetHeuristic");
  cublasLtMatmulPreferenceDestroy(pref);
  std::vector<cublasLtMatmulAlgo_t> algos;
  for (int i = 0; i < found; ++i) algos.push_back(res[i].algo);
  return algos;
}

// The fastest of `cands` on these operands (one warm-up and three timed launches each, on the
// compute stream; D = C is overwritten, the caller's launch follows); the first when none times.
cublasLtMatmulAlgo_t fastest_algo(cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                  cublasLtMatrixLayout_t c, const void* alpha, const void* A, const void* B, void* C,
                                  const std::vector<cublasLtMatmulAlgo_t>& cands) {
  const float zero = 0.0f;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  if (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
    (void)cudaGetLastError();
    return cands.front();
  }
  size_t best = 0;
  float best_ms = -1;
  for (size_t i = 0; i < cands.size(); ++i) {
    auto launch = [&] {
      return cublasLtMatmul(lt().handle, op, alpha, A, a, B, b, &zero, C, c, C, c, &cands[i], lt().workspace,
                            kWorkspaceBytes, stream()) == CUBLAS_STATUS_SUCCESS;
    };
    if (!launch()) continue;
    bool ok = cudaEventRecord(e0, stream()) == cudaSuccess;
    for (int r = 0; r < 3 && ok; ++r) ok = launch();
    ok = ok && cudaEventRecord(e1, stream()) == cudaSuccess && cudaEventSynchronize(e1) == cudaSuccess;
    float ms = 0;
    if (ok && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && (best_ms < 0 || ms < best_ms)) {
      best_ms = ms;
      best = i;
    }
  }
  (void)cudaGetLastError();
  (void)cudaEventDestroy(e0);
  (void)cudaEventDestroy(e1);
  return cands[best];
}

// ZI_GEMM_TUNE: at a plan's first launch outside a recording, its algorithm becomes the fastest of
// the heuristic's candidates on these operands (unchanged when the heuristic offers one or fails).
// L.mu is taken here.
void tune_once(bool& tuned, cublasLtMatmulAlgo_t& algo, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
               cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c, const void* alpha, const void* A, const void* B,
               void* C) {
  if (!gemm_tuning() || tuned || recording(stream())) return;
  std::lock_guard<std::mutex> lk(lt().mu);
  std::vector<cublasLtMatmulAlgo_t> cands;
  try {
    cands = heuristic_algos(op, a, b, c, A, B, C, kCandidates);
  } catch (const std::exception&) {  // no timing then: the plan keeps its algorithm
  }
  if (cands.size() > 1) {
    algo = fastest_algo(op, a, b, c, alpha, A, B, C, cands);
    ++g_tuned_plans;
  }
  tuned = true;
}

Plan& plan_for(int64_t M, int64_t N, int64_t K, DType dt, bool bias, DType bias_dt, const void* x,
               const void* w, const void* y) {
  Lt& L = lt();
  const Key key{M, N, K, int(dt), bias, int(bias_dt), alignment(x), alignment(w), alignment(y)};
  std::lock_guard<std::mutex> lk(L.mu);
  auto it = L.plans.find(key);
  if (it != L.plans.end()) return it->second;
  const cudaDataType_t t = dt == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
  Plan p;
  lt_check(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  const cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof tr), "TRANSA");
  lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt), "TRANSB");
  if (bias) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep), "EPILOGUE");
    const cudaDataType_t bt = bias_dt == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt), "BIAS_TYPE");
  }
  lt_check(cublasLtMatrixLayoutCreate(&p.a, t, uint64_t(K), uint64_t(N), K), "layout A");
  lt_check(cublasLtMatrixLayoutCreate(&p.b, t, uint64_t(K), uint64_t(M), K), "layout B");
  lt_check(cublasLtMatrixLayoutCreate(&p.c, t, uint64_t(N), uint64_t(M), N), "layout C");
  const std::vector<cublasLtMatmulAlgo_t> algos = heuristic_algos(p.op, p.a, p.b, p.c, w, x, y);
  ZI_CHECK(!algos.empty(), "[cublasLt] no algorithm for M=", M, " N=", N, " K=", K, " ", dtype_name(dt));
  p.algo = algos.front();
  return L.plans.emplace(key, p).first->second;
}

struct NnPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

const NnPlan& nn_plan(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, DType dt,
                      const void* A, const void* B, const void* C) {
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int>, NnPlan> plans;
  Lt& L = lt();
  const auto key = std::make_tuple(m, n, k, lda, ldb, ldc, int(dt), alignment(A), alignment(B), alignment(C));
  std::lock_guard<std::mutex> lk(L.mu);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  const cudaDataType_t t = dt == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
  NnPlan p;
  lt_check(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  lt_check(cublasLtMatrixLayoutCreate(&p.a, t, uint64_t(m), uint64_t(k), lda), "layout A");
  lt_check(cublasLtMatrixLayoutCreate(&p.b, t, uint64_t(k), uint64_t(n), ldb), "layout B");
  lt_check(cublasLtMatrixLayoutCreate(&p.c, t, uint64_t(m), uint64_t(n), ldc), "layout C");
  const std::vector<cublasLtMatmulAlgo_t> algos = heuristic_algos(p.op, p.a, p.b, p.c, A, B, C);
  ZI_CHECK(!algos.empty(), "[cublasLt] no algorithm for gemm_nn m=", m, " n=", n, " k=", k);
  p.algo = algos.front();
  return plans.emplace(key, p).first->second;
}

struct Fp8Plan {
  bool ok = false;
  std::string refusal;  // when !ok: the step cuBLASLt refused and its status
  bool tuned = false;  // the heuristic's candidates timed (ZI_GEMM_TUNE)
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};


// The plan, or ok = false (and the refused step in `refusal`) when cuBLASLt refuses any step (no
// exception: the caller falls back).
Fp8Plan make_fp8_plan(Fp8Scaling scaling, int64_t M, int64_t N, int64_t K, bool bias, const void* x, const void* w,
                      const void* y) {
  Fp8Plan p;
  auto ok = [&p](cublasStatus_t s, const char* step) {
    if (s != CUBLAS_STATUS_SUCCESS) p.refusal = str_cat(step, ": status ", int(s));
    return s == CUBLAS_STATUS_SUCCESS;
  };
  if (!ok(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate")) return p;
  const cublasOperation_t tr = CUBLAS_OP_T, nt = CUBLAS_OP_N;
  if (!ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof tr), "TRANSA") ||
      !ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt), "TRANSB"))
    return p;
  if (scaling == Fp8Scaling::OuterVector) {
    const int32_t outer = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    if (!ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer, sizeof outer),
            "A_SCALE_MODE") ||
        !ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer, sizeof outer),
            "B_SCALE_MODE"))
      return p;
  }
  // Hopper's fast fp8 accumulation (partial sums kept inside the tensor cores, not promoted to
  // f32 every few k-steps): the DiT's fp8 GEMMs 1040–1130 → 1220–1340 TFLOP/s, denoise compute
  // 0.580 → 0.534 s, and the same quality against bf16 (DiT forward rel L2 0.1519 vs 0.1520,
  // image PSNR 28.2 dB both; H100, 2026-12-08). ZI_FP8_FAST_ACCUM=0: off.
  static const bool fast_accum = env_flag("ZI_FP8_FAST_ACCUM", true);
  if (fast_accum) {
    const int8_t on = 1;
    if (!ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &on, sizeof on), "FAST_ACCUM"))
      return p;
  }
  const void* stub = lt().scale_stub;
  if (scaling == Fp8Scaling::OuterVector &&
      (!ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &stub, sizeof stub),
           "A_SCALE_POINTER") ||
       !ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &stub, sizeof stub),
           "B_SCALE_POINTER")))
    return p;
  if (scaling == Fp8Scaling::Scalar &&
      !ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &stub, sizeof stub),
          "B_SCALE_POINTER"))
    return p;
  if (scaling == Fp8Scaling::AlphaVector) {
    const int32_t mode = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO;
    if (!ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof mode),
            "POINTER_MODE"))
      return p;
  }
  if (bias) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bt = CUDA_R_16BF;
    if (!ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep), "EPILOGUE") ||
        !ok(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt),
            "BIAS_DATA_TYPE"))
      return p;
  }
  if (!ok(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(N), K), "layout A") ||
      !ok(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(M), K), "layout B") ||
      !ok(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_16BF, uint64_t(N), uint64_t(M), N), "layout C"))
    return p;
  cublasLtMatmulPreference_t pref;
  if (!ok(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate")) return p;
  const uint64_t ws = kWorkspaceBytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  const uint32_t aa = uint32_t(alignment(w)), ab = uint32_t(alignment(x)), ac = uint32_t(alignment(y));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof ac);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof ac);
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t s =
      cublasLtMatmulAlgoGetHeuristic(lt().handle, p.op, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  p.algo = res.algo;
  p.ok = s == CUBLAS_STATUS_SUCCESS && found > 0;
  if (!p.ok) p.refusal = str_cat("AlgoGetHeuristic: status ", int(s), ", ", found, " algorithms");
  return p;
}

std::string g_refusal;  // the last plan's refusal (L.mu held)

std::atomic<int> g_forced_scaling{-2};  // -2: not read from the environment yet; -1: any

// All three scalings are tried in order by default (measured on an H100 with cuBLASLt 13.1,
// 2026-12-07: outer vectors and the scalar run, the alpha vector has no fp8 kernel);
// ZI_FP8_SCALING=outer|alpha|scalar allows only that one.
int forced_scaling() {
  int v = g_forced_scaling.load();
  if (v == -2) {
    v = -1;
    if (const char* e = std::getenv("ZI_FP8_SCALING")) {
      if (!std::strcmp(e, "outer")) v = 0;
      else if (!std::strcmp(e, "alpha")) v = 1;
      else if (!std::strcmp(e, "scalar")) v = 2;
    }
    g_forced_scaling.store(v);
  }
  return v;
}

using Fp8Key = std::tuple<int, int64_t, int64_t, int64_t, bool, int, int, int>;

// The cached plan for (scaling, shape, bias, alignments); L.mu held.
Fp8Plan& fp8_plan(Fp8Scaling sc, int64_t M, int64_t N, int64_t K, bool bias, const void* x8, const void* w8,
                  const void* y) {
  static std::map<Fp8Key, Fp8Plan> plans;
  const Fp8Key key{int(sc), M, N, K, bias, alignment(x8), alignment(w8), alignment(y)};
  auto it = plans.find(key);
  if (it == plans.end()) {
    it = plans.emplace(key, make_fp8_plan(sc, M, N, K, bias, x8, w8, y)).first;
    if (!it->second.ok)
      g_refusal = str_cat(fp8_scaling_name(sc), " M=", M, " N=", N, " K=", K, bias ? " bias" : "", ": ",
                          it->second.refusal);
  }
  return it->second;
}

}  // namespace

const char* fp8_scaling_name(Fp8Scaling s) {
  switch (s) {
    case Fp8Scaling::OuterVector: return "outer-vector";
    case Fp8Scaling::AlphaVector: return "alpha-vector";
    case Fp8Scaling::Scalar: return "scalar";
  }
  return "?";
}

void force_fp8_scaling(int s) { g_forced_scaling.store(s); }

void set_gemm_tuning(bool on) { g_tuning.store(on ? 1 : 0); }
int gemm_tuned_plans() { return g_tuned_plans.load(); }

std::string fp8_plan_refusal() {
  std::lock_guard<std::mutex> lk(lt().mu);
  return g_refusal;
}

int compute_capability() {
  static const int cc = [] {
    ensure_init();
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return 10 * major + minor;
  }();
  return cc;
}

int fp8_scaling_for(int64_t M, int64_t N, int64_t K, bool bias, const void* x8, const void* w8, const void* y) {
  // fp8 tensor-core GEMMs exist from Ada (8.9) on; cuBLASLt wants K and the leading dimensions
  // in multiples of 16 bytes and 16-byte aligned pointers.
  if (compute_capability() < 89 || M < 1 || N % 16 || K % 16) return -1;
  if (alignment(x8) < 16 || alignment(w8) < 16 || alignment(y) < 16) return -1;
  const int only = forced_scaling();
  Lt& L = lt();
  std::lock_guard<std::mutex> lk(L.mu);
  for (int s = 0; s < 3; ++s)
    if ((only < 0 || only == s) && fp8_plan(Fp8Scaling(s), M, N, K, bias, x8, w8, y).ok) return s;
  return -1;
}

bool linear_fp8(Fp8Scaling sc, int64_t M, int64_t N, int64_t K, const void* x8, const float* scale_b, const void* w8,
                const float* scale_a, const void* bias_bf16, void* y) {
  Lt& L = lt();
  Fp8Plan* p;
  {
    std::lock_guard<std::mutex> lk(L.mu);
    p = &fp8_plan(sc, M, N, K, bias_bf16 != nullptr, x8, w8, y);
    if (!p->ok) return false;
    auto set = [&](cublasLtMatmulDescAttributes_t a, const void* v) {
      return cublasLtMatmulDescSetAttribute(p->op, a, &v, sizeof v) == CUBLAS_STATUS_SUCCESS;
    };
    if (bias_bf16 && !set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_bf16)) return p->ok = false;
    if (sc == Fp8Scaling::OuterVector &&
        (!set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, scale_a) || !set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, scale_b)))
      return p->ok = false;
    if (sc == Fp8Scaling::Scalar && !set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, scale_b)) return p->ok = false;
  }
  const float one = 1.0f, zero = 0.0f;
  const void* alpha = sc == Fp8Scaling::AlphaVector ? static_cast<const void*>(scale_a) : &one;
  const void* beta = &zero;  // never read with the alpha vector (its mode fixes beta = 0)
  tune_once(p->tuned, p->algo, p->op, p->a, p->b, p->c, alpha, w8, x8, y);
  const cublasStatus_t s = cublasLtMatmul(L.handle, p->op, alpha, w8, p->a, x8, p->b, beta, y, p->c, y, p->c,
                                          &p->algo, L.workspace, kWorkspaceBytes, stream());
  if (s != CUBLAS_STATUS_SUCCESS) {  // refused at launch: nothing was computed
    std::lock_guard<std::mutex> lk(L.mu);
    g_refusal = str_cat(fp8_scaling_name(sc), " M=", M, " N=", N, " K=", K, bias_bf16 ? " bias" : "",
                        ": cublasLtMatmul: status ", int(s));
    return p->ok = false;
  }
  return true;
}

void gemm_nn(int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb, void* C,
             int64_t ldc, DType dt) {
  const NnPlan& p = nn_plan(m, n, k, lda, ldb, ldc, dt, A, B, C);
  const float alpha = 1.0f, beta = 0.0f;
  lt_check(cublasLtMatmul(lt().handle, p.op, &alpha, A, p.a, B, p.b, &beta, C, p.c, C, p.c, &p.algo, lt().workspace,
                          kWorkspaceBytes, stream()),
           "Matmul (nn)");
}

void linear(const Tensor& x, const Tensor& w_in, const Tensor* bias, Tensor& y) {
  const int64_t N = w_in.dim(0), K = w_in.dim(1), M = x.numel() / K;
  if (M == 0 || N == 0) return;
  const DType dt = x.dtype();
  ZI_CHECK(dt == DType::F32 || dt == DType::BF16, "[linear] cuda activations must be f32 or bf16, got ", x.desc());
  // The weight in the activation dtype (a temporary only when the stored dtype differs).
  Tensor w = w_in.dtype() == dt ? w_in : w_in.to(dt, Tag::Workspace);
  Tensor b;
  if (bias) b = bias->dtype() == dt ? bias->contiguous(Tag::Workspace) : bias->to(dt, Tag::Workspace);
  Plan& p = plan_for(M, N, K, dt, bias != nullptr, dt, x.raw(), w.raw(), y.raw());
  Lt& L = lt();
  if (bias) {
    const void* bp = b.raw();
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp), "BIAS_POINTER");
  }
  const float alpha = 1.0f, beta = 0.0f;
  tune_once(p.tuned, p.algo, p.op, p.a, p.b, p.c, &alpha, w.raw(), x.raw(), y.raw());
  lt_check(cublasLtMatmul(L.handle, p.op, &alpha, w.raw(), p.a, x.raw(), p.b, &beta, y.raw(), p.c, y.raw(), p.c,
                          &p.algo, L.workspace, kWorkspaceBytes, stream()),
           "Matmul");
}

}  // namespace zi::cuda
