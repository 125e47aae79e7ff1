// The Walsh-Hadamard transform and RoSTE's fake quantizers on the CPU: the same results as
// kernels/hadamard.py, kernels/fake_quant.py and csrc/hadamard.cu (whose per-element math,
// csrc/quant_math.h, is shared with this file).
//
// hadamard:        y = scale (H_K kron H_P) x per row of x [R, n], n = K P, P = 2^m; H_K a
//                  [K, K] fp32 factor (none when K = 1), H_K^T with `transpose`.
// fake_quant_act:  q(y) per row, y the transform above (`rotate`) or x itself.
// fake_quant_weight: q(w) per output row of w [out, in], or per group of `group_size` inputs.
//
// A row is converted to an fp32 buffer; output segment ko is sum_ki H_K[ko, ki] x[ki] (K
// axpys), then the in-place butterflies of csrc/quant_math.h over its P elements, then the
// scale; the quantizer reads the row's min and max from the buffer. fp32 math, x and y in
// float, bfloat16 or half; rows run in parallel on ATen's thread pool (OpenMP).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "quant_math.h"

namespace {

// Unnormalised Walsh-Hadamard transform (Sylvester order) of v[0, P), in place.
void fwht(float* v, int64_t P) {
  for (int64_t h = 1; h < P; h <<= 1) {
    for (int64_t i = 0; i < P; i += 2 * h) {
      float* a = v + i;
      float* b = v + i + h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) fastft::butterfly(a[j], b[j]);
    }
  }
}

struct Rotation {
  bool on = false;
  int64_t K = 1, P = 1;
  const float* H = nullptr;  // [K, K] row-major, or null when K = 1
  bool transpose = false;
  float scale = 1.0f;
};

struct Quant {
  bool on = false;
  int bits = 4;
  bool symmetric = false;
  float clip = 1.0f;
};

// One row: x (n values of T) -> out (n fp32): the rotation when on, else a copy.
template <typename T>
void transform_row(const T* x, int64_t n, const Rotation& rot, float* in, float* out) {
  if (!rot.on) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(x[j]);
    return;
  }
  const int64_t K = rot.K, P = rot.P;
  if (K == 1) {
    for (int64_t j = 0; j < P; ++j) out[j] = static_cast<float>(x[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) in[j] = static_cast<float>(x[j]);
    for (int64_t ko = 0; ko < K; ++ko) {
      float* o = out + ko * P;
      std::fill(o, o + P, 0.0f);
      for (int64_t ki = 0; ki < K; ++ki) {
        const float h = rot.transpose ? rot.H[ki * K + ko] : rot.H[ko * K + ki];
        const float* src = in + ki * P;
#pragma omp simd
        for (int64_t j = 0; j < P; ++j) o[j] += h * src[j];
      }
    }
  }
  const float scale = rot.scale;
  for (int64_t ko = 0; ko < K; ++ko) {
    float* o = out + ko * P;
    fwht(o, P);
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) o[j] *= scale;
  }
}

template <typename T>
void run_rows(const T* x, int64_t sx, T* y, int64_t sy, int64_t R, int64_t n, const Rotation& rot,
              const Quant& quant) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> in(rot.on && rot.K > 1 ? n : 0), out(n);
    for (int64_t r = begin; r < end; ++r) {
      float* o = out.data();
      transform_row(x + r * sx, n, rot, in.data(), o);
      T* dst = y + r * sy;
      if (!quant.on) {
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(o[j]);
        continue;
      }
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
#pragma omp simd reduction(min : mn) reduction(max : mx)
      for (int64_t j = 0; j < n; ++j) {
        mn = std::min(mn, o[j]);
        mx = std::max(mx, o[j]);
      }
      const fastft::QParams q = fastft::qparams(mn, mx, quant.bits, quant.symmetric, quant.clip);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = fastft::fake_quant(o[j], q);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(o[j]);
    }
  });
}

torch::Tensor launch(const torch::Tensor& x_in, const Rotation& rot, const Quant& quant,
                     const char* who) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, who, ": x must be a 2-d CPU tensor");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16 || dtype == torch::kHalf, who,
              ": x must be float32, bfloat16 or float16");
  const torch::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t R = x.size(0), n = x.size(1);
  auto y = torch::empty({R, n}, x.options());
  if (R == 0 || n == 0) return y;
  switch (dtype) {
    case torch::kFloat:
      run_rows<float>(x.data_ptr<float>(), x.stride(0), y.data_ptr<float>(), n, R, n, rot, quant);
      break;
    case torch::kBFloat16:
      run_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.stride(0),
                              y.data_ptr<c10::BFloat16>(), n, R, n, rot, quant);
      break;
    default:
      run_rows<c10::Half>(x.data_ptr<c10::Half>(), x.stride(0), y.data_ptr<c10::Half>(), n, R, n,
                          rot, quant);
  }
  return y;
}

