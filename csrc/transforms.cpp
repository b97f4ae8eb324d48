// The real transforms of the drivers: fields (B, k, *spatial) to their half spectra on a grid
// (zero padded where the grid is larger), and back, in the natural layout (the last axis halved)
// or the moved one (the first axis last, see stats_loss_driver.cpp). On the CPU they run through
// MKL's DFTI directly where it is there (cpu/mkl_dft.h: no clones, no transposing copies, the
// result written where the caller wants it); elsewhere, and as the fallback, through ATen.
#include "cpu/gemm_dft.h"
#include "cpu/mkl_dft.h"
#include "two_point.h"

#include <algorithm>
#include <chrono>
#include <limits>

namespace pymks_vae {
std::vector<int64_t> half_sizes(int64_t B, int64_t k, at::IntArrayRef grid, bool moved) {
  std::vector<int64_t> sizes{B, k};
  const size_t nd = grid.size();
  for (size_t d = 0; d < nd; ++d) sizes.push_back(d + 1 < nd ? grid[d] : grid[d] / 2 + 1);
  if (moved && nd > 1) std::rotate(sizes.begin() + 2, sizes.begin() + 3, sizes.end());
  return sizes;
}

namespace {

void check_dest(const at::Tensor& dest, const std::vector<int64_t>& sizes, const char* what) {
  TORCH_CHECK(!dest.defined() || (dest.sizes() == at::IntArrayRef(sizes) && dest.is_contiguous()), what,
              ": the destination has shape ", dest.sizes(), " (contiguous: ", dest.is_contiguous(), "), expected ",
              at::IntArrayRef(sizes));
}

at::Tensor into(const at::Tensor& result, at::Tensor dest) {
  if (!dest.defined()) return result;
  dest.copy_(result);
  return dest;
}

// The transforms proper: MKL's DFTI where it takes the layout, else ATen's.
at::Tensor rfft_transforms(const at::Tensor& x, at::IntArrayRef grid, bool moved, bool padded, at::Tensor dest) {
  const int64_t B = x.size(0), k = x.size(1), nd = static_cast<int64_t>(grid.size());
  const auto ctype = x.options().dtype(c10::toComplexType(x.scalar_type()));
  // Zero padding (non-periodic statistics) stays with ATen, whose transforms pad as they go: DFTI
  // would need a padded copy first, which made the non-periodic loss 8% slower (cutoff 20, 224^2).
  // A strided x (some states of a batch, channels-last data) too: ATen's transforms read it in
  // place where DFTI would need a contiguous copy first. And so does the moved layout: MKL's
  // internal scatter into it cost more than ATen's transforms around one transposing copy (the
  // windowed loss, timed in the same rounds with each transform on either path: 3-4% slower
  // with DFTI here, 3-5% faster with DFTI for the inverse transform out of that layout).
  if (x.device().is_cpu() && cpu::dft_enabled() && !padded && x.is_contiguous() && (!moved || nd == 1)) {
    at::Tensor out = dest.defined() ? dest : at::empty(half_sizes(B, k, grid, moved), ctype);
    if (cpu::dft_r2c(cpu::contiguous_layout(grid.vec(), B * k, moved), x, out)) return out;
  }
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < nd; ++d) dims.push_back(d + 2);
  if (!moved || nd == 1) return into(at::fft_rfftn(x, grid, dims).contiguous(), dest);
  // The last axes first, then the first axis moved last and transformed along contiguous memory:
  // a lone transform along a strided axis cost about twice as much through ATen.
  std::vector<int64_t> rest_dims(dims.begin() + 1, dims.end()), rest_sizes(grid.begin() + 1, grid.end());
  auto p = at::fft_rfftn(x, rest_sizes, rest_dims).movedim(2, -1).contiguous();
  return into(at::fft_fft(p, grid[0], -1), dest);  // n = m_0 pads the first axis, as rfftn's s does
}

at::Tensor irfft_transforms(const at::Tensor& spec, at::IntArrayRef grid, bool moved, at::Tensor dest,
                            bool normalised) {
  const int64_t B = spec.size(0), k = spec.size(1), nd = static_cast<int64_t>(grid.size());
  const auto rtype = spec.options().dtype(c10::toRealValueType(spec.scalar_type()));
  double n = 1.0;
  for (auto m : grid) n *= static_cast<double>(m);
  if (spec.device().is_cpu() && cpu::dft_enabled() && spec.is_contiguous()) {
    std::vector<int64_t> sizes{B, k};
    sizes.insert(sizes.end(), grid.begin(), grid.end());
    at::Tensor out = dest.defined() ? dest : at::empty(sizes, rtype);
    if (cpu::dft_c2r(cpu::contiguous_layout(grid.vec(), B * k, moved), spec, out, normalised ? 1.0 / n : 1.0))
      return out;
  }
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < nd; ++d) dims.push_back(d + 2);
  // norm "forward" leaves the inverse unscaled.
  const c10::optional<c10::string_view> norm =
      normalised ? c10::optional<c10::string_view>() : c10::optional<c10::string_view>("forward");
  if (!moved || nd == 1) return into(at::fft_irfftn(spec, grid, dims, norm).contiguous(), dest);
  std::vector<int64_t> rest_dims(dims.begin() + 1, dims.end()), rest_sizes(grid.begin() + 1, grid.end());
  auto p = at::fft_ifft(spec, grid[0], -1, norm).movedim(-1, 2).contiguous();
  return into(at::fft_irfftn(p, rest_sizes, rest_dims, norm).contiguous(), dest);
}

