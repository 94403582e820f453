// linear on cuBLASLt: y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias). Row-major y is column-major yᵀ, so
// the call is yᵀ[N, M] = op(w)ᵀ… : A = w (K×N column-major, transposed), B = x (K×M column-
// major), C = D = yᵀ (N×M, ld N). bf16 operands accumulate in f32 on the tensor cores; f32
// operands use CUBLAS_COMPUTE_32F (no TF32), so the f32 path matches the CPU to rounding. The
// bias is the cuBLASLt epilogue (in y's dtype). Descriptors and the heuristic's algorithm are
// cached per shape, dtype and pointer alignment.
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"

namespace zi::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

void lt_check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(str_cat("[cublasLt] ", what, " failed with status ", int(s)));
}

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

using Key = std::tuple<int64_t, int64_t, int64_t, int, bool, int, int, int, int>;

struct Lt {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::map<Key, Plan> plans;
  std::mutex mu;
};

Lt& lt() {
  static Lt* s = [] {
    auto* l = new Lt;  // lives for the process: handles outlive every tensor
    ensure_init();
    lt_check(cublasLtCreate(&l->handle), "cublasLtCreate");
    ZI_CUDA(cudaMalloc(&l->workspace, kWorkspaceBytes));
    return l;
  }();
  return *s;
}

int alignment(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % uintptr_t(a)) a /= 2;
  return a;
}

// The heuristic's first algorithm for this operation within the workspace, given the pointers'
// alignments (A, B, C = D); false when there is none.
bool pick_algo(cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
               const void* A, const void* B, const void* C, cublasLtMatmulAlgo_t* algo) {
  cublasLtMatmulPreference_t pref;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
  const uint64_t ws = kWorkspaceBytes;
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws), "ws");
  const uint32_t aa = uint32_t(alignment(A)), ab = uint32_t(alignment(B)), ac = uint32_t(alignment(C));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof ac);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof ac);
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  lt_check(cublasLtMatmulAlgoGetHeuristic(lt().handle, op, a, b, c, c, pref, 1, &res, &found), "AlgoGetHeuristic");
  cublasLtMatmulPreferenceDestroy(pref);
  *algo = res.algo;
  return found > 0;
}

const Plan& plan_for(int64_t M, int64_t N, int64_t K, DType dt, bool bias, DType bias_dt, const void* x,
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
  ZI_CHECK(pick_algo(p.op, p.a, p.b, p.c, w, x, y, &p.algo), "[cublasLt] no algorithm for M=", M, " N=", N, " K=", K,
           " ", dtype_name(dt));
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
  ZI_CHECK(pick_algo(p.op, p.a, p.b, p.c, A, B, C, &p.algo), "[cublasLt] no algorithm for gemm_nn m=", m, " n=", n,
           " k=", k);
  return plans.emplace(key, p).first->second;
}

}  // namespace

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
  const Plan& p = plan_for(M, N, K, dt, bias != nullptr, dt, x.raw(), w.raw(), y.raw());
  Lt& L = lt();
  if (bias) {
    const void* bp = b.raw();
    lt_check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp), "BIAS_POINTER");
  }
  const float alpha = 1.0f, beta = 0.0f;
  lt_check(cublasLtMatmul(L.handle, p.op, &alpha, w.raw(), p.a, x.raw(), p.b, &beta, y.raw(), p.c, y.raw(), p.c,
                          &p.algo, L.workspace, kWorkspaceBytes, stream()),
           "Matmul");
}

}  // namespace zi::cuda
