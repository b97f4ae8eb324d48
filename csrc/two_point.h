// Host-side orchestration shared by the CPU and CUDA backends.
//
// The drivers (two_point_driver.cpp, stats_loss_driver.cpp) do what is the same on every
// device: planning which transforms to run, the FFTs themselves (ATen), data checks. Each
// backend supplies only the fused element-wise passes, written with the helpers of spectral.h.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "spectral.h"

// Errors in an argument's value: Python's ValueError. (A crash of these on the lent GPU machine,
// torch 2.11, came from building there with a g++ newer than the libstdc++ the process loads, not
// from torch: benchmarks/gpu_check.sh.)
#define PYMKS_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace pymks_vae {

// What one two_point_stats call computes, decided on the host.
struct TwoPointPlan {
  std::vector<int64_t> fwd_states;  // states whose forward transform is taken
  std::vector<int32_t> base_a;      // base correlation k = C_{base_a[k], base_b[k]} (positions);
  std::vector<int32_t> base_b;      // the n_auto auto-correlations (a == b) come first
  int32_t n_auto = 0;
  std::vector<PairPlan> pairs;      // one per requested correlation
  std::vector<Term> terms;
  std::vector<VfTerm> vfs;
};

// Gradient plan: for each transformed state, the CombineTerms that build its spectrum.
struct CombinePlan {
  std::vector<int64_t> states;        // states that receive a gradient (sorted)
  std::vector<int32_t> begin, end;    // ranges into terms, per state position
  std::vector<CombineTerm> terms;
};

// Device copies of plan tables (byte tensors), valid for the duration of one call.
struct PlanTensors {
  at::Tensor pairs, terms, vfs;
};

struct GatherArgs {
  at::Tensor even;   // (B, n_auto, even_numel) real: auto bases (pruned even layout), or undefined
  at::Tensor base;   // (B, n_base - n_auto, *m) real: cross bases, or undefined
  int32_t n_auto;
  at::Tensor dc;     // (B, n_fwd) real: sums over pixels of the transformed states
  at::Tensor zmask;  // (Bm, *m) mask correlation, or undefined
  at::Tensor zlevel; // (Bm,) no-overlap level, or undefined
  PlanTensors plan;
  int64_t n_pairs;
  Geometry geom;
  bool periodic;
};

struct EmbedArgs {
  at::Tensor grad;   // (B, n_pairs, *w)
  at::Tensor zmask;  // as above
  at::Tensor zlevel;
  Geometry geom;
  bool periodic;
};

struct CombineArgs {
  at::Tensor g_hat;  // (B, n_pairs, *h) complex
  at::Tensor x_hat;  // (B, n_used, *h) complex
  at::Tensor begin, end, terms;  // plan tables on the device (int32, int32, bytes)
  int64_t n_states;
  double scale = 1.0;  // multiplies every gradient spectrum
};

