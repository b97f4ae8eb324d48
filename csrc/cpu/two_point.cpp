// CPU kernels of the two-point operator: the fused passes around the FFTs (see two_point.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "cpu/cpu_loops.h"
#include "spectral.h"
#include "two_point.h"

namespace pymks_vae {
namespace {

using cpu::parallel_rows;

template <typename T>
int partition_check_t(const at::Tensor& x, double tol) {
  // x is (B, n, *spatial) with spatial dims flattening to one stride (two_point_forward sees to it):
  // contiguous channels first, or PyMKS's channels last read in place.
  const int64_t B = x.size(0), n = x.size(1), S = x.numel() / (B * n);
  const int64_t sb = x.stride(0), ss = x.stride(1), si = x.stride(x.dim() - 1);
  const T* p = x.data_ptr<T>();
  constexpr int64_t kChunk = 2048;
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  std::atomic<bool> ok{true}, exact{true};
  const T t = static_cast<T>(tol);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    T buf[kChunk];
    for (int64_t task = begin; task < end && ok.load(std::memory_order_relaxed); ++task) {
      const int64_t b = task / chunks, lo = (task % chunks) * kChunk;
      const int64_t len = std::min(kChunk, S - lo);
      const T* src = p + b * sb + lo * si;
      // Counting (dev <= t) and (dev == 0) vectorises, and NaN never counts.
      int64_t n_ok = 0, n_exact = 0;
      if (ss == 1 && si == n && n == 2) {  // channels-last two-phase data, the common PyMKS case
        for (int64_t i = 0; i < len; ++i) {
          const T dev = std::abs(src[2 * i] + src[2 * i + 1] - T(1));
          n_ok += dev <= t;
          n_exact += dev == T(0);
        }
      } else {
        if (si == 1) {
          for (int64_t i = 0; i < len; ++i) buf[i] = src[i];
          for (int64_t k = 1; k < n; ++k)
            for (int64_t i = 0; i < len; ++i) buf[i] += src[k * ss + i];
        } else {
          for (int64_t i = 0; i < len; ++i) {
            T v = T(0);
            for (int64_t k = 0; k < n; ++k) v += src[k * ss + i * si];
            buf[i] = v;
          }
        }
        for (int64_t i = 0; i < len; ++i) {
          const T dev = std::abs(buf[i] - T(1));
          n_ok += dev <= t;
          n_exact += dev == T(0);
        }
      }
      if (n_ok != len) ok.store(false, std::memory_order_relaxed);
      if (n_exact != len) exact.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load() ? (exact.load() ? 2 : 1) : 0;
}

int partition_check(const at::Tensor& x, double tol) {
  int r = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "partition_check", [&] { r = partition_check_t<scalar_t>(x, tol); });
  return r;
}

template <typename T>
void pair_products_t(const at::Tensor& xh, const int32_t* a, const int32_t* b, at::Tensor& out) {
  const int64_t B = xh.size(0), nf = xh.size(1), nb = out.size(1), H = xh.numel() / (B * nf);
  const auto* X = reinterpret_cast<const cpx<T>*>(xh.data_ptr());
  auto* P = reinterpret_cast<cpx<T>*>(out.data_ptr());
  parallel_rows(B * nb, H, [&](int64_t row, int64_t i0, int64_t i1) {
    const int64_t bb = row / nb, k = row % nb;
    const cpx<T>* xa = X + (bb * nf + a[k]) * H;
    const cpx<T>* xb = X + (bb * nf + b[k]) * H;
    cpx<T>* o = P + row * H;
    for (int64_t i = i0; i < i1; ++i) o[i] = cmul_conj(xa[i], xb[i]);
  });
}

at::Tensor pair_products(const at::Tensor& xh, const at::Tensor& a, const at::Tensor& b) {
  auto sizes = xh.sizes().vec();
  sizes[1] = a.numel();
  auto out = at::empty(sizes, xh.options());
  AT_DISPATCH_FLOATING_TYPES(at::toRealValueType(xh.scalar_type()), "pair_products", [&] {
    pair_products_t<scalar_t>(xh, a.data_ptr<int32_t>(), b.data_ptr<int32_t>(), out);
  });
  return out;
}

template <typename T>
void power_half_t(const at::Tensor& xh, const int32_t* idx, T scale, at::Tensor& out) {
  // out[b, u, rest, h0] = scale |X[b, idx[u], h0, rest]|^2: X read in order, out written with
  // stride h_0 (moving the first axis last), one (sample, state) slab per task.
  const int64_t B = xh.size(0), nf = xh.size(1), na = out.size(1), H = xh.numel() / (B * nf);
  const int64_t h0 = xh.dim() > 3 ? xh.size(2) : 1, rest = H / h0;
  const auto* X = reinterpret_cast<const cpx<T>*>(xh.data_ptr());
  T* P = out.data_ptr<T>();
  at::parallel_for(0, B * na, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const cpx<T>* xs = X + ((row / na) * nf + idx[row % na]) * H;
      T* o = P + row * H;
      // In tiles of kTile rows of X: their norms first (contiguous, vectorised) into a buffer
      // that stays in L1, then that buffer transposed, so that each written line of out is whole.
      constexpr int64_t kTile = 16, kCols = 256;
      T buf[kTile * kCols];
      for (int64_t c0 = 0; c0 < rest; c0 += kCols) {
        const int64_t nc = std::min(kCols, rest - c0);
        for (int64_t t0 = 0; t0 < h0; t0 += kTile) {
          const int64_t nt = std::min(kTile, h0 - t0);
          for (int64_t k = 0; k < nt; ++k) {
            const cpx<T>* src = xs + (t0 + k) * rest + c0;
            T* b = buf + k * kCols;
            for (int64_t r = 0; r < nc; ++r) b[r] = scale * cnorm2(src[r]);
          }
          for (int64_t r = 0; r < nc; ++r)
            for (int64_t k = 0; k < nt; ++k) o[(c0 + r) * h0 + t0 + k] = buf[k * kCols + r];
        }
      }
    }
  });
}

