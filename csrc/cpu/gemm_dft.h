// The real 2D transforms of small grids and of grids whose sides have a large prime factor written
// out on the CPU (the direct form, direct_dft.h), in place of MKL's where chosen; and the windowed
// loss's pruned one-dimensional transforms as matrix products (see gemm_dft.cpp for when and why).
// The route keeps its first name, "the matrix products" (set_gemm_dft, PYMKS_VAE_GEMM_DFT).
#pragma once

#include <ATen/ATen.h>

namespace pymks_vae {
namespace cpu {

// The fixed rule, measured on one CPU (see gemm_dft.cpp): 2D, each side either from 9 to 40 and not
// a multiple of 4, or at most 127 with a prime factor p >= 17 and m / p odd or at most 3 (..., 51,
// ..., 62, 67, 69, 71, 74, ..., 85, ..., 95, ..., 101, ..., 115, 118, 119, ..., 127; not 68, 76, 92,
// 102, 114, 116, 124), or a prime up to 223.
bool gemm_dft_rule(at::IntArrayRef grid);

// Whether the products may run on a grid at all (the route on for this thread and process, and a
// 2D grid whose sides make them a contender: the rule's and the other sides where they came within
// reach of MKL on the CPU measured). Which of the two then runs is gemm_dft_choice's.
bool gemm_dft_candidate(at::IntArrayRef grid);

// For a candidate grid: the rule's route where trials are off for this thread or torch's
// deterministic algorithms are on (results must not depend on timings there); else the route timed
// faster for this kind of call (grid, dtype, direction, layout, strided input, thread count, and
// the number of fields transformed to within a power of two), or kTrial where this kind has not been timed yet:
// the caller times both and records them. Past 256 kinds the rule decides for new ones.
enum class GemmDftChoice { kProducts, kTransforms, kTrial };
struct GemmDftKind {
  int64_t m0, m1, batch;
  bool is_double, inverse, moved;
  bool strided;  // the input is not contiguous (the products then copy it first)
};
GemmDftChoice gemm_dft_choice(const GemmDftKind& kind);
// Records a trial's best times (seconds) and says which route won. Against the fixed rule a win
// needs a margin and a second trial: the first returns kConfirm (nothing recorded), and the
// caller times both routes again and records them with confirming set, whose outcome stands.
enum class GemmDftVerdict { kProducts, kTransforms, kConfirm };
GemmDftVerdict gemm_dft_record(const GemmDftKind& kind, double t_products, double t_transforms,
                               bool confirming = false);
// The decision alone (no bias, nothing recorded): the margin of 15% against the rule's route, and
// kConfirm for a first win against it.
GemmDftVerdict gemm_dft_verdict(at::IntArrayRef grid, double t_products, double t_transforms, bool confirming);

// This thread's switches (tests compare the routes); each returns the previous setting.
bool set_gemm_dft(bool enabled);
bool set_gemm_dft_trials(bool enabled);
// Trials run so far (kinds remembered), forgetting them, and a factor on the products' measured
// time (tests make a trial's outcome certain with it; 1 otherwise).
int64_t gemm_dft_trials();
void clear_gemm_dft_trials();
double set_gemm_dft_trial_bias(double bias);

// rfftn over the last two axes: x (..., m0, m1) contiguous real -> out contiguous complex, written
// in place: (..., m0, m1 / 2 + 1), or with moved the first axis last, (..., m1 / 2 + 1, m0).
void gemm_rfft2(const at::Tensor& x, at::Tensor& out, bool moved = false);

// irfftn over the last two axes times `scale`: spec contiguous complex, (..., m0, m1 / 2 + 1) or
// moved (..., m1 / 2 + 1, m0) -> out (..., m0, m1) contiguous real. As MKL's and pocketfft's c2r,
// the first axis is inverted as complex data and the imaginary parts of the last axis's bins 0
// and m1 / 2 are then ignored.
void gemm_irfft2(const at::Tensor& spec, at::Tensor& out, double scale, bool moved = false);

// One-dimensional transforms along the last axis between a lag window and the grid, as one real
// matrix product each (the windowed loss's pruned transforms with cross pairs). A window of w
// lags along a grid side of m holds the lags -w/2 .. w - w/2 - 1 (mod m) in that order, as
// grid_to_window_rows takes them. Contiguity is not required; results are contiguous.
// Whether they take t (to be transformed) along a side m for a product over w lags or bins: t on
// the CPU, the route on for this thread and process (as gemm_dft_candidate), m one of the fixed
// rule's sides (the transforms there cost far more per point than on smooth sides) and w m small
// enough.
bool window_products(const at::Tensor& t, int64_t m, int64_t w);
// rfft over the last axis of a real window (.., w) placed on the zero grid: (.., m / 2 + 1).
at::Tensor window_rfft_last(const at::Tensor& win, int64_t m);
// fft over the last axis of a complex window (.., w) placed on the zero grid: (.., m).
at::Tensor window_fft_last(const at::Tensor& win, int64_t m);
// ifft (scaled 1 / m) over the last axis (.., m) complex, at the window's w lags only: (.., w).
at::Tensor ifft_last_to_window(const at::Tensor& spec, int64_t w);
// irfft (scaled 1 / m) over the last axis (.., m / 2 + 1) complex: (.., m) real, the imaginary
// parts of bins 0 and m / 2 ignored as in ATen's.
at::Tensor irfft_last(const at::Tensor& spec, int64_t m);
// The first `bins` bins of rfft over the last axis of real x (.., m): (.., bins).
at::Tensor rfft_last_bins(const at::Tensor& x, int64_t bins);
// The real part of the unnormalised fft over the last axis of a complex window (.., w) placed on
// the zero grid: (.., m) real (the whole transform where the window is even).
at::Tensor window_real_fft_last(const at::Tensor& win, int64_t m);

}  // namespace cpu
}  // namespace pymks_vae
