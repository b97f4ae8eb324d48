// Small CPU loop helpers shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// x86-64 with GCC or clang: function-level target attributes (target("avx2") ...) and
// __builtin_cpu_supports, for kernels built for several instruction sets and chosen at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PVAE_X86 1
#endif

namespace pymks_vae {
namespace cpu {

// Calls fn(row, i0, i1) over segments covering rows x len elements, in parallel, so that rows
// of any length (short or long) spread over the threads and a row's set-up runs once per segment.
template <typename F>
void parallel_rows(int64_t rows, int64_t len, F&& fn) {
  if (rows <= 0 || len <= 0) return;
  const int64_t total = rows * len;
  at::parallel_for(0, total, 16384, [&](int64_t begin, int64_t end) {
    int64_t row = begin / len, i = begin % len;
    while (begin < end) {
      const int64_t stop = std::min(len, i + (end - begin));
      fn(row, i, stop);
      begin += stop - i;
      ++row;
      i = 0;
    }
  });
}

}  // namespace cpu
}  // namespace pymks_vae
