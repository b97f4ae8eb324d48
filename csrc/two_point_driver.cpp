// Device-independent orchestration of the two-point operator (see two_point.h).
#include "two_point.h"

#include "cpu/gemm_dft.h"

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

namespace pymks_vae {

std::vector<int64_t> spatial_dims(int64_t ndim) {
  std::vector<int64_t> dims;
  for (int64_t d = 2; d < ndim; ++d) dims.push_back(d);
  return dims;
}

// Smallest even size >= n with no prime factor above 7 and at most one factor 7: fast for MKL,
// pocketfft and cuFFT alike. MKL's transforms of odd sizes and of 7^2 multiples are slow (measured,
// 32 x m^2 float32 rfftn + irfftn: 42 ms for m = 245 = 5 * 7^2 against 24 ms for 250 and 23 ms for
// 252). Only used where the size is free (zero padding of non-periodic statistics), by the
// operator, its counting route and the fused loss alike.
//
// With prefer_pow2 (the 2D grids) a power of two within 6% of n comes first: MKL's radix-5 and
// radix-7 passes cost more per element than its radix-2 ones. Measured on the 2-core AMD EPYC,
// one thread, the zero-padded loss and operator forward + backward alternated call by call with
// either grid: 256 against 250 (224 + cutoff 20) 1.19-1.32x faster, 512 against 500 (480 +
// cutoff 20) 1.10-1.11x, 128 against 126 (120 + cutoff 5) 1.07x. 3D keeps the smallest size (a
// third axis makes the extra padding dearer; 64^3 against 60^3 took 1.10x the time).
int64_t fast_fft_len(int64_t n, bool prefer_pow2) {
  if (prefer_pow2) {
    int64_t p2 = 2;
    while (p2 < n) p2 *= 2;
    if (p2 * 100 <= n * 106) return p2;
  }
  for (int64_t m = std::max<int64_t>(2, n + (n & 1));; m += 2) {
    int64_t r = m, sevens = 0;
    for (int64_t p : {2, 3, 5})
      while (r % p == 0) r /= p;
    while (r % 7 == 0) {
      r /= 7;
      ++sevens;
    }
    if (r == 1 && sevens <= 1) return m;
  }
}

Geometry lag_geometry(at::IntArrayRef spatial, at::IntArrayRef window, bool periodic) {
  TORCH_INTERNAL_ASSERT(!spatial.empty() && spatial.size() <= static_cast<size_t>(kMaxDims) &&
                        window.size() == spatial.size());
  Geometry g{};
  g.ndim = static_cast<int>(spatial.size());
  for (int d = 0; d < g.ndim; ++d) {
    g.n[d] = spatial[d];
    g.w[d] = window[d];
    g.m[d] = periodic ? spatial[d] : fast_fft_len(spatial[d] + window[d] / 2, g.ndim == 2);
  }
  return g;
}

// On the CPU a batch of small fields is processed in chunks whose intermediates (~20 MiB) stay in
// the last-level cache between the passes, which are then limited by cache rather than memory
// bandwidth (measured here: ~20% faster for 32 x 224^2). Large fields (fewer than 4 per chunk) and
// the GPU take the whole batch: there the per-call overhead of the transforms outweighs the gain.
int64_t cache_chunk(const at::Tensor& x, int64_t per_sample_elems) {
  const int64_t B = x.size(0);
  if (!x.device().is_cpu()) return B;
  const int64_t per_sample = std::max<int64_t>(1, per_sample_elems * static_cast<int64_t>(x.element_size()));
  const int64_t chunk = (int64_t{20} << 20) / per_sample;
  if (chunk < 4 || chunk >= B) return B;
  const int64_t n_chunks = (B + chunk - 1) / chunk;
  return (B + n_chunks - 1) / n_chunks;  // equal chunks: no short tail
}

namespace {
thread_local bool tl_data_checks = true;
thread_local bool tl_derive_eliminated = true;
}  // namespace

bool set_derive_eliminated(bool enabled) {
  const bool prev = tl_derive_eliminated;
  tl_derive_eliminated = enabled;
  return prev;
}

bool data_checks_enabled() { return tl_data_checks; }

bool set_data_checks(bool enabled) {
  const bool prev = tl_data_checks;
  tl_data_checks = enabled;
  return prev;
}

at::Tensor device_table(const void* data, int64_t bytes, at::ScalarType dtype, int64_t numel, const at::Device& device) {
  auto host = at::empty({numel}, at::TensorOptions().dtype(dtype));
  if (bytes > 0) std::memcpy(host.data_ptr(), data, static_cast<size_t>(bytes));
  if (device.is_cpu()) return host;
  // Keyed by device, dtype and content. Never destroyed (a static map would free its GPU tensors
  // after the CUDA runtime has shut down at exit); capped, past which tables are uploaded per call.
  constexpr size_t kMaxTables = 4096;
  static std::mutex mutex;
  static auto* cache = new std::unordered_map<std::string, at::Tensor>();
  std::string key = device.str() + "|" + std::to_string(static_cast<int>(dtype)) + "|";
  key.append(static_cast<const char*>(data), static_cast<size_t>(bytes));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  auto on_device = host.to(device);
  if (cache->size() < kMaxTables) cache->emplace(std::move(key), on_device);
  return on_device;
}

at::Tensor ints_to(const std::vector<int32_t>& v, const at::Device& device) {
  const auto n = static_cast<int64_t>(v.size());
  return device_table(v.data(), n * static_cast<int64_t>(sizeof(int32_t)), at::kInt, n, device);
}

at::Tensor longs_to(const std::vector<int64_t>& v, const at::Device& device) {
  const auto n = static_cast<int64_t>(v.size());
  return device_table(v.data(), n * static_cast<int64_t>(sizeof(int64_t)), at::kLong, n, device);
}

void check_real_float(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type());
}

void check_field_shape(const at::Tensor& x, const char* op) {
  PYMKS_CHECK_VALUE(x.dim() >= 3 && x.dim() <= 2 + kMaxDims, op,
                    ": x must have shape (batch, n_state, *spatial) with 1-3 spatial dims, got ", x.sizes());
}

void check_mask_arg(const c10::optional<at::Tensor>& mask, const at::Tensor& x, const char* op) {
  if (!mask.has_value() || !mask->defined()) return;
  const at::Tensor& m = *mask;
  check_like(m, "mask", x, "x", op);
  std::vector<int64_t> shared{1}, per_sample{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) {
    shared.push_back(x.size(d));
    per_sample.push_back(x.size(d));
  }
  PYMKS_CHECK_VALUE(m.sizes() == at::IntArrayRef(shared) || m.sizes() == at::IntArrayRef(per_sample), op,
                    ": mask has shape ", m.sizes(), ", expected ", at::IntArrayRef(shared), " or ",
                    at::IntArrayRef(per_sample), " for x of shape ", x.sizes());
}

