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

#include "cpu/gemm_dft.h"

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <map>

namespace pymks_vae {

std::tuple<at::Tensor, at::Tensor> stats_loss_forward(const at::Tensor& x_in, const at::Tensor& t_in,
                                                      at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                                                      double scale, bool need_grad,
                                                      const StatsLossBackend& be) {
  const char* op = "spatial_stats_loss";
  check_real_float(x_in, "x", op);
  check_like(t_in, "target", x_in, "x", op);
  check_field_shape(x_in, op);
  PYMKS_CHECK_VALUE(x_in.sizes() == t_in.sizes(), op, ": target shape ", t_in.sizes(),
                    " differs from x shape ", x_in.sizes());
  // The kernels launch on the current device's stream: make it x's (cuda:1 while cuda:0 is current).
  const c10::DeviceGuard guard(x_in.device());
  PYMKS_CHECK_VALUE(x_in.size(0) > 0, op, ": x is an empty batch");
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
  const auto spatial = x.sizes().slice(2);
  double n_pix = 1.0;
  for (int64_t d = 2; d < x.dim(); ++d) n_pix *= static_cast<double>(x.size(d));

  const int64_t B = x.size(0);
  auto values = at::empty({B}, x.options());
  std::vector<int64_t> spec_sizes = x.sizes().vec();
  spec_sizes.back() = spec_sizes.back() / 2 + 1;
  auto spectrum = need_grad ? at::empty(spec_sizes, x.options().dtype(c10::toComplexType(x.scalar_type())))
                            : at::empty({0}, x.options().dtype(c10::toComplexType(x.scalar_type())));
  const auto pa_t = ints_to(pa, x.device());
  const auto pb_t = ints_to(pb, x.device());
  const int64_t chunk = cache_chunk(x, 6 * x.size(1) * (x.numel() / (B * x.size(1))));
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    LossArgs a;
    // rfft_grid: on the CPU MKL's DFTI straight into the result, or the matrix products of
    // small grids with a large prime factor (transforms.cpp).
    a.x_hat = rfft_grid(x.narrow(0, b0, n), spatial, false);
    a.t_hat = rfft_grid(t.narrow(0, b0, n), spatial, false);
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
  PYMKS_CHECK_VALUE(nd >= 1 && nd <= kMaxDims && spectrum.dim() == nd + 2, op, ": spectrum has shape ",
                    spectrum.sizes(), ", which does not match spatial ", spatial);
  for (int64_t d = 0; d < nd; ++d) {
    const int64_t want = d + 1 < nd ? spatial[d] : spatial[d] / 2 + 1;  // the half spectrum's last axis
    PYMKS_CHECK_VALUE(spatial[d] >= 1 && spectrum.size(d + 2) == want, op, ": spectrum has shape ",
                      spectrum.sizes(), ", which does not match spatial ", spatial);
  }
  PYMKS_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == spectrum.size(0), op,
                    ": grad must have shape (batch,)");
  PYMKS_CHECK_VALUE(static_cast<int64_t>(states.size()) == spectrum.size(1), op,
                    ": states does not match the saved spectrum");
  for (size_t k = 0; k < states.size(); ++k)
    PYMKS_CHECK_VALUE(states[k] >= 0 && states[k] < n_state && (k == 0 || states[k] > states[k - 1]), op,
                      ": states must be increasing state indices below n_state=", n_state, ", got ", states);
  const c10::DeviceGuard guard(spectrum.device());
  std::vector<int64_t> view(spectrum.dim(), 1);
  view[0] = grad.size(0);
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
    if (spectrum.device().is_cpu()) {
      // irfft_grid may overwrite its input, and the spectrum is saved by autograd (a second
      // backward with retain_graph reads it again): it gets a copy of this chunk, as ATen's irfftn
      // makes one too.
      irfft_grid(spectrum.narrow(0, b0, n).clone(), spatial, false, out_c);
    } else {
      at::fft_irfftn_out(out_c, spectrum.narrow(0, b0, n), spatial, spatial_dims(spectrum.dim()));
    }
  }
  gx.mul_(grad.view(view).to(gx.scalar_type()));
  if (static_cast<int64_t>(states.size()) == n_state) return gx.contiguous();
  std::vector<int64_t> sizes{grad.size(0), n_state};
  for (auto s : spatial) sizes.push_back(s);
  auto out = at::zeros(sizes, gx.options());
  out.index_copy_(1, longs_to(states.vec(), gx.device()), gx);
  return out;
}


