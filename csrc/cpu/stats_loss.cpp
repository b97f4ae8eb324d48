// CPU kernel of the fused spatial-statistics loss (see stats_loss_driver.cpp for the math).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>

#include <algorithm>
#include <vector>
#include <torch/library.h>

#include "cpu/cpu_loops.h"
#include "spectral.h"
#include "two_point.h"

namespace pymks_vae {
namespace {

// sum_{k < K} f(k) with 8 independent partial sums: the compiler vectorises it without being
// allowed to reassociate floating-point additions itself.
template <typename T, typename F>
inline T lane_sum(int64_t K, F&& f) {
  T lanes[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += f(k + l);
  for (; k < K; ++k) lanes[0] += f(k);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename T>
void loss_pass_t(const LossArgs& a, at::Tensor& partial, at::Tensor& gx) {
  const int64_t B = a.x_hat.size(0), nu = a.x_hat.size(1), nq = a.pa.numel();
  const int64_t K = a.x_hat.size(a.x_hat.dim() - 1);  // bins of the halved last axis
  const int64_t H = a.x_hat.numel() / (B * nu), R = H / K;
  const auto* X = reinterpret_cast<const cpx<T>*>(a.x_hat.data_ptr());
  const auto* Tt = reinterpret_cast<const cpx<T>*>(a.t_hat.data_ptr());
  auto* G = a.need_grad ? reinterpret_cast<cpx<T>*>(gx.data_ptr()) : nullptr;
  const int32_t* pa = a.pa.data_ptr<int32_t>();
  const int32_t* pb = a.pb.data_ptr<int32_t>();
  T* part = partial.data_ptr<T>();
  const T gs = static_cast<T>(a.grad_scale);
  const int64_t m_last = a.m_last;

  // One task per (sample, spectral row); each writes its own partial sum (deterministic). The
  // first pair that touches a state's gradient row writes it, later ones add to it.
  at::parallel_for(0, B * R, 8, [&](int64_t begin, int64_t end) {
    std::vector<char> started(nu);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / R, r = task % R;
      const int64_t off = b * nu * H + r * K;
      std::fill(started.begin(), started.end(), 0);
      T acc = T(0);
      for (int64_t q = 0; q < nq; ++q) {
        const cpx<T>* __restrict__ xa = X + off + pa[q] * H;
        const cpx<T>* __restrict__ xb = X + off + pb[q] * H;
        const cpx<T>* __restrict__ ta = Tt + off + pa[q] * H;
        const cpx<T>* __restrict__ tb = Tt + off + pb[q] * H;
        T plain = T(0), first, last;
        if (pa[q] == pb[q]) {
          plain = lane_sum<T>(K, [&](int64_t k) {
            const T d = auto_difference(xa[k], ta[k]);
            return d * d;
          });
          const T d0 = auto_difference(xa[0], ta[0]), dl = auto_difference(xa[K - 1], ta[K - 1]);
          first = d0 * d0;
          last = dl * dl;
          if (G) {
            cpx<T>* __restrict__ ga = G + off + pa[q] * H;
            const T s2 = T(2) * gs;
            if (started[pa[q]]) {
              for (int64_t k = 0; k < K; ++k) {
                const T s = s2 * auto_difference(xa[k], ta[k]);
                ga[k].re += s * xa[k].re;
                ga[k].im += s * xa[k].im;
              }
            } else {
              for (int64_t k = 0; k < K; ++k) {
                const T s = s2 * auto_difference(xa[k], ta[k]);
                ga[k].re = s * xa[k].re;
                ga[k].im = s * xa[k].im;
              }
            }
            started[pa[q]] = 1;
          }
        } else {
          plain = lane_sum<T>(K, [&](int64_t k) { return cnorm2(pair_difference(xa[k], xb[k], ta[k], tb[k])); });
          first = cnorm2(pair_difference(xa[0], xb[0], ta[0], tb[0]));
          last = cnorm2(pair_difference(xa[K - 1], xb[K - 1], ta[K - 1], tb[K - 1]));
          if (G) {
            cpx<T>* __restrict__ ga = G + off + pa[q] * H;
            cpx<T>* __restrict__ gb = G + off + pb[q] * H;
            const bool add_a = started[pa[q]], add_b = started[pb[q]];
            started[pa[q]] = started[pb[q]] = 1;
            for (int64_t k = 0; k < K; ++k) {
              const cpx<T> ds = cscale(pair_difference(xa[k], xb[k], ta[k], tb[k]), gs);
              const cpx<T> va = cmul_conj(ds, xb[k]), vb = cmul(ds, xa[k]);
              ga[k] = add_a ? cadd(ga[k], va) : va;
              gb[k] = add_b ? cadd(gb[k], vb) : vb;
            }
          }
        }
        acc += parseval_row(plain, first, last, K, m_last);
      }
      part[task] = acc;
    }
  });
}

void loss_pass(const LossArgs& a) {
  const auto real = at::toRealValueType(a.x_hat.scalar_type());
  const int64_t B = a.x_hat.size(0);
  const int64_t K = a.x_hat.size(a.x_hat.dim() - 1);
  const int64_t R = a.x_hat.numel() / (B * a.x_hat.size(1) * K);
  auto partial = at::empty({B, R}, a.x_hat.options().dtype(real));
  at::Tensor gx = a.grad_spectrum;
  AT_DISPATCH_FLOATING_TYPES(real, "stats_loss", [&] { loss_pass_t<scalar_t>(a, partial, gx); });
  a.values.copy_(partial.sum(1).mul_(a.value_scale));
}

const StatsLossBackend kCpu{loss_pass};

std::tuple<at::Tensor, at::Tensor> stats_loss_cpu(const at::Tensor& x, const at::Tensor& target,
                                                  at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                                                  double scale, bool need_grad) {
  return stats_loss_forward(x, target, pair_i, pair_j, scale, need_grad, kCpu);
}

at::Tensor stats_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& spectrum,
                                   at::IntArrayRef spatial, int64_t n_state, at::IntArrayRef states) {
  return stats_loss_backward(grad, spectrum, spatial, n_state, states);
}


// ------------------------------------------------------------------ general loss (window, weights, padding)
template <typename T>
void power_diff_half_t(const at::Tensor& xh, const at::Tensor& th, const int32_t* idx, T scale, at::Tensor& out) {
  // out[b, u, rest, h0] = scale (|X|^2 - |T|^2)[b, idx[u], h0, rest]: the spectra read in order, out
  // written through an L1-sized tile so that each line of it is written whole (as power_half).
  const int64_t B = xh.size(0), nf = xh.size(1), na = out.size(1), H = xh.numel() / (B * nf);
  const int64_t h0 = xh.dim() > 3 ? xh.size(2) : 1, rest = H / h0;
  const auto* X = reinterpret_cast<const cpx<T>*>(xh.data_ptr());
  const auto* Tt = reinterpret_cast<const cpx<T>*>(th.data_ptr());
  T* P = out.data_ptr<T>();
  at::parallel_for(0, B * na, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kTile = 16, kCols = 256;
    T buf[kTile * kCols];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = ((row / na) * nf + idx[row % na]) * H;
      const cpx<T>* xs = X + off;
      const cpx<T>* ts = Tt + off;
      T* o = P + row * H;
      for (int64_t c0 = 0; c0 < rest; c0 += kCols) {
        const int64_t nc = std::min(kCols, rest - c0);
        for (int64_t t0 = 0; t0 < h0; t0 += kTile) {
          const int64_t nt = std::min(kTile, h0 - t0);
          for (int64_t k = 0; k < nt; ++k) {
            const int64_t src = (t0 + k) * rest + c0;
            T* b = buf + k * kCols;
            for (int64_t r = 0; r < nc; ++r) b[r] = scale * auto_difference(xs[src + r], ts[src + r]);
          }
          for (int64_t r = 0; r < nc; ++r)
            for (int64_t k = 0; k < nt; ++k) o[(c0 + r) * h0 + t0 + k] = buf[k * kCols + r];
        }
      }
    }
  });
}