void check_pairs(at::IntArrayRef pair_i, at::IntArrayRef pair_j, int64_t n_state, const char* op) {
  PYMKS_CHECK_VALUE(pair_i.size() == pair_j.size() && !pair_i.empty(), op,
                    ": pair_i and pair_j must be non-empty and of equal length");
  for (size_t k = 0; k < pair_i.size(); ++k)
    PYMKS_CHECK_VALUE(pair_i[k] >= 0 && pair_i[k] < n_state && pair_j[k] >= 0 && pair_j[k] < n_state,
                      op, ": correlation (", pair_i[k], ", ", pair_j[k], ") out of range for n_state=", n_state);
}

std::vector<int64_t> pair_states(at::IntArrayRef pair_i, at::IntArrayRef pair_j, std::map<int64_t, int32_t>* pos) {
  std::set<int64_t> used(pair_i.begin(), pair_i.end());
  used.insert(pair_j.begin(), pair_j.end());
  std::vector<int64_t> states(used.begin(), used.end());
  for (size_t k = 0; k < states.size(); ++k) (*pos)[states[k]] = static_cast<int32_t>(k);
  return states;
}

CombinePlan combine_plan(at::IntArrayRef pair_i, at::IntArrayRef pair_j) {
  CombinePlan cp;
  std::map<int64_t, int32_t> pos;
  cp.states = pair_states(pair_i, pair_j, &pos);
  const int64_t n_pairs = static_cast<int64_t>(pair_i.size());
  for (const int64_t st : cp.states) {
    cp.begin.push_back(static_cast<int32_t>(cp.terms.size()));
    for (int64_t q = 0; q < n_pairs; ++q) {
      if (pair_i[q] == st) cp.terms.push_back({static_cast<int32_t>(q), pos[pair_j[q]], 1, 0});
      if (pair_j[q] == st) cp.terms.push_back({static_cast<int32_t>(q), pos[pair_i[q]], 0, 0});
    }
    cp.end.push_back(static_cast<int32_t>(cp.terms.size()));
  }
  return cp;
}

bool spatial_flattens(const at::Tensor& x) {
  // Element i of the flattened field must sit at i * (last stride). A dim of size 1 is never
  // indexed, so its stride is free, but it still counts in the span of the dims before it.
  int64_t span = x.stride(x.dim() - 1) * x.size(x.dim() - 1);
  for (int64_t d = x.dim() - 2; d >= 2; --d) {
    if (x.size(d) > 1 && x.stride(d) != span) return false;
    span *= x.size(d);
  }
  return true;
}

at::Tensor select_states(const at::Tensor& x, const std::vector<int64_t>& states) {
  // A run of consecutive states is a view (the FFT reads it in place); others need a gather.
  const int64_t k = static_cast<int64_t>(states.size());
  if (k == x.size(1)) return x;
  if (states.back() - states.front() + 1 == k) return x.narrow(1, states.front(), k);
  return x.index_select(1, longs_to(states, x.device()));
}

void check_spectrum_finite(const at::Tensor& spec, const char* op, const char* what) {
  // A NaN or Inf anywhere in a field reaches its DC bin (the sum of all its values), so checking
  // the DC bins catches bad input at the cost of reading B * n_state numbers; their largest
  // magnitude (NaN propagates through max) is one reduction and one number to bring back.
  if (!data_checks_enabled()) return;
  bool finite = true;
  if (spec.device().is_cpu() && spec.dim() >= 2) {
    // Read in place: at the VAE's sizes (32 x 64^2) the reduction below was 4-9% of the loss's
    // forward + backward, as five small ATen calls per spectrum.
    const int64_t rows = spec.size(0) * spec.size(1);
    const int64_t s0 = spec.stride(0), s1 = spec.stride(1), k = spec.size(1);
    AT_DISPATCH_FLOATING_TYPES(c10::toRealValueType(spec.scalar_type()), "check_spectrum_finite", [&] {
      const auto* p = reinterpret_cast<const scalar_t*>(spec.data_ptr());
      for (int64_t r = 0; r < rows && finite; ++r) {
        const scalar_t* dc = p + 2 * ((r / k) * s0 + (r % k) * s1);
        finite = std::isfinite(dc[0]) && std::isfinite(dc[1]);
      }
    });
  } else {
    auto dc = at::view_as_real(spec.flatten(2).select(2, 0));
    finite = std::isfinite(at::abs(dc).max().item<double>());
  }
  PYMKS_CHECK_VALUE(finite, op, ": ", what, " contains NaN or Inf (or values so large that their sum overflows)");
}

namespace {

// Builds the plan for one choice of eliminated state L (L < 0: none).
TwoPointPlan plan_for(const std::vector<std::pair<int64_t, int64_t>>& req, int64_t n_state,
                      int64_t L) {
  std::map<std::pair<int64_t, int64_t>, int32_t> base_index;
  std::vector<std::pair<int64_t, int64_t>> base_pairs;
  std::set<int64_t> fwd;
  TwoPointPlan plan;
  std::vector<std::pair<int64_t, double>> vf_states;  // state ids before remapping

  auto add_term = [&](int64_t a, int64_t b, double coef) {
    const bool reversed = a > b;
    const auto key = reversed ? std::make_pair(b, a) : std::make_pair(a, b);
    auto it = base_index.find(key);
    int32_t idx;
    if (it == base_index.end()) {
      idx = static_cast<int32_t>(base_pairs.size());
      base_index[key] = idx;
      base_pairs.push_back(key);
      fwd.insert(a);
      fwd.insert(b);
    } else {
      idx = it->second;
    }
    // The auto-correlation is symmetric: a reversed auto term is the same term.
    plan.terms.push_back({idx, (reversed && a != b) ? 1 : 0, coef});
  };
  auto add_vf = [&](int64_t s, double coef) {
    fwd.insert(s);
    vf_states.push_back({s, coef});
  };

  for (const auto& [i, j] : req) {
    PairPlan p{};
    p.term_begin = static_cast<int32_t>(plan.terms.size());
    p.vf_begin = static_cast<int32_t>(vf_states.size());
    p.constant = 0.0;
    if (L < 0 || (i != L && j != L)) {
      add_term(i, j, 1.0);
    } else if (i != L) {  // C_iL = sum x_i - sum_k C_ik
      add_vf(i, 1.0);
      for (int64_t k = 0; k < n_state; ++k)
        if (k != L) add_term(i, k, -1.0);
    } else if (j != L) {  // C_Lj = sum x_j - sum_k C_kj
      add_vf(j, 1.0);
      for (int64_t k = 0; k < n_state; ++k)
        if (k != L) add_term(k, j, -1.0);
    } else {  // C_LL = S - 2 sum_k sum x_k + sum_kl C_kl
      p.constant = 1.0;
      for (int64_t k = 0; k < n_state; ++k)
        if (k != L) add_vf(k, -2.0);
      for (int64_t k = 0; k < n_state; ++k)
        for (int64_t l = 0; l < n_state; ++l)
          if (k != L && l != L) add_term(k, l, 1.0);
    }
    p.term_end = static_cast<int32_t>(plan.terms.size());
    p.vf_end = static_cast<int32_t>(vf_states.size());
    plan.pairs.push_back(p);
  }
  plan.fwd_states.assign(fwd.begin(), fwd.end());
  std::map<int64_t, int32_t> pos;
  for (size_t k = 0; k < plan.fwd_states.size(); ++k) pos[plan.fwd_states[k]] = static_cast<int32_t>(k);
  // Auto-correlations first (they take the real-to-complex route), then cross-correlations.
  std::vector<int32_t> order, remap(base_pairs.size());
  for (int pass = 0; pass < 2; ++pass)
    for (size_t k = 0; k < base_pairs.size(); ++k)
      if ((base_pairs[k].first == base_pairs[k].second) == (pass == 0)) order.push_back(static_cast<int32_t>(k));
  for (size_t n = 0; n < order.size(); ++n) {
    const auto& [a, b] = base_pairs[order[n]];
    remap[order[n]] = static_cast<int32_t>(n);
    plan.base_a.push_back(pos[a]);
    plan.base_b.push_back(pos[b]);
    if (a == b) ++plan.n_auto;
  }
  for (auto& t : plan.terms) t.base = remap[t.base];
  for (const auto& [s, coef] : vf_states) plan.vfs.push_back({pos[s], 0, coef});
  return plan;
}

}  // namespace

