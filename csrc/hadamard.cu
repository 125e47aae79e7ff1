// The Walsh-Hadamard transform and RoSTE's fake quantizers on the GPU: device code and
// extern "C" launchers only (no torch headers), called through ctypes by fastft/cuda_lib.py
// with data pointers and the current stream. The same results as kernels/hadamard.py,
// kernels/fake_quant.py and csrc/hadamard.cpp; the per-element math is csrc/quant_math.h.
//
// fastft_hadamard_rows: y = scale (H_K kron H_P) x per row of n = K P, then, when `quant`,
// y = q(y) per row. P = 2^m <= 8192 here; fastft/cuda_lib.py runs a larger P as
// (H_K kron H_f) kron H_8192 (held in registers, P = 16384 and 32768 spilled: 32 or 64
// values per thread plus the K-factor loads passed the registers a block may use).
// Output segment ko of a row is
// fwht(sum_ki H_K[ko, ki] x[ki]): K axpys over segments read from global memory (L1/L2 keep
// the row), then the transform of P elements held by TPR threads x E registers (thread t owns
// elements t E .. t E + E - 1): the stages over the low log2(E) bits in registers, the next
// five with __shfl_xor_sync inside a warp, the last log2(W) (W warps per row) in one round
// trip through shared memory, where each thread gathers the W elements that differ only in
// their warp bits. Short rows (P <= 256) pack 256 / TPR rows into a block, TPR lanes each.
// The quantizer needs the row's min and max: with K = 1 the row is in registers (one pass);
// with K > 1 the segments are computed twice (a min/max pass, then the quantize pass).
//
// fastft_quant_rows: q(x) per row of any length n (weights per channel or group,
// activations without rotation): one warp per row, a min/max sweep and a quantize sweep.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "quant_math.h"

namespace fastft_cuda {

constexpr unsigned FULL = 0xffffffffu;

template <int LOG2P>
struct Cfg {
  static constexpr int P = 1 << LOG2P;
  static_assert(LOG2P <= 13, "P > 8192: the caller folds H_2 factors into H_K");
  // elements per thread: all of a short row, 8 up to P = 2048, then 16
  static constexpr int LOG2E = LOG2P <= 3 ? LOG2P : (LOG2P <= 11 ? 3 : 4);
  static constexpr int E = 1 << LOG2E;
  static constexpr int TPR = P / E;               // threads per row
  static constexpr int W = TPR > 32 ? TPR / 32 : 1;  // warps per row
  static constexpr int LANES = TPR < 32 ? TPR : 32;  // lanes of a row within one warp
  static constexpr int THREADS = TPR > 32 ? TPR : 256;
  static constexpr int RPB = THREADS / TPR;       // rows per block
  static constexpr int SMEM = W > 1 ? (P + P / 32) * 4 : 0;  // bytes, one pad float per 32
  static_assert(SMEM <= 48 * 1024, "dynamic shared memory within the default 48 KiB");
  static_assert(W == 1 || E >= W, "each thread gathers E / W groups of W elements");
};

struct Params {
  const void* x;
  void* y;
  const float* h;  // [K, K] fp32, null when K = 1
  long long stride_x, stride_y, rows;
  int K, transpose, quant, bits, symmetric, vec_x, vec_y;
  float scale, clip;
};

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// E consecutive elements at p into v (16-byte loads when `vec` and E of T fill them).
template <typename T, int E>
__device__ __forceinline__ void load(const T* p, bool vec, float (&v)[E]) {
  constexpr int BYTES = E * static_cast<int>(sizeof(T));
  if constexpr (BYTES % 16 == 0) {
    if (vec) {
      constexpr int PER = 16 / sizeof(T);
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
        const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < PER; ++j) v[i * PER + j] = to_f(t[j]);
      }
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] = to_f(p[e]);
}

