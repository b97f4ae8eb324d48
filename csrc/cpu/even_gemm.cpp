// The windowed loss's even transforms for small 2D windows on the CPU, as matrix products.
//
// Auto pairs only (see stats_loss_driver.cpp's even_gradient_path): the forward pass needs, on the
// window's lags, D(r) = (1 / (m_0 m_1)) sum_k P(k) cos(2 pi k.r / m) with P = |X|^2 - |T|^2 real
// and even, and the backward pass Re(G)(k) = sum_r g(r) cos(2 pi k.r / m) for the window gradient
// g on every bin of the half spectrum. With cos(a + b) = cos a cos b - sin a sin b both are two
// separable products with cosine and sine tables, and folding each axis onto its non-negative half
// (cos even, sin odd) halves every contraction:
//   forward:  Pe(k_0) = P(k_0) + P(-k_0), Po(k_0) = P(k_0) - P(-k_0) over k_0 <= m_0 / 2; then
//             Ce = cos0 . Pe, So = sin0 . Po over the window's rows r_0 >= 0, and along the half
//             axis (weights c(k_1): 1 for the bins without a partner in the half spectrum, else 2)
//             T1 = Ce . c cos1, T2 = So . c sin1 for r_1 >= 0: D(r_0, -r_1) = T1 + T2,
//             D(r_0, r_1) = T1 - T2.
//   backward: g folded over the four sign combinations of (r_0, r_1): Gee (even in both) and Goo
//             (odd in both; the mixed parts drop out of the real part); U = Gee . cos1,
//             V = Goo . sin1 for every k_1 of the half axis, then E = cos0 . U, F = sin0 . V for
//             k_0 <= m_0 / 2: Re(G)(k_0, k_1) = E - F and Re(G)(-k_0, k_1) = E + F.
// Each contraction is one batched GEMM over the whole chunk (bmm of the cosine and the sine
// halves). Against the pruned transforms of the general path (stats_loss_driver.cpp) this drops
// the transposing passes and the many small ATen calls around them; it does more arithmetic, in
// proportion to the window's rows, so the driver takes it for small windows only (measured: see
// even_gemm_applies).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>
#include <vector>

#include "cpu/cpu_loops.h"
#include "cpu/trig_tables.h"
#include "spectral.h"
#include "two_point.h"