// Fewest transforms wins (forward + inverse); ties keep the direct computation.
TwoPointPlan make_plan(const std::vector<std::pair<int64_t, int64_t>>& req, int64_t n_state,
                       bool partition) {
  TwoPointPlan best = plan_for(req, n_state, -1);
  if (!partition) return best;
  auto cost = [](const TwoPointPlan& p) { return p.fwd_states.size() + p.base_a.size(); };
  for (int64_t L = n_state - 1; L >= 0; --L) {
    TwoPointPlan cand = plan_for(req, n_state, L);
    if (cost(cand) < cost(best)) best = std::move(cand);
  }
  return best;
}

std::vector<std::pair<int64_t, int64_t>> pair_list(at::IntArrayRef pi, at::IntArrayRef pj) {
  std::vector<std::pair<int64_t, int64_t>> req;
  for (size_t k = 0; k < pi.size(); ++k) req.push_back({pi[k], pj[k]});
  return req;
}

namespace {

struct Setup {
  Geometry geom;
  std::vector<int64_t> dims, grid;
  int64_t s_total;
};

Setup make_setup_spatial(at::IntArrayRef spatial, bool periodic, at::IntArrayRef window, const char* op);

Setup make_setup(const at::Tensor& x, bool periodic, at::IntArrayRef window, const char* op) {
  return make_setup_spatial(x.sizes().slice(2), periodic, window, op);
}

Setup make_setup_spatial(at::IntArrayRef spatial, bool periodic, at::IntArrayRef window, const char* op) {
  const int64_t nd = static_cast<int64_t>(spatial.size());
  PYMKS_CHECK_VALUE(nd >= 1 && nd <= kMaxDims, op, ": x must have 1-3 spatial dims");
  PYMKS_CHECK_VALUE(static_cast<int64_t>(window.size()) == nd, op, ": window has ", window.size(),
                    " entries for ", nd, " spatial dims");
  for (int64_t d = 0; d < nd; ++d)
    PYMKS_CHECK_VALUE(window[d] >= 1 && window[d] <= spatial[d], op, ": window ", window[d],
                      " does not fit spatial size ", spatial[d]);
  Setup s{};
  s.geom = lag_geometry(spatial, window, periodic);
  s.dims = spatial_dims(nd + 2);
  s.s_total = 1;
  for (int64_t d = 0; d < nd; ++d) {
    s.grid.push_back(s.geom.m[d]);
    s.s_total *= spatial[d];
  }
  return s;
}

// The mask's own correlation on the grid and the level under which a lag has no overlap.
std::pair<at::Tensor, at::Tensor> mask_norm(const at::Tensor& mask, const Setup& s) {
  // mask: (Bm, *n); treated as a constant.
  std::vector<int64_t> mdims;
  for (int64_t d = 1; d < mask.dim(); ++d) mdims.push_back(d);
  auto mh = at::fft_rfftn(mask, s.grid, mdims);
  auto z = at::fft_irfftn(at::mul(mh, at::conj_physical(mh)), s.grid, mdims).contiguous();
  const double rel = mask.scalar_type() == at::kFloat ? 1e-5 : 1e-10;
  auto level = (z.flatten(1).select(1, 0) * rel).contiguous();  // z(0) = sum m^2 is the largest
  return {z, level};
}

void check_mask(const at::Tensor& mask, const char* op) {
  if (!data_checks_enabled()) return;
  auto lo = mask.min().item<double>();
  auto hi = mask.max().item<double>();
  PYMKS_CHECK_VALUE(lo >= 0.0 && hi <= 1.0, op,
                    ": mask values must lie in [0, 1] (and be finite); got min ", lo, ", max ", hi);
}

}  // namespace

std::vector<int64_t> even_power_sizes(const at::Tensor& x_hat, int64_t na) {
  auto sizes = x_hat.sizes().vec();
  sizes[1] = na;
  std::rotate(sizes.begin() + 2, sizes.begin() + 3, sizes.end());
  return sizes;
}

// 1/m_0 in the power spectrum; the inverse transform of the other axes divides by their sizes.
// In 1D the one inverse transform divides by m_0 itself.
double even_power_scale(const Geometry& g) { return g.ndim == 1 ? 1.0 : 1.0 / static_cast<double>(g.m[0]); }

