// The schemas of every pymks-vae operator, declared once, and the module's build information.
// Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and
// autograd formulas are attached in Python (pymks_vae/ops.py), except the two losses' autograd,
// which is C++ (csrc/autograd.cpp).
#include <torch/extension.h>
#include <torch/library.h>
// TORCH_VERSION: recent torch defines it in torch/headeronly/version.h, older releases (such as
// the 2.11 of the lent GPU machines) in torch/version.h, which lies on the extension include path.
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include "spectral.h"
#include "cpu/direct_dft.h"
#include "cpu/gemm_dft.h"
#include "cpu/mkl_dft.h"
#include "two_point.h"

#ifndef PYMKS_VAE_CUDA_ARCHS
#define PYMKS_VAE_CUDA_ARCHS ""
#endif
#ifndef PYMKS_VAE_CUDA_VERSION
#define PYMKS_VAE_CUDA_VERSION ""
#endif

TORCH_LIBRARY(pymks_vae, m) {
  // Two-point statistics of x (B, n_state, *spatial) for pairs (pair_i[k], pair_j[k]) on a window
  // of lags (one size per spatial axis). partition: 0 off, 1 trust, 2 check.
  m.def(
      "two_point_stats(Tensor x, int[] pair_i, int[] pair_j, bool periodic, int[] window, "
      "Tensor? mask, int partition) -> Tensor");
  m.def(
      "two_point_stats_backward(Tensor grad, Tensor x, int[] pair_i, int[] pair_j, bool periodic, "
      "int[] window, Tensor? mask) -> Tensor");
  // The same statistics, and the spectra of the states the pairs name (masked, on the transform
  // grid), which the backward pass below reuses instead of transforming x again.
  m.def(
      "two_point_stats_spectra(Tensor x, int[] pair_i, int[] pair_j, bool periodic, int[] window, "
      "Tensor? mask, int partition) -> (Tensor, Tensor)");
  m.def(
      "two_point_stats_backward_spectra(Tensor grad, Tensor x_hat, int[] pair_i, int[] pair_j, int n_state, "
      "int[] spatial, bool periodic, Tensor? mask) -> Tensor");
  // Per-sample squared distance between periodic statistics, and the gradient spectrum the
  // backward pass turns into d/dx with one inverse FFT.
  m.def(
      "stats_loss(Tensor x, Tensor target, int[] pair_i, int[] pair_j, float scale, bool need_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "stats_loss_backward(Tensor grad, Tensor spectrum, int[] spatial, int n_state, int[] states) "
      "-> Tensor");
  // The general loss (a lag window, per-lag weights, periodic or zero-padded statistics, an offset
  // per sample and pair): per-sample values, dL/dC(x) on the window, the spectra of x and dL/doffset
  // (empty unless need_grad; the last also without offset), and the backward pass that turns the
  // first two into d/dx.
  m.def(
      "stats_loss_window(Tensor x, Tensor target, int[] pair_i, int[] pair_j, bool periodic, int[] window, "
      "Tensor? weight, Tensor? offset, float scale, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "stats_loss_window_backward(Tensor grad, Tensor grad_window, Tensor x_hat, int[] pair_i, int[] pair_j, "
      "int n_state, int[] spatial, bool periodic) -> Tensor");
}

// OpenMP (ATen's parallel loops) and MKL (ATen's CPU FFTs) keep a per-thread limit on their
// threads. They are looked up weakly: a torch built without them leaves these null.
extern "C" {
void omp_set_num_threads(int) __attribute__((weak));
int omp_get_max_threads() __attribute__((weak));
// MKL's C entry point (the lower-case symbol is its Fortran one, which takes a pointer).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace {

// Sets the calling thread's OpenMP and MKL thread limits and returns the previous ones, as
// (omp, mkl) with -1 for a library that is absent; (0 for MKL means "the global setting").
// Only this thread is affected: other threads, and torch.get_num_threads() elsewhere, are not.
std::pair<int, int> set_thread_limits(int omp, int mkl) {
  at::get_num_threads();  // ATen initialises a thread's limits lazily; do it before changing them
  int prev_omp = -1, prev_mkl = -1;
  if (omp_get_max_threads && omp_set_num_threads && omp >= 1) {
    prev_omp = omp_get_max_threads();
    omp_set_num_threads(omp);
  }
  if (MKL_Set_Num_Threads_Local && mkl >= 0) prev_mkl = MKL_Set_Num_Threads_Local(mkl);
  return {prev_omp, prev_mkl};
}

// spectral.h's index map of the pruned even layout, for the tests: the CPU kernels read that
// layout row by row, the CUDA kernels element by element through this function.
int64_t even_index_py(const std::vector<int64_t>& lag, const std::vector<int64_t>& m) {
  TORCH_CHECK_VALUE(!lag.empty() && lag.size() == m.size() && lag.size() <= pymks_vae::kMaxDims,
                    "_even_index: lag and m must have the same 1-3 entries");
  return pymks_vae::even_index(lag.data(), m.data(), static_cast<int>(lag.size()));
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu"] = true;
  d["cpu_count_kernel"] = std::string(pymks_vae::binary_count_kernel());
#ifdef PYMKS_VAE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::string(PYMKS_VAE_CUDA_VERSION);
#else
  d["cuda"] = false;
  d["cuda_version"] = pybind11::none();
#endif
  d["cuda_archs"] = std::string(PYMKS_VAE_CUDA_ARCHS);
  d["torch_version"] = std::string(TORCH_VERSION);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymks-vae compiled kernels (operators live under torch.ops.pymks_vae)";
  m.def("build_info", &build_info, "What this extension was compiled with");
  m.def("_even_index", &even_index_py, pybind11::arg("lag"), pybind11::arg("m"),
        "Index of a lag in the pruned even layout of spectral.h (for tests)");
  m.def("_set_thread_limits", &set_thread_limits, pybind11::arg("omp"), pybind11::arg("mkl"),
        "Set this thread's OpenMP and MKL thread limits; returns the previous (omp, mkl)");
  m.def("_set_data_checks", &pymks_vae::set_data_checks, pybind11::arg("enabled"),
        "Turn this thread's data checks (NaN/Inf, mask range) on or off; returns the previous setting");
  m.def("_data_checks_enabled", &pymks_vae::data_checks_enabled, "Whether this thread's data checks are on");
  m.def("_set_derive_eliminated", &pymks_vae::set_derive_eliminated, pybind11::arg("enabled"),
        "Let this thread's operator derive the kept spectrum of the state an exact partition eliminates "
        "(True) or transform it (False); returns the previous setting");
  // MKL's DFTI called directly for the CPU transforms (csrc/cpu/mkl_dft.h), and ATen's path instead.
  m.def("_set_even_gemm", &pymks_vae::set_even_gemm, pybind11::arg("enabled"),
        "Let this thread's windowed loss take the matrix-product route for small 2D windows (True) or the "
        "pruned transforms always (False); returns the previous setting");
  m.def("_set_even_simd", &pymks_vae::set_even_simd, pybind11::arg("enabled"),
        "Let this thread's matrix-product route run its AVX2 + FMA passes where the CPU has them (True) or "
        "the baseline build's (False); returns the previous setting");
  m.def(
      "_set_direct_dft",
      [](const std::string& mode) {
        using pymks_vae::cpu::DirectIsa;
        static const char* const kNames[] = {"auto", "generic"};
        TORCH_CHECK(mode == "auto" || mode == "generic", "_set_direct_dft: mode must be 'auto' or 'generic', got '",
                    mode, "'");
        const DirectIsa isa = mode == "auto" ? DirectIsa::kAuto : DirectIsa::kGeneric;
        return std::string(kNames[static_cast<int>(pymks_vae::cpu::set_direct_dft_isa(isa))]);
      },
      pybind11::arg("mode"),
      "This thread's instruction set for the direct 2D transforms: 'auto' (AVX2 with FMA where the CPU has "
      "them) or 'generic' (the baseline build); returns the previous mode (tests)");
  m.def("_direct_dft_isa", &pymks_vae::cpu::direct_dft_isa, "What the direct form's loops run with now (tests)");
  m.def("_set_gemm_dft", &pymks_vae::cpu::set_gemm_dft, pybind11::arg("enabled"),
        "Let this thread's CPU transforms of small 2D grids run written out (the route's first form was matrix "
        "products) where they are chosen (True) "
        "or as transforms always (False); returns the previous setting");
  m.def("_set_gemm_dft_trials", &pymks_vae::cpu::set_gemm_dft_trials, pybind11::arg("enabled"),
        "Choose this thread's matrix products by timing them against the transforms at the first call of a kind "
        "(True, default) or by the fixed rule (False); returns the previous setting");
  m.def("_gemm_dft_trials", &pymks_vae::cpu::gemm_dft_trials,
        "How many kinds of call have had the matrix products timed against the transforms");
  m.def("_clear_gemm_dft_trials", &pymks_vae::cpu::clear_gemm_dft_trials, "Forget the matrix products' trials");
  m.def(
      "_gemm_dft_verdict",
      [](std::vector<int64_t> grid, double t_products, double t_transforms, bool confirming) -> std::string {
        TORCH_CHECK(grid.size() == 2, "_gemm_dft_verdict: grid must have 2 sides");
        switch (pymks_vae::cpu::gemm_dft_verdict(grid, t_products, t_transforms, confirming)) {
          case pymks_vae::cpu::GemmDftVerdict::kProducts: return "products";
          case pymks_vae::cpu::GemmDftVerdict::kTransforms: return "transforms";
          default: return "confirm";
        }
      },
      pybind11::arg("grid"), pybind11::arg("t_products"), pybind11::arg("t_transforms"), pybind11::arg("confirming"),
      "A trial's decision from its two best times (seconds), as the matrix products' trials take it (tests)");
  // The matrix-product transforms alone, whatever the grid (tests compare them with torch.fft).
  m.def(
      "_gemm_rfft2",
      [](const at::Tensor& x, bool moved) {
        TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                        x.dim() >= 2,
                    "_gemm_rfft2: x must be a CPU float32/float64 tensor with at least 2 dimensions");
        // The route stops at sides of 401; its tables grow as the square of a side.
        TORCH_CHECK(x.size(-1) <= 4096 && x.size(-2) <= 4096, "_gemm_rfft2: sides up to 4096, got ", x.sizes());
        const auto xc = x.contiguous();
        auto sizes = xc.sizes().vec();
        sizes.back() = sizes.back() / 2 + 1;
        if (moved) std::swap(sizes[sizes.size() - 1], sizes[sizes.size() - 2]);
        auto out = at::empty(sizes, xc.options().dtype(c10::toComplexType(xc.scalar_type())));
        pymks_vae::cpu::gemm_rfft2(xc, out, moved);
        return out;
      },
      pybind11::arg("x"), pybind11::arg("moved") = false,
      "rfft over the last two axes, written out as the route of small grids runs it (moved: the first of them "
      "last in the result)");
  m.def(
      "_gemm_irfft2",
      [](const at::Tensor& spec, int64_t m1, bool moved, double scale) {
        TORCH_CHECK(spec.device().is_cpu() &&
                        (spec.scalar_type() == at::kComplexFloat || spec.scalar_type() == at::kComplexDouble) &&
                        spec.dim() >= 2,
                    "_gemm_irfft2: spec must be a CPU complex64/complex128 tensor with at least 2 dimensions");
        const auto sc = spec.contiguous();
        auto sizes = sc.sizes().vec();
        if (moved) std::swap(sizes[sizes.size() - 1], sizes[sizes.size() - 2]);
        TORCH_CHECK(m1 >= 1 && sizes.back() == m1 / 2 + 1, "_gemm_irfft2: m1 = ", m1, " does not fit the spectrum's ",
                    sizes.back(), " bins");
        TORCH_CHECK(m1 <= 4096 && sizes[sizes.size() - 2] <= 4096, "_gemm_irfft2: sides up to 4096, got ", m1, " and ",
                    sizes[sizes.size() - 2]);
        sizes.back() = m1;
        auto out = at::empty(sizes, sc.options().dtype(c10::toRealValueType(sc.scalar_type())));
        pymks_vae::cpu::gemm_irfft2(sc, out, scale, moved);
        return out;
      },
      pybind11::arg("spec"), pybind11::arg("m1"), pybind11::arg("moved") = false, pybind11::arg("scale") = 1.0,
      "irfft over the last two axes (times scale), written out as the route of small grids runs it, from natural "
      "or moved spectra");
  m.def("_set_gemm_dft_trial_bias", &pymks_vae::cpu::set_gemm_dft_trial_bias, pybind11::arg("bias"),
        "Multiply the matrix products' measured time by bias in their trials (tests); returns the previous bias");
  m.def("_mkl_dft_available", &pymks_vae::cpu::dft_available, "Whether MKL's DFTI was found in the loaded torch");
  m.def("_set_mkl_dft", &pymks_vae::cpu::set_dft_enabled, pybind11::arg("enabled"),
        "Use DFTI directly for the CPU transforms (True) or ATen's transforms (False); returns the previous setting");
  m.def("_mkl_dft_enabled", &pymks_vae::cpu::dft_enabled, "Whether the CPU transforms call DFTI directly now");
  m.def("_mkl_dft_cache_size", &pymks_vae::cpu::dft_cache_size, "Number of cached DFTI descriptors");
  m.def("_mkl_dft_clear_cache", &pymks_vae::cpu::dft_clear_cache, "Free the cached DFTI descriptors");
  // The route chooser for binary input (csrc/cpu/two_point_bits.cpp); pymks_vae.ops wraps these.
  // Costs travel as dicts {name: ns} with the names of RouteCosts.
  using pymks_vae::RouteCosts;
  static const std::pair<const char*, double RouteCosts::*> kCostNames[] = {
      {"word_ns", &RouteCosts::word_ns},         {"call_ns", &RouteCosts::call_ns},
      {"rotate_ns", &RouteCosts::rotate_ns},     {"pack_f32_ns", &RouteCosts::pack_f32_ns},
      {"pack_f64_ns", &RouteCosts::pack_f64_ns}, {"fft_f32_ns", &RouteCosts::fft_f32_ns},
      {"fft_f64_ns", &RouteCosts::fft_f64_ns}};
  auto costs_to_dict = [](const RouteCosts& c) {
    pybind11::dict d;
    for (const auto& [name, field] : kCostNames) d[name] = c.*field;
    return d;
  };
  auto costs_from_dict = [](const pybind11::dict& d, const char* op) {
    RouteCosts c;
    for (const auto& [name, field] : kCostNames) {
      TORCH_CHECK_VALUE(d.contains(name), op, ": costs lacks '", name, "'");
      c.*field = d[name].cast<double>();
    }
    TORCH_CHECK_VALUE(d.size() == std::size(kCostNames), op, ": costs has unknown names (expected exactly word_ns, ",
                      "call_ns, rotate_ns, pack_f32_ns, pack_f64_ns, fft_f32_ns, fft_f64_ns)");
    return c;
  };
  m.def(
      "_binary_route_calibration",
      [costs_to_dict](bool remeasure) {
        const auto cal = pymks_vae::binary_route_calibration(remeasure);
        pybind11::dict d;
        d["costs"] = costs_to_dict(cal.costs);
        d["kernel"] = cal.kernel;
        d["source"] = cal.source;
        d["threads"] = cal.threads;
        d["seconds"] = cal.seconds;
        return d;
      },
      pybind11::arg("remeasure") = false,
      "The binary route's costs in force for this thread (measured once per thread count if needed)");
  m.def(
      "_set_binary_route_costs",
      [costs_from_dict, costs_to_dict](const pybind11::object& costs) -> pybind11::object {
        std::optional<RouteCosts> prev;
        if (costs.is_none()) {
          prev = pymks_vae::set_binary_route_costs(nullptr);
        } else {
          const RouteCosts c = costs_from_dict(costs.cast<pybind11::dict>(), "set_binary_route_costs");
          prev = pymks_vae::set_binary_route_costs(&c);
        }
        if (!prev) return pybind11::none();
        return costs_to_dict(*prev);
      },
      pybind11::arg("costs"),
      "Override the binary route's costs (a dict), or None to clear the override; returns the previous one");
  m.def("_binary_route_trials", &pymks_vae::binary_route_trials,
        "How many kinds of call have had both binary routes timed (route trials)");
  m.def(
      "_last_binary_route_trial",
      [] {
        const auto r = pymks_vae::last_binary_route_trial();
        return pybind11::make_tuple(r.rounds, r.count_s, r.transform_s);
      },
      "The latest route trial: (rounds, counting's faster time, the transforms' faster time), in seconds");
  m.def("_clear_binary_route_trials", &pymks_vae::clear_binary_route_trials, "Forget the route trials");
  m.def("_set_binary_route_trial_band", &pymks_vae::set_binary_route_trial_band, pybind11::arg("band"),
        "Time both routes where the model's ratio lies within this band (0: never); returns the previous band");
  m.def(
      "_binary_route_estimate",
      [costs_from_dict](const std::vector<int64_t>& spatial, const std::vector<int64_t>& window, int64_t batch,
                        const std::vector<int64_t>& pair_i, const std::vector<int64_t>& pair_j, int64_t n_state,
                        bool periodic, bool single, bool check_partition, const pybind11::dict& costs,
                        bool spectra_kept) {
        TORCH_CHECK_VALUE(pair_i.size() == pair_j.size(), "binary_route_estimate: pair_i and pair_j differ in length");
        std::vector<std::pair<int64_t, int64_t>> req;
        for (size_t k = 0; k < pair_i.size(); ++k) req.push_back({pair_i[k], pair_j[k]});
        const auto e = pymks_vae::binary_route_estimate(spatial, window, batch, req, n_state, periodic, single,
                                                        check_partition, costs_from_dict(costs, "binary_route_estimate"),
                                                        spectra_kept);
        return pybind11::make_tuple(e.count_ns, e.transform_ns, e.counting);
      },
      pybind11::arg("spatial"), pybind11::arg("window"), pybind11::arg("batch"), pybind11::arg("pair_i"),
      pybind11::arg("pair_j"), pybind11::arg("n_state"), pybind11::arg("periodic"), pybind11::arg("single"),
      pybind11::arg("check_partition"), pybind11::arg("costs"), pybind11::arg("spectra_kept") = false,
      "(count_ns, transform_ns, counting): the route chooser's estimate under the given costs");
}