void power_half(const at::Tensor& xh, const at::Tensor& idx, double scale, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "power_half", [&] {
    power_half_t<scalar_t>(xh, idx.data_ptr<int32_t>(), static_cast<scalar_t>(scale), out);
  });
}

// Where one output row (fixed lags on all but the last axis) reads its bases: the grid row of the
// lags (fwd) and of their mirror (rev), and the row of the pruned even layout.
struct RowPos {
  int64_t fwd = 0, rev = 0, even = 0;
  bool even_reversed = false;
};

// The row loops below either start the output (kInit: o = b + c * src) or add to it
// (o += c * src), so a correlation made of one term costs one pass over its row.
template <bool kInit, typename T>
inline void put(T* o, int64_t j, T b, T v) {
  if constexpr (kInit) o[j] = b + v; else o[j] += v;
}

// o[i] (+)= c * src[i + off] for i in [i0, i1)
template <bool kInit, typename T>
inline void axpy_fwd(T* o, const T* src, int64_t off, T b, T c, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) put<kInit>(o, i, b, c * src[i + off]);
}
// o[i] (+)= c * src[off - i] for i in [i0, i1)
template <bool kInit, typename T>
inline void axpy_rev(T* o, const T* src, int64_t off, T b, T c, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) put<kInit>(o, i, b, c * src[off - i]);
}

