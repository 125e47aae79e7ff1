// Row kernels of the fused loss head on the CPU: the contract of kernels/loss_rows.py and
// fastft/ops/loss_rows_torch.py, one pass over each row of a chunk of logits.
//
// z [C, V] is float32 with unit column stride (row stride given). The loss sees the
// transformed logits s = softcap tanh(z / softcap) / temperature (softcap 0: z / temperature).
//
// - row_stats: lse = logsumexp(s), s at J indices per row (0 where an index is outside
//   [0, V)), optionally sum_v s_v and the entropy of softmax(s). The row is swept in blocks
//   of BLOCK entries: the block's maximum (the running maximum of the online logsumexp is
//   raised once per block), then one exp per entry.
// - row_grad: dz = (c p + u - sum_j w_j e_{idx_j} - lam p_ref) ds/dz with p = exp(s - lse),
//   written to out in the same pass (out may be z itself: each entry is read before it is
//   written; ds/dz at the gathered entries is read before the pass); with a reference row,
//   also KL(p_ref || p) per row.
//
// The per-entry loops run eight lanes at a time (GCC vector extensions) with the polynomial
// exp and tanh below (about 1 ulp); row tails run the same math on scalars. Math is fp32 per
// entry, sums across blocks in double; row offsets are int64. Rows run in parallel over
// ATen's thread pool.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t BLOCK = 512;  // entries per block of the online logsumexp (and per KL partial)
constexpr float INF = std::numeric_limits<float>::infinity();

// Eight fp32 lanes (GCC vector extensions: one AVX register, or two SSE ones). The math
// below is written once for F = float (row tails, single entries) and F = f8.
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
inline float hsum(f8 v) {
  float s = 0.0f;
  for (int64_t j = 0; j < W; ++j) s += v[j];
  return s;
}
inline float hmax(f8 v) {
  float m = v[0];
  for (int64_t j = 1; j < W; ++j) m = v[j] > m ? v[j] : m;
  return m;
}
template <class F> inline F vmax(F a, F b) { return a < b ? b : a; }

// exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by the Cephes expf
// polynomial: within 2 ulp. 0 below -87 (where 2^n leaves the normal range), inf above 88
// (where it would pass 2^127), NaN stays NaN.
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
  const I e = ((bits - 0x4B400000 + 127) & 0xFF) << 23;  // 2^n
  F scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const F out = y * scale;
  return x < splat<F>(-87.0f) ? splat<F>(0.0f) : (x > splat<F>(88.0f) ? splat<F>(INF) : out);
}

// tanh: an odd polynomial below |x| = 0.625 (Cephes tanhf), else 1 - 2 / (exp(2|x|) + 1)
// with the sign of x.
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

struct Transform {
  float cap, inv_cap, inv_temp;
  bool has_cap;
  // s = cap tanh(z / cap) / temperature (HAS_CAP), else z / temperature
  template <bool HAS_CAP, class F> F apply(F z) const {
    if (HAS_CAP) return ftanh(z * inv_cap) * (cap * inv_temp);
    return z * inv_temp;
  }
  float operator()(float z) const { return has_cap ? apply<true>(z) : apply<false>(z); }
};

Transform make_transform(double softcap, double temperature) {
  const bool has_cap = softcap > 0.0;
  return Transform{static_cast<float>(has_cap ? softcap : 1.0),
                   static_cast<float>(has_cap ? 1.0 / softcap : 1.0),
                   static_cast<float>(1.0 / temperature), has_cap};
}

struct RowStats {
  float lse, row_sum, entropy;
};