// ------------------------------------------------------------------ general loss
// A lag window, per-lag weights or zero padding (non-periodic statistics) break the Parseval
// shortcut above: the loss needs the statistics on the window itself. Per pair, the difference
// of the unnormalised correlations of x and target is one inverse transform of the difference of
// their spectral products (linearity), pruned to the window: auto pairs take the pruned even
// transform of |X|^2 - |T|^2, cross pairs an inverse transform cropped to the window axis by axis.
// The forward pass also writes dL/dC(x) on the window and keeps the spectra of x, so the backward
// pass is one (pruned) forward transform of that window, products with the saved spectra, and one
// inverse transform: x is never transformed twice.
namespace {

struct LossGeometry {
  Geometry geom;
  std::vector<int64_t> dims, grid;
};

LossGeometry loss_geometry(at::IntArrayRef spatial, at::IntArrayRef window, bool periodic, const char* op) {
  const int64_t nd = static_cast<int64_t>(spatial.size());
  PYMKS_CHECK_VALUE(static_cast<int64_t>(window.size()) == nd, op, ": window has ", window.size(), " entries for ",
                    nd, " spatial dims");
  for (int64_t d = 0; d < nd; ++d)
    PYMKS_CHECK_VALUE(window[d] >= 1 && window[d] <= spatial[d], op, ": window ", window,
                      " does not fit spatial size ", spatial);
  LossGeometry lg{};
  lg.geom = lag_geometry(spatial, window, periodic);  // the operator's grid
  lg.dims = spatial_dims(nd + 2);
  lg.grid.assign(lg.geom.m, lg.geom.m + nd);
  return lg;
}

// grad_window (B, k, *w) with sample b scaled by grad[b]. On the CPU a loop over the samples (it
// reads grad through its stride: a sum's gradient arrives expanded); as an ATen product the call
// cost 10 us at 32 x 64^2, for 7200 numbers.
at::Tensor scale_windows(const at::Tensor& grad_window, const at::Tensor& grad, const std::vector<int64_t>& view) {
  if (!grad_window.device().is_cpu()) return grad_window * grad.view(view);
  const auto gw = grad_window.contiguous();
  auto out = at::empty_like(gw);
  const int64_t B = gw.size(0), per = B > 0 ? gw.numel() / B : 0, gs = grad.stride(0);
  AT_DISPATCH_FLOATING_TYPES(gw.scalar_type(), "scale_windows", [&] {
    const scalar_t* src = gw.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t s = gp[b * gs];
      for (int64_t i = 0; i < per; ++i) dst[b * per + i] = src[b * per + i] * s;
    }
  });
  return out;
}

// The window's lags along `dim` of a grid of size m: negative lags from the end, then 0, 1, ...
at::Tensor grid_to_window_rows(const at::Tensor& t, int64_t dim, int64_t m, int64_t w) {
  const int64_t hw = w / 2;
  if (hw == 0) return t.narrow(dim, 0, w);
  return at::cat({t.narrow(dim, m - hw, hw), t.narrow(dim, 0, w - hw)}, dim);
}

// The adjoint: the window placed on a zero grid of size m along `dim`.
at::Tensor window_to_grid_rows(const at::Tensor& t, int64_t dim, int64_t m, int64_t w) {
  const int64_t hw = w / 2;
  auto sizes = t.sizes().vec();
  sizes[dim] = m;
  auto out = at::zeros(sizes, t.options());
  out.narrow(dim, 0, w - hw).copy_(t.narrow(dim, hw, w - hw));
  if (hw > 0) out.narrow(dim, m - hw, hw).copy_(t.narrow(dim, 0, hw));
  return out;
}

