// linear with a weight-format w on the GPU (cuda_ops.h): the weight is dequantized block by
// block (one thread per 32-value block, or per 256-value super-block for the K-quants) into a
// workspace buffer in the activation dtype, then the GEMM of linear() runs on it. The buffer
// comes from the pool, so consecutive layers reuse the same memory. The arithmetic is that of
// core/quant.cpp (ggml's), so the dequantized values equal the CPU's before the bf16 rounding.
// fp8 weights take the same route for now (e4m3 · row scale → bf16); an fp8 tensor-core GEMM
// (cuBLASLt, per-tensor activation scale) is the next step, not written yet.
#include "backends/cuda/common.cuh"
#include "backends/cuda/cuda_ops.h"

namespace zi::cuda {
namespace {

__device__ __forceinline__ float f16at(const uint8_t* p) {
  const unsigned short h = (unsigned short)(p[0] | (p[1] << 8));
  return __half2float(__ushort_as_half(h));
}

__device__ void deq_q8_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  for (int j = 0; j < 32; ++j) y[j] = float(int8_t(b[2 + j])) * d;
}
__device__ void deq_q4_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = float(int(b[2 + j] & 0x0F) - 8) * d;
    y[16 + j] = float(int(b[2 + j] >> 4) - 8) * d;
  }
}
__device__ void deq_q5_0(const uint8_t* b, float* y) {
  const float d = f16at(b);
  const uint32_t qh = uint32_t(b[2]) | uint32_t(b[3]) << 8 | uint32_t(b[4]) << 16 | uint32_t(b[5]) << 24;
  for (int j = 0; j < 16; ++j) {
    y[j] = float(int((b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16) * d;
    y[16 + j] = float(int((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) * d;
  }
}
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, float* sc, float* m) {
  if (j < 4) {
    *sc = float(q[j] & 63);
    *m = float(q[j + 4] & 63);
  } else {
    *sc = float((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *m = float((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}
__device__ void deq_q4_k(const uint8_t* b, float* y) {
  const float d = f16at(b), dmin = f16at(b + 2);
  for (int g = 0; g < 4; ++g) {
    float s1, m1, s2, m2;
    scale_min_k4(2 * g, b + 4, &s1, &m1);
    scale_min_k4(2 * g + 1, b + 4, &s2, &m2);
    const float d1 = __fmul_rn(d, s1), mm1 = __fmul_rn(dmin, m1), d2 = __fmul_rn(d, s2), mm2 = __fmul_rn(dmin, m2);
    for (int l = 0; l < 32; ++l) {
      y[64 * g + l] = __fsub_rn(__fmul_rn(d1, float(b[16 + 32 * g + l] & 0x0F)), mm1);
      y[64 * g + 32 + l] = __fsub_rn(__fmul_rn(d2, float(b[16 + 32 * g + l] >> 4)), mm2);
    }
  }
}
__device__ void deq_q5_k(const uint8_t* b, float* y) {
  const float d = f16at(b), dmin = f16at(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int g = 0; g < 4; ++g) {
    float s1, m1, s2, m2;
    scale_min_k4(2 * g, b + 4, &s1, &m1);
    scale_min_k4(2 * g + 1, b + 4, &s2, &m2);
    const float d1 = __fmul_rn(d, s1), mm1 = __fmul_rn(dmin, m1), d2 = __fmul_rn(d, s2), mm2 = __fmul_rn(dmin, m2);
    for (int l = 0; l < 32; ++l) {
      y[64 * g + l] = __fsub_rn(__fmul_rn(d1, float((ql[32 * g + l] & 0x0F) | (((qh[l] >> (2 * g)) & 1) << 4))), mm1);
      y[64 * g + 32 + l] =
          __fsub_rn(__fmul_rn(d2, float((ql[32 * g + l] >> 4) | (((qh[l] >> (2 * g + 1)) & 1) << 4))), mm2);
    }
  }
}
__device__ void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16at(b + 208);
  for (int c = 0; c < 8; ++c) {
    const int g = c / 4, r = c % 4, shift_l = 4 * (r / 2), off_l = 64 * g + 32 * (r % 2), shift_h = 2 * r;
    for (int l = 0; l < 32; ++l) {
      const int e = 32 * c + l;
      const int q = int(((ql[off_l + l] >> shift_l) & 0x0F) | (((qh[32 * g + l] >> shift_h) & 3) << 4)) - 32;
      y[e] = __fmul_rn(__fmul_rn(d, float(sc[e / 16])), float(q));
    }
  }
}
__device__ void deq_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hm = b;
  const uint8_t* qs = b + 32;
  const uint8_t* s = b + 96;
  const float d = f16at(b + 108);
  for (int c = 0; c < 8; ++c) {
    const int g = c / 4, shift = 2 * (c % 4);
    for (int l = 0; l < 32; ++l) {
      const int e = 32 * c + l, i = e / 16;
      const int lo = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
      const int hi = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
      const float dl = __fmul_rn(d, float(int(int8_t(uint8_t(lo | (hi << 4)))) - 32));
      const int q = int((qs[32 * g + l] >> shift) & 3) - (((hm[l] >> c) & 1) ? 0 : 4);
      y[e] = __fmul_rn(dl, float(q));
    }
  }
}

__device__ float e4m3(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = __int_as_float(0x7fc00000);
  else if (e == 0) v = ldexpf(float(m) / 8.0f, -6);
  else v = ldexpf(1.0f + float(m) / 8.0f, e - 7);
  return s ? -v : v;
}

template <class T>
__global__ void dequant_blocks(const uint8_t* __restrict__ src, T* __restrict__ dst, int64_t nblocks, int fmt,
                               int block, int block_bytes) {
  float y[256];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nblocks; i += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t* b = src + i * block_bytes;
    switch (fmt) {
      case 0: deq_q8_0(b, y); break;
      case 1: deq_q4_0(b, y); break;
      case 2: deq_q5_0(b, y); break;
      case 3: deq_q4_k(b, y); break;
      case 4: deq_q5_k(b, y); break;
      case 5: deq_q6_k(b, y); break;
      default: deq_q3_k(b, y); break;
    }
    for (int j = 0; j < block; ++j) st(dst, i * block + j, y[j]);
  }
}

template <class T>
__global__ void dequant_fp8(const uint8_t* __restrict__ src, const float* __restrict__ scale, T* __restrict__ dst,
                            int64_t n, int64_t K) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    st(dst, i, __fmul_rn(e4m3(src[i]), scale ? scale[i / K] : 1.0f));
}

int fmt_code(DType t) {
  switch (t) {
    case DType::Q8_0: return 0;
    case DType::Q4_0: return 1;
    case DType::Q5_0: return 2;
    case DType::Q4_K: return 3;
    case DType::Q5_K: return 4;
    case DType::Q6_K: return 5;
    case DType::Q3_K: return 6;
    default: return -1;
  }
}

}  // namespace

void linear_quant(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y) {
  const DType dt = x.dtype();
  ZI_CHECK(dt == DType::F32 || dt == DType::BF16, "[linear] cuda activations must be f32 or bf16, got ", x.desc());
  ZI_CHECK(w.device() == Device::CUDA && w.is_contiguous() && w.ndim() == 2, "[linear] bad weight ", w.desc());
  const int64_t n = w.numel();
  Tensor wd = Tensor::empty(w.shape(), dt, Tag::Workspace, Device::CUDA);
  {
    OpTimer prof("dequant");
    const int threads = 128;
    const uint8_t* src = static_cast<const uint8_t*>(w.raw());
    if (w.dtype() == DType::F8_E4M3) {
      const float* sc = w.row_scale() ? w.row_scale()->data<float>() : nullptr;
      const unsigned grid = grid_for(n, 256);
      if (dt == DType::BF16) dequant_fp8<bf16><<<grid, 256, 0, stream()>>>(src, sc, wd.data<bf16>(), n, w.dim(1));
      else dequant_fp8<float><<<grid, 256, 0, stream()>>>(src, sc, wd.data<float>(), n, w.dim(1));
    } else {
      const int code = fmt_code(w.dtype());
      ZI_CHECK(code >= 0, "[linear] no GPU dequantization for ", w.desc());
      const int block = int(dtype_block(w.dtype())), bb = int(dtype_block_bytes(w.dtype()));
      const int64_t nb = n / block;
      const unsigned grid = grid_for(nb, threads);
      if (dt == DType::BF16)
        dequant_blocks<bf16><<<grid, threads, 0, stream()>>>(src, wd.data<bf16>(), nb, code, block, bb);
      else
        dequant_blocks<float><<<grid, threads, 0, stream()>>>(src, wd.data<float>(), nb, code, block, bb);
    }
    ZI_CUDA_LAUNCHED();
  }
  linear(x, wd, bias, y);
}

}  // namespace zi::cuda
