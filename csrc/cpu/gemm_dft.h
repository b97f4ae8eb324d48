// The real 2D transforms of small grids whose sides have a large prime factor, as matrix
// products on the CPU (see gemm_dft.cpp for when and why).
#pragma once

#include <ATen/ATen.h>

namespace pymks_vae {
namespace cpu {

// Whether a grid's real transforms take the matrix products: 2D, each side m at most 103 with a
// prime factor p >= 17 and m <= 3p (17, 19, 23, ..., 51, ..., 62, 67, 69, 71, ..., 101, 103), and
// the route on for this thread (set_gemm_dft).
bool gemm_dft_applies(at::IntArrayRef grid);

// This thread's switch (tests compare the two routes); returns the previous setting.
bool set_gemm_dft(bool enabled);

// rfftn over the last two axes: x (..., m0, m1) contiguous real -> out (..., m0, m1 / 2 + 1)
// contiguous complex, written in place.
void gemm_rfft2(const at::Tensor& x, at::Tensor& out);

// irfftn over the last two axes times `scale`: spec (..., m0, m1 / 2 + 1) contiguous complex ->
// out (..., m0, m1) contiguous real. As MKL's and pocketfft's c2r, the first axis is inverted as
// complex data and the imaginary parts of the last axis's bins 0 and m1 / 2 are then ignored.
void gemm_irfft2(const at::Tensor& spec, at::Tensor& out, double scale);

}  // namespace cpu
}  // namespace pymks_vae
