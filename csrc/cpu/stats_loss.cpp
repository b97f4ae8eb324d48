// CPU kernel of the fused spatial-statistics loss (see stats_loss_driver.cpp for the math).
#include <ATen/ATen.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(pymks_vae, CPU, m) {
  m.impl("stats_loss", &stats_loss_cpu);
  m.impl("stats_loss_backward", &stats_loss_backward_cpu);
}

}  // namespace pymks_vae
