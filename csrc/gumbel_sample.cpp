// Sampling K tokens per row of softmax(s) on the CPU, s = softcap tanh(z / softcap) / temperature,
// by inverting each row's cumulative distribution (one exp per entry, whatever K):
//
// 1. m = max_v s_v (the transform is increasing: m = s(max_v z_v));
// 2. one pass writes e_v = exp(s_v - m) to a row buffer and cumulates the sums of blocks of
//    SB entries in double;
// 3. draw k takes u_k in [0, 1) and returns the first v whose cumulative sum of e passes
//    u_k sum_v e_v: its block by binary search over the block sums, then a scan of the block.
//
// u_k has 53 bits from Philox4x32-10 keyed by the seed, with counters (k, global row low 32
// bits, TAG, global row high 32 bits): a draw is a pure function of (seed, global row, k), the
// same whatever the chunking or the number of threads. (The Triton and torch samplers draw
// Gumbel-max with the same Philox; this stream is the CPU's own, with the same distribution.)
// Rows run in parallel over ATen's thread pool; the exp pass runs eight lanes at a time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t SB = 128;  // entries per block sum
constexpr uint32_t TAG = 0x243F6A88u;

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

// u in [0, 1) with 53 random bits, for draw k of global row grow.
inline double uniform(uint64_t seed, uint64_t grow, uint64_t k) {
  uint32_t c[4] = {static_cast<uint32_t>(k), static_cast<uint32_t>(grow), TAG,
                   static_cast<uint32_t>(grow >> 32)};
  philox(seed, c);
  const uint64_t bits = (static_cast<uint64_t>(c[0]) << 21) ^ (c[1] >> 11);
  return static_cast<double>(bits & ((uint64_t{1} << 53) - 1)) * 0x1.0p-53;
}

// Eight fp32 lanes (GCC vector extensions); the math is written once for F = float (row
// tails) and F = f8. The same exp and tanh as csrc/loss_rows.cpp.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int64_t W = 8;

template <class F> struct IntOf;
template <> struct IntOf<float> { using type = int32_t; };
template <> struct IntOf<f8> { using type = i8; };

template <class F> inline F splat(float v) { return F{} + v; }
template <> inline float splat<float>(float v) { return v; }

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) = 2^n exp(r), |r| <= ln 2 / 2, by the Cephes expf polynomial (within 2 ulp);
// 0 below -87, inf above 88.
template <class F> inline F fexp(F x) {
  using I = typename IntOf<F>::type;
  F xc = x < splat<F>(-87.0f) ? splat<F>(-87.0f) : x;
  xc = xc > splat<F>(88.0f) ? splat<F>(88.0f) : xc;
  const F t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  const F n = t - 12582912.0f;
  F r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = p * r * r + r + 1.0f;
  I bits;
  std::memcpy(&bits, &t, sizeof(bits));
  const I e = ((bits - 0x4B400000 + 127) & 0xFF) << 23;
  F scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const F out = y * scale;
  return x < splat<F>(-87.0f) ? splat<F>(0.0f)
                              : (x > splat<F>(88.0f) ? splat<F>(INFINITY) : out);
}

template <class F> inline F ftanh(F x) {
  using I = typename IntOf<F>::type;
  I b;
  std::memcpy(&b, &x, sizeof(b));
  const I sign = b & static_cast<int32_t>(0x80000000u);
  const I abs_bits = b & 0x7FFFFFFF;
  F ax;
  std::memcpy(&ax, &abs_bits, sizeof(ax));
  const F x2 = x * x;
  F p = splat<F>(-5.70498872745e-3f);
  p = p * x2 + 2.06390887954e-2f;
  p = p * x2 - 5.37397155531e-2f;
  p = p * x2 + 1.33314422036e-1f;
  p = p * x2 - 3.33332819422e-1f;
  const F small = x + x * x2 * p;
  F two = ax + ax;
  two = two > splat<F>(88.0f) ? splat<F>(88.0f) : two;
  const F big_abs = 1.0f - 2.0f / (fexp(two) + 1.0f);
  I big_bits;
  std::memcpy(&big_bits, &big_abs, sizeof(big_bits));
  big_bits = big_bits | sign;
  F big;
  std::memcpy(&big, &big_bits, sizeof(big));
  return ax < splat<F>(0.625f) ? small : big;
}

template <bool HAS_CAP, class F>
inline F transform(F z, float cap, float inv_cap, float inv_temp) {
  if (HAS_CAP) return ftanh(z * inv_cap) * (cap * inv_temp);
  return z * inv_temp;
}

