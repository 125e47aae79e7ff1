// Per-element math of the Hadamard and fake-quant kernels, shared by the C++ CPU kernel
// (csrc/hadamard.cpp) and the CUDA kernel (csrc/hadamard.cu): the CPU tests exercise the
// arithmetic the GPU runs. The same formulas as kernels/fake_quant.py and METHODS.md section 4:
//
//   asymmetric: s = c (max - min) / (2^b - 1),          z = round(-c min / s), q in [0, 2^b - 1]
//   symmetric:  s = c max(|min|, |max|) / (2^(b-1) - 1), z = 0,  q in [-2^(b-1), 2^(b-1) - 1]
//   s = max(s, 1e-8);   q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) s
//
// round is half to even (rint in the default rounding mode, as torch.round), divisions are
// IEEE (nvcc's default -prec-div=true), fp32 throughout. The per-element x / s is x times the
// row's r = 1 / s with one Markstein correction by fmas, equal to the IEEE quotient
// (tests/kernels/test_quant_division.py checks the formula exhaustively). No torch headers here.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define FASTFT_HD __host__ __device__ __forceinline__
#else
#define FASTFT_HD inline
#endif

namespace fastft {

constexpr float kMinScale = 1e-8f;

// One butterfly of the Walsh-Hadamard transform: (a, b) -> (a + b, a - b).
FASTFT_HD void butterfly(float& a, float& b) {
  const float t = a;
  a = t + b;
  b = t - b;
}

FASTFT_HD float round_half_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return std::rint(x);
#endif
}

FASTFT_HD float fmax_(float a, float b) {
#ifdef __CUDA_ARCH__
  return fmaxf(a, b);
#else
  return a > b ? a : b;
#endif
}

// a b + c rounded once.
FASTFT_HD float fma_(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

FASTFT_HD float fmin_(float a, float b) {
#ifdef __CUDA_ARCH__
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}

struct QParams {
  float s, r, z, qmin, qmax;  // r = 1 / s, correctly rounded
};

// x / s correctly rounded from r = RN(1 / s): q0 = x r, then q0 + (x - q0 s) r, each step
// one fma (x - q0 s is exact); a multiply and two fmas instead of a division per element.
FASTFT_HD float div_by(float x, float s, float r) {
  const float q0 = x * r;
  return fma_(fma_(-q0, s, x), r, q0);
}

// The quantizer of a row whose values lie in [mn, mx].
FASTFT_HD QParams qparams(float mn, float mx, int bits, bool symmetric, float clip) {
  QParams q;
  if (symmetric) {
    const float half = static_cast<float>(1 << (bits - 1));
    const float den = half - 1.0f;
    q.s = fmax_(clip * fmax_(-mn, mx) / den, kMinScale);
    q.z = 0.0f;
    q.qmin = -half;
    q.qmax = den;
  } else {
    const float den = static_cast<float>((1 << bits) - 1);
    q.s = fmax_(clip * (mx - mn) / den, kMinScale);
    q.z = round_half_even(-clip * mn / q.s);
    q.qmin = 0.0f;
    q.qmax = den;
  }
  q.r = 1.0f / q.s;
  return q;
}

FASTFT_HD float fake_quant(float x, const QParams& q) {
  const float t = fmin_(fmax_(round_half_even(div_by(x, q.s, q.r)) + q.z, q.qmin), q.qmax);
  return (t - q.z) * q.s;
}

}  // namespace fastft
