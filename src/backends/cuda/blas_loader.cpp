// cuBLAS and cuBLASLt, opened at run time with dlopen (like cuDNN in conv.cu), so that a CUDA
// build starts, and runs on the CPU, on a machine without them; available() (runtime.cu) names
// the missing library when a GPU is asked for. The few entry points zimage calls are defined
// here with the libraries' own signatures (from their headers), each forwarding to the symbol
// resolved at first use; nothing links against libcublas*.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <dlfcn.h>

#include <array>
#include <string>

#include "backends/cuda/cuda_ops.h"
#include "core/check.h"

namespace zi::cuda {
namespace {

#define ZI_STR2(x) #x
#define ZI_STR(x) ZI_STR2(x)
constexpr const char* kCublas = "libcublas.so." ZI_STR(CUBLAS_VER_MAJOR);
constexpr const char* kCublasLt = "libcublasLt.so." ZI_STR(CUBLAS_VER_MAJOR);

struct Lib {
  void* handle = nullptr;
  std::string error;
};

// Opened once; cuBLAS needs cuBLASLt, so Lt is opened first (RTLD_GLOBAL lets cuBLAS find it).
const Lib& lib(bool lt) {
  static const std::array<Lib, 2> libs = [] {
    std::array<Lib, 2> l;
    l[1].handle = dlopen(kCublasLt, RTLD_NOW | RTLD_GLOBAL);
    if (!l[1].handle) l[1].error = str_cat("cannot load ", kCublasLt, " (", dlerror(), ")");
    l[0].handle = dlopen(kCublas, RTLD_NOW | RTLD_GLOBAL);
    if (!l[0].handle) l[0].error = str_cat("cannot load ", kCublas, " (", dlerror(), ")");
    return l;
  }();
  return libs[lt ? 1u : 0u];
}

void* sym(bool lt, const char* name) {
  const Lib& l = lib(lt);
  if (!l.handle) fail(str_cat("[cuda] ", l.error));
  void* p = dlsym(l.handle, name);
  if (!p) fail(str_cat("[cuda] ", name, " not found in ", lt ? kCublasLt : kCublas));
  return p;
}

}  // namespace

std::string blas_unavailable_reason() {
  if (!lib(true).handle) return lib(true).error;
  if (!lib(false).handle) return lib(false).error;
  return "";
}

}  // namespace zi::cuda

// Each: the header's declaration, forwarding to the loaded symbol.
#define ZI_BLAS_FWD(lt, name, params, args)                                                     \
  extern "C" cublasStatus_t CUBLASWINAPI name params {                                          \
    using Fn = cublasStatus_t (*) params;                                                       \
    static const Fn fn = reinterpret_cast<Fn>(zi::cuda::sym(lt, #name));                        \
    return fn args;                                                                             \
  }

ZI_BLAS_FWD(false, cublasCreate_v2, (cublasHandle_t * handle), (handle))
ZI_BLAS_FWD(false, cublasSetStream_v2, (cublasHandle_t handle, cudaStream_t streamId), (handle, streamId))
ZI_BLAS_FWD(false, cublasGemmStridedBatchedEx,
            (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
             const void* alpha, const void* A, cudaDataType Atype, int lda, long long int strideA, const void* B,
             cudaDataType Btype, int ldb, long long int strideB, const void* beta, void* C, cudaDataType Ctype,
             int ldc, long long int strideC, int batchCount, cublasComputeType_t computeType,
             cublasGemmAlgo_t algo),
            (handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype,
             ldc, strideC, batchCount, computeType, algo))
ZI_BLAS_FWD(true, cublasLtCreate, (cublasLtHandle_t * lightHandle), (lightHandle))
ZI_BLAS_FWD(true, cublasLtMatmul,
            (cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t computeDesc, const void* alpha, const void* A,
             cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
             const void* C, cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
             const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspaceSizeInBytes, cudaStream_t stream),
            (lightHandle, computeDesc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo, workspace,
             workspaceSizeInBytes, stream))
ZI_BLAS_FWD(true, cublasLtMatmulAlgoGetHeuristic,
            (cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t operationDesc, cublasLtMatrixLayout_t Adesc,
             cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
             cublasLtMatmulPreference_t preference, int requestedAlgoCount,
             cublasLtMatmulHeuristicResult_t heuristicResultsArray[], int* returnAlgoCount),
            (lightHandle, operationDesc, Adesc, Bdesc, Cdesc, Ddesc, preference, requestedAlgoCount,
             heuristicResultsArray, returnAlgoCount))
ZI_BLAS_FWD(true, cublasLtMatmulDescCreate,
            (cublasLtMatmulDesc_t * matmulDesc, cublasComputeType_t computeType, cudaDataType_t scaleType),
            (matmulDesc, computeType, scaleType))
ZI_BLAS_FWD(true, cublasLtMatmulDescSetAttribute,
            (cublasLtMatmulDesc_t matmulDesc, cublasLtMatmulDescAttributes_t attr, const void* buf,
             size_t sizeInBytes),
            (matmulDesc, attr, buf, sizeInBytes))
ZI_BLAS_FWD(true, cublasLtMatmulPreferenceCreate, (cublasLtMatmulPreference_t * pref), (pref))
ZI_BLAS_FWD(true, cublasLtMatmulPreferenceDestroy, (cublasLtMatmulPreference_t pref), (pref))
ZI_BLAS_FWD(true, cublasLtMatmulDescDestroy, (cublasLtMatmulDesc_t matmulDesc), (matmulDesc))
ZI_BLAS_FWD(true, cublasLtMatrixLayoutDestroy, (cublasLtMatrixLayout_t matLayout), (matLayout))
ZI_BLAS_FWD(true, cublasLtMatmulPreferenceSetAttribute,
            (cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
             size_t sizeInBytes),
            (pref, attr, buf, sizeInBytes))
ZI_BLAS_FWD(true, cublasLtMatrixLayoutCreate,
            (cublasLtMatrixLayout_t * matLayout, cudaDataType type, uint64_t rows, uint64_t cols, int64_t ld),
            (matLayout, type, rows, cols, ld))