// See even_transform below for the layout and why.
at::Tensor even_inverse(const at::Tensor& power_t, const Geometry& g) {
  const int nd = g.ndim;
  const int64_t m0 = g.m[0];
  const int64_t B = power_t.size(0), na = power_t.size(1);
  if (nd == 1) return at::fft_irfft(power_t, m0, 2).contiguous().view({B, na, -1});
  // The kept rows go back to the front (a copy of the pruned, smaller array) so that the last
  // transforms run over contiguous memory and leave the even layout as they write it.
  // On the CPU along the sides where MKL's transforms are slowest, the kept bins as one matrix
  // product (cpu/gemm_dft.h), and in 2D the last axis's inverse too.
  const int64_t kept = even_rows(g.w[0]);
  auto q = (cpu::window_products(power_t, m0, kept) ? cpu::rfft_last_bins(power_t, kept)
                                                    : at::fft_rfft(power_t, m0, -1).narrow(-1, 0, kept))
               .movedim(-1, 2)
               .contiguous();
  if (nd == 2 && cpu::window_products(q, g.m[1], g.m[1] / 2 + 1))
    return cpu::irfft_last(q, g.m[1]).view({B, na, -1});
  std::vector<int64_t> rest_sizes;
  for (int d = 1; d < nd; ++d) rest_sizes.push_back(g.m[d]);
  // The complex-to-real transforms of the other axes as a batch of B * na * R0 fields through
  // irfft_grid (on the CPU, DFTI straight into the result: ATen's irfftn cloned q twice first,
  // 2 ms of a 20 ms forward pass at 8 x 64^3). q is this function's own copy, which DFTI may use
  // as scratch.
  std::vector<int64_t> qs{B * na * q.size(2), 1};  // (B * na * R0, 1, the other axes' bins)
  for (int64_t d = 3; d < q.dim(); ++d) qs.push_back(q.size(d));
  return irfft_grid(q.view(qs), rest_sizes, false).view({B, na, -1});  // (B, na, R0, m_1, .., m_{nd-1})
}

namespace {

// Auto-correlations in the pruned even layout of spectral.h, unnormalised like the cross bases:
// C(r) = (1/M) sum_k |X(k)|^2 exp(+2 pi i k.r / M). The power spectrum is real and even, so its
// transform along the first axis is a half-length real-to-complex one, of which only the rows
// r_0 <= w_0/2 are kept, and what is left is Hermitian along the last axis, which therefore ends
// with a complex-to-real transform. The power spectrum comes with its first axis last, so that
// the first transform runs over contiguous memory. That transform runs forwards and the others
// backwards, so the result holds C(a_0, -a_1, ...): even_index (spectral.h) reads it accordingly.
// This is half the work of a full inverse transform for the full window, and about a third for
// 128^2 and cutoff 20.
at::Tensor even_transform(const at::Tensor& x_hat, const std::vector<int32_t>& states, const Setup& s,
                          const TwoPointBackend& be) {
  // Small 2D windows on the CPU: the same values as matrix products (cpu/even_gemm.cpp), as the
  // loss takes them.
  if (be.even_values_gemm != nullptr && even_gemm_applies(s.geom))
    return be.even_values_gemm(x_hat, at::Tensor(), states, s.geom);
  auto idx = ints_to(states, x_hat.device());
  auto power_t = at::empty(even_power_sizes(x_hat, static_cast<int64_t>(states.size())),
                           x_hat.options().dtype(at::toRealValueType(x_hat.scalar_type())));
  be.power_half(x_hat, idx, even_power_scale(s.geom), power_t);
  return even_inverse(power_t, s.geom);
}

// Samples per pass of the forward operator: see cache_chunk. Per sample: the transformed fields
// and their spectra, the power spectra and even transforms of the autos, the products and inverse
// transforms of the crosses, and the output window.
// With n_kept > 0 (the spectra kept for the backward pass) the forward transforms those states.
int64_t batch_chunk(const at::Tensor& x, const Setup& s, const TwoPointPlan& plan, int64_t n_pairs, int64_t n_kept) {
  int64_t grid = 1, win = 1;
  for (int d = 0; d < s.geom.ndim; ++d) {
    grid *= s.geom.m[d];
    win *= s.geom.w[d];
  }
  const int64_t nf = std::max(static_cast<int64_t>(plan.fwd_states.size()), n_kept), na = plan.n_auto;
  const int64_t nc = static_cast<int64_t>(plan.base_a.size()) - na;
  return cache_chunk(x, (2 * nf + 3 * na + 3 * nc) * grid + n_pairs * win);
}

// Whether this call may use the partition-of-unity relations (see make_plan), checking x when
// asked to (partition 2) over the whole batch, so that one plan serves every chunk: 0 no, 1 yes,
// 2 yes and checked to hold exactly (the sum over states is 1 at every pixel, as in one-hot data).
int partition_holds(const at::Tensor& x, bool periodic, bool has_mask, int64_t partition, const TwoPointBackend& be) {
  const int64_t n_state = x.size(1);
  if (!periodic || has_mask || n_state < 2 || partition == 0) return 0;
  if (partition == 1) return 1;
  // Checking reads the answer back to the host: on a GPU with data checks off (a training loop's
  // hot path) the relations go unused instead; the result is the same, a few transforms dearer.
  if (!x.device().is_cpu() && !data_checks_enabled()) return 0;
  const double tol = 64.0 * (x.scalar_type() == at::kFloat ? 1.1920929e-07 : 2.220446049250313e-16) * n_state;
  return be.partition_check(x, tol);
}

// The spectra of the (masked) states keep_states of x into keep (this chunk of them), for the
// backward pass: those the forward pass transformed are copied from x_hat (states fwd_states),
// the others - eliminated by the partition relations - transformed here.
void keep_spectra(const at::Tensor& x, const at::Tensor& x_hat, const std::vector<int64_t>& fwd_states,
                  const std::vector<int64_t>& keep_states, const at::Tensor& mask_view, const Setup& s,
                  at::Tensor& keep) {
  if (fwd_states == keep_states) {
    if (!keep.is_same(x_hat)) keep.copy_(x_hat);
    return;
  }
  std::vector<int64_t> missing, missing_pos;
  for (size_t u = 0; u < keep_states.size(); ++u) {
    auto it = std::lower_bound(fwd_states.begin(), fwd_states.end(), keep_states[u]);
    if (it != fwd_states.end() && *it == keep_states[u]) {
      keep.select(1, static_cast<int64_t>(u)).copy_(x_hat.select(1, it - fwd_states.begin()));
    } else {
      missing.push_back(keep_states[u]);
      missing_pos.push_back(static_cast<int64_t>(u));
    }
  }
  if (missing.empty()) return;
  at::Tensor xs = select_states(x, missing);
  if (mask_view.defined()) xs = xs * mask_view;
  if (missing.size() == keep_states.size()) {  // nothing transformed yet: all of them straight into keep
    rfft_grid(xs, s.grid, false, keep);
    return;
  }
  auto extra = rfft_grid(xs, s.grid, false);
  for (size_t k = 0; k < missing.size(); ++k) keep.select(1, missing_pos[k]).copy_(extra.select(1, k));
}

// keep[:, L] = S delta - sum of keep[:, lo .. lo + k): the spectrum of state L of fields that
// partition every pixel exactly (x_L = 1 - the others), from the other states' spectra, which sit
// at positions lo .. lo + k of keep. S: the number of pixels.
void derive_eliminated(at::Tensor& keep, int64_t L, int64_t lo, int64_t k, double S) {
  auto xl = keep.select(1, L);
  const auto others = keep.narrow(1, lo, k);
  if (k == 1) {
    at::neg_out(xl, others.select(1, 0));
  } else {
    at::sum_out(xl, others, 1);
    xl.neg_();
  }
  auto dc = xl;
  while (dc.dim() > 1) dc = dc.select(1, 0);
  dc.add_(S);
}

// The forward pass on one chunk of samples, written into out (that chunk of the output).
// derived >= 0: every state is kept, the partition holds exactly, and the plan eliminates state
// `derived`, the first or the last: its kept spectrum follows from the others' (derive_eliminated)
// instead of a transform of its own.
void forward_chunk(const at::Tensor& x, const TwoPointPlan& plan, const PlanTensors& tables, bool trusted_partition,
                   int64_t n_pairs, bool periodic, const Setup& s, const at::Tensor& mask_view,
                   const at::Tensor& zmask, const at::Tensor& zlevel, const TwoPointBackend& be, at::Tensor& out,
                   at::Tensor* keep, const std::vector<int64_t>& keep_states, int64_t derived) {
  const char* op = "two_point_stats";
  const int64_t n_state = x.size(1);
  const bool has_mask = mask_view.defined();
  // When the backward pass keeps spectra of states that include the forward's (both lists are
  // sorted), every kept state is transformed straight into keep and the forward reads its states
  // there, with no copies. fpos: where each forward state's spectrum sits in x_hat.
  const bool via_keep = keep != nullptr && std::includes(keep_states.begin(), keep_states.end(),
                                                         plan.fwd_states.begin(), plan.fwd_states.end());
  const auto& x_states = via_keep ? keep_states : plan.fwd_states;
  std::vector<int32_t> fpos;
  for (const int64_t st : plan.fwd_states)
    fpos.push_back(static_cast<int32_t>(std::lower_bound(x_states.begin(), x_states.end(), st) - x_states.begin()));
  at::Tensor x_hat;
  if (derived >= 0) {
    const int64_t k = n_state - 1, lo = derived == 0 ? 1 : 0;
    auto dest = keep->narrow(1, lo, k);
    rfft_grid_into(x.narrow(1, lo, k), s.grid, dest);
    derive_eliminated(*keep, derived, lo, k, static_cast<double>(x.numel() / (x.size(0) * n_state)));
    x_hat = *keep;
  } else {
    at::Tensor xs = select_states(x, x_states);
    if (has_mask) xs = xs * mask_view;
    x_hat = rfft_grid(xs, s.grid, false, via_keep ? *keep : at::Tensor());
  }
  check_spectrum_finite(x_hat, op, "x");
  if (keep != nullptr && !via_keep) keep_spectra(x, x_hat, plan.fwd_states, keep_states, mask_view, s, *keep);
  auto at_pos = [&](std::vector<int32_t>::const_iterator b, std::vector<int32_t>::const_iterator e) {
    std::vector<int32_t> v;
    for (auto it = b; it != e; ++it) v.push_back(fpos[*it]);
    return v;
  };
  if (trusted_partition && static_cast<int64_t>(plan.fwd_states.size()) != n_state && data_checks_enabled()) {
    // Trusted partition: the eliminated states are never transformed, so check their values here
    // (one sum each, read in place: a NaN or Inf anywhere makes it non-finite).
    std::vector<at::Tensor> sums;
    for (int64_t k = 0; k < n_state; ++k)
      if (!std::binary_search(plan.fwd_states.begin(), plan.fwd_states.end(), k)) sums.push_back(x.select(1, k).sum());
    PYMKS_CHECK_VALUE(at::isfinite(at::stack(sums)).all().item<bool>(), op,
                      ": x contains NaN or Inf (or values so large that their sum overflows)");
  }

  auto dev = x.device();
  const size_t na = static_cast<size_t>(plan.n_auto);
  at::Tensor even, base;
  if (na > 0) even = even_transform(x_hat, at_pos(plan.base_a.begin(), plan.base_a.begin() + na), s, be);
  if (plan.base_a.size() > na) {
    const std::vector<int32_t> a = at_pos(plan.base_a.begin() + na, plan.base_a.end());
    const std::vector<int32_t> b = at_pos(plan.base_b.begin() + na, plan.base_b.end());
    auto products = be.pair_products(x_hat, ints_to(a, dev), ints_to(b, dev));
    base = irfft_grid(products, s.grid, false);
  }

  GatherArgs g;
  g.even = even;
  g.base = base;
  g.n_auto = plan.n_auto;
  // The forward states' DC bins, in the plan's order.
  const auto dc = at::real(x_hat.flatten(2).select(2, 0));
  g.dc = (via_keep && keep_states != plan.fwd_states ? dc.index_select(1, longs_to({fpos.begin(), fpos.end()}, dev))
                                                     : dc)
             .contiguous();
  g.zmask = zmask;
  g.zlevel = zlevel;
  g.plan = tables;
  g.n_pairs = n_pairs;
  g.geom = s.geom;
  g.periodic = periodic;
  be.gather(g, out);
}

}  // namespace

