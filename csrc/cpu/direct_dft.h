// The 2D real transforms written out as symmetric sums over groups of fields (see direct_dft.cpp);
// gemm_rfft2 / gemm_irfft2 run them with gemm_dft.cpp's tables.
#pragma once

#include <ATen/ATen.h>

namespace pymks_vae {
namespace cpu {

// The instruction set of the loops for this thread: kAuto (AVX2 with FMA where the CPU has them)
// or kGeneric (the baseline x86-64 build); tests compare the two. Returns the previous setting.
enum class DirectIsa { kAuto, kGeneric };
DirectIsa set_direct_dft_isa(DirectIsa isa);
// "avx2" or "generic": what this thread's calls run now.
const char* direct_dft_isa();

// As gemm_rfft2 / gemm_irfft2 (gemm_dft.h), on inputs they have checked (at least one field), any
// sizes. The tables are gemm_dft.cpp's half tables, contiguous, of the data's real type: cos and
// sin of the first side, and of the last side cos and sin for the forward, the c2r's weighted and
// scaled cosw and sinw for the inverse.
void direct_rfft2(const at::Tensor& x, at::Tensor& out, bool moved, const at::Tensor& cos0, const at::Tensor& sin0,
                  const at::Tensor& cos1, const at::Tensor& sin1);
void direct_irfft2(const at::Tensor& spec, at::Tensor& out, bool moved, const at::Tensor& cos0, const at::Tensor& sin0,
                   const at::Tensor& cosw1, const at::Tensor& sinw1);

}  // namespace cpu
}  // namespace pymks_vae
