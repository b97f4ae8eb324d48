// Device-independent orchestration of the fused spatial-statistics loss.
//
// With X = rfftn(x), T = rfftn(t), D_q = conj(X_i) X_j - conj(T_i) T_j for each pair q and N the
// number of pixels, Parseval gives
//   sum_q sum_r (s f_q(x)(r) - s f_q(t)(r))^2 = (s^2 / N^3) sum_q sum_k w_k |D_q,k|^2
// over the half spectrum (w_k: 1 or 2, see parseval_weight), and the gradient
//   dL/dx_a = irfftn( (2 s^2 / N^2) * [sum_{q: i=a} conj(D_q) X_j + sum_{q: j=a} D_q X_i] ).
// The forward pass therefore takes two forward transforms and prepares the gradient spectrum;
// the backward pass is one inverse transform.
#include "two_point.h"

#include <c10/core/DeviceGuard.h>

namespace pymks_vae {

std::tuple<at::Tensor, at::Tensor> stats_loss_forward(const at::Tensor& x_in, const at::Tensor& t_in,
                                                      at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                                                      double scale, bool need_grad,
                                                      const StatsLossBackend& be) {
  const char* op = "spatial_stats_loss";
  check_real_float(x_in, "x", op);
  check_like(t_in, "target", x_in, "x", op);
  check_field_shape(x_in, op);
  TORCH_CHECK_VALUE(x_in.sizes() == t_in.sizes(), op, ": target shape ", t_in.sizes(),
                    " differs from x shape ", x_in.sizes());
  // The kernels launch on the current device's stream: make it x's (cuda:1 while cuda:0 is current).
  const c10::DeviceGuard guard(x_in.device());
  TORCH_CHECK_VALUE(x_in.size(0) > 0, op, ": x is an empty batch");
  const int64_t n_state = x_in.size(1);
  check_pairs(pair_i, pair_j, n_state, op);
  std::map<int64_t, int32_t> pos;
  const std::vector<int64_t> states = pair_states(pair_i, pair_j, &pos);
  std::vector<int32_t> pa, pb;
  for (size_t k = 0; k < pair_i.size(); ++k) {
    pa.push_back(pos[pair_i[k]]);
    pb.push_back(pos[pair_j[k]]);
  }

  auto x = x_in.contiguous();
  auto t = t_in.contiguous();
  x = select_states(x, states);
  t = select_states(t, states);
  const auto dims = spatial_dims(x.dim());
  double n_pix = 1.0;
  for (int64_t d = 2; d < x.dim(); ++d) n_pix *= static_cast<double>(x.size(d));

  const int64_t B = x.size(0);
  auto values = at::empty({B}, x.options());
  std::vector<int64_t> half_sizes = x.sizes().vec();
  half_sizes.back() = half_sizes.back() / 2 + 1;
  auto spectrum = need_grad ? at::empty(half_sizes, x.options().dtype(c10::toComplexType(x.scalar_type())))
                            : at::empty({0}, x.options().dtype(c10::toComplexType(x.scalar_type())));
  const auto pa_t = ints_to(pa, x.device());
  const auto pb_t = ints_to(pb, x.device());
  const int64_t chunk = cache_chunk(x, 6 * x.size(1) * (x.numel() / (B * x.size(1))));
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    LossArgs a;
    a.x_hat = at::fft_rfftn(x.narrow(0, b0, n), c10::nullopt, dims).contiguous();
    a.t_hat = at::fft_rfftn(t.narrow(0, b0, n), c10::nullopt, dims).contiguous();
    check_spectrum_finite(a.x_hat, op, "x");
    check_spectrum_finite(a.t_hat, op, "target");
    a.pa = pa_t;
    a.pb = pb_t;
    a.m_last = x.size(x.dim() - 1);
    a.value_scale = scale * scale / (n_pix * n_pix * n_pix);
    a.grad_scale = 2.0 * scale * scale / (n_pix * n_pix);
    a.need_grad = need_grad;
    a.values = values.narrow(0, b0, n);
    if (need_grad) a.grad_spectrum = spectrum.narrow(0, b0, n);
    be.loss_pass(a);
  }
  return {values, spectrum};
}