void power_diff_half(const at::Tensor& xh, const at::Tensor& th, const at::Tensor& idx, double scale, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "power_diff_half", [&] {
    power_diff_half_t<scalar_t>(xh, th, idx.data_ptr<int32_t>(), static_cast<scalar_t>(scale), out);
  });
}

at::Tensor diff_products(const at::Tensor& xh, const at::Tensor& th, const at::Tensor& a, const at::Tensor& b) {
  auto sizes = xh.sizes().vec();
  sizes[1] = a.numel();
  auto out = at::empty(sizes, xh.options());
  AT_DISPATCH_FLOATING_TYPES(at::toRealValueType(xh.scalar_type()), "diff_products", [&] {
    using T = scalar_t;
    const int64_t B = xh.size(0), nf = xh.size(1), nb = a.numel(), H = xh.numel() / (B * nf);
    const auto* X = reinterpret_cast<const cpx<T>*>(xh.data_ptr());
    const auto* Tt = reinterpret_cast<const cpx<T>*>(th.data_ptr());
    auto* P = reinterpret_cast<cpx<T>*>(out.data_ptr());
    const int32_t* pa = a.data_ptr<int32_t>();
    const int32_t* pb = b.data_ptr<int32_t>();
    cpu::parallel_rows(B * nb, H, [&](int64_t row, int64_t i0, int64_t i1) {
      const int64_t bb = row / nb, k = row % nb;
      const int64_t oa = (bb * nf + pa[k]) * H, ob = (bb * nf + pb[k]) * H;
      cpx<T>* o = P + row * H;
      for (int64_t i = i0; i < i1; ++i) o[i] = pair_difference(X[oa + i], X[ob + i], Tt[oa + i], Tt[ob + i]);
    });
  });
  return out;
}