// The per-device passes of the two-point operator.
struct TwoPointBackend {
  // 2 when the sum over states of x is exactly 1 at every pixel, 1 when it is within tol of 1
  // everywhere (and x is finite), 0 otherwise. x may be strided (e.g. a channels-last view) as
  // long as its spatial dims flatten to one stride.
  int (*partition_check)(const at::Tensor& x, double tol);
  // P[b, k] = conj(X[b, a_k]) * X[b, b_k]  ->  (B, n_cross, *h)
  at::Tensor (*pair_products)(const at::Tensor& x_hat, const at::Tensor& a, const at::Tensor& b);
  // scale * |X[b, idx_k]|^2 on the half spectrum, with the first spatial axis moved last
  // (where the even transform runs along it), into out (B, n_auto, h_1, ..., h_{nd-1}, h_0) real
  void (*power_half)(const at::Tensor& x_hat, const at::Tensor& idx, double scale, at::Tensor& out);
  // Output window: assemble, normalise, centre and crop into out (B, n_pairs, *w), contiguous
  void (*gather)(const GatherArgs& args, at::Tensor& out);
  // Adjoint of gather for the direct definition  ->  (B, n_pairs, *m)
  at::Tensor (*embed_grad)(const EmbedArgs& args);
  // Gradient spectra of the states  ->  (B, n_states, *h)
  at::Tensor (*combine_grad)(const CombineArgs& args);
  // Statistics without a mask of the pairs req, computed exactly by counting where x holds only 0s
  // and 1s and counting is the cheaper route (check_partition: the partition relations may be used
  // where the states partition every pixel, which it checks; periodic statistics only): writes out
  // (B, n_pairs, *w) and returns true, or returns false (out may then hold part of the answer, to
  // be overwritten). spectra_kept: the call keeps x's spectra for a backward pass, which the
  // transforms route computes on its way; counting then competes with the rest of that route
  // alone. Null where there is no such route.
  bool (*binary_stats)(const at::Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& req,
                       bool check_partition, bool periodic, const Geometry& g, at::Tensor& out, bool spectra_kept);
  // Gradient spectra of auto pairs: out[b, u, k0, rest] = factor * g[b, idx[u], rest, k0] *
  // X[b, u, k0, rest] (added to out with accumulate), X and out in the natural layout (first axis
  // first), g real in power_half's (first axis last); a state with idx[u] < 0 is left alone (with
  // accumulate) or zeroed. In 1D both layouts are the same.
  void (*even_grad_spectrum)(const at::Tensor& x_hat, const at::Tensor& g, const at::Tensor& idx, double factor,
                             at::Tensor& out, bool accumulate);
  // The auto pairs' correlations on a small 2D window as matrix products (even_values_gemm_cpu
  // without a target), where even_gemm_applies; null where the device has none.
  at::Tensor (*even_values_gemm)(const at::Tensor& x_hat, const at::Tensor& t_hat, const std::vector<int32_t>& idx,
                                 const Geometry& g);
};

// The CPU's binary_stats (csrc/cpu/two_point_bits.cpp).
bool binary_stats_cpu(const at::Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& req, bool check_partition,
                      bool periodic, const Geometry& g, at::Tensor& out, bool spectra_kept);

// The best counting kernel this CPU runs: "avx512", "avx2", "popcnt" or "generic" (for build_info).
const char* binary_count_kernel();

// The CPU backend of the two-point operator (csrc/cpu/two_point.cpp), for the route calibration,
// which times the transforms route itself.
const TwoPointBackend& cpu_two_point_backend();

// What the route chooser for binary input (csrc/cpu/two_point_bits.cpp) charges per unit of work,
// in nanoseconds of wall time at some thread count: per word counted by the counting kernel, per
// kernel call, per word rotated, per pixel packed (float32 / float64 input), and per S log2 S of
// each transform (float32 / float64).
struct RouteCosts {
  double word_ns = 0, call_ns = 0, rotate_ns = 0, pack_f32_ns = 0, pack_f64_ns = 0, fft_f32_ns = 0, fft_f64_ns = 0;
};

// The costs in force for calls made with `threads` intra-op threads, and where they come from:
// "set" (set_binary_route_costs), "env" (PYMKS_VAE_ROUTE_COSTS), "fitted" (the constants shipped,
// PYMKS_VAE_ROUTE_COSTS=fitted) or "measured" (timed on this CPU at the first call that needed them).
struct RouteCalibration {
  RouteCosts costs;
  std::string kernel;  // the counting kernel the costs are for
  std::string source;
  int threads = 0;
  double seconds = 0;  // time the measurement took (0 when not measured)
};

// The calibration in force for this thread (measuring it, once per thread count, if needed;
// remeasure: measure this thread count's costs again now, when they are measured ones). Raises
// ValueError naming PYMKS_VAE_ROUTE_COSTS when that variable is malformed.
RouteCalibration binary_route_calibration(bool remeasure = false);

// Overrides the costs for every thread count (nullptr: back to the environment or the
// measurement), for tests and reproducible runs; returns the previous override, if any. ValueError
// unless every cost is finite and > 0.
std::optional<RouteCosts> set_binary_route_costs(const RouteCosts* costs);

// Route trials (two_point_bits.cpp): how many kinds of call have had both routes timed, forgetting
// them, and the band of the model's count/transform ratio (and its inverse) inside which a new kind
// is timed (0 or 1: never; default 3). The band returned is the previous one.
int64_t binary_route_trials();
void clear_binary_route_trials();
// The latest route trial's rounds and the faster time of each route in it, in seconds (all zero
// before the first trial).
struct TrialRecord {
  int rounds = 0;
  double count_s = 0.0, transform_s = 0.0;
};
TrialRecord last_binary_route_trial();
double set_binary_route_trial_band(double band);