// Small 2D grids (cpu/gemm_dft.h): products(input, out) or transforms(input, out), as the chooser
// says. A trial runs both three times, alternating, each into its own output (where the transforms
// consume their input, on a fresh copy made outside the timing, as the products read the input
// again), keeps the best time of each, and leaves the winner's result in out; a trial against the
// fixed rule is repeated at once and its second outcome stands. So the first call of a kind gives
// the bits of the calls that follow it.
template <class Products, class Transforms>
void run_small_grid(const cpu::GemmDftKind& kind, const at::Tensor& input, bool transforms_consume_input,
                    at::Tensor& out, Products products, Transforms transforms) {
  const auto choice = cpu::gemm_dft_choice(kind);
  if (choice == cpu::GemmDftChoice::kProducts) return products(input, out);
  if (choice == cpu::GemmDftChoice::kTransforms) return transforms(input, out);
  at::Tensor other = at::empty_like(out);
  auto verdict = cpu::GemmDftVerdict::kConfirm;
  for (int attempt = 0; attempt < 2 && verdict == cpu::GemmDftVerdict::kConfirm; ++attempt) {
    double t_products = std::numeric_limits<double>::infinity(), t_transforms = t_products;
    for (int round = 0; round < 3; ++round) {
      auto t0 = std::chrono::steady_clock::now();
      products(input, out);
      t_products = std::min(t_products, seconds_since(t0));
      const at::Tensor in = transforms_consume_input ? input.clone() : input;
      t0 = std::chrono::steady_clock::now();
      transforms(in, other);
      t_transforms = std::min(t_transforms, seconds_since(t0));
    }
    verdict = cpu::gemm_dft_record(kind, t_products, t_transforms, /*confirming=*/attempt > 0);
  }
  if (verdict == cpu::GemmDftVerdict::kTransforms) out.copy_(other);
}

}  // namespace

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