// The rotation of rows of n with this K factor (checked); `factor` keeps H alive.
Rotation rotation(int64_t n, const std::optional<torch::Tensor>& kfactor, double scale,
                  bool transpose, torch::Tensor& factor, const char* who) {
  Rotation rot;
  rot.on = true;
  rot.transpose = transpose;
  rot.scale = static_cast<float>(scale);
  if (kfactor.has_value() && kfactor->defined()) {
    TORCH_CHECK(kfactor->dim() == 2 && kfactor->size(0) == kfactor->size(1), who,
                ": the K factor must be a square matrix");
    factor = kfactor->to(torch::kCPU, torch::kFloat).contiguous();
    rot.K = factor.size(0);
    rot.H = factor.data_ptr<float>();
  }
  TORCH_CHECK(rot.K >= 1 && n % rot.K == 0, who, ": n=", n, " is not a multiple of K=", rot.K);
  rot.P = n / rot.K;
  TORCH_CHECK((rot.P & (rot.P - 1)) == 0, who, ": n=", n, " is not K=", rot.K,
              " times a power of two");
  return rot;
}

Quant quantizer(int64_t bits, bool symmetric, double clip, const char* who) {
  TORCH_CHECK(bits >= (symmetric ? 2 : 1) && bits <= 16, who, ": bits must be in [",
              symmetric ? 2 : 1, ", 16]; got ", bits);
  Quant q;
  q.on = true;
  q.bits = static_cast<int>(bits);
  q.symmetric = symmetric;
  q.clip = static_cast<float>(clip);
  return q;
}

}  // namespace

torch::Tensor hadamard(const torch::Tensor& x, const std::optional<torch::Tensor>& kfactor,
                       double scale, bool transpose) {
  torch::Tensor factor;
  const Rotation rot = rotation(x.size(-1), kfactor, scale, transpose, factor, "hadamard");
  return launch(x, rot, Quant{}, "hadamard");
}

torch::Tensor fake_quant_act(const torch::Tensor& x, const std::optional<torch::Tensor>& kfactor,
                             double scale, int64_t bits, bool symmetric, double clip_ratio,
                             bool rotate, bool transpose) {
  torch::Tensor factor;
  Rotation rot;
  if (rotate) rot = rotation(x.size(-1), kfactor, scale, transpose, factor, "fake_quant_act");
  return launch(x, rot, quantizer(bits, symmetric, clip_ratio, "fake_quant_act"),
                "fake_quant_act");
}

torch::Tensor fake_quant_weight(const torch::Tensor& w, int64_t bits, bool symmetric,
                                double clip_ratio, int64_t group_size) {
  TORCH_CHECK(w.dim() == 2, "fake_quant_weight: w must be [out, in]");
  const int64_t out_f = w.size(0), in_f = w.size(1);
  const int64_t g = (group_size <= 0 || group_size >= in_f) ? in_f : group_size;
  TORCH_CHECK(in_f % g == 0, "fake_quant_weight: group_size ", g, " does not divide ", in_f);
  const torch::Tensor rows = w.contiguous().view({in_f ? out_f * (in_f / g) : out_f, g});
  return launch(rows, Rotation{}, quantizer(bits, symmetric, clip_ratio, "fake_quant_weight"),
                "fake_quant_weight")
      .view({out_f, in_f});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hadamard", &hadamard, "y = scale (H_K kron H_P) x per row (H_K^T with transpose)",
        pybind11::arg("x"), pybind11::arg("kfactor"), pybind11::arg("scale"),
        pybind11::arg("transpose"));
  m.def("fake_quant_act", &fake_quant_act,
        "per-row fake quantization of x, or of its Hadamard transform (rotate)",
        pybind11::arg("x"), pybind11::arg("kfactor"), pybind11::arg("scale"),
        pybind11::arg("bits"), pybind11::arg("symmetric"), pybind11::arg("clip_ratio"),
        pybind11::arg("rotate"), pybind11::arg("transpose"));
  m.def("fake_quant_weight", &fake_quant_weight,
        "per-output-row (or per-group) fake quantization of a weight [out, in]",
        pybind11::arg("w"), pybind11::arg("bits"), pybind11::arg("symmetric"),
        pybind11::arg("clip_ratio"), pybind11::arg("group_size"));
}
