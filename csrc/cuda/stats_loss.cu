// CUDA kernel of the fused spatial-statistics loss: one thread per (sample, spectral bin), with
// the arithmetic of spectral.h (see stats_loss_driver.cpp for the math).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "cuda/cuda_loops.cuh"
#include "spectral.h"
#include "two_point.h"

namespace pymks_vae {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

template <typename T>
__global__ void loss_kernel(const cpx<T>* X, const cpx<T>* Tt, const int32_t* pa, const int32_t* pb, int64_t nq,
                            int64_t nu, int64_t H, int64_t K, int64_t m_last, T gs, cpx<T>* G, T* contrib,
                            int64_t total) {
  PVAE_GRID_STRIDE(idx, total) {
    const int64_t b = idx / H, i = idx % H;
    const int64_t off = b * nu * H + i;
    const T w = parseval_weight<T>(i % K, m_last);
    if (G != nullptr)
      for (int64_t u = 0; u < nu; ++u) G[off + u * H] = {T(0), T(0)};
    T acc = T(0);
    for (int64_t q = 0; q < nq; ++q) {
      const cpx<T> xa = X[off + pa[q] * H], xb = X[off + pb[q] * H];
      const cpx<T> d = pair_difference(xa, xb, Tt[off + pa[q] * H], Tt[off + pb[q] * H]);
      acc += w * cnorm2(d);
      if (G != nullptr) {
        const cpx<T> ds = cscale(d, gs);
        G[off + pa[q] * H] = cadd(G[off + pa[q] * H], cmul_conj(ds, xb));
        G[off + pb[q] * H] = cadd(G[off + pb[q] * H], cmul(ds, xa));
      }
    }
    contrib[idx] = acc;
  }
}

void loss_pass(const LossArgs& a) {
  const auto real = at::toRealValueType(a.x_hat.scalar_type());
  const int64_t B = a.x_hat.size(0), nu = a.x_hat.size(1), H = a.x_hat.numel() / (B * nu);
  const int64_t K = a.x_hat.size(a.x_hat.dim() - 1);
  auto contrib = at::empty({B, H}, a.x_hat.options().dtype(real));
  const int64_t total = B * H;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(real, "stats_loss", [&] {
    loss_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        reinterpret_cast<const cpx<scalar_t>*>(a.x_hat.data_ptr()),
        reinterpret_cast<const cpx<scalar_t>*>(a.t_hat.data_ptr()), a.pa.data_ptr<int32_t>(),
        a.pb.data_ptr<int32_t>(), a.pa.numel(), nu, H, K, a.m_last, static_cast<scalar_t>(a.grad_scale),
        a.need_grad ? reinterpret_cast<cpx<scalar_t>*>(a.grad_spectrum.data_ptr()) : nullptr,
        contrib.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  a.values.copy_(contrib.sum(1).mul_(a.value_scale));
}

const StatsLossBackend kCuda{loss_pass};

// No device guard here: the drivers check every tensor argument first, then set the current device.

std::tuple<at::Tensor, at::Tensor> stats_loss_cuda(const at::Tensor& x, const at::Tensor& target,
                                                   at::IntArrayRef pair_i, at::IntArrayRef pair_j, double scale,
                                                   bool need_grad) {
  return stats_loss_forward(x, target, pair_i, pair_j, scale, need_grad, kCuda);
}

at::Tensor stats_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& spectrum, at::IntArrayRef spatial,
                                    int64_t n_state, at::IntArrayRef states) {
  return stats_loss_backward(grad, spectrum, spatial, n_state, states);
}


// ------------------------------------------------------------------ general loss (window, weights, padding)
template <typename T>
__global__ void power_diff_half_kernel(const cpx<T>* X, const cpx<T>* Tt, const int32_t* idx, int64_t nf, int64_t na,
                                       int64_t H, int64_t h0, T scale, T* out, int64_t total) {
  // out[b, u, rest, k0] = scale (|X|^2 - |T|^2)[b, idx[u], k0, rest] (the first axis moved last).
  const int64_t rest = H / h0;
  PVAE_GRID_STRIDE(e, total) {
    const int64_t k0 = e % h0, r = (e / h0) % rest, row = e / H, u = row % na, b = row / na;
    const int64_t i = (b * nf + idx[u]) * H + k0 * rest + r;
    out[e] = scale * auto_difference(X[i], Tt[i]);
  }
}

void power_diff_half(const at::Tensor& xh, const at::Tensor& th, const at::Tensor& idx, double scale, at::Tensor& out) {
  const int64_t total = out.numel(), H = xh.numel() / (xh.size(0) * xh.size(1));
  const int64_t h0 = xh.dim() > 3 ? xh.size(2) : 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "power_diff_half", [&] {
    power_diff_half_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        reinterpret_cast<const cpx<scalar_t>*>(xh.data_ptr()), reinterpret_cast<const cpx<scalar_t>*>(th.data_ptr()),
        idx.data_ptr<int32_t>(), xh.size(1), idx.numel(), H, h0, static_cast<scalar_t>(scale),
        out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
__global__ void diff_products_kernel(const cpx<T>* X, const cpx<T>* Tt, const int32_t* a, const int32_t* b, cpx<T>* P,
                                     int64_t nf, int64_t nb, int64_t H, int64_t total) {
  PVAE_GRID_STRIDE(idx, total) {
    const int64_t i = idx % H, row = idx / H, k = row % nb, bb = row / nb;
    const int64_t ia = (bb * nf + a[k]) * H + i, ib = (bb * nf + b[k]) * H + i;
    P[idx] = pair_difference(X[ia], X[ib], Tt[ia], Tt[ib]);
  }
}

at::Tensor diff_products(const at::Tensor& xh, const at::Tensor& th, const at::Tensor& a, const at::Tensor& b) {
  auto sizes = xh.sizes().vec();
  sizes[1] = a.numel();
  auto out = at::empty(sizes, xh.options());
  const int64_t B = xh.size(0), nf = xh.size(1), nb = a.numel(), H = xh.numel() / (B * nf);
  const int64_t total = B * nb * H;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(at::toRealValueType(xh.scalar_type()), "diff_products", [&] {
    diff_products_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        reinterpret_cast<const cpx<scalar_t>*>(xh.data_ptr()), reinterpret_cast<const cpx<scalar_t>*>(th.data_ptr()),
        a.data_ptr<int32_t>(), b.data_ptr<int32_t>(), reinterpret_cast<cpx<scalar_t>*>(out.data_ptr()), nf, nb, H,
        total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One thread per (sample, pair, lag of the window): the same lookups and arithmetic as the CPU's
// row loop, through spectral.h's index maps.
template <typename T>
__global__ void window_kernel(const T* even, int64_t na, int64_t en, const T* cross, int64_t nc, int64_t cn,
                              const WinPair* pairs, const T* weight, const T* offset, Geometry g, bool periodic,
                              int64_t nq, int64_t win, T scale, T inv_s, T* grad, T* contrib, T* contrib_off,
                              int64_t total) {
  PVAE_GRID_STRIDE(idx, total) {
    const int64_t bq = idx / win, q = bq % nq, b = bq / nq, wflat = idx % win;
    int64_t widx[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    unravel(wflat, g.w, g.ndim, widx);
    for (int d = 0; d < g.ndim; ++d) lag[d] = window_lag(widx[d], g.w[d]);
    const WinPair p = pairs[q];
    const T delta = p.is_auto ? even[(b * na + p.base) * en + even_index(lag, g.m, g.ndim)]
                              : cross[(b * nc + p.base) * cn + cross_index(widx, lag, g)];
    const T inv = inv_norm_lag<T>(g, lag, periodic, inv_s);
    T gv, goff;
    contrib[idx] = window_loss_lag<T>(delta, inv, offset ? offset[bq] : T(0), weight ? weight[q * win + wflat] : T(1),
                                      scale, gv, goff);
    if (grad != nullptr) grad[idx] = gv;
    if (contrib_off != nullptr) contrib_off[idx] = goff;
  }
}

void window_pass(const WindowLossArgs& a) {
  const Geometry& g = a.geom;
  int64_t win = 1, s_total = 1;
  for (int d = 0; d < g.ndim; ++d) {
    win *= g.w[d];
    s_total *= g.n[d];
  }
  const int64_t B = a.values.size(0), total = B * a.n_pairs * win;
  auto contrib = at::empty({B, a.n_pairs * win}, a.values.options());
  auto contrib_off = a.grad_offset.defined() ? at::empty({B, a.n_pairs, win}, a.values.options()) : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.values.scalar_type(), "window_pass", [&] {
    window_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        a.even.defined() ? a.even.data_ptr<scalar_t>() : nullptr, a.even.defined() ? a.even.size(1) : 0,
        a.even.defined() ? a.even.size(2) : 0, a.cross.defined() ? a.cross.data_ptr<scalar_t>() : nullptr,
        a.cross.defined() ? a.cross.size(1) : 0, a.cross.defined() ? a.cross.size(2) : 0,
        reinterpret_cast<const WinPair*>(a.pairs.data_ptr()),
        a.weight.defined() ? a.weight.data_ptr<scalar_t>() : nullptr,
        a.offset.defined() ? a.offset.data_ptr<scalar_t>() : nullptr, g, a.periodic, a.n_pairs, win,
        static_cast<scalar_t>(a.scale), scalar_t(1) / static_cast<scalar_t>(s_total),
        a.grad_window.defined() ? a.grad_window.data_ptr<scalar_t>() : nullptr, contrib.data_ptr<scalar_t>(),
        contrib_off.defined() ? contrib_off.data_ptr<scalar_t>() : nullptr, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  a.values.copy_(contrib.sum(1));
  if (contrib_off.defined()) a.grad_offset.copy_(contrib_off.sum(2));
}

template <typename T>
__global__ void even_grad_spectrum_kernel(const cpx<T>* X, const T* G, const int32_t* idx, int64_t nf, int64_t nq,
                                          int64_t H, int64_t h0, T factor, cpx<T>* out, bool accumulate,
                                          int64_t total) {
  // out[b, u, k0, r] (+)= factor * G[b, idx[u], r, k0] * X[b, u, k0, r] (see even_grad_spectrum)
  const int64_t rest = H / h0;
  PVAE_GRID_STRIDE(e, total) {
    const int64_t r = e % rest, k0 = (e / rest) % h0, row = e / H, u = row % nf, b = row / nf;
    if (idx[u] < 0) {
      if (!accumulate) out[e] = cpx<T>{T(0), T(0)};
      continue;
    }
    const cpx<T> v = cscale(X[e], factor * G[(b * nq + idx[u]) * H + r * h0 + k0]);
    out[e] = accumulate ? cadd(out[e], v) : v;
  }
}

}  // namespace

void even_grad_spectrum_cuda(const at::Tensor& xh, const at::Tensor& g, const at::Tensor& idx, double factor,
                             at::Tensor& out, bool accumulate) {
  const int64_t total = out.numel(), H = xh.numel() / (xh.size(0) * xh.size(1));
  const int64_t h0 = xh.dim() > 3 ? xh.size(2) : 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "even_grad_spectrum", [&] {
    even_grad_spectrum_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        reinterpret_cast<const cpx<scalar_t>*>(xh.data_ptr()), g.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(),
        xh.size(1), g.size(1), H, h0, static_cast<scalar_t>(factor),
        reinterpret_cast<cpx<scalar_t>*>(out.data_ptr()), accumulate, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

// No matrix-product route for small windows here (null): the pruned transforms serve every window.
const WindowLossBackend kCudaWindow{power_diff_half,         diff_products, window_pass, combine_grad_cuda,
                                    even_grad_spectrum_cuda, nullptr,       nullptr};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_loss_window_cuda(
    const at::Tensor& x, const at::Tensor& target, at::IntArrayRef pair_i, at::IntArrayRef pair_j, bool periodic,
    at::IntArrayRef window, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& offset,
    double scale, bool need_grad) {
  return stats_loss_window_forward(x, target, pair_i, pair_j, periodic, window, weight, offset, scale, need_grad,
                                   kCudaWindow);
}

at::Tensor stats_loss_window_backward_cuda(const at::Tensor& grad, const at::Tensor& grad_window,
                                           const at::Tensor& x_hat, at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                                           int64_t n_state, at::IntArrayRef spatial, bool periodic) {
  return stats_loss_window_backward(grad, grad_window, x_hat, pair_i, pair_j, n_state, spatial, periodic,
                                    kCudaWindow);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymks_vae, CUDA, m) {
  m.impl("stats_loss", &stats_loss_cuda);
  m.impl("stats_loss_backward", &stats_loss_backward_cuda);
  m.impl("stats_loss_window", &stats_loss_window_cuda);
  m.impl("stats_loss_window_backward", &stats_loss_window_backward_cuda);
}

}  // namespace pymks_vae