// One term of a correlation over [i0, i1) of an output row (see assemble_pair in spectral.h).
// Auto bases are read from their row of the pruned even layout (backwards where it holds -r),
// cross bases from their grid row (or the mirror row for a reversed term); either way the last
// axis is read forwards or backwards along one stored row.
template <bool kInit, typename T>
inline void add_term(T* o, const Term& t, T b, T c, const T* even_b, const T* full_b, int32_t n_auto,
                     const RowPos& rp, int64_t even_numel, int64_t grid, int64_t hw, int64_t M, int64_t i0,
                     int64_t i1) {
  const T* src;
  bool reversed;
  if (t.base < n_auto) {
    src = even_b + t.base * even_numel + rp.even * M;
    reversed = rp.even_reversed;
  } else {
    src = full_b + (t.base - n_auto) * grid + (t.reversed ? rp.rev : rp.fwd) * M;
    reversed = t.reversed != 0;
  }
  if (!reversed) {  // grid index lag_to_grid(i - hw, M): lags < 0 wrap to the end of the row
    const int64_t split = std::min(std::max(hw, i0), i1);
    axpy_fwd<kInit>(o, src, M - hw, b, c, i0, split);
    axpy_fwd<kInit>(o, src, -hw, b, c, split, i1);
  } else {  // grid index lag_to_grid(hw - i, M)
    const int64_t split = std::min(std::max(hw + 1, i0), i1);
    axpy_rev<kInit>(o, src, hw, b, c, i0, split);
    axpy_rev<kInit>(o, src, hw + M, b, c, split, i1);
  }
}