// The pruned one-dimensional transforms below run as matrix products on the CPU along the sides
// where MKL's transforms are slowest, for windows not too large (cpu::window_products).

// With cross pairs the general loss keeps its spectra in the "moved" layout: the first spatial
// axis last, (B, k, m_1, .., h_{nd-1}, m_0) for 2D and 3D - power_half's layout, in which the
// pruned transforms start - and (B, k, h_0) in 1D. (Auto pairs alone keep the natural layout,
// see even_gradient_path: their elementwise passes move the axis.) rfft_grid and irfft_grid
// (transforms.cpp) transform
// into and out of it: on the CPU MKL reads and writes it through strides; through ATen each
// transform then runs over the contiguous last axis or the axes of the row-major rest (a transform
// along a strided first axis cost about twice as much there: irfftn of 32 x 224^2 took 8.6 ms
// against 4.5 ms for the same transforms with one transpose). The elementwise passes (products,
// power spectra, the gradient's combination) read any layout alike.

// Inverse transform of spectra in the moved layout onto the pruned cross layout (spectral.h): the
// complex axes one by one, each cropped to the window before the next (so later transforms run on
// fewer rows), then the complex-to-real transform of the last axis on the window's rows only.
at::Tensor cross_window_inverse(const at::Tensor& spec, const Geometry& g) {
  const int nd = g.ndim;
  at::Tensor p = spec;
  if (nd > 1) {
    p = (cpu::window_products(p, g.m[0], g.w[0])
             ? cpu::ifft_last_to_window(p, g.w[0])
             : grid_to_window_rows(at::fft_ifft(p, g.m[0], -1), nd + 1, g.m[0], g.w[0]))
            .movedim(-1, 2)
            .contiguous();
    for (int d = 1; d < nd - 1; ++d)
      p = grid_to_window_rows(at::fft_ifft(p, g.m[d], d + 2), d + 2, g.m[d], g.w[d]);
  }
  const int64_t m_last = g.m[nd - 1];
  auto out = cpu::window_products(p, m_last, m_last / 2 + 1) ? cpu::irfft_last(p, m_last)
                                                             : at::fft_irfft(p, m_last, nd + 1);
  return out.contiguous().view({spec.size(0), spec.size(1), -1});
}

// The window (B, k, *w) placed on the zero grid and transformed along every axis but the first:
// the last axis first, on the window's rows only, then each further axis after placing the
// window's rows on the grid. The first axis is left untransformed, on the window's w_0 rows.
at::Tensor window_forward_rest(const at::Tensor& win, const Geometry& g) {
  const int nd = g.ndim;
  auto p = cpu::window_products(win, g.m[nd - 1], g.w[nd - 1])
               ? cpu::window_rfft_last(win, g.m[nd - 1])
               : at::fft_rfft(window_to_grid_rows(win, nd + 1, g.m[nd - 1], g.w[nd - 1]), g.m[nd - 1], nd + 1);
  for (int d = nd - 2; d >= 1; --d) p = at::fft_fft(window_to_grid_rows(p, d + 2, g.m[d], g.w[d]), g.m[d], d + 2);
  return p;
}

// rfftn of the window (B, k, *w) placed on the zero grid, in the moved layout: window_forward_rest,
// then the first axis, placed on the grid and moved last.
at::Tensor window_forward(const at::Tensor& win, const Geometry& g) {
  auto p = window_forward_rest(win, g);
  if (g.ndim == 1) return p.contiguous();
  if (cpu::window_products(p, g.m[0], g.w[0])) return cpu::window_fft_last(p.movedim(2, -1), g.m[0]);
  p = window_to_grid_rows(p.movedim(2, -1), g.ndim + 1, g.m[0], g.w[0]);
  return at::fft_fft(p, g.m[0], -1);
}

