// Fused sparse AdamW step on the CPU: the same update as kernels/sparse_adam.py.
//
// For each compact entry i with flat weight index o = idx[i] of weight j:
//   g    = grad[i] (compact fp32 gradient) or grad_j[o] (the weight's dense gradient)
//   m_i  = b1 m_i + c1 g,    v_i = b2 v_i + c2 g^2          (c1 = 1 - b1, c2 = 1 - b2)
//   w[o] = w[o] decay - step_size (m_i / (sqrt(v_i) / sqrt_bc2 + eps))
// with decay = 1 - lr wd, step_size = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t), all
// computed once by the caller. One call updates a list of weights of one dtype: idx, m, v
// (and a compact gradient) are flat, segment j = [offsets[j], offsets[j + 1]) belonging to
// weight j. fp32 math; weights float, bfloat16 or half; indices int32 or int64 (offsets are
// int64). A segment's entries run in parallel over ATen's thread pool; each chunk gathers
// into small buffers, updates them in a loop the compiler vectorises, and scatters.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t CHUNK = 256;   // entries per gather / update / scatter round
constexpr int64_t GRAIN = 32768;  // entries per parallel task (smaller updates run on one thread)
constexpr int64_t PREFETCH = 96;  // entries ahead whose weight (and gradient) lines are fetched

struct Coeffs {
  float b1, c1, b2, c2, eps, decay, step_size, sqrt_bc2;
};