namespace {

// The forward pass; when keep is given, also the spectra of the states named by the pairs (masked,
// on the transform grid), for the backward pass.
at::Tensor forward_impl(const at::Tensor& x_in, at::IntArrayRef pair_i, at::IntArrayRef pair_j, bool periodic,
                        at::IntArrayRef window, const c10::optional<at::Tensor>& mask_in, int64_t partition,
                        const TwoPointBackend& be, at::Tensor* keep) {
  const char* op = "two_point_stats";
  check_real_float(x_in, "x", op);
  check_field_shape(x_in, op);
  check_mask_arg(mask_in, x_in, op);
  // The kernels launch on the current device's stream: make it x's (cuda:1 while cuda:0 is current).
  const c10::DeviceGuard guard(x_in.device());
  // A strided x (PyMKS's channels-last data seen channels first) is read in place when its spatial
  // dims flatten to one stride: the transforms take views, and only the states they need are read.
  auto x = spatial_flattens(x_in) ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), n_state = x.size(1);
  PYMKS_CHECK_VALUE(B > 0, op, ": x is an empty batch");
  check_pairs(pair_i, pair_j, n_state, op);
  Setup s = make_setup(x, periodic, window, op);
  const int64_t n_pairs = static_cast<int64_t>(pair_i.size());