// The even part of a window (B, k, *w) on the grid's lags, (g(r) + g(-r)) / 2: each axis flipped
// about lag 0 (an even window is then the whole periodic axis, which holds lag -m/2 once, its own
// mirror on the grid).
at::Tensor even_part(const at::Tensor& win, const Geometry& g) {
  at::Tensor mirror = win;
  for (int d = 0; d < g.ndim; ++d) {
    mirror = mirror.flip({d + 2});
    if (g.w[d] % 2 == 0) mirror = mirror.roll({1}, {d + 2});
  }
  return (win + mirror) * 0.5;
}

// Re(rfftn) of a window placed on the zero grid, in the moved layout, for 2D and 3D: the real
// part of a window's transform is the transform of its even part, which is real and even. So
// after the transforms of the other axes (on the window's rows only, as window_forward), the
// first axis holds a Hermitian sequence whose transform is real: a complex-to-real transform of
// half the length from the lags r_0 >= 0, where window_forward runs a full complex transform
// over a zero-filled grid.
at::Tensor even_window_forward_real(const at::Tensor& win_in, const Geometry& g_in) {
  const int nd = g_in.ndim;
  // An even window shorter than its axis (non-periodic statistics over the whole field) holds
  // lags -w/2 .. w/2 - 1: one zero row for lag w/2 makes its lag set symmetric.
  Geometry g = g_in;
  at::Tensor win = win_in;
  for (int d = 0; d < nd; ++d) {
    if (g.w[d] % 2 != 0 || g.w[d] == g.m[d]) continue;
    auto sizes = win.sizes().vec();
    sizes[d + 2] = 1;
    win = at::cat({win, at::zeros(sizes, win.options())}, d + 2);
    g.w[d] += 1;
  }
  const auto p = window_forward_rest(even_part(win, g), g).movedim(2, -1);  // (B, k, .., w_0)
  const int64_t m0 = g.m[0], w0 = g.w[0], hw = w0 / 2, h0 = m0 / 2 + 1;
  if (cpu::window_products(p, m0, w0)) return cpu::window_real_fft_last(p, m0);  // the whole transform's real part
  auto sizes = p.sizes().vec();
  sizes.back() = h0;
  auto half = at::zeros(sizes, p.options());
  // The complex-to-real transform runs with exp(+i k r): fed H(-r_0) = conj(H(r_0)), it gives the
  // forward transform sum_r H(r_0) exp(-i k r).
  half.narrow(-1, 0, w0 - hw).copy_(p.narrow(-1, hw, w0 - hw).conj());  // lags 0 .. w0 - hw - 1
  if (hw > 0 && m0 - hw < h0) half.narrow(-1, m0 - hw, 1).copy_(p.narrow(-1, 0, 1).conj());  // lag -m0/2
  return at::fft_irfft(half, m0, -1, "forward");  // unnormalised, as the forward transform
}

// Whether the gradient takes the even path: auto pairs only, at most one per state, in 2D or 3D.
// There the gradient spectrum of state a is 2 Re(G_a) X_a (see stats_loss_window_backward), and
// the kept spectra stay in the natural layout: the transforms into and out of it are the plain
// contiguous ones, and the elementwise passes move the first axis instead (power_diff_half writes
// power_half's layout, even_grad_spectrum reads it), on real arrays of half the bytes. Measured
// against the moved layout on the 2-core AMD EPYC (224^2, cutoff 20): the transposing copies of
// complex spectra were about a fifth of the loss's time.
bool even_gradient_path(at::IntArrayRef pair_i, at::IntArrayRef pair_j, int64_t nd) {
  if (nd < 2) return false;
  std::vector<int64_t> seen;
  for (size_t q = 0; q < pair_i.size(); ++q) {
    if (pair_i[q] != pair_j[q] || std::find(seen.begin(), seen.end(), pair_i[q]) != seen.end()) return false;
    seen.push_back(pair_i[q]);
  }
  return true;
}

}  // namespace

