// CPU kernels of the two-point operator: the fused passes around the FFTs (see two_point.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "cpu/cpu_loops.h"
#include "spectral.h"
#include "two_point.h"

namespace pymks_vae {
namespace {

using cpu::parallel_rows;

template <typename T>
bool partition_check_t(const at::Tensor& x, double tol) {
  const int64_t B = x.size(0), n = x.size(1), S = x.numel() / (B * n);
  const T* p = x.data_ptr<T>();
  constexpr int64_t kChunk = 2048;
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  std::atomic<bool> ok{true};
  const T t = static_cast<T>(tol);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    T buf[kChunk];
    for (int64_t task = begin; task < end && ok.load(std::memory_order_relaxed); ++task) {
      const int64_t b = task / chunks, lo = (task % chunks) * kChunk;
      const int64_t len = std::min(kChunk, S - lo);
      const T* src = p + b * n * S + lo;
      for (int64_t i = 0; i < len; ++i) buf[i] = src[i];
      for (int64_t s = 1; s < n; ++s)
        for (int64_t i = 0; i < len; ++i) buf[i] += src[s * S + i];
      int bad = 0;  // !(dev <= t) also flags NaN
      for (int64_t i = 0; i < len; ++i) bad |= !(std::abs(buf[i] - T(1)) <= t);
      if (bad) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

bool partition_check(const at::Tensor& x, double tol) {
  bool r = false;
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

// o[i] += c * src[i + off] for i in [i0, i1)
template <typename T>
inline void axpy_fwd(T* o, const T* src, int64_t off, T c, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) o[i] += c * src[i + off];
}
// o[i] += c * src[off - i] for i in [i0, i1)
template <typename T>
inline void axpy_rev(T* o, const T* src, int64_t off, T c, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) o[i] += c * src[off - i];
}

template <typename T>
void gather_t(const GatherArgs& a, at::Tensor& out) {
  const Geometry g = a.geom;
  const int nd = g.ndim;
  const int64_t B = a.base.size(0), nb = a.base.size(1), nf = a.dc.size(1), nq = a.n_pairs;
  int64_t grid = 1, rows = B * nq, s_total = 1;
  for (int d = 0; d < nd; ++d) {
    grid *= g.m[d];
    s_total *= g.n[d];
    if (d < nd - 1) rows *= g.w[d];
  }
  const int64_t W = g.w[nd - 1], M = g.m[nd - 1], hw = W / 2;
  const T* base = a.base.data_ptr<T>();
  const T* dc = a.dc.data_ptr<T>();
  const auto* pairs = reinterpret_cast<const PairPlan*>(a.plan.pairs.data_ptr());
  const auto* terms = reinterpret_cast<const Term*>(a.plan.terms.data_ptr());
  const auto* vfs = reinterpret_cast<const VfTerm*>(a.plan.vfs.data_ptr());
  const bool has_mask = a.zmask.defined();
  const T* zmask = has_mask ? a.zmask.data_ptr<T>() : nullptr;
  const T* zlevel = has_mask ? a.zlevel.data_ptr<T>() : nullptr;
  const int64_t Bm = has_mask ? a.zmask.size(0) : 1;
  const T inv_s = T(1) / static_cast<T>(s_total);
  T* o_all = out.data_ptr<T>();

  parallel_rows(rows, W, [&](int64_t row, int64_t i0, int64_t i1) {
    int64_t rem = row, midx[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    for (int d = nd - 2; d >= 0; --d) {
      midx[d] = rem % g.w[d];
      rem /= g.w[d];
    }
    const int64_t q = rem % nq, b = rem / nq;
    int64_t rowpos = 0, rowpos_rev = 0;
    for (int d = 0; d < nd - 1; ++d) {
      lag[d] = window_lag(midx[d], g.w[d]);
      rowpos = rowpos * g.m[d] + lag_to_grid(lag[d], g.m[d]);
      rowpos_rev = rowpos_rev * g.m[d] + lag_to_grid(-lag[d], g.m[d]);
    }
    const PairPlan p = pairs[q];
    const T* base_b = base + b * nb * grid;
    T* o = o_all + row * W;
    const T cst = pair_constant(p, vfs, dc + b * nf, static_cast<T>(s_total));
    for (int64_t i = i0; i < i1; ++i) o[i] = cst;
    // Lags i - hw < 0 sit at the end of the grid row (wrap), the others at its start.
    const int64_t split = std::min(std::max(hw, i0), i1);
    for (int32_t k = p.term_begin; k < p.term_end; ++k) {
      const Term t = terms[k];
      const T c = static_cast<T>(t.coef);
      const T* src = base_b + t.base * grid + (t.reversed ? rowpos_rev : rowpos) * M;
      if (!t.reversed) {  // grid index lag_to_grid(i - hw, M)
        axpy_fwd(o, src, M - hw, c, i0, split);
        axpy_fwd(o, src, -hw, c, split, i1);
      } else {  // grid index lag_to_grid(hw - i, M)
        const int64_t rsplit = std::min(std::max(hw + 1, i0), i1);
        axpy_rev(o, src, hw, c, i0, rsplit);
        axpy_rev(o, src, hw + M, c, rsplit, i1);
      }
    }
    if (has_mask) {
      const int64_t bm = Bm == 1 ? 0 : b;
      const T* z = zmask + bm * grid + rowpos * M;
      const T level = zlevel[bm];
      for (int64_t i = i0; i < i1; ++i) o[i] *= inv_mask_norm(z[lag_to_grid(window_lag(i, W), M)], level);
    } else if (a.periodic) {
      for (int64_t i = i0; i < i1; ++i) o[i] *= inv_s;
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        lag[nd - 1] = window_lag(i, W);
        o[i] *= inv_norm_lag<T>(g, lag, false, inv_s);
      }
    }
  });
}

at::Tensor gather(const GatherArgs& a) {
  std::vector<int64_t> sizes{a.base.size(0), a.n_pairs};
  for (int d = 0; d < a.geom.ndim; ++d) sizes.push_back(a.geom.w[d]);
  auto out = at::empty(sizes, a.base.options());
  AT_DISPATCH_FLOATING_TYPES(a.base.scalar_type(), "gather", [&] { gather_t<scalar_t>(a, out); });
  return out;
}

template <typename T>
void embed_grad_t(const EmbedArgs& a, at::Tensor& out) {
  const Geometry g = a.geom;
  const int nd = g.ndim;
  const int64_t B = a.grad.size(0), nq = a.grad.size(1);
  int64_t grid = 1, win = 1, rows = B * nq, s_total = 1;
  for (int d = 0; d < nd; ++d) {
    grid *= g.m[d];
    win *= g.w[d];
    s_total *= g.n[d];
    if (d < nd - 1) rows *= g.m[d];
  }
  const int64_t M = g.m[nd - 1], W = g.w[nd - 1];
  const T* grad = a.grad.data_ptr<T>();
  const bool has_mask = a.zmask.defined();
  const T* zmask = has_mask ? a.zmask.data_ptr<T>() : nullptr;
  const T* zlevel = has_mask ? a.zlevel.data_ptr<T>() : nullptr;
  const int64_t Bm = has_mask ? a.zmask.size(0) : 1;
  const T inv_s = T(1) / static_cast<T>(s_total);
  T* o_all = out.data_ptr<T>();

  parallel_rows(rows, M, [&](int64_t row, int64_t i0, int64_t i1) {
    int64_t rem = row, pos[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    for (int d = nd - 2; d >= 0; --d) {
      pos[d] = rem % g.m[d];
      rem /= g.m[d];
    }
    const int64_t bq = rem, b = rem / nq;
    T* o = o_all + row * M;
    int64_t wrow = 0;
    bool inside = true;
    for (int d = 0; d < nd - 1; ++d) {
      const int64_t idx = grid_to_window(pos[d], g.m[d], g.w[d]);
      if (idx < 0) inside = false;
      lag[d] = window_lag(idx, g.w[d]);
      wrow = wrow * g.w[d] + idx;
    }
    if (!inside) {
      for (int64_t i = i0; i < i1; ++i) o[i] = T(0);
      return;
    }
    const T* gr = grad + bq * win + wrow * W;
    const int64_t bm = Bm == 1 ? 0 : b;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t idx = grid_to_window(i, M, W);
      if (idx < 0) {
        o[i] = T(0);
        continue;
      }
      lag[nd - 1] = window_lag(idx, W);
      const T norm = has_mask ? inv_mask_norm(zmask[bm * grid + (row % (grid / M)) * M + i], zlevel[bm])
                              : inv_norm_lag<T>(g, lag, a.periodic, inv_s);
      o[i] = gr[idx] * norm;
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
  parallel_rows(B * a.n_states, H, [&](int64_t row, int64_t i0, int64_t i1) {
    const int64_t b = row / a.n_states, u = row % a.n_states;
    const cpx<T>* g = G + b * nq * H;
    const cpx<T>* x = X + b * nu * H;
    cpx<T>* o = O + row * H;
    for (int64_t i = i0; i < i1; ++i) o[i] = combine_bin(terms, begin[u], end[u], g + i, x + i, H);
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

const TwoPointBackend kCpu{partition_check, pair_products, gather, embed_grad, combine_grad};

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

}  // namespace

TORCH_LIBRARY_IMPL(pymks_vae, CPU, m) {
  m.impl("two_point_stats", &two_point_stats_cpu);
  m.impl("two_point_stats_backward", &two_point_stats_backward_cpu);
}

}  // namespace pymks_vae
