// CUDA kernels of the two-point operator: the same passes as csrc/cpu/two_point.cpp, one thread
// per element, with the arithmetic of spectral.h.
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

int partition_check(const at::Tensor& x, double tol) {
  // One fused reduction is not worth a custom kernel on a GPU; the largest deviation is NaN where
  // any is, which !(dev <= tol) refuses.
  const double dev = (x.sum(1) - 1.0).abs().max().item<double>();
  return dev <= tol ? (dev == 0.0 ? 2 : 1) : 0;
}

template <typename T>
__global__ void pair_products_kernel(const cpx<T>* X, const int32_t* a, const int32_t* b, cpx<T>* P,
                                     int64_t nf, int64_t nb, int64_t H, int64_t total) {
  PVAE_GRID_STRIDE(idx, total) {
    const int64_t i = idx % H, row = idx / H, k = row % nb, bb = row / nb;
    P[idx] = cmul_conj(X[(bb * nf + a[k]) * H + i], X[(bb * nf + b[k]) * H + i]);
  }
}

at::Tensor pair_products(const at::Tensor& xh, const at::Tensor& a, const at::Tensor& b) {
  auto sizes = xh.sizes().vec();
  sizes[1] = a.numel();
  auto out = at::empty(sizes, xh.options());
  const int64_t B = xh.size(0), nf = xh.size(1), nb = a.numel(), H = xh.numel() / (B * nf);
  const int64_t total = B * nb * H;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(at::toRealValueType(xh.scalar_type()), "pair_products", [&] {
    pair_products_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        reinterpret_cast<const cpx<scalar_t>*>(xh.data_ptr()), a.data_ptr<int32_t>(), b.data_ptr<int32_t>(),
        reinterpret_cast<cpx<scalar_t>*>(out.data_ptr()), nf, nb, H, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename T>
__global__ void power_half_kernel(const cpx<T>* X, const int32_t* idx, int64_t nf, int64_t na, int64_t H, int64_t h0,
                                  T scale, T* out, int64_t total) {
  // out[b, u, rest, k0] = scale |X[b, idx[u], k0, rest]|^2 (the first axis moved last).
  const int64_t rest = H / h0;
  PVAE_GRID_STRIDE(e, total) {
    const int64_t k0 = e % h0, r = (e / h0) % rest, row = e / H, u = row % na, b = row / na;
    out[e] = scale * cnorm2(X[(b * nf + idx[u]) * H + k0 * rest + r]);
  }
}

void power_half(const at::Tensor& xh, const at::Tensor& idx, double scale, at::Tensor& out) {
  const int64_t total = out.numel(), H = xh.numel() / (xh.size(0) * xh.size(1));
  const int64_t h0 = xh.dim() > 3 ? xh.size(2) : 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "power_half", [&] {
    power_half_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        reinterpret_cast<const cpx<scalar_t>*>(xh.data_ptr()), idx.data_ptr<int32_t>(), xh.size(1), idx.numel(), H,
        h0, static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
__global__ void gather_kernel(const T* even, int32_t n_auto, const T* base, int64_t nc, const T* dc,
                              MaskNorm<T> mask, const PairPlan* pairs, const Term* terms,
                              const VfTerm* vfs, Geometry g, bool periodic, int64_t nf, int64_t nq, int64_t grid,
                              int64_t even_numel, int64_t win, T s_total, T* out, int64_t total) {
  PVAE_GRID_STRIDE(idx, total) {
    const int64_t bq = idx / win, q = bq % nq, b = bq / nq;
    int64_t midx[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    unravel(idx % win, g.w, g.ndim, midx);
    int64_t pos = 0, pos_rev = 0;
    for (int d = 0; d < g.ndim; ++d) {
      lag[d] = window_lag(midx[d], g.w[d]);
      pos = pos * g.m[d] + lag_to_grid(lag[d], g.m[d]);
      pos_rev = pos_rev * g.m[d] + lag_to_grid(-lag[d], g.m[d]);
    }
    const int64_t epos = even_index(lag, g.m, g.ndim);
    const T v = assemble_pair(pairs[q], terms, vfs, even + b * n_auto * even_numel, even_numel, epos, n_auto,
                              base + b * nc * grid, grid, pos, pos_rev, dc + b * nf, s_total);
    out[idx] = v * (mask.active() ? mask.inv(b, pos) : inv_norm_lag<T>(g, lag, periodic, T(1) / s_total));
  }
}

void gather(const GatherArgs& a, at::Tensor& out) {
  const Geometry g = a.geom;
  int64_t grid = 1, win = 1, s_total = 1;
  for (int d = 0; d < g.ndim; ++d) {
    grid *= g.m[d];
    win *= g.w[d];
    s_total *= g.n[d];
  }
  const int64_t total = out.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.dc.scalar_type(), "gather", [&] {
    gather_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        a.even.defined() ? a.even.data_ptr<scalar_t>() : nullptr, a.n_auto,
        a.base.defined() ? a.base.data_ptr<scalar_t>() : nullptr, a.base.defined() ? a.base.size(1) : 0,
        a.dc.data_ptr<scalar_t>(), mask_norm_view<scalar_t>(a.zmask, a.zlevel),
        reinterpret_cast<const PairPlan*>(a.plan.pairs.data_ptr()), reinterpret_cast<const Term*>(a.plan.terms.data_ptr()),
        reinterpret_cast<const VfTerm*>(a.plan.vfs.data_ptr()), g, a.periodic, a.dc.size(1), a.n_pairs, grid,
        even_numel(g), win, static_cast<scalar_t>(s_total), out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
__global__ void embed_grad_kernel(const T* grad, MaskNorm<T> mask, Geometry g,
                                  bool periodic, int64_t nq, int64_t grid, int64_t win, T s_total, T* out,
                                  int64_t total) {
  PVAE_GRID_STRIDE(idx, total) {
    const int64_t bq = idx / grid, b = bq / nq, gpos = idx % grid;
    int64_t pos[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
    unravel(gpos, g.m, g.ndim, pos);
    int64_t wflat = 0;
    bool inside = true;
    for (int d = 0; d < g.ndim; ++d) {
      const int64_t w = grid_to_window(pos[d], g.m[d], g.w[d]);
      inside = inside && w >= 0;
      lag[d] = window_lag(w, g.w[d]);
      wflat = wflat * g.w[d] + w;
    }
    T v = T(0);
    if (inside) {
      v = grad[bq * win + wflat] *
          (mask.active() ? mask.inv(b, gpos) : inv_norm_lag<T>(g, lag, periodic, T(1) / s_total));
    }
    out[idx] = v;
  }
}

at::Tensor embed_grad(const EmbedArgs& a) {
  const Geometry g = a.geom;
  std::vector<int64_t> sizes{a.grad.size(0), a.grad.size(1)};
  int64_t grid = 1, win = 1, s_total = 1;
  for (int d = 0; d < g.ndim; ++d) {
    sizes.push_back(g.m[d]);
    grid *= g.m[d];
    win *= g.w[d];
    s_total *= g.n[d];
  }
  auto out = at::empty(sizes, a.grad.options());
  const int64_t total = out.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.grad.scalar_type(), "embed_grad", [&] {
    embed_grad_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        a.grad.data_ptr<scalar_t>(), mask_norm_view<scalar_t>(a.zmask, a.zlevel), g, a.periodic,
        a.grad.size(1), grid, win, static_cast<scalar_t>(s_total), out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename T>
__global__ void combine_grad_kernel(const cpx<T>* G, const cpx<T>* X, const int32_t* begin, const int32_t* end,
                                    const CombineTerm* terms, int64_t nq, int64_t nu, int64_t ns, int64_t H,
                                    T scale, cpx<T>* out, int64_t total) {
  PVAE_GRID_STRIDE(idx, total) {
    const int64_t i = idx % H, row = idx / H, u = row % ns, b = row / ns;
    out[idx] = cscale(combine_bin(terms, begin[u], end[u], G + b * nq * H + i, X + b * nu * H + i, H), scale);
  }
}

at::Tensor combine_grad(const CombineArgs& a) {
  auto sizes = a.x_hat.sizes().vec();
  sizes[1] = a.n_states;
  auto out = at::empty(sizes, a.x_hat.options());
  const int64_t B = a.x_hat.size(0), nu = a.x_hat.size(1), H = a.x_hat.numel() / (B * nu);
  const int64_t total = out.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(at::toRealValueType(a.x_hat.scalar_type()), "combine_grad", [&] {
    combine_grad_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        reinterpret_cast<const cpx<scalar_t>*>(a.g_hat.data_ptr()),
        reinterpret_cast<const cpx<scalar_t>*>(a.x_hat.data_ptr()), a.begin.data_ptr<int32_t>(),
        a.end.data_ptr<int32_t>(), reinterpret_cast<const CombineTerm*>(a.terms.data_ptr()), a.g_hat.size(1), nu,
        a.n_states, H, static_cast<scalar_t>(a.scale), reinterpret_cast<cpx<scalar_t>*>(out.data_ptr()), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

const TwoPointBackend kCuda{partition_check, pair_products, power_half,  gather,
                            embed_grad,      combine_grad,  nullptr,     even_grad_spectrum_cuda,
                            nullptr};

// No device guard here: the drivers check every tensor argument first (a CPU mask with a CUDA x
// lands here, and must get an error naming it), then set the current device to x's.

at::Tensor two_point_stats_cuda(const at::Tensor& x, at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                                bool periodic, at::IntArrayRef window, const c10::optional<at::Tensor>& mask,
                                int64_t partition) {
  return two_point_forward(x, pair_i, pair_j, periodic, window, mask, partition, kCuda);
}

at::Tensor two_point_stats_backward_cuda(const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef pair_i,
                                         at::IntArrayRef pair_j, bool periodic, at::IntArrayRef window,
                                         const c10::optional<at::Tensor>& mask) {
  return two_point_backward(grad, x, pair_i, pair_j, periodic, window, mask, kCuda);
}


std::tuple<at::Tensor, at::Tensor> two_point_stats_spectra_cuda(const at::Tensor& x, at::IntArrayRef pair_i,
                                                                  at::IntArrayRef pair_j, bool periodic,
                                                                  at::IntArrayRef window,
                                                                  const c10::optional<at::Tensor>& mask,
                                                                  int64_t partition) {
  return two_point_forward_spectra(x, pair_i, pair_j, periodic, window, mask, partition, kCuda);
}

at::Tensor two_point_stats_backward_spectra_cuda(const at::Tensor& grad, const at::Tensor& x_hat,
                                                  at::IntArrayRef pair_i, at::IntArrayRef pair_j, int64_t n_state,
                                                  at::IntArrayRef spatial, bool periodic,
                                                  const c10::optional<at::Tensor>& mask) {
  return two_point_backward_spectra(grad, x_hat, pair_i, pair_j, n_state, spatial, periodic, mask, kCuda);
}

}  // namespace

at::Tensor combine_grad_cuda(const CombineArgs& args) { return combine_grad(args); }

TORCH_LIBRARY_IMPL(pymks_vae, CUDA, m) {
  m.impl("two_point_stats", &two_point_stats_cuda);
  m.impl("two_point_stats_backward", &two_point_stats_backward_cuda);
  m.impl("two_point_stats_spectra", &two_point_stats_spectra_cuda);
  m.impl("two_point_stats_backward_spectra", &two_point_stats_backward_spectra_cuda);
}

}  // namespace pymks_vae