// The route chooser's estimate for one call on binary input of `batch` fields of shape `spatial`
// and a window of lags `window`, in nanoseconds: the counting route and the transforms route, under `costs`. check_partition:
// the call may use the partition relations (partition=None, periodic, n_state >= 2); the estimate
// then assumes they hold, as the chooser does before it has read the data. spectra_kept: x requires
// grad, so the spectra its forward transforms give are computed either way, and transform_ns
// counts the transforms route's inverse transforms alone. A pure function.
struct RouteEstimate {
  double count_ns = 0, transform_ns = 0;
  bool counting = false;  // count_ns < transform_ns
};
RouteEstimate binary_route_estimate(const std::vector<int64_t>& spatial, const std::vector<int64_t>& window, int64_t batch,
                                    const std::vector<std::pair<int64_t, int64_t>>& req, int64_t n_state, bool periodic,
                                    bool single, bool check_partition, const RouteCosts& costs,
                                    bool spectra_kept = false);

// The cheapest plan for the requested pairs (req[k] = (i, j)), with the partition relations when
// partition holds.
TwoPointPlan make_plan(const std::vector<std::pair<int64_t, int64_t>>& req, int64_t n_state, bool partition);
std::vector<std::pair<int64_t, int64_t>> pair_list(at::IntArrayRef pi, at::IntArrayRef pj);

at::Tensor two_point_forward(const at::Tensor& x, at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                             bool periodic, at::IntArrayRef window,
                             const c10::optional<at::Tensor>& mask, int64_t partition,
                             const TwoPointBackend& be);

// The forward pass, and the spectra (B, n_used, *h) of the states the pairs name (masked, on the
// transform grid) for two_point_backward_spectra, which then transforms no field again.
std::tuple<at::Tensor, at::Tensor> two_point_forward_spectra(const at::Tensor& x, at::IntArrayRef pair_i,
                                                             at::IntArrayRef pair_j, bool periodic,
                                                             at::IntArrayRef window,
                                                             const c10::optional<at::Tensor>& mask,
                                                             int64_t partition, const TwoPointBackend& be);

at::Tensor two_point_backward_spectra(const at::Tensor& grad, const at::Tensor& x_hat, at::IntArrayRef pair_i,
                                      at::IntArrayRef pair_j, int64_t n_state, at::IntArrayRef spatial,
                                      bool periodic, const c10::optional<at::Tensor>& mask,
                                      const TwoPointBackend& be);

at::Tensor two_point_backward(const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef pair_i,
                              at::IntArrayRef pair_j, bool periodic, at::IntArrayRef window,
                              const c10::optional<at::Tensor>& mask, const TwoPointBackend& be);

// ------------------------------------------------------------------ fused loss
struct LossArgs {
  at::Tensor x_hat, t_hat;  // (B, n_used, *h) complex
  at::Tensor values;        // out: (B,) per-sample values
  at::Tensor grad_spectrum; // out: (B, n_used, *h) when need_grad
  at::Tensor pa, pb;        // int32 (n_pairs,) positions among the used states
  int64_t m_last;           // size of the last spatial axis (for Parseval weights)
  double value_scale;       // multiplies sum w |D|^2
  double grad_scale;        // multiplies the gradient spectrum
  bool need_grad;
};

struct StatsLossBackend {
  // Writes the per-sample values and, when need_grad, the gradient spectrum.
  void (*loss_pass)(const LossArgs& args);
};

std::tuple<at::Tensor, at::Tensor> stats_loss_forward(const at::Tensor& x, const at::Tensor& target,
                                                      at::IntArrayRef pair_i, at::IntArrayRef pair_j,
                                                      double scale, bool need_grad,
                                                      const StatsLossBackend& be);

at::Tensor stats_loss_backward(const at::Tensor& grad, const at::Tensor& spectrum,
                               at::IntArrayRef spatial, int64_t n_state, at::IntArrayRef states);