  at::Tensor mask, mask_view, zmask, zlevel;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = mask_in->contiguous();
    check_mask(mask, op);
    std::vector<int64_t> view{mask.size(0), 1};
    for (int64_t d = 0; d < s.geom.ndim; ++d) view.push_back(s.geom.n[d]);
    mask_view = mask.view(view);
    std::tie(zmask, zlevel) = mask_norm(mask, s);
  }

  std::vector<int64_t> sizes{B, n_pairs};
  for (int d = 0; d < s.geom.ndim; ++d) sizes.push_back(s.geom.w[d]);
  auto out = at::empty(sizes, x.options());
  // Binary fields (segmented microstructures) may be counted exactly instead, which checks the
  // partition itself: not under a trusted partition, whose eliminated states would then go unread
  // (the transforms check them for NaN).
  const auto req = pair_list(pair_i, pair_j);
  std::map<int64_t, int32_t> keep_pos;
  const std::vector<int64_t> keep_states = pair_states(pair_i, pair_j, &keep_pos);
  if (keep != nullptr) {
    std::vector<int64_t> hs{B, static_cast<int64_t>(keep_states.size())};
    for (int d = 0; d < s.geom.ndim; ++d) hs.push_back(d + 1 < s.geom.ndim ? s.geom.m[d] : s.geom.m[d] / 2 + 1);
    *keep = at::empty(hs, x.options().dtype(c10::toComplexType(x.scalar_type())));
  }
  if (!mask.defined() && partition != 1 && be.binary_stats != nullptr &&
      be.binary_stats(x, req, partition == 2 && n_state >= 2, periodic, s.geom, out, keep != nullptr)) {
    // Counted, not transformed: the backward pass's spectra are taken here.
    if (keep != nullptr) {
      const int64_t per = 3 * static_cast<int64_t>(keep_states.size()) * (keep->numel() / B);
      const int64_t chunk = cache_chunk(x, per);
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t n = std::min(chunk, B - b0);
        auto k = keep->narrow(0, b0, n);
        keep_spectra(x.narrow(0, b0, n), at::Tensor(), {}, keep_states, at::Tensor(), s, k);
      }
    }
    return out;
  }
  const int partition_state = partition_holds(x, periodic, mask.defined(), partition, be);
  const bool use_partition = partition_state > 0;
  const TwoPointPlan plan = make_plan(req, n_state, use_partition);
  // Every state kept for the backward pass, of fields that partition every pixel exactly (one-hot
  // data): the state the plan eliminates needs no transform of its own (forward_chunk), where it
  // is the first or the last (the others then one run of states, transformed in place).
  int64_t derived = -1;
  if (keep != nullptr && partition_state == 2 && tl_derive_eliminated &&
      static_cast<int64_t>(keep_states.size()) == n_state && static_cast<int64_t>(plan.fwd_states.size()) + 1 == n_state) {
    const int64_t L = plan.fwd_states.front() == 0 ? n_state - 1 : 0;
    if (!std::binary_search(plan.fwd_states.begin(), plan.fwd_states.end(), L)) derived = L;
  }
  const PlanTensors tables{table_to(plan.pairs, x.device()), table_to(plan.terms, x.device()),
                           table_to(plan.vfs, x.device())};
  const int64_t chunk =
      batch_chunk(x, s, plan, n_pairs, keep != nullptr ? static_cast<int64_t>(keep_states.size()) : 0);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    // A per-sample mask follows the chunk; a shared one (first dim 1) serves every chunk.
    const bool per_sample = mask.defined() && mask.size(0) != 1;
    auto out_c = out.narrow(0, b0, n);
    auto keep_c = keep != nullptr ? keep->narrow(0, b0, n) : at::Tensor();
    forward_chunk(x.narrow(0, b0, n), plan, tables, use_partition && partition == 1, n_pairs, periodic, s,
                  per_sample ? mask_view.narrow(0, b0, n) : mask_view,
                  per_sample ? zmask.narrow(0, b0, n) : zmask, per_sample ? zlevel.narrow(0, b0, n) : zlevel,
                  be, out_c, keep_c.defined() ? &keep_c : nullptr, keep_states, derived);
  }
  return out;
}

}  // namespace

at::Tensor two_point_forward(const at::Tensor& x, at::IntArrayRef pair_i, at::IntArrayRef pair_j, bool periodic,
                             at::IntArrayRef window, const c10::optional<at::Tensor>& mask, int64_t partition,
                             const TwoPointBackend& be) {
  return forward_impl(x, pair_i, pair_j, periodic, window, mask, partition, be, nullptr);
}

std::tuple<at::Tensor, at::Tensor> two_point_forward_spectra(const at::Tensor& x, at::IntArrayRef pair_i,
                                                             at::IntArrayRef pair_j, bool periodic,
                                                             at::IntArrayRef window,
                                                             const c10::optional<at::Tensor>& mask,
                                                             int64_t partition, const TwoPointBackend& be) {
  at::Tensor keep;
  auto out = forward_impl(x, pair_i, pair_j, periodic, window, mask, partition, be, &keep);
  return {out, keep};
}

at::Tensor two_point_backward(const at::Tensor& grad_in, const at::Tensor& x_in, at::IntArrayRef pair_i,
                              at::IntArrayRef pair_j, bool periodic, at::IntArrayRef window,
                              const c10::optional<at::Tensor>& mask_in, const TwoPointBackend& be) {
  const char* op = "two_point_stats_backward";
  check_real_float(x_in, "x", op);
  check_like(grad_in, "grad", x_in, "x", op);
  check_field_shape(x_in, op);
  check_mask_arg(mask_in, x_in, op);
  const c10::DeviceGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto grad = grad_in.contiguous();
  const int64_t B = x.size(0), n_state = x.size(1), n_pairs = static_cast<int64_t>(pair_i.size());
  check_pairs(pair_i, pair_j, n_state, op);
  Setup s = make_setup(x, periodic, window, op);
  std::vector<int64_t> want{B, n_pairs};
  for (int64_t d = 0; d < s.geom.ndim; ++d) want.push_back(s.geom.w[d]);
  PYMKS_CHECK_VALUE(grad.sizes() == at::IntArrayRef(want), op, ": grad has shape ", grad.sizes(),
                    ", expected ", at::IntArrayRef(want));
  const bool has_mask = mask_in.has_value() && mask_in->defined();

  // The gradient is that of the direct definition C_ij(r) = sum_x x_i(x) x_j(x + r), whatever
  // relations the forward pass used: every state of a requested pair is transformed.
  const CombinePlan cp = combine_plan(pair_i, pair_j);

  at::Tensor xs = select_states(x, cp.states);
  at::Tensor mask, mask_view, zmask, zlevel;
  if (has_mask) {
    mask = mask_in->contiguous();
    std::vector<int64_t> view{mask.size(0), 1};
    for (int64_t d = 0; d < s.geom.ndim; ++d) view.push_back(s.geom.n[d]);
    mask_view = mask.view(view);
    xs = xs * mask_view;
    std::tie(zmask, zlevel) = mask_norm(mask, s);
  }

  EmbedArgs e;
  e.grad = grad;
  e.zmask = zmask;
  e.zlevel = zlevel;
  e.geom = s.geom;
  e.periodic = periodic;
  auto g_grid = be.embed_grad(e);
  auto g_hat = rfft_grid(g_grid, s.grid, false);
  auto x_hat = rfft_grid(xs, s.grid, false);

  auto dev = x.device();
  CombineArgs c;
  c.g_hat = g_hat;
  c.x_hat = x_hat;
  c.begin = ints_to(cp.begin, dev);
  c.end = ints_to(cp.end, dev);
  c.terms = table_to(cp.terms, dev);
  c.n_states = static_cast<int64_t>(cp.states.size());
  auto gx = irfft_grid(be.combine_grad(c), s.grid, false);
  if (!periodic) {
    for (int64_t d = 0; d < s.geom.ndim; ++d) gx = gx.narrow(d + 2, 0, s.geom.n[d]);
  }
  if (has_mask) gx = gx * mask_view;
  if (static_cast<int64_t>(cp.states.size()) == n_state) return gx.contiguous();
  auto out = at::zeros_like(x);
  out.index_copy_(1, longs_to(cp.states, x.device()), gx);
  return out;
}