// One run of a window row: elements i0 .. i1 - 1 of the row, whose differences lie at v[Step * k]
// for k = 0, 1, ... (consecutive on the grid, ascending or descending). Adds each lag's loss to
// lanes[0..7] and its offset gradient to lanes[8..15] in eight independent partial sums (so that
// the loop vectorises without reassociating additions) and writes the gradient go[i].
template <typename T, int Step>
inline void window_run(const T* v, int64_t i0, int64_t i1, const T* inv_row, T inv_c, const T* wt, T off, T s,
                       T* go, T* lanes) {
  int64_t i = i0;
  const T* p = v;
  auto lag = [&](int64_t i, const T* p, int l) {
    T gv, goff;
    const T inv = inv_row ? inv_row[i] : inv_c;
    lanes[l] += window_loss_lag<T>(*p, inv, off, wt ? wt[i] : T(1), s, gv, goff);
    lanes[8 + l] += goff;
    go[i] = gv;
  };
  for (; i + 8 <= i1; i += 8, p += 8 * Step)
    for (int l = 0; l < 8; ++l) lag(i + l, p + l * Step, l);
  for (; i < i1; ++i, p += Step) lag(i, p, 0);
}

template <typename T>
void window_pass_t(const WindowLossArgs& a) {
  const Geometry& g = a.geom;
  const int nd = g.ndim;
  const int64_t B = a.values.size(0), nq = a.n_pairs;
  const int64_t W = g.w[nd - 1], M = g.m[nd - 1];
  int64_t wrows = 1, s_total = 1;
  for (int d = 0; d < nd; ++d) {
    s_total *= g.n[d];
    if (d < nd - 1) wrows *= g.w[d];
  }
  const T* even = a.even.defined() ? a.even.data_ptr<T>() : nullptr;
  const T* cross = a.cross.defined() ? a.cross.data_ptr<T>() : nullptr;
  const int64_t na = even ? a.even.size(1) : 0, en = even ? a.even.size(2) : 0;
  const int64_t nc = cross ? a.cross.size(1) : 0, cn = cross ? a.cross.size(2) : 0;
  const auto* pairs = reinterpret_cast<const WinPair*>(a.pairs.data_ptr());
  const T* weight = a.weight.defined() ? a.weight.data_ptr<T>() : nullptr;
  T* grad = a.grad_window.defined() ? a.grad_window.data_ptr<T>() : nullptr;
  const T* offset = a.offset.defined() ? a.offset.data_ptr<T>() : nullptr;
  const bool want_off = a.grad_offset.defined();
  const T s = static_cast<T>(a.scale), inv_s = T(1) / static_cast<T>(s_total);
  auto partial = at::empty({B, nq * wrows}, a.values.options());
  T* part = partial.data_ptr<T>();
  auto partial_off = want_off ? at::empty({B, nq, wrows}, a.values.options()) : at::Tensor();
  T* part_off = want_off ? partial_off.data_ptr<T>() : nullptr;
  // Zero-padded statistics: the normaliser of each lag of the window, the same for every sample
  // and pair (computed once rather than per element).
  std::vector<T> inv_table;
  if (!a.periodic) {
    inv_table.resize(wrows * W);
    int64_t widx[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    for (int64_t wr = 0; wr < wrows; ++wr) {
      unravel(wr, g.w, nd - 1, widx);
      for (int d = 0; d < nd - 1; ++d) lag[d] = window_lag(widx[d], g.w[d]);
      for (int64_t i = 0; i < W; ++i) {
        lag[nd - 1] = window_lag(i, W);
        inv_table[wr * W + i] = inv_norm_lag<T>(g, lag, false, inv_s);
      }
    }
  }
  // Where the gradient is not wanted, each thread writes it to its own row of scratch.
  std::vector<T> scratch(grad ? 0 : at::get_num_threads() * W);

  // One task per (sample, pair, window row), each writing its own partial sum (deterministic).
  at::parallel_for(0, B * nq * wrows, 16, [&](int64_t begin, int64_t end) {
    // The task's indices are stepped rather than divided out of it: at 32 x 64^2 cutoff 7 the
    // integer divisions of 480 short tasks were most of this pass.
    int64_t wr = begin % wrows, q = (begin / wrows) % nq, b = begin / (wrows * nq);
    int64_t widx[kMaxDims] = {0, 0, 0};
    unravel(wr, g.w, nd - 1, widx);
    for (int64_t task = begin; task < end; ++task) {
      if (task > begin) {
        if (++wr == wrows) {
          wr = 0;
          if (++q == nq) {
            q = 0;
            ++b;
          }
        }
        for (int d = nd - 2; d >= 0; --d) {
          if (++widx[d] < g.w[d]) break;
          widx[d] = 0;
        }
      }
      int64_t lag[kMaxDims] = {0, 0, 0};
      for (int d = 0; d < nd - 1; ++d) lag[d] = window_lag(widx[d], g.w[d]);
      const WinPair p = pairs[q];
      // The row of the stored base that holds this window row, and whether it runs backwards.
      const T* src;
      bool rev = false;
      if (p.is_auto) {
        lag[nd - 1] = 0;
        rev = even_reversed(lag, nd);
        src = even + (b * na + p.base) * en + even_index(lag, g.m, nd);  // even_index(.., r_last = 0) starts the row
      } else {
        lag[nd - 1] = 0;
        src = cross + (b * nc + p.base) * cn + cross_index(widx, lag, g);
      }
      const T* wt = weight ? weight + (q * wrows + wr) * W : nullptr;
      T* go = grad ? grad + task * W : scratch.data() + at::get_thread_num() * W;
      const T off = offset ? offset[b * nq + q] : T(0);
      const T* inv_row = a.periodic ? nullptr : inv_table.data() + wr * W;
      // The row's lags l = i - W/2 read the base at l (or -l when the row runs backwards), wrapped
      // onto the grid: two runs of consecutive elements, ascending or descending.
      T lanes[16] = {};
      const int64_t hw = W / 2;
      if (!rev) {
        window_run<T, 1>(src + M - hw, 0, hw, inv_row, inv_s, wt, off, s, go, lanes);
        window_run<T, 1>(src, hw, W, inv_row, inv_s, wt, off, s, go, lanes);
      } else {
        window_run<T, -1>(src + hw, 0, hw + 1, inv_row, inv_s, wt, off, s, go, lanes);
        window_run<T, -1>(src + M - 1, hw + 1, W, inv_row, inv_s, wt, off, s, go, lanes);
      }
      part[task] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      if (part_off)
        part_off[task] = ((lanes[8] + lanes[9]) + (lanes[10] + lanes[11])) + ((lanes[12] + lanes[13]) + (lanes[14] + lanes[15]));
    }
  });
  // The partial sums in order, accumulated in double for float (a loop rather than an ATen sum:
  // at 64^2 the reduction's call cost more than its arithmetic).
  using acc_t = at::acc_type<T, false>;
  auto reduce_rows = [](const T* src, int64_t rows, int64_t len, const at::Tensor& dst) {
    TORCH_INTERNAL_ASSERT(dst.is_contiguous() && dst.numel() == rows);
    T* out = dst.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) {
      acc_t sum = 0;
      for (int64_t k = 0; k < len; ++k) sum += src[r * len + k];
      out[r] = static_cast<T>(sum);
    }
  };
  reduce_rows(part, B, nq * wrows, a.values);
  if (want_off) reduce_rows(part_off, B * nq, wrows, a.grad_offset);
}