// ------------------------------------------------------------------ general loss (window, weights, padding)
struct WindowLossArgs {
  at::Tensor even;         // (B, n_auto, even_numel) real: auto differences (pruned even layout), or undefined
  at::Tensor cross;        // (B, n_cross, cross_numel) real: cross differences (pruned cross layout), or undefined
  at::Tensor pairs;        // WinPair table (bytes) on the device, one per pair
  int64_t n_pairs;
  at::Tensor weight;       // (n_pairs, *w) contiguous, or undefined (weight 1)
  at::Tensor offset;       // (B, n_pairs) contiguous, subtracted from each pair's statistics, or undefined
  at::Tensor grad_offset;  // out: (B, n_pairs) dL/doffset, or undefined
  Geometry geom;
  bool periodic;
  double scale;
  at::Tensor values;       // out: (B,) per-sample sums
  at::Tensor grad_window;  // out: (B, n_pairs, *w) dL/dC(x) on the window, or undefined
};

struct WindowLossBackend {
  // scale * (|X[b, idx_k]|^2 - |T[b, idx_k]|^2) into out in power_half's layout (first axis last)
  void (*power_diff_half)(const at::Tensor& x_hat, const at::Tensor& t_hat, const at::Tensor& idx, double scale,
                          at::Tensor& out);
  // conj(X[b, a_k]) X[b, b_k] - conj(T[b, a_k]) T[b, b_k]  ->  (B, n_cross, *h)
  at::Tensor (*diff_products)(const at::Tensor& x_hat, const at::Tensor& t_hat, const at::Tensor& a,
                              const at::Tensor& b);
  // Per-sample values and (when grad_window is defined) the gradient on the window
  void (*window_pass)(const WindowLossArgs& args);
  // The two-point operator's combine_grad of the same device
  at::Tensor (*combine_grad)(const CombineArgs& args);
  // The two-point backends' even_grad_spectrum (below).
  void (*even_grad_spectrum)(const at::Tensor& x_hat, const at::Tensor& g, const at::Tensor& idx, double factor,
                             at::Tensor& out, bool accumulate);
  // Auto pairs only, small 2D windows (even_gemm_applies): the window's statistics and the
  // gradient spectrum as matrix products (cpu/even_gemm.cpp); null where the device has none.
  at::Tensor (*even_values_gemm)(const at::Tensor& x_hat, const at::Tensor& t_hat, const std::vector<int32_t>& idx,
                                 const Geometry& g);
  at::Tensor (*even_gradient_gemm)(const at::Tensor& grad_window, const at::Tensor& x_hat,
                                   const std::vector<int32_t>& pair_of, const Geometry& g, double factor);
};

// cpu/even_gemm.cpp. even_values_gemm_cpu: the auto pairs' D(r) = C(x)(r) - C(t)(r), unnormalised,
// for idx's states, in the pruned even layout (n, na, even_numel), as even_inverse of
// power_diff_half (C(x)(r) alone, as even_transform, where t_hat is undefined).
// even_gradient_gemm_cpu: factor Re(G_s) X_s for every state s of x_hat (natural layout), G_s the
// transform of the window gradient of pair pair_of[s], as even_grad_spectrum of
// even_window_spectrum. Both for 2D geometries where even_gemm_applies.
at::Tensor even_values_gemm_cpu(const at::Tensor& x_hat, const at::Tensor& t_hat, const std::vector<int32_t>& idx,
                                const Geometry& g);
at::Tensor even_gradient_gemm_cpu(const at::Tensor& grad_window, const at::Tensor& x_hat,
                                  const std::vector<int32_t>& pair_of, const Geometry& g, double factor);
// Whether the matrix-product route serves this geometry: 2D, each axis's folded window rows at
// most 4 log2(m) + 8 (see cpu/even_gemm.cpp), and the route on for this thread (set_even_gemm,
// for tests).
bool even_gemm_applies(const Geometry& g);
bool set_even_gemm(bool enabled);
// Whether this thread's matrix-product route may run its AVX2 + FMA passes where the CPU has
// them (true, the default) or the baseline build's (tests of both); returns the previous setting.
bool set_even_simd(bool enabled);