// One row: per block, s (kept in buf under a softcap), its maximum and sum, then one exp per
// entry against the running maximum M.
template <bool HAS_CAP, bool WANT_SUM, bool WANT_ENT>
RowStats stats_row(const float* z, int64_t V, const Transform& tf) {
  alignas(64) float buf[BLOCK];
  float M = -INF;   // running maximum of s
  double L = 0.0;   // sum_v exp(s_v - M)
  double A = 0.0;   // sum_v exp(s_v - M) (s_v - M)
  double S = 0.0;   // sum_v s_v
  for (int64_t b0 = 0; b0 < V; b0 += BLOCK) {
    const int64_t n = std::min(BLOCK, V - b0), nv = n - n % W;
    const float* x = z + b0;
    f8 mx = splat<f8>(-INF), sm = splat<f8>(0.0f);
    for (int64_t i = 0; i < nv; i += W) {
      const f8 s = tf.apply<HAS_CAP>(load8(x + i));
      if (HAS_CAP) store8(buf + i, s);
      mx = vmax(mx, s);
      if (WANT_SUM) sm += s;
    }
    float bm = hmax(mx), ss = hsum(sm);
    for (int64_t i = nv; i < n; ++i) {
      const float s = tf.apply<HAS_CAP>(x[i]);
      if (HAS_CAP) buf[i] = s;
      bm = vmax(bm, s);
      ss += s;
    }
    if (WANT_SUM) S += ss;
    if (bm > M) {
      if (L > 0.0) {
        const double alpha = std::exp(static_cast<double>(M) - bm);
        A = alpha * (A + (static_cast<double>(M) - bm) * L);
        L *= alpha;
      }
      M = bm;
    }
    if (!(M > -INF)) continue;  // nothing above -inf yet
    // s again: from buf under a softcap, else recomputed (one multiply)
    const float* sp = HAS_CAP ? buf : x;
    const float scale = HAS_CAP ? 1.0f : tf.inv_temp;
    f8 vl = splat<f8>(0.0f), va = splat<f8>(0.0f);
    for (int64_t i = 0; i < nv; i += W) {
      const f8 d = load8(sp + i) * scale - M;
      const f8 e = fexp(d);
      vl += e;
      if (WANT_ENT) va += e * d;
    }
    float l = hsum(vl), a = hsum(va);
    for (int64_t i = nv; i < n; ++i) {
      const float d = sp[i] * scale - M;
      const float e = fexp(d);
      l += e;
      if (WANT_ENT) a += e * d;
    }
    L += l;
    A += a;
  }
  const double logL = std::log(L);
  return RowStats{static_cast<float>(M + logL), static_cast<float>(S),
                  static_cast<float>(logL - A / L)};
}

template <bool HAS_CAP, bool WANT_SUM, bool WANT_ENT>
void stats_rows(const float* zp, int64_t C, int64_t V, int64_t sz, const int64_t* idx,
                int64_t J, const Transform& tf, float* lse, float* gath, float* rsum,
                float* ent) {
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* z = zp + r * sz;
      const RowStats st = stats_row<HAS_CAP, WANT_SUM, WANT_ENT>(z, V, tf);
      lse[r] = st.lse;
      if (WANT_SUM) rsum[r] = st.row_sum;
      if (WANT_ENT) ent[r] = st.entropy;
      for (int64_t j = 0; j < J; ++j) {
        const int64_t v = idx[r * J + j];
        gath[r * J + j] = (v >= 0 && v < V) ? tf.apply<HAS_CAP>(z[v]) : 0.0f;
      }
    }
  });
}

template <bool HAS_CAP>
void stats_dispatch(bool want_sum, bool want_ent, const float* zp, int64_t C, int64_t V,
                    int64_t sz, const int64_t* idx, int64_t J, const Transform& tf, float* lse,
                    float* gath, float* rsum, float* ent) {
  if (want_sum && want_ent) {
    stats_rows<HAS_CAP, true, true>(zp, C, V, sz, idx, J, tf, lse, gath, rsum, ent);
  } else if (want_sum) {
    stats_rows<HAS_CAP, true, false>(zp, C, V, sz, idx, J, tf, lse, gath, rsum, ent);
  } else if (want_ent) {
    stats_rows<HAS_CAP, false, true>(zp, C, V, sz, idx, J, tf, lse, gath, rsum, ent);
  } else {
    stats_rows<HAS_CAP, false, false>(zp, C, V, sz, idx, J, tf, lse, gath, rsum, ent);
  }
}

void check_rows(const torch::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.scalar_type() == torch::kFloat &&
                  (z.size(1) <= 1 || z.stride(1) == 1),
              name, " must be a 2-d float32 CPU tensor with unit column stride");
}

void check_vec(const torch::Tensor& t, int64_t n, torch::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.is_contiguous() &&
                  t.numel() == n,
              name, " must be a contiguous CPU tensor of ", n, " elements of type ", dt);
}

struct GradArgs {
  const float* z;
  int64_t sz;
  float* out;
  int64_t so;
  int64_t V;
  const float *lse, *c, *u, *w;
  const int64_t* idx;
  int64_t J;
  const float *zr, *lse_r, *lam;
  int64_t szr;
  float* kl;
};

// ds/dz (c p + u - lam p_ref) at logits x (and reference logits xr); adds
// p_ref (log p_ref - log p) to kl.
template <bool HAS_CAP, bool HAS_REF, class F>
inline F grad_entry(F x, F xr, const Transform& tf, float lse, float c, float u, float lse_r,
                    float lam, F& kl) {
  F s, chain;
  if (HAS_CAP) {
    const F t = ftanh(x * tf.inv_cap);
    s = t * (tf.cap * tf.inv_temp);
    chain = (1.0f - t * t) * tf.inv_temp;
  } else {
    s = x * tf.inv_temp;
    chain = splat<F>(tf.inv_temp);
  }
  const F log_p = s - lse;
  F d = c * fexp(log_p) + u;
  if (HAS_REF) {
    const F log_pr = tf.apply<HAS_CAP>(xr) - lse_r;
    const F pr = fexp(log_pr);
    kl += pr * (log_pr - log_p);
    d -= lam * pr;
  }
  return d * chain;
}

