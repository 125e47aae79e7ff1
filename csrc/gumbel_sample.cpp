// Gumbel-max sampling of K tokens per row on the CPU: the same Philox4x32-10
// stream as kernels/gumbel_sample.py, so a draw is a pure function of
// (seed, global row, k, v) on every backend.
//
// For each row of z [C, V] (fp32, unit column stride) and each k < K:
//   a_k = argmax_v (s_v + g_{k,v}),  s = softcap * tanh(z / softcap) / temperature,
// g standard Gumbel noise from Philox with counters (v, row lo, k / 4, row hi)
// and key (seed lo, seed hi). Rows run in parallel (ATen's thread pool).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

inline void philox(uint64_t seed, uint32_t c[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = mulhi(0xCD9E8D57u, c2) ^ c[1] ^ k0;
    c[2] = mulhi(0xD2511F53u, c0) ^ c[3] ^ k1;
    c[1] = 0xCD9E8D57u * c2;
    c[3] = 0xD2511F53u * c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

inline float gumbel(uint32_t x) {
  const float u = (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;  // (0, 1)
  return -std::log(-std::log(u));
}

}  // namespace

torch::Tensor gumbel_sample(const torch::Tensor& z, int64_t k, int64_t seed, int64_t row_offset,
                            double softcap, double temperature) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.scalar_type() == torch::kFloat,
              "gumbel_sample: z must be a 2-d float32 CPU tensor");
  TORCH_CHECK(k >= 1, "gumbel_sample: k must be >= 1");
  const torch::Tensor zc = z.stride(1) == 1 ? z : z.contiguous();
  const int64_t C = zc.size(0), V = zc.size(1), stride = zc.stride(0);
  auto out = torch::empty({C, k}, zc.options().dtype(torch::kLong));
  const float* zp = zc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const float cap = static_cast<float>(softcap), temp = static_cast<float>(temperature);
  const uint64_t key = static_cast<uint64_t>(seed);
  const int64_t groups = (k + 3) / 4;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> best(k);
    std::vector<int64_t> arg(k);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
      std::fill(arg.begin(), arg.end(), 0);
      const uint64_t grow = static_cast<uint64_t>(r + row_offset);
      const float* row = zp + r * stride;
      for (int64_t v = 0; v < V; ++v) {
        float s = row[v];
        if (cap > 0.f) s = cap * std::tanh(s / cap);
        s /= temp;
        for (int64_t g = 0; g < groups; ++g) {
          uint32_t c[4] = {static_cast<uint32_t>(v), static_cast<uint32_t>(grow),
                           static_cast<uint32_t>(g), static_cast<uint32_t>(grow >> 32)};
          philox(key, c);
          for (int i = 0; i < 4 && 4 * g + i < k; ++i) {
            const float val = s + gumbel(c[i]);
            if (val > best[4 * g + i]) {
              best[4 * g + i] = val;
              arg[4 * g + i] = v;
            }
          }
        }
      }
      for (int64_t j = 0; j < k; ++j) op[r * k + j] = arg[j];
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gumbel_sample", &gumbel_sample, "Gumbel-max samples of K tokens per row (Philox)",
        pybind11::arg("z"), pybind11::arg("k"), pybind11::arg("seed"),
        pybind11::arg("row_offset"), pybind11::arg("softcap"), pybind11::arg("temperature"));
}