namespace pymks_vae {
namespace {

// (2, rows, cols): [0][i][j] = wt(i) cos(2 pi a(i, j) / m) and [1] the sine, with the phase
// k r reduced mod m in integers first (exact for any size), from one table of m angles.
template <typename T, typename Phase, typename Weight>
at::Tensor trig_pair(int64_t rows, int64_t cols, int64_t m, Phase&& phase, Weight&& wt, const at::TensorOptions& o) {
  const cpu::UnitCircle u(m);
  const std::vector<double>&c = u.c, &s = u.s;
  auto out = at::empty({2, rows, cols}, o);
  T* p = out.data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t a = phase(i, j) % m;
      const double w = wt(i, j);
      p[i * cols + j] = static_cast<T>(w * c[a]);
      p[(rows + i) * cols + j] = static_cast<T>(w * s[a]);
    }
  return out;
}

// Weight of bin k of a half axis of length m in a sum over the whole axis: 2 where -k is not kept.
inline double half_weight(int64_t k, int64_t m) { return (k == 0 || 2 * k == m) ? 1.0 : 2.0; }

// The four tables of the products (see the top of this file): the forward pass's a0 (cos, sin of
// r_0 k_0; R0 x H0) and a1 (norm * c(k_1) times cos, sin of k_1 r_1; R1 x h1), the backward pass's
// b1 (R1 x h1) and b0 (H0 x R0).
enum class Table { kA0, kA1, kB1, kB0 };

// A table of a geometry, built once and kept: they depend on the sizes and the dtype only, and
// building them (sines and cosines of every angle) took 16 us of a 64^2 forward pass. Shared
// read-only by every caller; the cache is cleared when it holds 256 tables.
template <typename T>
at::Tensor trig_table(Table which, const Geometry& g, const at::TensorOptions& o) {
  const int64_t m0 = g.m[0], m1 = g.m[1], h1 = m1 / 2 + 1, H0 = m0 / 2 + 1;
  const int64_t R0 = even_rows(g.w[0]), R1 = g.w[1] / 2 + 1;
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int>;
  const Key key{static_cast<int>(which), m0, m1, R0, R1, static_cast<int>(o.dtype().toScalarType())};
  static auto* cache = new cpu::TableCache<Key>(256);  // never destroyed, as device_table's
  return cache->get(key, [&] {
    auto times = [](int64_t a, int64_t b) { return a * b; };
    auto one = [](int64_t, int64_t) { return 1.0; };
    switch (which) {
      case Table::kA0:
        return trig_pair<T>(R0, H0, m0, times, one, o);
      case Table::kA1: {
        const double norm = 1.0 / (static_cast<double>(m0) * static_cast<double>(m1));
        return trig_pair<T>(R1, h1, m1, times, [&](int64_t, int64_t k) { return norm * half_weight(k, m1); }, o);
      }
      case Table::kB1:
        return trig_pair<T>(R1, h1, m1, times, one, o);
      case Table::kB0:
        break;
    }
    return trig_pair<T>(H0, R0, m0, times, one, o);
  });
}

// The two elementwise passes are compiled twice, for AVX2 + FMA (taken where the CPU has them)
// and for the build's baseline: measured at 64^2 cutoff 7, the folding pass took 40-45 us with
// AVX2 against 49-50 us without, the gradient's product 30-32 against 35-57 us.
#define PVAE_ALWAYS_INLINE inline __attribute__((always_inline))
#ifdef PVAE_X86
#define PVAE_AVX2 __attribute__((target("avx2,fma")))
#else
#define PVAE_AVX2
#endif

thread_local bool tl_even_simd = true;

bool use_avx2() {
#ifdef PVAE_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has && tl_even_simd;
#else
  return false;
#endif
}

// Pe and Po rows of one task (see even_values_t) from rows k_0 and its mirror kp of the power
// |X|^2 - |T|^2 (spectral.h's auto_difference), or |X|^2 alone without a target.
template <bool kDiff, typename T>
PVAE_ALWAYS_INLINE void fold_rows(const cpx<T>* __restrict__ x0, const cpx<T>* __restrict__ t0,
                                  const cpx<T>* __restrict__ x1, const cpx<T>* __restrict__ t1, bool self, int64_t h1,
                                  T* __restrict__ pe, T* __restrict__ po) {
  auto power = [](const cpx<T>* x, const cpx<T>* t, int64_t k) {
    if constexpr (kDiff) return auto_difference(x[k], t[k]);
    return cnorm2(x[k]);
  };
  if (self) {
    for (int64_t k = 0; k < h1; ++k) {
      pe[k] = power(x0, t0, k);
      po[k] = T(0);
    }
  } else {
    for (int64_t k = 0; k < h1; ++k) {
      const T p = power(x0, t0, k), q = power(x1, t1, k);
      pe[k] = p + q;
      po[k] = p - q;
    }
  }
}

template <typename T>
struct FoldArgs {
  const cpx<T>* x;
  const cpx<T>* t;  // null without a target
  T* fold;          // (2, H0, N, h1)
  const int32_t* idx;
  int64_t m0, h1, H0, N, na, nf;
};

// Pe and Po of fields [begin, end) (see even_values_t).
struct FoldFields {
  template <typename T>
  static PVAE_ALWAYS_INLINE void run(const FoldArgs<T>& a, int64_t begin, int64_t end) {
    const int64_t m0 = a.m0, h1 = a.h1, N = a.N, half_fold = a.N * a.H0 * a.h1;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = ((row / a.na) * a.nf + a.idx[row % a.na]) * m0 * h1;
      for (int64_t k0 = 0; k0 < a.H0; ++k0) {
        const int64_t kp = k0 == 0 ? 0 : m0 - k0;
        const int64_t at0 = base + k0 * h1, at1 = base + kp * h1;
        T* pe = a.fold + (k0 * N + row) * h1;
        T* po = pe + half_fold;
        if (a.t != nullptr)
          fold_rows<true>(a.x + at0, a.t + at0, a.x + at1, a.t + at1, kp == k0, h1, pe, po);
        else
          fold_rows<false, T>(a.x + at0, nullptr, a.x + at1, nullptr, kp == k0, h1, pe, po);
      }
    }
  }
};