// One pass per row: dz = (c p + u - lam p_ref) ds/dz entry by entry (z may be overwritten as
// it goes), then the gathered terms -w_j ds/dz at idx_j, whose ds/dz was read beforehand.
template <bool HAS_CAP, bool HAS_REF, bool STORE>
void grad_rows(const GradArgs& g, int64_t C, const Transform& tf) {
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> chain_j(STORE ? g.J : 0);
    for (int64_t r = begin; r < end; ++r) {
      const float* z = g.z + r * g.sz;
      const float lse = g.lse[r], c = g.c[r], u = g.u[r];
      const float lse_r = HAS_REF ? g.lse_r[r] : 0.0f;
      const float lam = HAS_REF ? g.lam[r] : 0.0f;
      const float* zr = HAS_REF ? g.zr + r * g.szr : z;
      float* out = STORE ? g.out + r * g.so : nullptr;
      const int64_t* idx = g.idx + r * g.J;
      const float* w = g.w + r * g.J;
      if (STORE) {
        for (int64_t j = 0; j < g.J; ++j) {
          const int64_t v = idx[j];
          float ch = tf.inv_temp;
          if (HAS_CAP && v >= 0 && v < g.V) {
            const float t = ftanh(z[v] * tf.inv_cap);
            ch = (1.0f - t * t) * tf.inv_temp;
          }
          chain_j[j] = ch;
        }
      }
      double kl = 0.0;
      for (int64_t b0 = 0; b0 < g.V; b0 += BLOCK) {
        const int64_t n = std::min(BLOCK, g.V - b0), nv = n - n % W;
        f8 vkl = splat<f8>(0.0f);
        for (int64_t i = b0; i < b0 + nv; i += W) {
          const f8 xr = HAS_REF ? load8(zr + i) : f8{};
          const f8 d = grad_entry<HAS_CAP, HAS_REF>(load8(z + i), xr, tf, lse, c, u,
                                                          lse_r, lam, vkl);
          if (STORE) store8(out + i, d);
        }
        float klb = hsum(vkl);
        for (int64_t i = b0 + nv; i < b0 + n; ++i) {
          const float d = grad_entry<HAS_CAP, HAS_REF>(z[i], HAS_REF ? zr[i] : 0.0f, tf,
                                                             lse, c, u, lse_r, lam, klb);
          if (STORE) out[i] = d;
        }
        kl += klb;
      }
      if (STORE) {
        for (int64_t j = 0; j < g.J; ++j) {
          const int64_t v = idx[j];
          if (v >= 0 && v < g.V) out[v] -= w[j] * chain_j[j];
        }
      }
      if (HAS_REF) g.kl[r] = static_cast<float>(kl);
    }
  });
}

template <bool HAS_CAP>
void grad_dispatch(const GradArgs& g, int64_t C, const Transform& tf, bool has_ref, bool store) {
  if (has_ref) {
    store ? grad_rows<HAS_CAP, true, true>(g, C, tf) : grad_rows<HAS_CAP, true, false>(g, C, tf);
  } else if (store) {
    grad_rows<HAS_CAP, false, true>(g, C, tf);
  }
}

}  // namespace

// (lse [C], gathered [C, J], row_sum [C] or [0], entropy [C] or [0]), float32.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> row_stats(
    const torch::Tensor& z, const torch::Tensor& idx, double softcap, double temperature,
    bool want_sum, bool want_entropy) {
  check_rows(z, "row_stats: z");
  const int64_t C = z.size(0), V = z.size(1);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == C, "row_stats: idx must be [C, J]");
  check_vec(idx, idx.numel(), torch::kLong, "row_stats: idx");
  TORCH_CHECK(temperature > 0.0, "row_stats: temperature must be > 0");
  const int64_t J = idx.size(1);
  const auto f32 = z.options();
  auto lse = torch::empty({C}, f32);
  auto gath = torch::empty({C, J}, f32);
  auto rsum = torch::empty({want_sum ? C : 0}, f32);
  auto ent = torch::empty({want_entropy ? C : 0}, f32);
  if (C == 0) return {lse, gath, rsum, ent};
  const Transform tf = make_transform(softcap, temperature);
  const float* zp = z.data_ptr<float>();
  const int64_t sz = z.stride(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  float *l = lse.data_ptr<float>(), *g = gath.data_ptr<float>();
  float* s = want_sum ? rsum.data_ptr<float>() : nullptr;
  float* e = want_entropy ? ent.data_ptr<float>() : nullptr;
  if (tf.has_cap) {
    stats_dispatch<true>(want_sum, want_entropy, zp, C, V, sz, ip, J, tf, l, g, s, e);
  } else {
    stats_dispatch<false>(want_sum, want_entropy, zp, C, V, sz, ip, J, tf, l, g, s, e);
  }
  return {lse, gath, rsum, ent};
}

