// Which fp8 GEMMs does this machine's cuBLASLt have? An experiment, not a test: for a few shapes,
// asks the heuristic for the descriptor zimage's fp8 path builds (gemm_cublaslt.cpp) and for
// variants of it (no alignment preferences, other C/D types, scale pointers, fast accumulation, no
// workspace), printing cuBLASLt's status and the number of algorithms for each, then runs the
// first variant that has one and checks it against a CPU sum. Use: fp8_probe  (CUBLASLT_LOG_LEVEL=2
// beside it prints cuBLASLt's own reasons).
#include <cublasLt.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/cuda_ops.h"

namespace {

struct Variant {
  const char* name;
  cudaDataType_t cd = CUDA_R_16BF;  // C and D
  bool prefs = true;                // alignment preferences (256 B)
  bool scale_ptrs = false;          // A and B scalar scale pointers set
  bool fast_accum = false;
  bool workspace = true;
  bool bias = false;
  cudaDataType_t ab = CUDA_R_8F_E4M3;  // A and B
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
};

const char* status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "ARCH_MISMATCH";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "NOT_SUPPORTED";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "INTERNAL_ERROR";
    default: return "other";
  }
}

float* g_one = nullptr;  // a device 1.0f for the scale pointers
void* g_ws = nullptr;
constexpr size_t kWs = size_t(32) << 20;

// Returns the number of algorithms found (and the first in *algo), printing the outcome.
int probe(cublasLtHandle_t h, const Variant& v, int64_t M, int64_t N, int64_t K, cublasLtMatmulAlgo_t* algo,
          cublasLtMatmulDesc_t* op_out = nullptr, cublasLtMatrixLayout_t* lay = nullptr) {
  cublasLtMatmulDesc_t op;
  cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &v.ta, sizeof v.ta);
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &v.tb, sizeof v.tb);
  if (v.scale_ptrs) {
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g_one, sizeof g_one);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g_one, sizeof g_one);
  }
  if (v.fast_accum) {
    const int8_t f = 1;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &f, sizeof f);
  }
  if (v.bias) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &v.cd, sizeof v.cd);
  }
  const bool at = v.ta == CUBLAS_OP_T, bt = v.tb == CUBLAS_OP_T;
  cublasLtMatrixLayout_t a, b, c;
  cublasLtMatrixLayoutCreate(&a, v.ab, at ? K : N, at ? N : K, at ? K : N);
  cublasLtMatrixLayoutCreate(&b, v.ab, bt ? M : K, bt ? K : M, bt ? M : K);
  cublasLtMatrixLayoutCreate(&c, v.cd, N, M, N);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  const uint64_t ws = v.workspace ? kWs : 0;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  if (v.prefs) {
    const uint32_t al = 256;
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof al);
  }
  cublasLtMatmulHeuristicResult_t res[8]{};
  int found = 0;
  const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(h, op, a, b, c, c, pref, 8, res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  std::printf("FP8PROBE %-28s M=%-5lld N=%-5lld K=%-5lld heuristic %-15s (%d) algorithms %d\n", v.name, (long long)M,
              (long long)N, (long long)K, status_name(s), int(s), found);
  if (s == CUBLAS_STATUS_SUCCESS && found > 0) {
    *algo = res[0].algo;
    if (op_out) {
      *op_out = op;
      lay[0] = a, lay[1] = b, lay[2] = c;
      return found;
    }
  }
  cublasLtMatmulDescDestroy(op);
  cublasLtMatrixLayoutDestroy(a);
  cublasLtMatrixLayoutDestroy(b);
  cublasLtMatrixLayoutDestroy(c);
  return s == CUBLAS_STATUS_SUCCESS ? found : 0;
}

}  // namespace