at::Tensor even_window_spectrum(const at::Tensor& win, const Geometry& g) { return even_window_forward_real(win, g); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_loss_window_forward(
    const at::Tensor& x_in, const at::Tensor& t_in, at::IntArrayRef pair_i, at::IntArrayRef pair_j, bool periodic,
    at::IntArrayRef window, const c10::optional<at::Tensor>& weight_in, const c10::optional<at::Tensor>& offset_in,
    double scale, bool need_grad, const WindowLossBackend& be) {
  const char* op = "spatial_stats_loss";
  check_real_float(x_in, "x", op);
  check_like(t_in, "target", x_in, "x", op);
  check_field_shape(x_in, op);
  PYMKS_CHECK_VALUE(x_in.sizes() == t_in.sizes(), op, ": target shape ", t_in.sizes(), " differs from x shape ",
                    x_in.sizes());
  PYMKS_CHECK_VALUE(x_in.size(0) > 0, op, ": x is an empty batch");
  const int64_t n_state = x_in.size(1), nq = static_cast<int64_t>(pair_i.size());
  check_pairs(pair_i, pair_j, n_state, op);
  const LossGeometry lg = loss_geometry(x_in.sizes().slice(2), window, periodic, op);
  const Geometry& g = lg.geom;
  at::Tensor weight;
  if (weight_in.has_value() && weight_in->defined()) {
    check_like(*weight_in, "weight", x_in, "x", op);
    std::vector<int64_t> want{nq};
    want.insert(want.end(), window.begin(), window.end());
    PYMKS_CHECK_VALUE(weight_in->sizes() == at::IntArrayRef(want), op, ": weight has shape ", weight_in->sizes(),
                      ", expected (n_pairs, *window) = ", at::IntArrayRef(want));
    weight = weight_in->contiguous();
  }
  at::Tensor offset;
  if (offset_in.has_value() && offset_in->defined()) {
    check_like(*offset_in, "offset", x_in, "x", op);
    PYMKS_CHECK_VALUE(offset_in->sizes() == at::IntArrayRef({x_in.size(0), nq}), op, ": offset has shape ",
                      offset_in->sizes(), ", expected (batch, n_pairs) = (", x_in.size(0), ", ", nq, ")");
    offset = offset_in->contiguous();
  }
  const c10::DeviceGuard guard(x_in.device());

  // Auto pairs share one even transform per state, cross pairs take one inverse transform each.
  std::map<int64_t, int32_t> pos;
  const std::vector<int64_t> states = pair_states(pair_i, pair_j, &pos);
  std::vector<int32_t> auto_states, cross_a, cross_b;
  std::map<int32_t, int32_t> auto_base;
  std::vector<WinPair> wp;
  for (int64_t q = 0; q < nq; ++q) {
    const int32_t a = pos[pair_i[q]], b = pos[pair_j[q]];
    if (a == b) {
      auto it = auto_base.find(a);
      if (it == auto_base.end()) {
        it = auto_base.emplace(a, static_cast<int32_t>(auto_states.size())).first;
        auto_states.push_back(a);
      }
      wp.push_back({it->second, 1});
    } else {
      wp.push_back({static_cast<int32_t>(cross_a.size()), 0});
      cross_a.push_back(a);
      cross_b.push_back(b);
    }
  }
  const auto dev = x_in.device();
  const bool moved = !even_gradient_path(pair_i, pair_j, g.ndim);
  const bool gemm = !moved && be.even_values_gemm != nullptr && even_gemm_applies(g);
  const auto pairs_t = table_to(wp, dev);
  const auto auto_t = gemm ? at::Tensor() : ints_to(auto_states, dev);  // power_diff_half's states
  const auto ca_t = ints_to(cross_a, dev), cb_t = ints_to(cross_b, dev);

  auto x = select_states(x_in.contiguous(), states);
  auto t = select_states(t_in.contiguous(), states);
  const int64_t B = x.size(0), nu = x.size(1);
  auto values = at::empty({B}, x.options());
  std::vector<int64_t> wsizes{B, nq};
  for (int d = 0; d < g.ndim; ++d) wsizes.push_back(g.w[d]);
  const auto ctype = x.options().dtype(c10::toComplexType(x.scalar_type()));
  at::Tensor grad_window = need_grad ? at::empty(wsizes, x.options()) : at::empty({0}, x.options());
  at::Tensor x_hat_all = at::empty({0}, ctype);
  at::Tensor grad_offset = need_grad && offset.defined() ? at::empty({B, nq}, x.options()) : at::empty({0}, x.options());

  int64_t grid = 1;
  for (int d = 0; d < g.ndim; ++d) grid *= g.m[d];
  const int64_t chunk = cache_chunk(x, (6 * nu + 2 * nq) * grid);
  // The spectra kept for the backward pass are transformed chunk by chunk too and copied out while
  // in cache: transforming the whole batch at once took twice as long (measured, 32 x 224^2).
  if (need_grad) x_hat_all = at::empty(half_sizes(B, nu, lg.grid, moved), ctype);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    // x's spectra straight into the ones kept for the backward pass.
    const at::Tensor x_hat =
        rfft_grid(x.narrow(0, b0, n), lg.grid, moved, need_grad ? x_hat_all.narrow(0, b0, n) : at::Tensor());
    const at::Tensor t_hat = rfft_grid(t.narrow(0, b0, n), lg.grid, moved);
    check_spectrum_finite(x_hat, op, "x");
    check_spectrum_finite(t_hat, op, "target");
    WindowLossArgs a;
    if (!auto_states.empty() && gemm) {
      a.even = be.even_values_gemm(x_hat, t_hat, auto_states, g);
    } else if (!auto_states.empty()) {
      const int64_t H = x_hat.numel() / (n * nu), na = static_cast<int64_t>(auto_states.size());
      auto power_t = at::empty(half_sizes(n, na, lg.grid, true), x.options().dtype(x.scalar_type()));
      if (moved) {
        // The moved layout is power_half's: the power spectra are an elementwise pass (one "row"
        // of H bins per field for the kernel, whose transposition is then the identity).
        auto flat = power_t.view({n, na, H, 1});
        be.power_diff_half(x_hat.view({n, nu, 1, H}), t_hat.view({n, nu, 1, H}), auto_t, even_power_scale(g), flat);
      } else {
        be.power_diff_half(x_hat, t_hat, auto_t, even_power_scale(g), power_t);
      }
      a.even = even_inverse(power_t, g);
    }
    if (!cross_a.empty()) a.cross = cross_window_inverse(be.diff_products(x_hat, t_hat, ca_t, cb_t), g);
    a.pairs = pairs_t;
    a.n_pairs = nq;
    a.weight = weight;
    if (offset.defined()) a.offset = offset.narrow(0, b0, n);
    if (need_grad && offset.defined()) a.grad_offset = grad_offset.narrow(0, b0, n);
    a.geom = g;
    a.periodic = periodic;
    a.scale = scale;
    a.values = values.narrow(0, b0, n);
    if (need_grad) a.grad_window = grad_window.narrow(0, b0, n);
    be.window_pass(a);
  }
  return {values, grad_window, x_hat_all, grad_offset};
}