// Writes dz into out (when given; it may be z itself). Returns KL(p_ref || p) [C] with a
// reference row (zr, lse_r, lam), else an empty tensor.
torch::Tensor row_grad(const torch::Tensor& z, const torch::Tensor& lse, const torch::Tensor& c,
                       const torch::Tensor& u, const torch::Tensor& idx, const torch::Tensor& w,
                       std::optional<torch::Tensor> out, double softcap, double temperature,
                       std::optional<torch::Tensor> zr, std::optional<torch::Tensor> lse_r,
                       std::optional<torch::Tensor> lam) {
  check_rows(z, "row_grad: z");
  const int64_t C = z.size(0), V = z.size(1);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == C, "row_grad: idx must be [C, J]");
  const int64_t J = idx.size(1);
  check_vec(idx, C * J, torch::kLong, "row_grad: idx");
  check_vec(w, C * J, torch::kFloat, "row_grad: w");
  check_vec(lse, C, torch::kFloat, "row_grad: lse");
  check_vec(c, C, torch::kFloat, "row_grad: c");
  check_vec(u, C, torch::kFloat, "row_grad: u");
  TORCH_CHECK(temperature > 0.0, "row_grad: temperature must be > 0");
  const bool has_ref = zr.has_value();
  const bool store = out.has_value();
  GradArgs g{};
  g.z = z.data_ptr<float>();
  g.sz = z.stride(0);
  g.V = V;
  g.lse = lse.data_ptr<float>();
  g.c = c.data_ptr<float>();
  g.u = u.data_ptr<float>();
  g.w = w.data_ptr<float>();
  g.idx = idx.data_ptr<int64_t>();
  g.J = J;
  if (store) {
    check_rows(*out, "row_grad: out");
    TORCH_CHECK(out->size(0) == C && out->size(1) == V, "row_grad: out must be [C, V]");
    g.out = out->data_ptr<float>();
    g.so = out->stride(0);
  }
  torch::Tensor kl = torch::empty({has_ref ? C : 0}, z.options());
  if (has_ref) {
    TORCH_CHECK(lse_r.has_value() && lam.has_value(),
                "row_grad: a reference row needs zr, lse_r and lam");
    check_rows(*zr, "row_grad: zr");
    TORCH_CHECK(zr->size(0) == C && zr->size(1) == V, "row_grad: zr must be [C, V]");
    check_vec(*lse_r, C, torch::kFloat, "row_grad: lse_r");
    check_vec(*lam, C, torch::kFloat, "row_grad: lam");
    g.zr = zr->data_ptr<float>();
    g.szr = zr->stride(0);
    g.lse_r = lse_r->data_ptr<float>();
    g.lam = lam->data_ptr<float>();
    g.kl = kl.data_ptr<float>();
  }
  if (C == 0 || (!store && !has_ref)) return kl;
  const Transform tf = make_transform(softcap, temperature);
  if (tf.has_cap) {
    grad_dispatch<true>(g, C, tf, has_ref, store);
  } else {
    grad_dispatch<false>(g, C, tf, has_ref, store);
  }
  return kl;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_stats", &row_stats,
        "Per row of z: logsumexp, gathered entries, optional row sum and entropy",
        pybind11::arg("z"), pybind11::arg("idx"), pybind11::arg("softcap"),
        pybind11::arg("temperature"), pybind11::arg("want_sum"), pybind11::arg("want_entropy"));
  m.def("row_grad", &row_grad,
        "dz = (c p + u - sum_j w_j e_idx_j - lam p_ref) ds/dz per row; KL(p_ref || p)",
        pybind11::arg("z"), pybind11::arg("lse"), pybind11::arg("c"), pybind11::arg("u"),
        pybind11::arg("idx"), pybind11::arg("w"), pybind11::arg("out"),
        pybind11::arg("softcap"), pybind11::arg("temperature"), pybind11::arg("zr"),
        pybind11::arg("lse_r"), pybind11::arg("lam"));
}
