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

}  // namespace

TORCH_LIBRARY_IMPL(pymks_vae, CUDA, m) {
  m.impl("stats_loss", &stats_loss_cuda);
  m.impl("stats_loss_backward", &stats_loss_backward_cuda);
}

}  // namespace pymks_vae
