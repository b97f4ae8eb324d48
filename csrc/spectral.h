// Arithmetic shared by the CPU and CUDA kernels of pymks-vae.
//
// Every function here is __host__ __device__: the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda) call the same helpers, so a test of the CPU path exercises the arithmetic the GPU
// runs. Nothing here allocates or touches ATen.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PVAE_HD __host__ __device__ __forceinline__
#else
#define PVAE_HD inline
#endif

namespace pymks_vae {

constexpr int kMaxDims = 3;

// ------------------------------------------------------------------ complex numbers
// Layout-compatible with c10::complex<T> and std::complex<T> (re, im).
template <typename T>
struct cpx {
  T re, im;
};

template <typename T>
PVAE_HD cpx<T> cadd(cpx<T> a, cpx<T> b) { return {a.re + b.re, a.im + b.im}; }

template <typename T>
PVAE_HD cpx<T> csub(cpx<T> a, cpx<T> b) { return {a.re - b.re, a.im - b.im}; }

template <typename T>
PVAE_HD cpx<T> cscale(cpx<T> a, T s) { return {a.re * s, a.im * s}; }

// a * b
template <typename T>
PVAE_HD cpx<T> cmul(cpx<T> a, cpx<T> b) {
  return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}

// conj(a) * b: the spectrum of the correlation sum_x a(x) b(x + r).
template <typename T>
PVAE_HD cpx<T> cmul_conj(cpx<T> a, cpx<T> b) {
  return {a.re * b.re + a.im * b.im, a.re * b.im - a.im * b.re};
}

template <typename T>
PVAE_HD T cnorm2(cpx<T> a) { return a.re * a.re + a.im * a.im; }

// ------------------------------------------------------------------ geometry of lags
// n: spatial size, m: FFT grid size (n when periodic, padded otherwise), w: window of lags kept.
// The window holds lags -w/2 .. w-1-w/2 (r = 0 at index w/2, numpy's fftshift convention).
struct Geometry {
  int ndim;
  int64_t n[kMaxDims];
  int64_t m[kMaxDims];
  int64_t w[kMaxDims];
};

// Lag held at index `idx` of a window of size w.
PVAE_HD int64_t window_lag(int64_t idx, int64_t w) { return idx - w / 2; }

// Position of lag r (|r| < m) on a circular grid of size m.
PVAE_HD int64_t lag_to_grid(int64_t r, int64_t m) { return r < 0 ? r + m : r; }

// Window index whose lag sits at grid position `pos`, or -1 when that lag is outside the window.
// Requires m >= w, so each grid position holds at most one lag of the window.
PVAE_HD int64_t grid_to_window(int64_t pos, int64_t m, int64_t w) {
  const int64_t hw = w / 2;
  const int64_t r = pos <= w - 1 - hw ? pos : pos - m;
  return r < -hw ? -1 : r + hw;
}

// Number of pixel pairs at lag r along an axis of n pixels without periodic wrap.
template <typename T>
PVAE_HD T overlap_count(int64_t n, int64_t r) { return static_cast<T>(n - (r < 0 ? -r : r)); }

// Parseval weight of a bin of the last (halved) axis of a real-to-complex transform: interior
// bins stand for themselves and their mirror (2); the DC bin and, for even m, the Nyquist bin
// have no distinct mirror (1).
template <typename T>
PVAE_HD T parseval_weight(int64_t k, int64_t m) {
  return (k == 0 || 2 * k == m) ? T(1) : T(2);
}

// sum_k parseval_weight(k) * v_k over one row of K = m/2 + 1 bins, from the plain sum and the
// end values: every bin counts twice but the first and (even m) the last, whose weight is 1.
template <typename T>
PVAE_HD T parseval_row(T plain, T first, T last, int64_t K, int64_t m) {
  T v = T(2) * plain - (T(2) - parseval_weight<T>(0, m)) * first;
  if (K > 1) v -= (T(2) - parseval_weight<T>(K - 1, m)) * last;
  return v;
}

// ------------------------------------------------------------------ correlation relations
// A requested correlation is assembled from "base" correlations (computed by FFT) as
//   C_q(r) = constant * S + sum_v coef_v * sum_x x_{state_v}(x) + sum_t coef_t * C_{base_t}(+-r)
// which covers the direct case (one term), the mirror C_ji(r) = C_ij(-r) (reversed term) and the
// partition-of-unity relations, where the last state is 1 - sum of the others.
//
// Base correlations come in two forms. Auto-correlations C_aa (base < n_auto) are even, with a
// real and even spectrum |X_a|^2, so they are kept on a pruned grid (see even_index) computed
// from the half spectrum alone. Cross-correlations (base >= n_auto) are inverse transforms on the
// full grid.
struct Term {
  int32_t base;
  int32_t reversed;
  double coef;
};

struct VfTerm {
  int32_t state;  // position among the transformed states
  int32_t pad;
  double coef;
};

struct PairPlan {
  int32_t term_begin, term_end;
  int32_t vf_begin, vf_end;
  double constant;
};

// The lag-independent part of a requested correlation: constant * S + sum_v coef_v * sum x_v.
template <typename T>
PVAE_HD T pair_constant(const PairPlan& p, const VfTerm* vfs, const T* dc_b, T s_total) {
  T v = static_cast<T>(p.constant) * s_total;
  for (int32_t k = p.vf_begin; k < p.vf_end; ++k) v += static_cast<T>(vfs[k].coef) * dc_b[vfs[k].state];
  return v;
}

// An even function C(r) = C(-r) on the grid (an auto-correlation) is kept for the lags r_0 in
// [0, R0) of the first axis only, R0 = even_rows(w_0), the other axes whole: (R0, m_1, ...,
// m_{nd-1}). The element at (a_0, a_1, ..., a_{nd-1}) holds C(a_0, -a_1, ..., -a_{nd-1}): the
// transform that fills it runs forwards along the first axis and backwards along the others (see
// the driver's even_transform), which is the same as C(-a_0, a_1, ...). A lag with r_0 >= 0 is
// read at (r_0, -r_1, ...), one with r_0 < 0 at (-r_0, r_1, ...). In 1D the whole grid (m_0,)
// holds C itself.
PVAE_HD int64_t even_rows(int64_t w0) { return w0 / 2 + 1; }

// Whether, for lags sharing r_0 (and the middle axes), the stored row is read backwards along
// the last axis: when it holds C(r_0, ..., -r_last), i.e. for r_0 >= 0 in 2D and 3D.
PVAE_HD bool even_reversed(const int64_t* lag, int nd) { return nd > 1 && lag[0] >= 0; }

// Flat index of lag r (per-axis lags, |r_d| <= w_d / 2) in the pruned even layout above.
PVAE_HD int64_t even_index(const int64_t* lag, const int64_t* m, int nd) {
  if (nd == 1) return lag_to_grid(lag[0], m[0]);
  const bool flip = even_reversed(lag, nd);  // r_0 >= 0: stored at (r_0, -r_1, ...)
  int64_t pos = flip ? lag[0] : -lag[0];
  for (int d = 1; d < nd; ++d) pos = pos * m[d] + lag_to_grid(flip ? -lag[d] : lag[d], m[d]);
  return pos;
}

// Elements of one even function in that layout.
PVAE_HD int64_t even_numel(const Geometry& g) {
  if (g.ndim == 1) return g.m[0];
  int64_t n = even_rows(g.w[0]);
  for (int d = 1; d < g.ndim; ++d) n *= g.m[d];
  return n;
}

// Unnormalised value of one requested correlation at one lag, for one sample.
//   even_b: this sample's auto bases, [n_auto][even_numel] in the pruned even layout
//   full_b: this sample's cross bases, [n_base - n_auto][grid_numel]
//   dc_b:   this sample's sums over pixels of the transformed states
template <typename T>
PVAE_HD T assemble_pair(const PairPlan& p, const Term* terms, const VfTerm* vfs, const T* even_b,
                        int64_t even_numel, int64_t epos, int32_t n_auto, const T* full_b,
                        int64_t grid_numel, int64_t pos, int64_t pos_rev, const T* dc_b, T s_total) {
  T v = pair_constant(p, vfs, dc_b, s_total);
  for (int32_t k = p.term_begin; k < p.term_end; ++k) {
    const Term t = terms[k];
    const T c = static_cast<T>(t.coef);
    if (t.base < n_auto) {
      v += c * even_b[t.base * even_numel + epos];
    } else {
      v += c * full_b[(t.base - n_auto) * grid_numel + (t.reversed ? pos_rev : pos)];
    }
  }
  return v;
}

// 1 / normaliser of a lag: 1/S (periodic), 1/prod(n - |r|) (zero padded), or the mask's own
// correlation z (0 where the mask has no overlap at that lag, i.e. z <= level).
template <typename T>
PVAE_HD T inv_norm_lag(const Geometry& g, const int64_t* lag, bool periodic, T inv_s) {
  if (periodic) return inv_s;
  T c = T(1);
  for (int d = 0; d < g.ndim; ++d) c *= overlap_count<T>(g.n[d], lag[d]);
  return T(1) / c;
}

template <typename T>
PVAE_HD T inv_mask_norm(T z, T level) { return z > level ? T(1) / z : T(0); }

// The mask's own correlation on the grid, when there is a mask (z == nullptr otherwise):
// one per sample, or one shared by all (count == 1).
template <typename T>
struct MaskNorm {
  const T* z = nullptr;      // (count, grid)
  const T* level = nullptr;  // (count,)
  int64_t count = 1;
  int64_t grid = 0;
  PVAE_HD bool active() const { return z != nullptr; }
  PVAE_HD T inv(int64_t b, int64_t pos) const {
    const int64_t k = count == 1 ? 0 : b;
    return inv_mask_norm(z[k * grid + pos], level[k]);
  }
};

// Splits a flat index over `sizes` (innermost last) into idx[0..n); returns the leading rest.
PVAE_HD int64_t unravel(int64_t flat, const int64_t* sizes, int n, int64_t* idx) {
  for (int d = n - 1; d >= 0; --d) {
    idx[d] = flat % sizes[d];
    flat /= sizes[d];
  }
  return flat;
}

// ------------------------------------------------------------------ gradient assembly
// One term of the gradient spectrum of state s:  conj(G_q) X_other  when s is the first state of
// pair q (sum_x x_s(x) x_o(x + r)), and  G_q X_other  when s is its second state.
struct CombineTerm {
  int32_t pair;
  int32_t other;  // position among the transformed states
  int32_t conj;
  int32_t pad;
};

template <typename T>
PVAE_HD cpx<T> combine_bin(const CombineTerm* terms, int32_t begin, int32_t end, const cpx<T>* g_bin,
                           const cpx<T>* x_bin, int64_t stride) {
  cpx<T> acc{T(0), T(0)};
  for (int32_t k = begin; k < end; ++k) {
    const CombineTerm t = terms[k];
    const cpx<T> g = g_bin[t.pair * stride];
    const cpx<T> xo = x_bin[t.other * stride];
    acc = cadd(acc, t.conj ? cmul_conj(g, xo) : cmul(g, xo));
  }
  return acc;
}

// ------------------------------------------------------------------ fused loss (Parseval)
// For a pair (a, b) at one spectral bin: D = conj(Xa) Xb - conj(Ta) Tb. The loss adds w |D|^2;
// the gradient spectrum adds conj(D) Xb to state a and D Xa to state b.
template <typename T>
PVAE_HD cpx<T> pair_difference(cpx<T> xa, cpx<T> xb, cpx<T> ta, cpx<T> tb) {
  return csub(cmul_conj(xa, xb), cmul_conj(ta, tb));
}

// The auto-pair case a == b: D = |Xa|^2 - |Ta|^2 is real, and the two gradient terms add up to
// 2 D Xa.
template <typename T>
PVAE_HD T auto_difference(cpx<T> xa, cpx<T> ta) { return cnorm2(xa) - cnorm2(ta); }


// ------------------------------------------------------------------ windowed loss
// The general loss compares the statistics on a window of lags, with per-lag weights and either
// normalisation. Per pair q and lag r, with delta the unnormalised difference C_q(x)(r) - C_q(t)(r)
// (one inverse transform of conj(X_i) X_j - conj(T_i) T_j, not two) and inv its normaliser
// (inv_norm_lag), the loss adds w (s inv delta)^2 and its gradient with respect to C_q(x)(r) is
// 2 s^2 w inv^2 delta, which the backward pass correlates with the saved spectra. An offset (one
// per sample and pair, e.g. the difference of the centring terms of autocovariances) is subtracted
// from every lag's difference of statistics: d = s (inv delta - offset), and grad_off = dL/doffset.
template <typename T>
PVAE_HD T window_loss_lag(T delta, T inv, T off, T w, T s, T& grad, T& grad_off) {
  const T d = s * (inv * delta - off);
  grad = T(2) * w * d * s * inv;
  grad_off = T(-2) * w * d * s;
  return w * d * d;
}

// One pair of the windowed loss: an auto pair (i == j) reads its base in the pruned even layout,
// a cross pair in the pruned cross layout below.
struct WinPair {
  int32_t base;
  int32_t is_auto;
};

// The pruned cross layout keeps, of a full inverse transform, only the window on every axis but
// the last (in window order: an inverse transform along an axis is cropped to the window before
// the next axis is transformed) and the whole grid along the last axis, whose complex-to-real
// transform runs last: (w_0, .., w_{nd-2}, m_{nd-1}).
PVAE_HD int64_t cross_numel(const Geometry& g) {
  int64_t n = g.m[g.ndim - 1];
  for (int d = 0; d < g.ndim - 1; ++d) n *= g.w[d];
  return n;
}

// Flat index of the lag at window indices widx (lags lag) in the pruned cross layout.
PVAE_HD int64_t cross_index(const int64_t* widx, const int64_t* lag, const Geometry& g) {
  int64_t pos = 0;
  for (int d = 0; d < g.ndim - 1; ++d) pos = pos * g.w[d] + widx[d];
  const int last = g.ndim - 1;
  return pos * g.m[last] + lag_to_grid(lag[last], g.m[last]);
}

}  // namespace pymks_vae