at::Tensor stats_loss_window_backward(const at::Tensor& grad, const at::Tensor& grad_window, const at::Tensor& x_hat,
                                      at::IntArrayRef pair_i, at::IntArrayRef pair_j, int64_t n_state,
                                      at::IntArrayRef spatial, bool periodic, const WindowLossBackend& be) {
  const char* op = "spatial_stats_loss_backward";
  TORCH_CHECK(x_hat.scalar_type() == at::kComplexFloat || x_hat.scalar_type() == at::kComplexDouble, op,
              ": x_hat must be complex64 or complex128, got ", x_hat.scalar_type());
  const auto real = c10::toRealValueType(x_hat.scalar_type());
  TORCH_CHECK(grad.scalar_type() == real, op, ": grad has dtype ", grad.scalar_type(), " but x_hat has dtype ",
              x_hat.scalar_type(), " (grad must be ", real, ")");
  TORCH_CHECK(grad_window.scalar_type() == real, op, ": grad_window has dtype ", grad_window.scalar_type(),
              " but x_hat has dtype ", x_hat.scalar_type(), " (grad_window must be ", real, ")");
  TORCH_CHECK(grad.device() == x_hat.device(), op, ": grad is on ", grad.device(), " but x_hat is on ",
              x_hat.device());
  TORCH_CHECK(grad_window.device() == x_hat.device(), op, ": grad_window is on ", grad_window.device(),
              " but x_hat is on ", x_hat.device());
  const int64_t nd = static_cast<int64_t>(spatial.size());
  PYMKS_CHECK_VALUE(nd >= 1 && nd <= kMaxDims, op, ": spatial must have 1-3 entries, got ", spatial);
  check_pairs(pair_i, pair_j, n_state, op);
  const int64_t nq = static_cast<int64_t>(pair_i.size());
  PYMKS_CHECK_VALUE(grad_window.dim() == nd + 2 && grad_window.size(1) == nq, op, ": grad_window has shape ",
                    grad_window.sizes(), ", expected (batch, ", nq, ", *window) with ", nd, " window dims");
  const int64_t B = grad_window.size(0);
  PYMKS_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == B, op, ": grad must have shape (", B, ",), got ",
                    grad.sizes());
  const LossGeometry lg = loss_geometry(spatial, grad_window.sizes().slice(2), periodic, op);
  const Geometry& g = lg.geom;
  // Gradient spectra of the states: for pair q = (i, j), conj(G_q) X_j goes to state i and G_q X_i
  // to state j (the adjoint of C_ij(r) = sum_x x_i(x) x_j(x + r)).
  const CombinePlan cp = combine_plan(pair_i, pair_j);
  const std::vector<int64_t>& states = cp.states;
  const int64_t nu = static_cast<int64_t>(states.size());
  const bool autos_only = even_gradient_path(pair_i, pair_j, nd);
  const std::vector<int64_t> hsizes = half_sizes(B, nu, lg.grid, !autos_only);
  PYMKS_CHECK_VALUE(x_hat.sizes() == at::IntArrayRef(hsizes), op, ": x_hat has shape ", x_hat.sizes(),
                    ", expected ", at::IntArrayRef(hsizes), " for these pairs, spatial size and window");
  const c10::DeviceGuard guard(x_hat.device());

  const auto dev = x_hat.device();
  std::vector<int64_t> view(nd + 2, 1);
  view[0] = B;
  CombineArgs c;
  c.begin = ints_to(cp.begin, dev);
  c.end = ints_to(cp.end, dev);
  c.terms = table_to(cp.terms, dev);
  c.n_states = nu;
  const auto xh = x_hat.contiguous();
  // The upstream gradient scales the small window, not the full grid.
  const auto gw = scale_windows(grad_window, grad, view);
  // In cache-sized chunks, as the other passes.
  int64_t grid = 1;
  for (auto m : lg.grid) grid *= m;
  const int64_t chunk = cache_chunk(gw, (3 * nq + 4 * nu) * grid);
  std::vector<int64_t> gsizes{B, nu};
  gsizes.insert(gsizes.end(), lg.grid.begin(), lg.grid.end());
  // Auto pairs only, one per state (the usual case: [(0, 0)], or every phase's auto-correlation):
  // the gradient spectrum of state a is conj(G) X_a + G X_a = 2 Re(G) X_a, and Re(G) comes from
  // even_window_forward_real, half the work of window_forward, and a real-times-complex product.
  std::vector<int32_t> auto_pair(nu, -1);  // the pair of each state (a permutation of the pairs)
  if (autos_only)
    for (int64_t q = 0; q < nq; ++q)
      auto_pair[std::lower_bound(states.begin(), states.end(), pair_i[q]) - states.begin()] = static_cast<int32_t>(q);
  // The even part's pruned transforms pay off while the window is small; a 2D window over more
  // than half the grid is cheaper placed on the grid and transformed whole (one contiguous
  // transform). Measured on the 2-core AMD EPYC, forward + backward, one thread: 32 x 224^2 over
  // the whole window 23.5 ms that way against 26.5-27.1 ms; at cutoff 20 the even part won (16.4
  // against 17.3-21.3 ms); in 3D (32^3 cutoff 5 and 10, 64^3 cutoff 20 and whole) the two were
  // level or the even part ahead. Where the matrix products apply (small grids) they come first,
  // whatever the window: against the whole-grid transform, B = 32, forward + backward, 6 process
  // rounds, 21^2 cutoff 8 and 10 0.86x and 0.92x, 32^2 cutoff 12 0.84x, 51^2 cutoff 20 0.81x, the
  // whole window weighted 0.90x (21^2), 0.99x (32^2), 0.96x (15^2, B = 8).
  int64_t window_numel = 1;
  for (int d = 0; d < g.ndim; ++d) window_numel *= g.w[d];
  const bool even_path = !(nd == 2 && 2 * window_numel > grid);
  const bool gemm = autos_only && be.even_gradient_gemm != nullptr && even_gemm_applies(g);
  // even_grad_spectrum's states, on the device (the pruned even path only).
  const at::Tensor auto_pair_t = autos_only && even_path && !gemm ? ints_to(auto_pair, dev) : at::Tensor();
  at::Tensor gx = chunk >= B ? at::Tensor() : at::empty(gsizes, gw.options());
  // The inverse transform's division by the grid size rides on the gradient spectra's products
  // (an unnormalised inverse then saves DFTI a scaling pass over its result).
  const double inv_grid = 1.0 / static_cast<double>(grid);
  c.scale = inv_grid;
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    at::Tensor spec;
    if (gemm) {  // autos_only
      spec = be.even_gradient_gemm(gw.narrow(0, b0, n), xh.narrow(0, b0, n), auto_pair, g, 2.0 * inv_grid);
    } else if (autos_only && !even_path) {
      // The window placed on the grid and transformed whole; combine_grad's auto pairs take
      // 2 Re(G) X from it.
      at::Tensor full = gw.narrow(0, b0, n);
      for (int d = 0; d < g.ndim; ++d) full = window_to_grid_rows(full, d + 2, g.m[d], g.w[d]);
      c.g_hat = rfft_grid(full.contiguous(), lg.grid, false);
      c.x_hat = xh.narrow(0, b0, n);
      spec = be.combine_grad(c);
    } else if (autos_only) {
      const auto gr = even_window_forward_real(gw.narrow(0, b0, n), g);
      const auto xc = xh.narrow(0, b0, n);
      spec = at::empty_like(xc);
      be.even_grad_spectrum(xc, gr, auto_pair_t, 2.0 * inv_grid, spec, false);
    } else {
      c.g_hat = window_forward(gw.narrow(0, b0, n), g);
      c.x_hat = xh.narrow(0, b0, n);
      spec = be.combine_grad(c);
    }
    // Into the chunk of gx (one chunk - the GPU, large fields - returns the transform itself).
    auto part = irfft_grid(spec, lg.grid, !autos_only, chunk >= B ? at::Tensor() : gx.narrow(0, b0, n),
                           /*normalised=*/false);
    if (chunk >= B) gx = part;
  }
  if (!periodic)
    for (int64_t d = 0; d < nd; ++d) gx = gx.narrow(d + 2, 0, spatial[d]);
  if (nu == n_state) return gx.contiguous();
  std::vector<int64_t> sizes{B, n_state};
  for (auto s : spatial) sizes.push_back(s);
  auto out = at::zeros(sizes, gx.options());
  out.index_copy_(1, longs_to(states, dev), gx.contiguous());
  return out;
}

}  // namespace pymks_vae