at::Tensor rfft_grid(const at::Tensor& x, at::IntArrayRef grid, bool moved, at::Tensor dest) {
  const int64_t B = x.size(0), k = x.size(1), nd = static_cast<int64_t>(grid.size());
  bool padded = false;
  for (int64_t d = 0; d < nd; ++d) padded = padded || grid[d] != x.size(d + 2);
  const auto sizes = half_sizes(B, k, grid, moved);
  check_dest(dest, sizes, "rfft_grid");
  // Small 2D grids: matrix products where they are chosen (cpu/gemm_dft.h). A strided x (some
  // states of a batch) is copied for them first, which the time of their trials includes: at 51^2
  // (32 x 2 of 3 states) the products with the copy took about 0.4x the time of ATen's transforms
  // reading x in place.
  if (x.device().is_cpu() && !padded && cpu::gemm_dft_candidate(grid)) {
    at::Tensor out = dest.defined() ? dest : at::empty(sizes, x.options().dtype(c10::toComplexType(x.scalar_type())));
    const cpu::GemmDftKind kind{grid[0], grid[1], B * k, x.scalar_type() == at::kDouble, false, moved,
                                !x.is_contiguous()};
    run_small_grid(
        kind, x, false, out, [&](const at::Tensor& in, at::Tensor& o) { cpu::gemm_rfft2(in.contiguous(), o, moved); },
        [&](const at::Tensor& in, at::Tensor& o) { rfft_transforms(in, grid, moved, padded, o); });
    return out;
  }
  return rfft_transforms(x, grid, moved, padded, dest);
}

void rfft_grid_into(const at::Tensor& x, at::IntArrayRef grid, at::Tensor& dest) {
  const int64_t B = x.size(0), nd = static_cast<int64_t>(grid.size());
  const auto sizes = half_sizes(B, x.size(1), grid, false);
  TORCH_CHECK(dest.sizes() == at::IntArrayRef(sizes), "rfft_grid_into: the destination has shape ", dest.sizes(),
              ", expected ", at::IntArrayRef(sizes));
  for (int64_t d = 0; d < nd; ++d)
    TORCH_CHECK(grid[d] == x.size(d + 2), "rfft_grid_into: x has spatial size ", x.sizes().slice(2),
                ", expected the grid ", grid);
  if (dest.is_contiguous()) {
    rfft_grid(x, grid, false, dest);
    return;
  }
  // One field per sample, each (real and half) stored row-major with its own distance between
  // samples: DFTI takes those strides and writes the view in place, where a contiguous result and
  // a copy into the view cost one more pass over the spectra. Small 2D grids keep their chooser.
  if (x.device().is_cpu() && cpu::dft_enabled() && x.size(1) == 1 && !cpu::gemm_dft_candidate(grid)) {
    cpu::DftLayout l = cpu::contiguous_layout(grid.vec(), B, false);
    l.real_dist = x.stride(0);
    l.half_dist = dest.stride(0);
    bool row_major = true;
    for (int64_t d = 0; d < nd; ++d) {
      const int64_t h = d + 1 < nd ? grid[d] : grid[d] / 2 + 1;
      row_major = row_major && (grid[d] == 1 || x.stride(d + 2) == l.real_strides[d]) &&
                  (h == 1 || dest.stride(d + 2) == l.half_strides[d]);
    }
    if (row_major && cpu::dft_r2c(l, x, dest)) return;
  }
  dest.copy_(rfft_grid(x, grid, false));
}

at::Tensor irfft_grid(const at::Tensor& spec, at::IntArrayRef grid, bool moved, at::Tensor dest, bool normalised) {
  const int64_t B = spec.size(0), k = spec.size(1);
  std::vector<int64_t> sizes{B, k};
  sizes.insert(sizes.end(), grid.begin(), grid.end());
  check_dest(dest, sizes, "irfft_grid");
  if (spec.device().is_cpu() && cpu::gemm_dft_candidate(grid)) {
    double n = 1.0;
    for (auto m : grid) n *= static_cast<double>(m);
    const double scale = normalised ? 1.0 / n : 1.0;
    at::Tensor out = dest.defined() ? dest : at::empty(sizes, spec.options().dtype(c10::toRealValueType(spec.scalar_type())));
    const cpu::GemmDftKind kind{grid[0], grid[1], B * k, spec.scalar_type() == at::kComplexDouble, true, moved,
                                !spec.is_contiguous()};
    run_small_grid(
        kind, spec, true, out, [&](const at::Tensor& in, at::Tensor& o) { cpu::gemm_irfft2(in.contiguous(), o, scale, moved); },
        [&](const at::Tensor& in, at::Tensor& o) { irfft_transforms(in, grid, moved, o, normalised); });
    return out;
  }
  return irfft_transforms(spec, grid, moved, dest, normalised);
}

}  // namespace pymks_vae