template <typename T>
struct GradOutArgs {
  const cpx<T>* x;
  const T* ef;  // (2, H0, N, h1)
  cpx<T>* out;
  T factor;
  int64_t m0, h1, H0, N;
};

// 2 Re(G) X of fields [begin, end) in the natural layout (see even_gradient_t).
struct GradOut {
  template <typename T>
  static PVAE_ALWAYS_INLINE void run(const GradOutArgs<T>& a, int64_t begin, int64_t end) {
    const int64_t m0 = a.m0, h1 = a.h1, H0 = a.H0, N = a.N, half_ef = a.N * a.H0 * a.h1;
    for (int64_t row = begin; row < end; ++row)
      for (int64_t k0 = 0; k0 < m0; ++k0) {
        const bool low = k0 < H0;
        const int64_t kf = low ? k0 : m0 - k0;
        const T* __restrict__ e = a.ef + (kf * N + row) * h1;
        const T* __restrict__ f = e + half_ef;
        const cpx<T>* __restrict__ x = a.x + (row * m0 + k0) * h1;
        cpx<T>* __restrict__ o = a.out + (row * m0 + k0) * h1;
        const T sgn = low ? T(-1) : T(1);
        for (int64_t k = 0; k < h1; ++k) o[k] = cscale(x[k], a.factor * (e[k] + sgn * f[k]));
      }
  }
};

// Pass::run over fields [0, n), one task per field, in the AVX2 + FMA build where use_avx2() and
// the baseline build otherwise (Pass::run is inlined into each).
template <typename Pass, typename Args>
void fields_baseline(const Args& a, int64_t begin, int64_t end) {
  Pass::run(a, begin, end);
}

template <typename Pass, typename Args>
PVAE_AVX2 void fields_avx2(const Args& a, int64_t begin, int64_t end) {
  Pass::run(a, begin, end);
}

template <typename Pass, typename Args>
void for_fields(const Args& a, int64_t n) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    if (avx2)
      fields_avx2<Pass>(a, begin, end);
    else
      fields_baseline<Pass>(a, begin, end);
  });
}