// v += h * (E consecutive elements at p), 16 bytes at a time.
template <typename T, int E>
__device__ __forceinline__ void load_axpy(const T* p, bool vec, float h, float (&v)[E]) {
  constexpr int BYTES = E * static_cast<int>(sizeof(T));
  if constexpr (BYTES % 16 == 0) {
    if (vec) {
      constexpr int PER = 16 / sizeof(T);
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
        const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < PER; ++j) v[i * PER + j] += h * to_f(t[j]);
      }
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] += h * to_f(p[e]);
}

template <typename T, int E>
__device__ __forceinline__ void store(T* p, bool vec, const float (&v)[E]) {
  constexpr int BYTES = E * static_cast<int>(sizeof(T));
  if constexpr (BYTES % 16 == 0) {
    if (vec) {
      constexpr int PER = 16 / sizeof(T);
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) {
        uint4 u;
        T* t = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int j = 0; j < PER; ++j) t[j] = from_f<T>(v[i * PER + j]);
        reinterpret_cast<uint4*>(p)[i] = u;
      }
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) p[e] = from_f<T>(v[e]);
}

// Walsh-Hadamard transform of N registers (the low bits of the index).
template <int N>
__device__ __forceinline__ void fwht_regs(float (&v)[N]) {
#pragma unroll
  for (int h = 1; h < N; h <<= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if ((i & h) == 0) fastft::butterfly(v[i], v[i + h]);
    }
  }
}

__device__ __forceinline__ int pad(int p) { return p + (p >> 5); }

// The transform of one segment held as v[E] by the TPR threads of a row (lt: the thread's
// index in its row). All threads of the block must call it (shuffles, barriers).
template <int LOG2P>
__device__ __forceinline__ void fwht_segment(float (&v)[Cfg<LOG2P>::E], int lt, float* smem) {
  using C = Cfg<LOG2P>;
  fwht_regs<C::E>(v);
#pragma unroll
  for (int m = 1; m < C::LANES; m <<= 1) {  // partner element: p ^ (m E), in lane ^ m
    const bool upper = lt & m;
#pragma unroll
    for (int e = 0; e < C::E; ++e) {
      const float other = __shfl_xor_sync(FULL, v[e], m);
      v[e] = upper ? other - v[e] : v[e] + other;
    }
  }
  if constexpr (C::W > 1) {
    constexpr int STRIDE = 32 * C::E;  // index distance between warps' elements
#pragma unroll
    for (int e = 0; e < C::E; ++e) smem[pad(lt * C::E + e)] = v[e];
    __syncthreads();
#pragma unroll
    for (int i = 0; i < C::E / C::W; ++i) {
      const int low = lt + i * C::TPR;
      float u[C::W];
#pragma unroll
      for (int w = 0; w < C::W; ++w) u[w] = smem[pad(low + w * STRIDE)];
      fwht_regs<C::W>(u);
#pragma unroll
      for (int w = 0; w < C::W; ++w) smem[pad(low + w * STRIDE)] = u[w];
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < C::E; ++e) v[e] = smem[pad(lt * C::E + e)];
    __syncthreads();  // smem is reused by the next segment
  }
}

// Output segment ko of the row at x (this thread's E elements of segment 0), scaled.
template <typename T, int LOG2P>
__device__ __forceinline__ void segment(const Params& a, const T* x, int ko, int lt,
                                        float (&v)[Cfg<LOG2P>::E], float* smem) {
  using C = Cfg<LOG2P>;
  if (a.h == nullptr) {
    load<T, C::E>(x, a.vec_x, v);
  } else {
#pragma unroll
    for (int e = 0; e < C::E; ++e) v[e] = 0.0f;
#pragma unroll 1
    for (int ki = 0; ki < a.K; ++ki) {
      const float h = __ldg(a.h + (a.transpose ? ki * a.K + ko : ko * a.K + ki));
      load_axpy<T, C::E>(x + static_cast<long long>(ki) * C::P, a.vec_x, h, v);
    }
  }
  fwht_segment<LOG2P>(v, lt, smem);
#pragma unroll
  for (int e = 0; e < C::E; ++e) v[e] *= a.scale;
}