template <typename scalar_t, typename index_t, typename grad_t, bool COMPACT>
void update(scalar_t* w, const grad_t* g, const index_t* idx, float* m, float* v, int64_t n,
            const Coeffs k) {
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    float gb[CHUNK];
    float wb[CHUNK];
    for (int64_t s = begin; s < end; s += CHUNK) {
      const int64_t len = std::min(CHUNK, end - s);
      const index_t* ix = idx + s;
      for (int64_t j = 0; j < len; ++j) {
        if (s + j + PREFETCH < end) {  // scattered entries: ask for them early
          const int64_t ahead = static_cast<int64_t>(ix[j + PREFETCH]);
          __builtin_prefetch(w + ahead, 1);
          if (!COMPACT) __builtin_prefetch(g + ahead, 0);
        }
        const int64_t o = static_cast<int64_t>(ix[j]);
        gb[j] = COMPACT ? static_cast<float>(g[s + j]) : static_cast<float>(g[o]);
        wb[j] = static_cast<float>(w[o]);
      }
      float* ms = m + s;
      float* vs = v + s;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float gj = gb[j];
        const float mj = k.b1 * ms[j] + k.c1 * gj;
        const float vj = k.b2 * vs[j] + k.c2 * (gj * gj);
        ms[j] = mj;
        vs[j] = vj;
        const float denom = std::sqrt(vj) / k.sqrt_bc2 + k.eps;
        wb[j] = wb[j] * k.decay - k.step_size * (mj / denom);
      }
      for (int64_t j = 0; j < len; ++j) {
        w[static_cast<int64_t>(ix[j])] = static_cast<scalar_t>(wb[j]);
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void run_all(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& gs,
             const torch::Tensor& idx, torch::Tensor& m, torch::Tensor& v,
             const std::vector<int64_t>& offsets, bool compact, const Coeffs& k) {
  const index_t* ip = idx.data_ptr<index_t>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  for (size_t j = 0; j < ws.size(); ++j) {
    const int64_t a = offsets[j], n = offsets[j + 1] - offsets[j];
    if (n == 0) continue;
    scalar_t* w = ws[j].data_ptr<scalar_t>();
    if (compact) {
      update<scalar_t, index_t, float, true>(w, gs[0].data_ptr<float>() + a, ip + a, mp + a,
                                             vp + a, n, k);
    } else {
      update<scalar_t, index_t, scalar_t, false>(w, gs[j].data_ptr<scalar_t>(), ip + a, mp + a,
                                                 vp + a, n, k);
    }
  }
}

template <typename scalar_t>
void by_index(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& gs,
              const torch::Tensor& idx, torch::Tensor& m, torch::Tensor& v,
              const std::vector<int64_t>& offsets, bool compact, const Coeffs& k) {
  if (idx.scalar_type() == torch::kInt) {
    run_all<scalar_t, int32_t>(ws, gs, idx, m, v, offsets, compact, k);
  } else {
    run_all<scalar_t, int64_t>(ws, gs, idx, m, v, offsets, compact, k);
  }
}

}  // namespace

void sparse_adam_step(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> grads,
                      torch::Tensor idx, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                      std::vector<int64_t> offsets, double beta1, double beta2, double eps,
                      double decay, double step_size, double sqrt_bc2, bool compact) {
  const int64_t n = idx.numel();
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous() &&
                  (idx.scalar_type() == torch::kInt || idx.scalar_type() == torch::kLong),
              "sparse_adam_step: idx must be a contiguous 1-d int32 or int64 tensor");
  for (const auto* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == n,
                "sparse_adam_step: exp_avg and exp_avg_sq must be contiguous float32 of idx's size");
  }
  TORCH_CHECK(offsets.size() == weights.size() + 1 && offsets.front() == 0 && offsets.back() == n,
              "sparse_adam_step: offsets must hold len(weights) + 1 segment bounds of idx");
  TORCH_CHECK(grads.size() == (compact ? 1 : weights.size()),
              "sparse_adam_step: one compact gradient, or one dense gradient per weight");
  if (weights.empty()) return;
  const auto dtype = weights[0].scalar_type();
  for (size_t j = 0; j < weights.size(); ++j) {
    const auto& w = weights[j];
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == dtype,
                "sparse_adam_step: weights must be contiguous CPU tensors of one dtype");
    TORCH_CHECK(offsets[j] <= offsets[j + 1], "sparse_adam_step: offsets must not decrease");
    if (!compact) {
      TORCH_CHECK(grads[j].scalar_type() == dtype && grads[j].is_contiguous() &&
                      grads[j].numel() == w.numel(),
                  "sparse_adam_step: a dense grad is contiguous, with its weight's dtype and size");
    }
  }
  if (compact) {
    TORCH_CHECK(grads[0].scalar_type() == torch::kFloat && grads[0].is_contiguous() &&
                    grads[0].numel() == n,
                "sparse_adam_step: a compact grad is contiguous float32 of idx's size");
  }
  const Coeffs k{static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
                 static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                 static_cast<float>(eps), static_cast<float>(decay),
                 static_cast<float>(step_size), static_cast<float>(sqrt_bc2)};
  switch (dtype) {
    case torch::kFloat:
      by_index<float>(weights, grads, idx, exp_avg, exp_avg_sq, offsets, compact, k);
      break;
    case torch::kBFloat16:
      by_index<c10::BFloat16>(weights, grads, idx, exp_avg, exp_avg_sq, offsets, compact, k);
      break;
    case torch::kHalf:
      by_index<c10::Half>(weights, grads, idx, exp_avg, exp_avg_sq, offsets, compact, k);
      break;
    default:
      TORCH_CHECK(false, "sparse_adam_step: weights must be float32, bfloat16 or float16");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_adam_step", &sparse_adam_step,
        "Fused sparse AdamW over weights of one dtype: update m, v and the entries at idx",
        pybind11::arg("weight"), pybind11::arg("grad"), pybind11::arg("idx"),
        pybind11::arg("exp_avg"), pybind11::arg("exp_avg_sq"), pybind11::arg("offsets"),
        pybind11::arg("beta1"),
        pybind11::arg("beta2"), pybind11::arg("eps"), pybind11::arg("decay"),
        pybind11::arg("step_size"), pybind11::arg("sqrt_bc2"), pybind11::arg("compact"));
}