template <typename T>
at::Tensor even_values_t(const at::Tensor& xh, const at::Tensor& th, const std::vector<int32_t>& idx,
                         const Geometry& g) {
  const int64_t n = xh.size(0), nf = xh.size(1), na = static_cast<int64_t>(idx.size());
  const int64_t m0 = g.m[0], m1 = g.m[1], h1 = m1 / 2 + 1, H0 = m0 / 2 + 1;
  const int64_t R0 = even_rows(g.w[0]), R1 = g.w[1] / 2 + 1, N = n * na;
  const auto ro = xh.options().dtype(c10::toRealValueType(xh.scalar_type()));
  // Pe and Po, (2, H0, N, h1): k_0 outermost, so that each contraction over k_0 is one GEMM of
  // the whole chunk (a batch of per-sample products took 1.4x as long, measured at 64^2, N = 32).
  auto fold = at::empty({2, H0, N, h1}, ro);
  const auto* X = reinterpret_cast<const cpx<T>*>(xh.data_ptr());
  const auto* Tt = th.defined() ? reinterpret_cast<const cpx<T>*>(th.data_ptr()) : nullptr;
  T* F = fold.data_ptr<T>();
  // One task per field (sample and state), its rows k_0 in a loop: no divisions per row.
  for_fields<FoldFields>(FoldArgs<T>{X, Tt, F, idx.data(), m0, h1, H0, N, na, nf}, N);
  const at::Tensor a0 = trig_table<T>(Table::kA0, g, ro);
  const at::Tensor a1 = trig_table<T>(Table::kA1, g, ro);
  const at::Tensor s1 = at::bmm(a0, fold.view({2, H0, N * h1}));  // (2, R0, N h1)
  // The second product transposed, a1 . s1^T (2, R1, R0 N): with the short axis R1 as its rows
  // it took half the time of s1 . a1^T (measured at 64^2 cutoff 7: 11-13 against 20-29 us).
  const at::Tensor s2 = at::bmm(a1, s1.view({2, R0 * N, h1}).transpose(1, 2)).contiguous();
  // Into the pruned even layout of spectral.h, (n, na, R0, m_1) holding D(r_0, -c) at column c:
  // c = r_1 takes T1 + T2 and c = m_1 - r_1 takes T1 - T2; columns off the window are zero.
  auto out = at::empty({n, na, R0, m1}, ro);
  const T* S = s2.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t RN = R0 * N, half = R1 * RN;
  for (int64_t row = 0; row < N; ++row)
    for (int64_t r0 = 0; r0 < R0; ++r0) {
      const T* u1 = S + r0 * N + row;  // T1 at r_1: u1[r_1 * RN]
      const T* u2 = u1 + half;
      T* o = O + (row * R0 + r0) * m1;
      o[0] = u1[0] + u2[0];
      for (int64_t c = R1; c <= m1 - R1; ++c) o[c] = T(0);
      for (int64_t r1 = 1; r1 < R1; ++r1) {
        o[r1] = u1[r1 * RN] + u2[r1 * RN];
        o[m1 - r1] = u1[r1 * RN] - u2[r1 * RN];
      }
    }
  return out.view({n, na, R0 * m1});
}

template <typename T>
at::Tensor even_gradient_t(const at::Tensor& gw, const at::Tensor& xh, const std::vector<int32_t>& pair_of,
                           const Geometry& g, T factor) {
  const int64_t n = xh.size(0), nu = xh.size(1), nq = gw.size(1);
  const int64_t m0 = g.m[0], m1 = g.m[1], h1 = m1 / 2 + 1, H0 = m0 / 2 + 1;
  const int64_t w0 = g.w[0], w1 = g.w[1], hw0 = w0 / 2, hw1 = w1 / 2, R0 = hw0 + 1, R1 = hw1 + 1;
  const int64_t N = n * nu;
  const auto ro = gw.options();
  // Gee and Goo, (2, R0, N, R1) (r_0 outermost: one GEMM per contraction, as the forward). A lag
  // outside the window (lag w/2 of an even window) counts as zero.
  auto fold = at::empty({2, R0, N, R1}, ro);
  const T* Gw = gw.data_ptr<T>();
  T* Fd = fold.data_ptr<T>();
  const int64_t half = N * R0 * R1;
  for (int64_t row = 0; row < N; ++row) {
    const T* win = Gw + ((row / nu) * nq + pair_of[row % nu]) * w0 * w1;
    auto val = [&](int64_t r0, int64_t r1) -> T {
      return (r0 < w0 - hw0 && r1 < w1 - hw1) ? win[(r0 + hw0) * w1 + r1 + hw1] : T(0);
    };
    for (int64_t r0 = 0; r0 < R0; ++r0)
      for (int64_t r1 = 0; r1 < R1; ++r1) {
        const T pp = val(r0, r1), mp = val(-r0, r1), pm = val(r0, -r1), mm = val(-r0, -r1);
        T ee, oo = T(0);
        if (r0 == 0 && r1 == 0)
          ee = pp;
        else if (r0 == 0)
          ee = pp + pm;
        else if (r1 == 0)
          ee = pp + mp;
        else {
          ee = (pp + mm) + (mp + pm);
          oo = (pp + mm) - (mp + pm);
        }
        Fd[(r0 * N + row) * R1 + r1] = ee;
        Fd[half + (r0 * N + row) * R1 + r1] = oo;
      }
  }
  const at::Tensor b1 = trig_table<T>(Table::kB1, g, ro);
  const at::Tensor b0 = trig_table<T>(Table::kB0, g, ro);
  const at::Tensor u = at::bmm(fold.view({2, R0 * N, R1}), b1);           // (2, R0 N, h1)
  const at::Tensor ef = at::bmm(b0, u.view({2, R0, N * h1})).contiguous();  // (2, H0, N h1)
  // 2 Re(G) X in the natural layout: row k_0 < H0 takes E - F, its mirror m_0 - k_0 takes E + F.
  auto out = at::empty_like(xh);
  const auto* X = reinterpret_cast<const cpx<T>*>(xh.data_ptr());
  auto* O = reinterpret_cast<cpx<T>*>(out.data_ptr());
  const T* E = ef.data_ptr<T>();
  for_fields<GradOut>(GradOutArgs<T>{X, E, O, factor, m0, h1, H0, N}, N);
  return out;
}