// e[i] = exp(s(z[i]) - m) for one block of n entries; returns the block's sum.
template <bool HAS_CAP>
inline float exp_block(const float* z, float* e, int64_t n, float m, float cap, float inv_cap,
                       float inv_temp) {
  const int64_t nv = n - n % W;
  f8 acc = splat<f8>(0.0f);
  for (int64_t i = 0; i < nv; i += W) {
    const f8 x = fexp(transform<HAS_CAP>(load8(z + i), cap, inv_cap, inv_temp) - m);
    store8(e + i, x);
    acc += x;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < W; ++j) sum += acc[j];
  for (int64_t i = nv; i < n; ++i) {
    e[i] = fexp(transform<HAS_CAP>(z[i], cap, inv_cap, inv_temp) - m);
    sum += e[i];
  }
  return sum;
}

// max_v z_v
inline float row_max(const float* z, int64_t V) {
  const int64_t nv = V - V % W;
  f8 mx = splat<f8>(-INFINITY);
  for (int64_t i = 0; i < nv; i += W) {
    const f8 x = load8(z + i);
    mx = mx < x ? x : mx;
  }
  float m = -INFINITY;
  for (int64_t j = 0; j < W; ++j) m = mx[j] > m ? mx[j] : m;
  for (int64_t i = nv; i < V; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// The entry of block b where the remaining mass rem runs out (the last positive entry when
// rounding leaves some over).
inline int64_t scan_block(const float* e, int64_t lo, int64_t hi, double rem) {
  for (int64_t v = lo; v < hi; ++v) {
    rem -= e[v];
    if (rem < 0.0) return v;
  }
  for (int64_t v = hi - 1; v > lo; --v) {
    if (e[v] > 0.0f) return v;
  }
  return lo;
}

}  // namespace

torch::Tensor gumbel_sample(const torch::Tensor& z, int64_t k, int64_t seed, int64_t row_offset,
                            double softcap, double temperature) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.scalar_type() == torch::kFloat,
              "gumbel_sample: z must be a 2-d float32 CPU tensor");
  TORCH_CHECK(k >= 1, "gumbel_sample: k must be >= 1");
  TORCH_CHECK(temperature > 0.0, "gumbel_sample: temperature must be > 0");
  const torch::Tensor zc = z.stride(1) == 1 ? z : z.contiguous();
  const int64_t C = zc.size(0), V = zc.size(1), stride = zc.stride(0);
  auto out = torch::empty({C, k}, zc.options().dtype(torch::kLong));
  if (C == 0) return out;
  TORCH_CHECK(V >= 1, "gumbel_sample: the vocabulary is empty");
  const float* zp = zc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const bool has_cap = softcap > 0.0;
  const float cap = has_cap ? static_cast<float>(softcap) : 1.0f;
  const float inv_cap = has_cap ? static_cast<float>(1.0 / softcap) : 1.0f;
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const uint64_t key = static_cast<uint64_t>(seed);
  const int64_t nb = (V + SB - 1) / SB;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V);
    std::vector<double> cum(nb);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = zp + r * stride;
      const float zmax = row_max(row, V);
      const float m = has_cap ? transform<true>(zmax, cap, inv_cap, inv_temp)
                              : transform<false>(zmax, cap, inv_cap, inv_temp);
      double total = 0.0;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t lo = b * SB, n = std::min(SB, V - lo);
        total += has_cap ? exp_block<true>(row + lo, e.data() + lo, n, m, cap, inv_cap, inv_temp)
                         : exp_block<false>(row + lo, e.data() + lo, n, m, cap, inv_cap,
                                            inv_temp);
        cum[b] = total;
      }
      const uint64_t grow = static_cast<uint64_t>(r + row_offset);
      for (int64_t j = 0; j < k; ++j) {
        const double target = uniform(key, grow, static_cast<uint64_t>(j)) * total;
        int64_t b = std::upper_bound(cum.begin(), cum.end(), target) - cum.begin();
        b = std::min(b, nb - 1);
        const double before = b > 0 ? cum[b - 1] : 0.0;
        op[r * k + j] = scan_block(e.data(), b * SB, std::min(V, (b + 1) * SB), target - before);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gumbel_sample", &gumbel_sample,
        "K samples per row of softmax(softcap tanh(z / softcap) / temperature), by inverting "
        "the row's cumulative distribution; a pure function of (seed, global row, k)",
        pybind11::arg("z"), pybind11::arg("k"), pybind11::arg("seed"),
        pybind11::arg("row_offset"), pybind11::arg("softcap"), pybind11::arg("temperature"));
}