// min and max over the row's threads (red: 64 floats of shared memory).
template <int LOG2P>
__device__ __forceinline__ void row_minmax(float& mn, float& mx, float* red) {
  using C = Cfg<LOG2P>;
#pragma unroll
  for (int m = 1; m < C::LANES; m <<= 1) {
    mn = fminf(mn, __shfl_xor_sync(FULL, mn, m));
    mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, m));
  }
  if constexpr (C::W > 1) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
      red[warp] = mn;
      red[32 + warp] = mx;
    }
    __syncthreads();
    mn = red[0];
    mx = red[32];
#pragma unroll
    for (int w = 1; w < C::W; ++w) {
      mn = fminf(mn, red[w]);
      mx = fmaxf(mx, red[32 + w]);
    }
    __syncthreads();
  }
}

template <typename T, int LOG2P>
__global__ void __launch_bounds__(Cfg<LOG2P>::THREADS, 1) hadamard_kernel(const Params a) {
  using C = Cfg<LOG2P>;
  extern __shared__ float smem[];
  __shared__ float red[64];
  const int lt = threadIdx.x % C::TPR;
  const long long row = static_cast<long long>(blockIdx.x) * C::RPB + threadIdx.x / C::TPR;
  const bool live = row < a.rows;
  if (C::W > 1 && !live) return;  // one row per block: the whole block leaves
  // rows past the end (short rows only) compute on row 0 and store nothing: the shuffles
  // need every lane of the warp
  const T* x = static_cast<const T*>(a.x) + (live ? row : 0) * a.stride_x + lt * C::E;
  // the output address, formed where it is used: kept live through the transform, it would
  // take two registers that ptxas may spill
  const auto out = [&](int ko) {
    return static_cast<T*>(a.y) + row * a.stride_y + static_cast<long long>(ko) * C::P +
           lt * C::E;
  };
  float v[C::E];
  if (!a.quant) {
#pragma unroll 1
    for (int ko = 0; ko < a.K; ++ko) {
      segment<T, LOG2P>(a, x, ko, lt, v, smem);
      if (live) store<T, C::E>(out(ko), a.vec_y, v);
    }
    return;
  }
  float mn = __int_as_float(0x7f800000), mx = -mn;  // +inf, -inf
  if (a.K > 1) {
#pragma unroll 1
    for (int ko = 0; ko < a.K; ++ko) {
      segment<T, LOG2P>(a, x, ko, lt, v, smem);
#pragma unroll
      for (int e = 0; e < C::E; ++e) {
        mn = fminf(mn, v[e]);
        mx = fmaxf(mx, v[e]);
      }
    }
  } else {
    segment<T, LOG2P>(a, x, 0, lt, v, smem);
#pragma unroll
    for (int e = 0; e < C::E; ++e) {
      mn = fminf(mn, v[e]);
      mx = fmaxf(mx, v[e]);
    }
  }
  row_minmax<LOG2P>(mn, mx, red);
  const fastft::QParams q = fastft::qparams(mn, mx, a.bits, a.symmetric != 0, a.clip);
#pragma unroll 1
  for (int ko = 0; ko < a.K; ++ko) {
    if (a.K > 1) segment<T, LOG2P>(a, x, ko, lt, v, smem);
#pragma unroll
    for (int e = 0; e < C::E; ++e) v[e] = fastft::fake_quant(v[e], q);
    if (live) store<T, C::E>(out(ko), a.vec_y, v);
  }
}

template <typename T>
__global__ void __launch_bounds__(256) quant_rows_kernel(const T* x, long long stride_x, T* y,
                                                          long long stride_y, long long rows,
                                                          long long n, int bits, int symmetric,
                                                          float clip) {
  const long long row = static_cast<long long>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= rows) return;  // a whole warp: no shuffle is left waiting
  const int lane = threadIdx.x & 31;
  const T* src = x + row * stride_x;
  T* dst = y + row * stride_y;
  float mn = __int_as_float(0x7f800000), mx = -mn;
  for (long long j = lane; j < n; j += 32) {
    const float v = to_f(src[j]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    mn = fminf(mn, __shfl_xor_sync(FULL, mn, m));
    mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, m));
  }
  const fastft::QParams q = fastft::qparams(mn, mx, bits, symmetric != 0, clip);
  for (long long j = lane; j < n; j += 32) dst[j] = from_f<T>(fastft::fake_quant(to_f(src[j]), q));
}