void window_pass(const WindowLossArgs& a) {
  AT_DISPATCH_FLOATING_TYPES(a.values.scalar_type(), "window_pass", [&] { window_pass_t<scalar_t>(a); });
}

template <typename T>
void even_grad_spectrum_t(const at::Tensor& xh, const at::Tensor& g, const int32_t* idx, T factor, at::Tensor& out,
                          bool accumulate) {
  // The transpose of power_diff_half's pass: g read through an L1-sized tile (its lines whole),
  // X read and out written in order.
  const int64_t B = xh.size(0), nf = xh.size(1), nq = g.size(1), H = xh.numel() / (B * nf);
  const int64_t h0 = xh.dim() > 3 ? xh.size(2) : 1, rest = H / h0;
  const auto* X = reinterpret_cast<const cpx<T>*>(xh.data_ptr());
  const T* G = g.data_ptr<T>();
  auto* O = reinterpret_cast<cpx<T>*>(out.data_ptr());
  at::parallel_for(0, B * nf, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kTile = 16, kCols = 256;
    T buf[kTile * kCols];
    for (int64_t row = begin; row < end; ++row) {
      const cpx<T>* xs = X + row * H;
      cpx<T>* o = O + row * H;
      if (idx[row % nf] < 0) {
        if (!accumulate) std::fill(o, o + H, cpx<T>{T(0), T(0)});
        continue;
      }
      const T* gs = G + ((row / nf) * nq + idx[row % nf]) * H;
      for (int64_t c0 = 0; c0 < rest; c0 += kCols) {
        const int64_t nc = std::min(kCols, rest - c0);
        for (int64_t t0 = 0; t0 < h0; t0 += kTile) {
          const int64_t nt = std::min(kTile, h0 - t0);
          for (int64_t r = 0; r < nc; ++r)
            for (int64_t k = 0; k < nt; ++k) buf[k * kCols + r] = gs[(c0 + r) * h0 + t0 + k];
          for (int64_t k = 0; k < nt; ++k) {
            const int64_t at = (t0 + k) * rest + c0;
            const T* b = buf + k * kCols;
            if (accumulate)
              for (int64_t r = 0; r < nc; ++r) o[at + r] = cadd(o[at + r], cscale(xs[at + r], factor * b[r]));
            else
              for (int64_t r = 0; r < nc; ++r) o[at + r] = cscale(xs[at + r], factor * b[r]);
          }
        }
      }
    }
  });
}

}  // namespace