namespace {

// The backward's split of the pairs: auto pairs alone on their state ("even": their gradient
// spectrum 2 Re(G) X_a comes from the even part of their window, through pruned transforms of the
// window rather than a full transform of the embedded grid - the loss's even path) and the rest,
// which take the embedded gradient and combine_grad as before. 2D and 3D without a mask (the mask
// normalises each grid position, not each lag) on a backend with the even pass.
struct EvenSplit {
  std::vector<int64_t> even, rest;  // pair indices
  std::vector<int32_t> state_even;  // per state position: its even pair's position in `even`, or -1
  CombinePlan rest_plan;            // combine_grad's plan over the rest (pair positions in `rest`)
};

EvenSplit even_split(at::IntArrayRef pair_i, at::IntArrayRef pair_j, const CombinePlan& cp, int64_t nd,
                     bool disabled) {
  EvenSplit sp;
  const int64_t nq = static_cast<int64_t>(pair_i.size());
  const int64_t nu = static_cast<int64_t>(cp.states.size());
  sp.state_even.assign(nu, -1);
  std::vector<int64_t> rest_pos(nq, -1);
  for (int64_t q = 0; q < nq; ++q) {
    bool even = !disabled && nd > 1 && pair_i[q] == pair_j[q];
    for (int64_t k = 0; k < nq && even; ++k)
      even = k == q || pair_i[k] != pair_i[q] || pair_j[k] != pair_i[q];  // the state's only auto pair
    if (even) {
      const int64_t u = std::lower_bound(cp.states.begin(), cp.states.end(), pair_i[q]) - cp.states.begin();
      sp.state_even[u] = static_cast<int32_t>(sp.even.size());
      sp.even.push_back(q);
    } else {
      rest_pos[q] = static_cast<int64_t>(sp.rest.size());
      sp.rest.push_back(q);
    }
  }
  sp.rest_plan.states = cp.states;
  for (int64_t u = 0; u < nu; ++u) {
    sp.rest_plan.begin.push_back(static_cast<int32_t>(sp.rest_plan.terms.size()));
    for (int32_t k = cp.begin[u]; k < cp.end[u]; ++k) {
      CombineTerm t = cp.terms[k];
      if (rest_pos[t.pair] < 0) continue;
      t.pair = static_cast<int32_t>(rest_pos[t.pair]);
      sp.rest_plan.terms.push_back(t);
    }
    sp.rest_plan.end.push_back(static_cast<int32_t>(sp.rest_plan.terms.size()));
  }
  return sp;
}

// 1 / normaliser of every lag of the window, (*w): 1/S (periodic) or 1/prod(n - |r|), the
// arithmetic of inv_norm_lag (the product of the counts, then its reciprocal). A device_table:
// uploaded to a GPU once per geometry, not on every backward call.
at::Tensor lag_normaliser(const Geometry& g, bool periodic, const at::TensorOptions& opts) {
  std::vector<int64_t> w(g.w, g.w + g.ndim);
  int64_t numel = 1;
  for (auto v : w) numel *= v;
  std::vector<double> v(numel);
  double s_total = 1.0;
  for (int d = 0; d < g.ndim; ++d) s_total *= static_cast<double>(g.n[d]);
  int64_t idx[kMaxDims] = {0, 0, 0}, lag[kMaxDims] = {0, 0, 0};
  for (int64_t k = 0; k < numel; ++k) {
    unravel(k, g.w, g.ndim, idx);
    for (int d = 0; d < g.ndim; ++d) lag[d] = window_lag(idx[d], g.w[d]);
    v[k] = periodic ? 1.0 / s_total : inv_norm_lag<double>(g, lag, false, 1.0);
  }
  if (opts.dtype() == at::kFloat) {
    const std::vector<float> f(v.begin(), v.end());
    return device_table(f.data(), numel * static_cast<int64_t>(sizeof(float)), at::kFloat, numel, opts.device())
        .view(w);
  }
  return device_table(v.data(), numel * static_cast<int64_t>(sizeof(double)), at::kDouble, numel, opts.device())
      .view(w);
}

}  // namespace