// ------------------------------------------------------------------ real transforms (transforms.cpp)
// rfftn of fields x (B, k, *spatial) on grid (zero padded at the end of each axis), and irfftn of
// such half spectra back to (B, k, *grid) (normalised by the grid size, as ATen's), in the natural
// layout (the last axis halved) or with moved, the first axis last: (B, k, m_1, .., h_{d-1}, m_0).
// The result goes into dest when it is given (contiguous, of the result's shape). irfft_grid may
// overwrite spec: give it a spectrum the caller no longer needs. With normalised false it leaves
// out the division by the grid size (for spectra scaled on their way, saving a pass).
at::Tensor rfft_grid(const at::Tensor& x, at::IntArrayRef grid, bool moved, at::Tensor dest = at::Tensor());
// Shape of the half spectra of k fields (B, k, ..) on grid, natural or moved (as rfft_grid).
std::vector<int64_t> half_sizes(int64_t B, int64_t k, at::IntArrayRef grid, bool moved);
at::Tensor irfft_grid(const at::Tensor& spec, at::IntArrayRef grid, bool moved, at::Tensor dest = at::Tensor(),
                      bool normalised = true);
// rfft_grid of x (B, k, *spatial) on its own grid (no padding), natural layout, into dest, a view
// of the result's shape that need not be contiguous (some states of a larger batch of spectra).
void rfft_grid_into(const at::Tensor& x, at::IntArrayRef grid, at::Tensor& dest);

// The two-point backends' combine_grad passes, shared with the loss's backward.
at::Tensor combine_grad_cpu(const CombineArgs& args);
at::Tensor combine_grad_cuda(const CombineArgs& args);
void even_grad_spectrum_cpu(const at::Tensor& x_hat, const at::Tensor& g, const at::Tensor& idx, double factor,
                            at::Tensor& out, bool accumulate);
void even_grad_spectrum_cuda(const at::Tensor& x_hat, const at::Tensor& g, const at::Tensor& idx, double factor,
                             at::Tensor& out, bool accumulate);
// Re(rfftn) of windows (B, k, *w) of lags placed on the zero grid of g, real, with the first
// axis last (power_half's layout); 2D and 3D (stats_loss_driver.cpp).
at::Tensor even_window_spectrum(const at::Tensor& win, const Geometry& g);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_loss_window_forward(
    const at::Tensor& x, const at::Tensor& target, at::IntArrayRef pair_i, at::IntArrayRef pair_j, bool periodic,
    at::IntArrayRef window, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& offset,
    double scale, bool need_grad, const WindowLossBackend& be);

at::Tensor stats_loss_window_backward(const at::Tensor& grad, const at::Tensor& grad_window, const at::Tensor& x_hat,
                                      at::IntArrayRef pair_i, at::IntArrayRef pair_j, int64_t n_state,
                                      at::IntArrayRef spatial, bool periodic, const WindowLossBackend& be);

// Pruned even transforms (two_point_driver.cpp): the layout of power_half's output for na states,
// the scale its power spectra take, and the inverse transforms from it into the pruned even layout.
std::vector<int64_t> even_power_sizes(const at::Tensor& x_hat, int64_t na);
double even_power_scale(const Geometry& g);
at::Tensor even_inverse(const at::Tensor& power_t, const Geometry& g);

