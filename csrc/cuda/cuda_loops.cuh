// Launch helpers shared by the CUDA kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace pymks_vae {
namespace cuda {

constexpr int kThreads = 256;

// Enough blocks to cover n elements with grid-stride loops, capped to keep launches cheap.
inline unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 4096)));
}

#define PVAE_GRID_STRIDE(idx, total)                                                    \
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;       \
       idx < (total); idx += static_cast<int64_t>(blockDim.x) * gridDim.x)

}  // namespace cuda
}  // namespace pymks_vae