at::Tensor stats_loss_backward(const at::Tensor& grad, const at::Tensor& spectrum,
                               at::IntArrayRef spatial, int64_t n_state, at::IntArrayRef states) {
  const char* op = "spatial_stats_loss_backward";
  TORCH_CHECK(spectrum.scalar_type() == at::kComplexFloat || spectrum.scalar_type() == at::kComplexDouble, op,
              ": spectrum must be complex64 or complex128, got ", spectrum.scalar_type());
  TORCH_CHECK(grad.device() == spectrum.device(), op, ": grad is on ", grad.device(), " but spectrum is on ",
              spectrum.device());
  // The per-sample gradient has the dtype of the forward's values, the real counterpart of the spectrum.
  TORCH_CHECK(grad.scalar_type() == c10::toRealValueType(spectrum.scalar_type()), op, ": grad has dtype ",
              grad.scalar_type(), " but spectrum has dtype ", spectrum.scalar_type(), " (grad must be ",
              c10::toRealValueType(spectrum.scalar_type()), ")");
  const int64_t nd = static_cast<int64_t>(spatial.size());
  TORCH_CHECK_VALUE(nd >= 1 && nd <= kMaxDims && spectrum.dim() == nd + 2, op, ": spectrum has shape ",
                    spectrum.sizes(), ", which does not match spatial ", spatial);
  for (int64_t d = 0; d < nd; ++d) {
    const int64_t want = d + 1 < nd ? spatial[d] : spatial[d] / 2 + 1;  // the half spectrum's last axis
    TORCH_CHECK_VALUE(spatial[d] >= 1 && spectrum.size(d + 2) == want, op, ": spectrum has shape ",
                      spectrum.sizes(), ", which does not match spatial ", spatial);
  }
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == spectrum.size(0), op,
                    ": grad must have shape (batch,)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(states.size()) == spectrum.size(1), op,
                    ": states does not match the saved spectrum");
  for (size_t k = 0; k < states.size(); ++k)
    TORCH_CHECK_VALUE(states[k] >= 0 && states[k] < n_state && (k == 0 || states[k] > states[k - 1]), op,
                      ": states must be increasing state indices below n_state=", n_state, ", got ", states);
  const c10::DeviceGuard guard(spectrum.device());
  std::vector<int64_t> view(spectrum.dim(), 1);
  view[0] = grad.size(0);
  const auto dims = spatial_dims(spectrum.dim());
  // The transform is linear: scale its real output in place rather than a copy of the spectrum.
  // (Always: telling a unit grad - reduction="sum" - apart would read it back to the host, a
  // device synchronisation on a GPU, for the price of one element-wise pass.) Chunks keep the
  // transform's internal copies in cache.
  std::vector<int64_t> out_sizes{spectrum.size(0), spectrum.size(1)};
  for (auto n : spatial) out_sizes.push_back(n);
  auto gx = at::empty(out_sizes, spectrum.options().dtype(c10::toRealValueType(spectrum.scalar_type())));
  const int64_t B = spectrum.size(0);
  const int64_t chunk = cache_chunk(gx, 6 * gx.numel() / B);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    auto out_c = gx.narrow(0, b0, n);
    at::fft_irfftn_out(out_c, spectrum.narrow(0, b0, n), spatial, dims);
  }
  gx.mul_(grad.view(view).to(gx.scalar_type()));
  if (static_cast<int64_t>(states.size()) == n_state) return gx.contiguous();
  std::vector<int64_t> sizes{grad.size(0), n_state};
  for (auto s : spatial) sizes.push_back(s);
  auto out = at::zeros(sizes, gx.options());
  out.index_copy_(1, longs_to(states.vec(), gx.device()), gx);
  return out;
}

}  // namespace pymks_vae
