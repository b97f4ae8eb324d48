// Real FFTs on the CPU through MKL's DFTI, called directly.
//
// torch's own CPU transforms run on the same MKL, but around it they clone the input of every
// complex-to-real transform, permute a strided axis into a contiguous copy, and answer out= by
// copying a fresh result. Measured on the 2-core AMD EPYC VM, one thread, 22 fields of 224^2,
// float32: irfftn took 8.3 ms through torch and 2.8 ms through DFTI. DFTI also reads and writes
// any element strides, so a transform can start from or land in the "moved" layout (first axis
// last) the loss kernels use, with no transposing copy.
//
// DFTI is reached through the libtorch_cpu that is already loaded (x86 builds of torch link MKL
// and export its DFTI entry points). Where it is missing - torch built without MKL, another
// architecture - or refuses a layout, the functions return false and the caller takes ATen's path.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pymks_vae {
namespace cpu {

// A batch of real transforms: `count` arrays of `lengths` on the real side, each axis and each
// array given by its element strides there and on the half-spectrum side (the last axis halved).
struct DftLayout {
  std::vector<int64_t> lengths;
  int64_t count = 1;
  std::vector<int64_t> real_strides;
  int64_t real_dist = 0;
  std::vector<int64_t> half_strides;
  int64_t half_dist = 0;
};

// Row-major strides of an array of these sizes.
std::vector<int64_t> row_major_strides(const std::vector<int64_t>& sizes);

// The layout of count contiguous real arrays of `lengths` and their contiguous half spectra, in
// the natural layout (the last axis halved, last) or, with moved, the first axis moved last:
// (m_1, .., h_{d-1}, m_0), as the loss kernels keep them (the same as natural in 1D).
DftLayout contiguous_layout(const std::vector<int64_t>& lengths, int64_t count, bool moved);

// Whether DFTI was found (looked up once; PYMKS_VAE_MKL_DFT=0 in the environment hides it).
bool dft_available();
// Turns the DFTI path on or off for the process (tests of the ATen path); returns the previous
// setting. dft_enabled: available and on.
bool set_dft_enabled(bool enabled);
bool dft_enabled();

// half = rfftn(real), unnormalised. real: float or double; half: the matching complex type.
// Both are addressed from their first element through the layout's strides alone (a view that is
// not contiguous must come with a layout of its own strides); the tensors' storage bounds them.
// Returns false, having written nothing, where DFTI is unavailable or refuses the layout (a
// failure of the transform itself, after DFTI accepted it, is an error).
bool dft_r2c(const DftLayout& layout, const at::Tensor& real, at::Tensor& half);

// real = scale * irfftn(half) (unnormalised inverse times scale). half may be overwritten (MKL
// may use it as scratch in multi-dimensional complex-to-real transforms): pass a spectrum the
// caller owns. Returns false, having written nothing, where DFTI is unavailable or refuses it.
bool dft_c2r(const DftLayout& layout, const at::Tensor& half, at::Tensor& real, double scale);

// Drops the cached DFTI descriptors (tests; the cache also empties itself when full).
void dft_clear_cache();
int64_t dft_cache_size();

}  // namespace cpu
}  // namespace pymks_vae