at::Tensor two_point_backward_spectra(const at::Tensor& grad_in, const at::Tensor& x_hat, at::IntArrayRef pair_i,
                                      at::IntArrayRef pair_j, int64_t n_state, at::IntArrayRef spatial,
                                      bool periodic, const c10::optional<at::Tensor>& mask_in,
                                      const TwoPointBackend& be) {
  const char* op = "two_point_stats_backward";
  TORCH_CHECK(x_hat.scalar_type() == at::kComplexFloat || x_hat.scalar_type() == at::kComplexDouble, op,
              ": x_hat must be complex64 or complex128, got ", x_hat.scalar_type());
  const auto real = c10::toRealValueType(x_hat.scalar_type());
  TORCH_CHECK(grad_in.scalar_type() == real, op, ": grad has dtype ", grad_in.scalar_type(), " but x_hat has dtype ",
              x_hat.scalar_type(), " (grad must be ", real, ")");
  TORCH_CHECK(grad_in.device() == x_hat.device(), op, ": grad is on ", grad_in.device(), " but x_hat is on ",
              x_hat.device());
  const int64_t nd = static_cast<int64_t>(spatial.size());
  PYMKS_CHECK_VALUE(nd >= 1 && nd <= kMaxDims, op, ": spatial must have 1-3 entries, got ", spatial);
  check_pairs(pair_i, pair_j, n_state, op);
  const int64_t n_pairs = static_cast<int64_t>(pair_i.size());
  PYMKS_CHECK_VALUE(grad_in.dim() == nd + 2 && grad_in.size(1) == n_pairs && grad_in.size(0) > 0, op,
                    ": grad has shape ", grad_in.sizes(), ", expected (batch, ", n_pairs, ", *window) with ", nd,
                    " window dims");
  const int64_t B = grad_in.size(0);
  Setup s = make_setup_spatial(spatial, periodic, grad_in.sizes().slice(2), op);
  const CombinePlan cp = combine_plan(pair_i, pair_j);
  const int64_t nu = static_cast<int64_t>(cp.states.size());
  std::vector<int64_t> hs{B, nu};
  for (int d = 0; d < s.geom.ndim; ++d) hs.push_back(d + 1 < s.geom.ndim ? s.geom.m[d] : s.geom.m[d] / 2 + 1);
  PYMKS_CHECK_VALUE(x_hat.sizes() == at::IntArrayRef(hs), op, ": x_hat has shape ", x_hat.sizes(), ", expected ",
                    at::IntArrayRef(hs), " for these pairs, spatial size and window");
  at::Tensor mask, mask_view, zmask, zlevel;
  if (mask_in.has_value() && mask_in->defined()) {
    const at::Tensor& m = *mask_in;
    TORCH_CHECK(m.device() == x_hat.device(), op, ": mask is on ", m.device(), " but x_hat is on ", x_hat.device());
    TORCH_CHECK(m.scalar_type() == real, op, ": mask has dtype ", m.scalar_type(), " but x_hat has dtype ",
                x_hat.scalar_type());
    std::vector<int64_t> shared{1}, per_sample{B};
    shared.insert(shared.end(), spatial.begin(), spatial.end());
    per_sample.insert(per_sample.end(), spatial.begin(), spatial.end());
    PYMKS_CHECK_VALUE(m.sizes() == at::IntArrayRef(shared) || m.sizes() == at::IntArrayRef(per_sample), op,
                      ": mask has shape ", m.sizes(), ", expected ", at::IntArrayRef(shared), " or ",
                      at::IntArrayRef(per_sample));
    mask = m.contiguous();
  }
  const c10::DeviceGuard guard(x_hat.device());
  if (mask.defined()) {
    std::vector<int64_t> view{mask.size(0), 1};
    view.insert(view.end(), spatial.begin(), spatial.end());
    mask_view = mask.view(view);
    std::tie(zmask, zlevel) = mask_norm(mask, s);
  }
  const auto dev = x_hat.device();
  CombineArgs c;
  c.begin = ints_to(cp.begin, dev);
  c.end = ints_to(cp.end, dev);
  c.terms = table_to(cp.terms, dev);
  c.n_states = nu;
  // The CPU's embed_grad reads grad through its strides (a reduction's gradient arrives expanded).
  const auto grad = grad_in.device().is_cpu() ? grad_in : grad_in.contiguous();
  const auto xh = x_hat.contiguous();
  std::vector<int64_t> sizes{B, n_state};
  sizes.insert(sizes.end(), spatial.begin(), spatial.end());
  auto out = nu == n_state ? at::empty(sizes, grad.options()) : at::zeros(sizes, grad.options());
  const auto states_t = longs_to(cp.states, dev);
  int64_t grid = 1;
  for (auto m : s.grid) grid *= m;
  // In cache-sized chunks: the embedded gradient, its spectrum, the gradient spectra and their
  // inverse transforms of a chunk stay in cache between the passes.
  const int64_t chunk = cache_chunk(grad, (3 * n_pairs + 4 * nu) * grid);
  const bool per_sample_mask = mask.defined() && mask.size(0) != 1;
  // The even part's pruned transforms against one transform of the embedded grid, measured on
  // the 2-core AMD EPYC (one-hot pairs [(1, 1), (0, 1)], forward + backward, one thread): ahead by
  // 4-8% on 32 x 224^2 at cutoffs 20 and 40 (windows of 3% and 13% of the grid), level at cutoff 70
  // (40%), 10% behind over the whole window; in 3D level at 8 x 64^3 cutoff 10 (3.5% of the
  // volume) and well behind at cutoff 20 (45 against 49-68 ms). So: 2D windows of at most a
  // quarter of the grid.
  int64_t window_numel = 1;
  for (int d = 0; d < s.geom.ndim; ++d) window_numel *= s.geom.w[d];
  const bool small_window = nd == 2 && 4 * window_numel <= grid;
  const EvenSplit split = even_split(pair_i, pair_j, cp, nd, !small_window || mask.defined() || !be.even_grad_spectrum);
  const at::Tensor state_even_t = split.even.empty() ? at::Tensor() : ints_to(split.state_even, dev);
  const at::Tensor even_norm = split.even.empty() ? at::Tensor() : lag_normaliser(s.geom, periodic, grad.options());
  // The inverse transforms' division by the grid size rides on the gradient spectra's products
  // (an unnormalised inverse then saves DFTI a scaling pass over each result).
  const double inv_grid = 1.0 / static_cast<double>(grid);
  c.scale = inv_grid;
  if (!split.even.empty()) {
    c.begin = ints_to(split.rest_plan.begin, dev);
    c.end = ints_to(split.rest_plan.end, dev);
    c.terms = table_to(split.rest_plan.terms, dev);
  }
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    const at::Tensor g_chunk = grad.narrow(0, b0, n);
    c.x_hat = xh.narrow(0, b0, n);
    at::Tensor spec;
    if (!split.rest.empty()) {
      EmbedArgs e;
      e.grad = split.even.empty() ? g_chunk : select_states(g_chunk, split.rest);  // these pairs, along dim 1
      // The CUDA embed_grad reads grad as contiguous (the CPU one through its strides): a run of
      // pairs out of several is a strided view.
      if (!e.grad.is_cpu()) e.grad = e.grad.contiguous();
      e.zmask = per_sample_mask ? zmask.narrow(0, b0, n) : zmask;
      e.zlevel = per_sample_mask ? zlevel.narrow(0, b0, n) : zlevel;
      e.geom = s.geom;
      e.periodic = periodic;
      c.g_hat = rfft_grid(be.embed_grad(e), s.grid, false);
      spec = be.combine_grad(c);
    }
    if (!split.even.empty()) {
      // The auto pairs' share, 2 Re(G) X_a, from the even part of their normalised windows.
      const auto win = select_states(g_chunk, split.even) * even_norm;
      const auto re_g = even_window_spectrum(win, s.geom);
      const bool accumulate = spec.defined();
      if (!accumulate) spec = at::empty_like(c.x_hat);
      be.even_grad_spectrum(c.x_hat, re_g, state_even_t, 2.0 * inv_grid, spec, accumulate);
    }
    auto out_c = out.narrow(0, b0, n);
    if (periodic && !mask.defined() && nu == n_state) {
      irfft_grid(spec, s.grid, false, out_c, /*normalised=*/false);  // straight into the output
      continue;
    }
    auto gx = irfft_grid(spec, s.grid, false, at::Tensor(), /*normalised=*/false);
    if (!periodic)
      for (int64_t d = 0; d < nd; ++d) gx = gx.narrow(d + 2, 0, spatial[d]);
    if (mask.defined()) gx = gx * (per_sample_mask ? mask_view.narrow(0, b0, n) : mask_view);
    if (nu == n_state) out_c.copy_(gx);
    else out_c.index_copy_(1, states_t, gx);
  }
  return out;
}

}  // namespace pymks_vae