template <typename T, int LOG2P>
cudaError_t launch(const Params& a, cudaStream_t stream) {
  using C = Cfg<LOG2P>;
  const long long blocks = (a.rows + C::RPB - 1) / C::RPB;
  hadamard_kernel<T, LOG2P><<<static_cast<unsigned>(blocks), C::THREADS, C::SMEM, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const Params& a, int log2p, cudaStream_t s) {
  switch (log2p) {
    case 0: return launch<T, 0>(a, s);
    case 1: return launch<T, 1>(a, s);
    case 2: return launch<T, 2>(a, s);
    case 3: return launch<T, 3>(a, s);
    case 4: return launch<T, 4>(a, s);
    case 5: return launch<T, 5>(a, s);
    case 6: return launch<T, 6>(a, s);
    case 7: return launch<T, 7>(a, s);
    case 8: return launch<T, 8>(a, s);
    case 9: return launch<T, 9>(a, s);
    case 10: return launch<T, 10>(a, s);
    case 11: return launch<T, 11>(a, s);
    case 12: return launch<T, 12>(a, s);
    case 13: return launch<T, 13>(a, s);
    default: return cudaErrorInvalidValue;
  }
}

bool aligned16(const void* p, long long stride, int elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * elem) % 16 == 0;
}

}  // namespace fastft_cuda

using fastft_cuda::Params;
using fastft_cuda::dispatch;
using fastft_cuda::aligned16;
using fastft_cuda::quant_rows_kernel;

// dtype: 0 float32, 1 float16, 2 bfloat16. Returns a cudaError_t (0: launched).
extern "C" int fastft_hadamard_rows(const void* x, long long stride_x, void* y,
                                    long long stride_y, long long rows, long long n, int K,
                                    const float* h, int transpose, float scale, int quant,
                                    int bits, int symmetric, float clip, int dtype,
                                    void* stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  if (K < 1 || n % K) return cudaErrorInvalidValue;
  const long long P = n / K;
  if (P & (P - 1)) return cudaErrorInvalidValue;
  int log2p = 0;
  while ((1LL << log2p) < P) ++log2p;
  const int elem = dtype == 0 ? 4 : 2;
  Params a{x, y, K > 1 ? h : nullptr, stride_x, stride_y, rows, K, transpose, quant, bits,
           symmetric, aligned16(x, stride_x, elem), aligned16(y, stride_y, elem), scale, clip};
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return dispatch<float>(a, log2p, s);
    case 1: return dispatch<__half>(a, log2p, s);
    case 2: return dispatch<__nv_bfloat16>(a, log2p, s);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int fastft_quant_rows(const void* x, long long stride_x, void* y, long long stride_y,
                                 long long rows, long long n, int bits, int symmetric,
                                 float clip, int dtype, void* stream) {
  if (rows <= 0 || n <= 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>((rows + 7) / 8);
  switch (dtype) {
    case 0:
      quant_rows_kernel<float><<<blocks, 256, 0, s>>>(static_cast<const float*>(x), stride_x,
                                                      static_cast<float*>(y), stride_y, rows, n,
                                                      bits, symmetric, clip);
      break;
    case 1:
      quant_rows_kernel<__half><<<blocks, 256, 0, s>>>(static_cast<const __half*>(x), stride_x,
                                                       static_cast<__half*>(y), stride_y, rows,
                                                       n, bits, symmetric, clip);
      break;
    case 2:
      quant_rows_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(
          static_cast<const __nv_bfloat16*>(x), stride_x, static_cast<__nv_bfloat16*>(y),
          stride_y, rows, n, bits, symmetric, clip);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