void even_grad_spectrum_cpu(const at::Tensor& xh, const at::Tensor& g, const at::Tensor& idx, double factor,
                            at::Tensor& out, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "even_grad_spectrum", [&] {
    even_grad_spectrum_t<scalar_t>(xh, g, idx.data_ptr<int32_t>(), static_cast<scalar_t>(factor), out, accumulate);
  });
}

namespace {

const WindowLossBackend kCpuWindow{power_diff_half,        diff_products,       window_pass, combine_grad_cpu,
                                   even_grad_spectrum_cpu, even_values_gemm_cpu, even_gradient_gemm_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_loss_window_cpu(
    const at::Tensor& x, const at::Tensor& target, at::IntArrayRef pair_i, at::IntArrayRef pair_j, bool periodic,
    at::IntArrayRef window, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& offset,
    double scale, bool need_grad) {
  return stats_loss_window_forward(x, target, pair_i, pair_j, periodic, window, weight, offset, scale, need_grad,
                                   kCpuWindow);
}

at::Tensor stats_loss_window_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_window,
                                          const at::Tensor& x_hat, at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                                          int64_t n_state, at::IntArrayRef spatial, bool periodic) {
  return stats_loss_window_backward(grad, grad_window, x_hat, pair_i, pair_j, n_state, spatial, periodic, kCpuWindow);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymks_vae, CPU, m) {
  m.impl("stats_loss", &stats_loss_cpu);
  m.impl("stats_loss_backward", &stats_loss_backward_cpu);
  m.impl("stats_loss_window", &stats_loss_window_cpu);
  m.impl("stats_loss_window_backward", &stats_loss_window_backward_cpu);
}

}  // namespace pymks_vae