template <typename T>
void gather_t(const GatherArgs& a, at::Tensor& out) {
  const Geometry g = a.geom;
  const int nd = g.ndim;
  const int64_t nf = a.dc.size(1), nq = a.n_pairs, B = a.dc.size(0);
  const int32_t n_auto = a.n_auto;
  const int64_t nc = a.base.defined() ? a.base.size(1) : 0;
  int64_t grid = 1, rows = B * nq, s_total = 1;
  for (int d = 0; d < nd; ++d) {
    grid *= g.m[d];
    s_total *= g.n[d];
    if (d < nd - 1) rows *= g.w[d];
  }
  const int64_t W = g.w[nd - 1], M = g.m[nd - 1], hw = W / 2, en = even_numel(g);
  const T* even = a.even.defined() ? a.even.data_ptr<T>() : nullptr;
  const T* base = a.base.defined() ? a.base.data_ptr<T>() : nullptr;
  const T* dc = a.dc.data_ptr<T>();
  const auto* pairs = reinterpret_cast<const PairPlan*>(a.plan.pairs.data_ptr());
  const auto* terms = reinterpret_cast<const Term*>(a.plan.terms.data_ptr());
  const auto* vfs = reinterpret_cast<const VfTerm*>(a.plan.vfs.data_ptr());
  const MaskNorm<T> mask = mask_norm_view<T>(a.zmask, a.zlevel);
  const bool has_mask = mask.active();
  const T inv_s = T(1) / static_cast<T>(s_total);
  T* o_all = out.data_ptr<T>();

  // Tasks run pair-minor (sample, window row, pair) so that the pairs of one window row, which
  // read the same base rows, follow each other while those rows are in cache.
  const int64_t wrows = rows / (B * nq);
  parallel_rows(rows, W, [&](int64_t task, int64_t i0, int64_t i1) {
    const int64_t q = task % nq, wr = (task / nq) % wrows, b = task / (nq * wrows);
    const int64_t row = (b * nq + q) * wrows + wr;  // the output row
    int64_t midx[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    unravel(wr, g.w, nd - 1, midx);
    RowPos rp;
    for (int d = 0; d < nd - 1; ++d) {
      lag[d] = window_lag(midx[d], g.w[d]);
      rp.fwd = rp.fwd * g.m[d] + lag_to_grid(lag[d], g.m[d]);
      rp.rev = rp.rev * g.m[d] + lag_to_grid(-lag[d], g.m[d]);
    }
    // The even layout's row: even_index of the lags with the last one at 0, over the last axis.
    rp.even_reversed = even_reversed(lag, nd);
    if (nd > 1) rp.even = even_index(lag, g.m, nd) / M;
    const PairPlan p = pairs[q];
    T* o = o_all + row * W;
    // Periodic statistics have one normaliser, folded into the coefficients; the others are
    // applied per lag afterwards.
    const T scale = (a.periodic && !has_mask) ? inv_s : T(1);
    const T cst = scale * pair_constant(p, vfs, dc + b * nf, static_cast<T>(s_total));
    const T* even_b = even ? even + b * n_auto * en : nullptr;
    const T* full_b = base ? base + b * nc * grid : nullptr;
    if (p.term_begin == p.term_end) {
      for (int64_t i = i0; i < i1; ++i) o[i] = cst;
    }
    for (int32_t k = p.term_begin; k < p.term_end; ++k) {
      const T c = scale * static_cast<T>(terms[k].coef);
      if (k == p.term_begin)
        add_term<true>(o, terms[k], cst, c, even_b, full_b, n_auto, rp, en, grid, hw, M, i0, i1);
      else
        add_term<false>(o, terms[k], cst, c, even_b, full_b, n_auto, rp, en, grid, hw, M, i0, i1);
    }
    if (has_mask) {
      for (int64_t i = i0; i < i1; ++i) o[i] *= mask.inv(b, rp.fwd * M + lag_to_grid(window_lag(i, W), M));
    } else if (!a.periodic) {
      for (int64_t i = i0; i < i1; ++i) {
        lag[nd - 1] = window_lag(i, W);
        o[i] *= inv_norm_lag<T>(g, lag, false, inv_s);
      }
    }
  });
}

void gather(const GatherArgs& a, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(a.dc.scalar_type(), "gather", [&] { gather_t<scalar_t>(a, out); });
}

template <typename T>
void embed_grad_t(const EmbedArgs& a, at::Tensor& out) {
  const Geometry g = a.geom;
  const int nd = g.ndim;
  const int64_t B = a.grad.size(0), nq = a.grad.size(1);
  int64_t grid = 1, rows = B * nq, s_total = 1;
  for (int d = 0; d < nd; ++d) {
    grid *= g.m[d];
    s_total *= g.n[d];
    if (d < nd - 1) rows *= g.m[d];
  }
  const int64_t M = g.m[nd - 1], W = g.w[nd - 1];
  // grad is read through its strides: autograd hands a reduction's gradient over expanded (the
  // backward of .sum() has every stride 0), and a contiguous copy of it cost as much as a transform.
  const T* grad = a.grad.data_ptr<T>();
  const int64_t sb = a.grad.stride(0), sq = a.grad.stride(1), sl = a.grad.stride(nd + 1);
  const MaskNorm<T> mask = mask_norm_view<T>(a.zmask, a.zlevel);
  const T inv_s = T(1) / static_cast<T>(s_total);
  T* o_all = out.data_ptr<T>();
  std::vector<T> last_count(W);  // overlap count of each lag of the last axis (zero padding)
  for (int64_t i = 0; i < W; ++i) last_count[i] = overlap_count<T>(g.n[nd - 1], window_lag(i, W));

  parallel_rows(rows, M, [&](int64_t row, int64_t i0, int64_t i1) {
    int64_t pos[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    const int64_t bq = unravel(row, g.m, nd - 1, pos), b = bq / nq;
    T* o = o_all + row * M;
    int64_t goff = b * sb + (bq % nq) * sq;
    bool inside = true;
    for (int d = 0; d < nd - 1; ++d) {
      const int64_t idx = grid_to_window(pos[d], g.m[d], g.w[d]);
      if (idx < 0) inside = false;
      lag[d] = window_lag(idx, g.w[d]);
      goff += idx * a.grad.stride(d + 2);
    }
    if (!inside) {
      for (int64_t i = i0; i < i1; ++i) o[i] = T(0);
      return;
    }
    const T* gr = grad + goff;
    if (!mask.active()) {
      // The grid row holds the window's lags 0 .. W-1-hw at positions 0 .. W-1-hw, its negative
      // lags at M-hw .. M-1 and zeros between: three runs, each a plain loop (vectorised).
      const int64_t hw = W / 2;
      T row_count = T(1);  // the overlap counts of the other axes, multiplied as inv_norm_lag does
      for (int d = 0; d < nd - 1; ++d) row_count *= overlap_count<T>(g.n[d], lag[d]);
      auto run = [&](int64_t p0, int64_t p1, int64_t idx0) {
        p0 = std::max(p0, i0);
        p1 = std::min(p1, i1);
        for (int64_t i = p0; i < p1; ++i) {
          const int64_t idx = idx0 + i;
          const T norm = a.periodic ? inv_s : T(1) / (row_count * last_count[idx]);
          o[i] = gr[idx * sl] * norm;
        }
      };
      run(0, W - hw, hw);
      for (int64_t i = std::max(i0, W - hw); i < std::min(i1, M - hw); ++i) o[i] = T(0);
      run(M - hw, M, hw - M);
      return;
    }
    const int64_t gridrow = row % (grid / M);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t idx = grid_to_window(i, M, W);
      if (idx < 0) {
        o[i] = T(0);
        continue;
      }
      lag[nd - 1] = window_lag(idx, W);
      const T norm = mask.active() ? mask.inv(b, gridrow * M + i) : inv_norm_lag<T>(g, lag, a.periodic, inv_s);
      o[i] = gr[idx * sl] * norm;
    }
  });
}

at::Tensor embed_grad(const EmbedArgs& a) {
  std::vector<int64_t> sizes{a.grad.size(0), a.grad.size(1)};
  for (int d = 0; d < a.geom.ndim; ++d) sizes.push_back(a.geom.m[d]);
  auto out = at::empty(sizes, a.grad.options());
  AT_DISPATCH_FLOATING_TYPES(a.grad.scalar_type(), "embed_grad", [&] { embed_grad_t<scalar_t>(a, out); });
  return out;
}

template <typename T>
void combine_grad_t(const CombineArgs& a, at::Tensor& out) {
  const int64_t B = a.x_hat.size(0), nu = a.x_hat.size(1), nq = a.g_hat.size(1);
  const int64_t H = a.x_hat.numel() / (B * nu);
  const auto* G = reinterpret_cast<const cpx<T>*>(a.g_hat.data_ptr());
  const auto* X = reinterpret_cast<const cpx<T>*>(a.x_hat.data_ptr());
  auto* O = reinterpret_cast<cpx<T>*>(out.data_ptr());
  const int32_t* begin = a.begin.data_ptr<int32_t>();
  const int32_t* end = a.end.data_ptr<int32_t>();
  const auto* terms = reinterpret_cast<const CombineTerm*>(a.terms.data_ptr());
  const T scale = static_cast<T>(a.scale);
  // One pass per term over a block of the row, so that each inner loop is a plain elementwise
  // product (vectorised; the per-bin loop over the term table was not), the first term writing
  // the block; the block (4-8 KiB) stays in L1 between a state's terms and the scaling. An auto
  // pair's two terms, conj(G) X + G X, come as one: 2 Re(G) X.
  constexpr int64_t kBlock = 512;
  parallel_rows(B * a.n_states, H, [&](int64_t row, int64_t i0, int64_t i1) {
    const int64_t b = row / a.n_states, u = row % a.n_states;
    cpx<T>* o = O + row * H;
    for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
      const int64_t j1 = std::min(i1, j0 + kBlock);
      bool first = true;
      for (int32_t k = begin[u]; k < end[u]; ++k) {
        const CombineTerm t = terms[k];
        const cpx<T>* g = G + (b * nq + t.pair) * H;
        const cpx<T>* x = X + (b * nu + t.other) * H;
        const bool pair_of_auto = k + 1 < end[u] && terms[k + 1].pair == t.pair &&
                                  terms[k + 1].other == t.other && terms[k + 1].conj != t.conj;
        if (pair_of_auto) {
          ++k;
          if (first)
            for (int64_t i = j0; i < j1; ++i) o[i] = cscale(x[i], T(2) * g[i].re);
          else
            for (int64_t i = j0; i < j1; ++i) o[i] = cadd(o[i], cscale(x[i], T(2) * g[i].re));
        } else if (t.conj) {
          if (first)
            for (int64_t i = j0; i < j1; ++i) o[i] = cmul_conj(g[i], x[i]);
          else
            for (int64_t i = j0; i < j1; ++i) o[i] = cadd(o[i], cmul_conj(g[i], x[i]));
        } else {
          if (first)
            for (int64_t i = j0; i < j1; ++i) o[i] = cmul(g[i], x[i]);
          else
            for (int64_t i = j0; i < j1; ++i) o[i] = cadd(o[i], cmul(g[i], x[i]));
        }
        first = false;
      }
      if (first) {
        for (int64_t i = j0; i < j1; ++i) o[i] = cpx<T>{T(0), T(0)};
      } else if (scale != T(1)) {
        for (int64_t i = j0; i < j1; ++i) o[i] = cscale(o[i], scale);
      }
    }
  });
}