int main() {
  zi::cuda::blas_warm_up();  // opens cuBLASLt (RTLD_GLOBAL) and creates the context
  using GetVersion = size_t (*)();
  using GetCudart = size_t (*)();
  auto ver = reinterpret_cast<GetVersion>(dlsym(RTLD_DEFAULT, "cublasLtGetVersion"));
  auto cudart = reinterpret_cast<GetCudart>(dlsym(RTLD_DEFAULT, "cublasLtGetCudartVersion"));
  int rt = 0, drv = 0, dev = 0, maj = 0, min = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&maj, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&min, cudaDevAttrComputeCapabilityMinor, dev);
  Dl_info info{};
  void* sym = dlsym(RTLD_DEFAULT, "cublasLtGetVersion");
  if (sym) dladdr(sym, &info);
  std::printf("FP8PROBE cublasLt %zu (built against %d, its cudart %zu) from %s; cudart %d, driver %d, sm_%d%d\n",
              ver ? ver() : size_t(0), CUBLAS_VERSION, cudart ? cudart() : size_t(0),
              info.dli_fname ? info.dli_fname : "?", rt, drv, maj, min);

  cublasLtHandle_t h;
  if (cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    std::printf("FP8PROBE cublasLtCreate failed\n");
    return 1;
  }
  cudaMalloc(&g_one, sizeof(float));
  const float one = 1.0f;
  cudaMemcpy(g_one, &one, sizeof one, cudaMemcpyHostToDevice);
  cudaMalloc(&g_ws, kWs);

  std::vector<Variant> vs;
  vs.push_back({"as zimage (bf16 C/D)"});
  { Variant v{"no alignment prefs"}; v.prefs = false; vs.push_back(v); }
  { Variant v{"no workspace"}; v.workspace = false; vs.push_back(v); }
  { Variant v{"scale pointers"}; v.scale_ptrs = true; vs.push_back(v); }
  { Variant v{"fast accumulation"}; v.fast_accum = true; vs.push_back(v); }
  { Variant v{"scale ptrs + fast accum"}; v.scale_ptrs = true; v.fast_accum = true; vs.push_back(v); }
  { Variant v{"f16 C/D"}; v.cd = CUDA_R_16F; vs.push_back(v); }
  { Variant v{"f32 C/D"}; v.cd = CUDA_R_32F; vs.push_back(v); }
  { Variant v{"bias epilogue"}; v.bias = true; vs.push_back(v); }
  { Variant v{"e4m3 x e5m2"}; v.ab = CUDA_R_8F_E5M2; vs.push_back(v); }
  { Variant v{"bf16 TN (control)"}; v.ab = CUDA_R_16BF; vs.push_back(v); }
  { Variant v{"fp8 NN"}; v.ta = CUBLAS_OP_N; vs.push_back(v); }
  struct Shape { int64_t M, N, K; };
  for (Shape s : {Shape{1024, 1024, 640}, Shape{4128, 3840, 3840}, Shape{4128, 10240, 3840}, Shape{64, 256, 128}})
    for (const Variant& v : vs) {
      cublasLtMatmulAlgo_t algo;
      probe(h, v, s.M, s.N, s.K, &algo);
    }

  // Run the first working fp8 variant on small integers (exact in e4m3 and in the f32 sum).
  const int64_t M = 64, N = 256, K = 128;
  for (const Variant& v : vs) {
    if (v.ab != CUDA_R_8F_E4M3 || v.cd != CUDA_R_16BF || v.bias) continue;
    cublasLtMatmulAlgo_t algo;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t lay[3];
    if (probe(h, v, M, N, K, &algo, &op, lay) <= 0) continue;
    std::vector<__nv_fp8_e4m3> x(M * K), w(N * K);
    std::vector<float> xf(M * K), wf(N * K);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = float(int(i % 7) - 3), x[i] = __nv_fp8_e4m3(xf[i]);
    for (int64_t i = 0; i < N * K; ++i) wf[i] = float(int(i % 5) - 2), w[i] = __nv_fp8_e4m3(wf[i]);
    void *dx, *dw, *dy;
    cudaMalloc(&dx, x.size());
    cudaMalloc(&dw, w.size());
    cudaMalloc(&dy, M * N * 2);
    cudaMemcpy(dx, x.data(), x.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(dw, w.data(), w.size(), cudaMemcpyHostToDevice);
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t s = cublasLtMatmul(h, op, &alpha, dw, lay[0], dx, lay[1], &beta, dy, lay[2], dy, lay[2],
                                            &algo, g_ws, v.workspace ? kWs : 0, nullptr);
    std::vector<uint16_t> y(M * N);
    const cudaError_t e = cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost);
    int64_t bad = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float ref = 0;
        for (int64_t k = 0; k < K; ++k) ref += xf[m * K + k] * wf[n * K + k];
        uint32_t bits = uint32_t(y[m * N + n]) << 16;
        float got;
        std::memcpy(&got, &bits, 4);
        if (std::fabs(got - ref) > std::fabs(ref) / 128 + 1e-3f) ++bad;
      }
    std::printf("FP8PROBE ran '%s' M=%lld N=%lld K=%lld: matmul %s, copy %s, %lld of %lld outputs wrong\n", v.name,
                (long long)M, (long long)N, (long long)K, status_name(s), cudaGetErrorString(e), (long long)bad,
                (long long)(M * N));
    break;
  }
  return 0;
}