// ------------------------------------------------------------------ shared host helpers
std::vector<int64_t> spatial_dims(int64_t ndim);
// Seconds since t0 on the steady clock (the routes' trials and measurements).
double seconds_since(std::chrono::steady_clock::time_point t0);
// Samples per pass so that a pass's intermediates (per_sample_elems elements of x's type per
// sample) stay in the last-level cache: CPU only, and only when at least 4 samples fit;
// otherwise (and on the GPU) the whole batch.
int64_t cache_chunk(const at::Tensor& x, int64_t per_sample_elems);
int64_t fast_fft_len(int64_t n, bool prefer_pow2);
// The lag geometry of fields of shape `spatial` with a window of lags `window` (sizes checked by the
// caller): the FFT grid is the field itself when periodic, else the field zero-padded by the largest
// |lag| kept, to fast_fft_len, which keeps wrapped pairs out of the window. The one padding rule
// of the operator, its counting route and the fused loss.
Geometry lag_geometry(at::IntArrayRef spatial, at::IntArrayRef window, bool periodic);
// View of the mask normalisation (zmask/zlevel of GatherArgs/EmbedArgs) for the kernels.
template <typename T>
MaskNorm<T> mask_norm_view(const at::Tensor& zmask, const at::Tensor& zlevel) {
  MaskNorm<T> m;
  if (zmask.defined()) {
    m.z = zmask.data_ptr<T>();
    m.level = zlevel.data_ptr<T>();
    m.count = zmask.size(0);
    m.grid = zmask.numel() / zmask.size(0);
  }
  return m;
}
// A read-only table of `bytes` bytes (numel elements of dtype) for the kernels, on `device`. On a
// GPU a table is uploaded once per device and content, then kept: an upload on every call copies
// from pageable host memory, which the host waits for and a CUDA graph cannot capture, and the
// tables are few (one set per plan of pairs) and tiny. Callers must never write into the result.
at::Tensor device_table(const void* data, int64_t bytes, at::ScalarType dtype, int64_t numel, const at::Device& device);
// Copies a vector of POD structs into a byte tensor on `device` (see device_table).
template <typename S>
at::Tensor table_to(const std::vector<S>& v, const at::Device& device) {
  const auto bytes = static_cast<int64_t>(v.size() * sizeof(S));
  if (bytes == 0) return at::empty({1}, at::TensorOptions().dtype(at::kByte).device(device));
  return device_table(v.data(), bytes, at::kByte, bytes, device);
}
at::Tensor ints_to(const std::vector<int32_t>& v, const at::Device& device);
// int64 indices (for index_select / index_copy_) on `device` (see device_table).
at::Tensor longs_to(const std::vector<int64_t>& v, const at::Device& device);
// Whether the operators check the data itself on this thread (NaN/Inf in a field, a mask outside
// [0, 1]; default on). Each such check reads a value back to the host - on a GPU, a wait for every
// queued kernel - so a training loop turns them off once its first batch has passed them
// (pymks_vae.ops.data_checks). Argument checks (shapes, dtypes, devices, indices) always run.
bool data_checks_enabled();
// Sets this thread's data checks; returns the previous setting.
bool set_data_checks(bool enabled);
// Whether this thread's forward pass, keeping the spectra of every state of one-hot data (an exact
// partition) for the backward pass, derives the state the plan eliminates from the others'
// spectra (true, the default) or transforms it (tests); returns the previous setting.
bool set_derive_eliminated(bool enabled);
// Argument checks of the registered operators. The operators are public (torch.compile and users
// call them directly, not only through pymks_vae/ops.py), and their kernels read raw pointers of
// one type on one device, so each entry point runs these before any kernel, naming the argument.
// RuntimeError unless x is float32 or float64.
void check_real_float(const at::Tensor& x, const char* name, const char* op);
// RuntimeError unless t is on the device of ref and has its dtype.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name, const char* op);
// ValueError unless x is (B, n_state, *spatial) with 1-3 spatial dims.
void check_field_shape(const at::Tensor& x, const char* op);
// The mask of a two-point call, when given: like x (RuntimeError) and (1 or B, *spatial) (ValueError).
void check_mask_arg(const c10::optional<at::Tensor>& mask, const at::Tensor& x, const char* op);
// Raises ValueError unless pair_i/pair_j are non-empty, of equal length and name states < n_state.
void check_pairs(at::IntArrayRef pair_i, at::IntArrayRef pair_j, int64_t n_state, const char* op);
// The states named by the pairs, sorted, and each one's position in that list.
std::vector<int64_t> pair_states(at::IntArrayRef pair_i, at::IntArrayRef pair_j, std::map<int64_t, int32_t>* pos);
// The gradient plan of the direct definition C_ij(r) = sum_x x_i(x) x_j(x + r): every state of a
// pair gets conj(G_q) X_j for q = (i, j) and G_q X_i for q = (j, i) (the adjoint of the correlation).
CombinePlan combine_plan(at::IntArrayRef pair_i, at::IntArrayRef pair_j);
// True when the spatial dims of x (B, n_state, *spatial) flatten to one stride (innermost last).
bool spatial_flattens(const at::Tensor& x);
// The given (sorted) states of x (B, n_state, ...): a view when they are consecutive.
at::Tensor select_states(const at::Tensor& x, const std::vector<int64_t>& states);
// Raises ValueError naming `what` when the DC bins of a spectrum are not finite (NaN/Inf input).
void check_spectrum_finite(const at::Tensor& spec, const char* op, const char* what);

}  // namespace pymks_vae