at::Tensor combine_grad(const CombineArgs& a) {
  auto sizes = a.x_hat.sizes().vec();
  sizes[1] = a.n_states;
  auto out = at::empty(sizes, a.x_hat.options());
  AT_DISPATCH_FLOATING_TYPES(at::toRealValueType(a.x_hat.scalar_type()), "combine_grad", [&] {
    combine_grad_t<scalar_t>(a, out);
  });
  return out;
}

const TwoPointBackend kCpu{partition_check, pair_products, power_half,       gather,
                           embed_grad,      combine_grad,  binary_stats_cpu, even_grad_spectrum_cpu,
                           even_values_gemm_cpu};

at::Tensor two_point_stats_cpu(const at::Tensor& x, at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                               bool periodic, at::IntArrayRef window,
                               const c10::optional<at::Tensor>& mask, int64_t partition) {
  return two_point_forward(x, pair_i, pair_j, periodic, window, mask, partition, kCpu);
}

at::Tensor two_point_stats_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                        at::IntArrayRef pair_i, at::IntArrayRef pair_j, bool periodic,
                                        at::IntArrayRef window, const c10::optional<at::Tensor>& mask) {
  return two_point_backward(grad, x, pair_i, pair_j, periodic, window, mask, kCpu);
}


std::tuple<at::Tensor, at::Tensor> two_point_stats_spectra_cpu(const at::Tensor& x, at::IntArrayRef pair_i,
                                                                  at::IntArrayRef pair_j, bool periodic,
                                                                  at::IntArrayRef window,
                                                                  const c10::optional<at::Tensor>& mask,
                                                                  int64_t partition) {
  return two_point_forward_spectra(x, pair_i, pair_j, periodic, window, mask, partition, kCpu);
}

at::Tensor two_point_stats_backward_spectra_cpu(const at::Tensor& grad, const at::Tensor& x_hat,
                                                  at::IntArrayRef pair_i, at::IntArrayRef pair_j, int64_t n_state,
                                                  at::IntArrayRef spatial, bool periodic,
                                                  const c10::optional<at::Tensor>& mask) {
  return two_point_backward_spectra(grad, x_hat, pair_i, pair_j, n_state, spatial, periodic, mask, kCpu);
}

}  // namespace

at::Tensor combine_grad_cpu(const CombineArgs& args) { return combine_grad(args); }
const TwoPointBackend& cpu_two_point_backend() { return kCpu; }

TORCH_LIBRARY_IMPL(pymks_vae, CPU, m) {
  m.impl("two_point_stats", &two_point_stats_cpu);
  m.impl("two_point_stats_backward", &two_point_stats_backward_cpu);
  m.impl("two_point_stats_spectra", &two_point_stats_spectra_cpu);
  m.impl("two_point_stats_backward_spectra", &two_point_stats_backward_spectra_cpu);
}

}  // namespace pymks_vae