thread_local bool tl_even_gemm = true;

}  // namespace

bool set_even_simd(bool enabled) {
  const bool prev = tl_even_simd;
  tl_even_simd = enabled;
  return prev;
}

bool set_even_gemm(bool enabled) {
  const bool prev = tl_even_gemm;
  tl_even_gemm = enabled;
  return prev;
}

// The products cost about R m^2 per field (R a window's folded rows, m the grid's side), the
// pruned transforms about m^2 log m plus their per-call overhead. Alternated call by call against
// them on the 2-core AMD EPYC (one thread, 32 fields, forward + backward): 0.86-0.90x the time at
// 64^2 cutoff 7 (R = 8) and 0.87-0.95x at 224^2 cutoff 20 (R = 21), level at 224^2 cutoffs 27 and
// 40, 1.06x at cutoff 56 (R = 57); faster too at 64^2 cutoffs 10 and 15 and on 101^2 over the
// whole window (R = 51, 0.92x), where the transforms' overhead weighs more. Hence a bound that
// grows with log m, R <= 4 log2(m) + 8 (39 rows at 224, 32 at 64, 34 at 101): it leaves some of
// those faster cases to the transforms rather than risk slower ones.
bool even_gemm_applies(const Geometry& g) {
  if (!tl_even_gemm || g.ndim != 2) return false;
  auto fits = [](int64_t rows, int64_t m) { return rows <= 4.0 * std::log2(static_cast<double>(m)) + 8.0; };
  return fits(even_rows(g.w[0]), g.m[0]) && fits(g.w[1] / 2 + 1, g.m[1]);
}

at::Tensor even_values_gemm_cpu(const at::Tensor& x_hat, const at::Tensor& t_hat, const std::vector<int32_t>& idx,
                                const Geometry& g) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(c10::toRealValueType(x_hat.scalar_type()), "even_values_gemm",
                             [&] { out = even_values_t<scalar_t>(x_hat, t_hat, idx, g); });
  return out;
}

at::Tensor even_gradient_gemm_cpu(const at::Tensor& grad_window, const at::Tensor& x_hat,
                                  const std::vector<int32_t>& pair_of, const Geometry& g, double factor) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(grad_window.scalar_type(), "even_gradient_gemm", [&] {
    out = even_gradient_t<scalar_t>(grad_window.contiguous(), x_hat, pair_of, g, static_cast<scalar_t>(factor));
  });
  return out;
}

}  // namespace pymks_vae
