// Exact two-point statistics of binary fields by counting, on the CPU.
//
// A segmented microstructure (PyMKS's one-hot of integer phases) holds only 0s and 1s, and its
// correlation at lag r is a count divided by the number of pixels S (periodic) or by the number of
// pixel pairs at lag r inside the field (non-periodic):
//   C_ab(r) = #{x : a(x) = 1 and b(x + r) = 1}, x and x + r wrapped (periodic) or both inside.
// Packed one bit per pixel, 64 pixels to a word, that count is a sum of popcount(a & b') over the
// words of a and of b shifted by r. For a window of lags much smaller than the field (PyMKS's
// cutoff) this is less work than the transforms, and it is exact: the output is the correctly
// rounded quotient, where the FFT path is off by a few ulps.
//
// Layout: a field (n_0, ..., n_{nd-1}) is R = n_0 ... n_{nd-2} rows of L = n_{nd-1} pixels, each
// row packed into wd = ceil(L / 64) words (bits past L are 0), stored word-major (word k of every
// row, then word k + 1). A shift along a row is read from a tripled copy of the row: the row at
// bit L, with its periodic copies (or zeros, non-periodic) before and after. A shift along the axis
// before the last is one contiguous run of rows once each block of rows is extended on both sides
// (periodically, or with zero rows); a shift along the first axis of a 3D field picks another block
// (or none). So every count is a few calls of one
// loop - and, popcount, add - each taking eight lags at once.
//
// Which route a call takes (counting or the transforms) is decided by a cost model whose per-unit
// costs are measured on the CPU at hand at first use (see measure_costs), and which kernel counts
// by the CPU (AVX-512 VPOPCNTDQ, AVX2, popcnt, or portable C++): see docs/two_point_stats.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cpu/cpu_loops.h"
#ifdef PVAE_X86
#include <immintrin.h>
#endif

#include "two_point.h"

namespace pymks_vae {
namespace {

// ------------------------------------------------------------------ counting kernels
// out[j] = sum_{i < n} popcount(a[i] & b[i + j * stride]) for j < k (k <= kMaxLags): k lags at
// once, so that each word of a is loaded once for all of them. One version per instruction set.
constexpr int kMaxLags = 8;

template <int K>
__attribute__((always_inline)) inline void and_counts_scalar(const uint64_t* a, const uint64_t* b, int64_t n,
                                                             int64_t stride, int64_t* out) {
  int64_t acc[K] = {};
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = a[i];
    for (int j = 0; j < K; ++j) acc[j] += __builtin_popcountll(v & b[i + j * stride]);
  }
  for (int j = 0; j < K; ++j) out[j] = acc[j];
}

#define PVAE_DISPATCH_LAGS(K_RUNTIME, CALL) \
  switch (K_RUNTIME) {                      \
    case 1: CALL(1); break;                 \
    case 2: CALL(2); break;                 \
    case 3: CALL(3); break;                 \
    case 4: CALL(4); break;                 \
    case 5: CALL(5); break;                 \
    case 6: CALL(6); break;                 \
    case 7: CALL(7); break;                 \
    default: CALL(8); break;                \
  }

void and_counts_generic(const uint64_t* a, const uint64_t* b, int64_t n, int64_t stride, int k, int64_t* out) {
#define PVAE_CALL(K) and_counts_scalar<K>(a, b, n, stride, out)
  PVAE_DISPATCH_LAGS(k, PVAE_CALL)
#undef PVAE_CALL
}

#ifdef PVAE_X86
__attribute__((target("popcnt"))) void and_counts_popcnt(const uint64_t* a, const uint64_t* b, int64_t n,
                                                         int64_t stride, int k, int64_t* out) {
#define PVAE_CALL(K) and_counts_scalar<K>(a, b, n, stride, out)
  PVAE_DISPATCH_LAGS(k, PVAE_CALL)
#undef PVAE_CALL
}

template <int K>
__attribute__((target("avx512f,avx512vpopcntdq"))) inline void and_counts_avx512_k(const uint64_t* a,
                                                                                   const uint64_t* b, int64_t n,
                                                                                   int64_t stride, int64_t* out) {
  __m512i acc[K];
  for (int j = 0; j < K; ++j) acc[j] = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 8) {
    // The last vector is masked: no read past a or b.
    const __mmask8 m = n - i >= 8 ? __mmask8(0xFF) : static_cast<__mmask8>((1u << (n - i)) - 1);
    const __m512i va = _mm512_maskz_loadu_epi64(m, a + i);
    for (int j = 0; j < K; ++j) {
      const __m512i vb = _mm512_maskz_loadu_epi64(m, b + i + j * stride);
      acc[j] = _mm512_add_epi64(acc[j], _mm512_popcnt_epi64(_mm512_and_si512(va, vb)));
    }
  }
  alignas(64) int64_t lanes[8];
  for (int j = 0; j < K; ++j) {
    _mm512_store_si512(lanes, acc[j]);
    out[j] = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
  }
}

// AVX2 has no popcount instruction: the counts of the two nibbles of each byte come from a
// 16-entry table (vpshufb), and vpsadbw sums each 8 bytes into a 64-bit lane.
template <int K>
__attribute__((target("avx2,popcnt"))) inline void and_counts_avx2_k(const uint64_t* a, const uint64_t* b, int64_t n,
                                                                   int64_t stride, int64_t* out) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  __m256i acc[K];
  for (int j = 0; j < K; ++j) acc[j] = zero;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
    for (int j = 0; j < K; ++j) {
      const __m256i v = _mm256_and_si256(va, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i + j * stride)));
      const __m256i c = _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(v, low)),
                                        _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
      acc[j] = _mm256_add_epi64(acc[j], _mm256_sad_epu8(c, zero));
    }
  }
  alignas(32) int64_t lanes[4];
  for (int j = 0; j < K; ++j) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[j]);
    int64_t t = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (int64_t r = i; r < n; ++r) t += __builtin_popcountll(a[r] & b[r + j * stride]);
    out[j] = t;
  }
}

__attribute__((target("avx2,popcnt"))) void and_counts_avx2(const uint64_t* a, const uint64_t* b, int64_t n,
                                                            int64_t stride, int k, int64_t* out) {
#define PVAE_CALL(K) and_counts_avx2_k<K>(a, b, n, stride, out)
  PVAE_DISPATCH_LAGS(k, PVAE_CALL)
#undef PVAE_CALL
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void and_counts_avx512(const uint64_t* a, const uint64_t* b,
                                                                          int64_t n, int64_t stride, int k,
                                                                          int64_t* out) {
#define PVAE_CALL(K) and_counts_avx512_k<K>(a, b, n, stride, out)
  PVAE_DISPATCH_LAGS(k, PVAE_CALL)
#undef PVAE_CALL
}
#endif

using AndCount = void (*)(const uint64_t*, const uint64_t*, int64_t, int64_t, int, int64_t*);

// Which packing code goes with a counting kernel: the vector one of its instruction set.
enum class PackIsa { kScalar, kAvx2, kAvx512 };

// What this CPU can run, best first, with the kernel's cost per word counted in nanoseconds as
// fitted on the development VM (AMD EPYC Zen 4, one thread: see model_parts), the starting point
// that measure_costs scales to this CPU. The portable loop on an x86 CPU without a popcount
// instruction is never chosen by the cost model (cost 0).
struct CountKernel {
  const char* name;
  AndCount fn;
  double ns_per_word;
  PackIsa pack;
};

// The kernels by rank: a CPU that runs one runs those before it.
const char* const kKernelNames[] = {"generic", "popcnt", "avx2", "avx512"};

CountKernel kernel_named(const std::string& name) {
#ifdef PVAE_X86
  if (name == "avx512") return {"avx512", and_counts_avx512, 0.1, PackIsa::kAvx512};
  if (name == "avx2") return {"avx2", and_counts_avx2, 0.28, PackIsa::kAvx2};
  if (name == "popcnt") return {"popcnt", and_counts_popcnt, 0.4, PackIsa::kScalar};
#endif
  return {"generic", and_counts_generic, 0.0, PackIsa::kScalar};
}

int kernel_rank(const std::string& name) {
  for (int r = 0; r < 4; ++r)
    if (name == kKernelNames[r]) return r;
  return -1;
}

CountKernel best_kernel() {
#ifdef PVAE_X86
  static const CountKernel k = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")) return kernel_named("avx512");
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return kernel_named("avx2");
    if (__builtin_cpu_supports("popcnt")) return kernel_named("popcnt");
    return kernel_named("generic");
  }();
  return k;
#else
  return CountKernel{"generic", and_counts_generic, 0.4, PackIsa::kScalar};  // the target's own popcount
#endif
}

// PYMKS_VAE_BINARY_PATH (read on every call, for tests and benchmarks): "auto" or unset lets the
// cost model choose; "off" always transforms; "generic", "popcnt", "avx2" or "avx512" always counts
// binary input with that kernel (an error if this CPU lacks it).
struct Choice {
  bool forced = false, off = false;
  bool spectra_kept = false;  // see transforms_cost
  CountKernel kernel{};
  RouteCosts costs{};  // the cost model's, when not forced
};

// Set while the calibration or a route trial times the transforms route, which must not count (nor
// calibrate); TransformsOnly sets it for a scope and puts the previous value back, also on a throw.
thread_local bool tl_transforms_only = false;

struct TransformsOnly {
  bool prev = tl_transforms_only;
  TransformsOnly() { tl_transforms_only = true; }
  ~TransformsOnly() { tl_transforms_only = prev; }
  TransformsOnly(const TransformsOnly&) = delete;
  TransformsOnly& operator=(const TransformsOnly&) = delete;
};

Choice read_choice() {
  Choice c;
  c.kernel = best_kernel();
  if (tl_transforms_only) {
    c.off = true;
    return c;
  }
  const char* env = std::getenv("PYMKS_VAE_BINARY_PATH");
  const std::string v = env ? env : "";
  if (v.empty() || v == "auto") return c;
  if (v == "off") {
    c.off = true;
    return c;
  }
  PYMKS_CHECK_VALUE(kernel_rank(v) >= 0, "PYMKS_VAE_BINARY_PATH must be auto, off, generic, popcnt, avx2 or avx512, ",
                    "got '", v, "'");
  PYMKS_CHECK_VALUE(kernel_rank(v) <= kernel_rank(c.kernel.name), "PYMKS_VAE_BINARY_PATH=", v,
                    ": this CPU cannot run that kernel (its best: ", c.kernel.name, ")");
  c.forced = true;
  c.kernel = kernel_named(v);
  return c;
}

// ------------------------------------------------------------------ geometry of the counts
// Counts are taken on the box of lags [-h_d, h_d], h_d = w_d / 2, which holds the window and its
// mirror (a reversed term reads -r). The rows are na blocks of nb rows (3D: n_0 blocks of n_1 rows;
// 2D: one block of n_0 rows; 1D: one row), and the last axis runs along each row's bits.
struct Layout {
  int nd;
  bool periodic;
  int64_t L, wd, wd3;   // row length in pixels, words per row, words per tripled row
  int64_t na, nb;       // rows = na * nb: (n_0 .. n_{nd-3}) folded into na, n_{nd-2} is nb
  int64_t ha, hb, hl;   // half-widths of the lag box on those axes
  int64_t box;          // (2ha+1)(2hb+1)(2hl+1)
};

Layout make_layout(const Geometry& g, bool periodic) {
  Layout y{};
  y.nd = g.ndim;
  y.periodic = periodic;
  y.L = g.n[g.ndim - 1];
  y.wd = (y.L + 63) / 64;
  y.wd3 = (3 * y.L + 63) / 64 + 1;  // one spare word: a read at bit offset o touches words o/64 and o/64+1
  y.hl = g.w[g.ndim - 1] / 2;
  y.na = y.nb = 1;
  y.ha = y.hb = 0;
  if (g.ndim >= 2) {
    y.nb = g.n[g.ndim - 2];
    y.hb = g.w[g.ndim - 2] / 2;
  }
  if (g.ndim == 3) {
    y.na = g.n[0];
    y.ha = g.w[0] / 2;
  }
  y.box = (2 * y.ha + 1) * (2 * y.hb + 1) * (2 * y.hl + 1);
  return y;
}

int64_t box_index(const Layout& y, int64_t ra, int64_t rb, int64_t rl) {
  return ((ra + y.ha) * (2 * y.hb + 1) + (rb + y.hb)) * (2 * y.hl + 1) + (rl + y.hl);
}

int64_t wrap(int64_t r, int64_t n) { return r < 0 ? r + n : r; }

// A word with its n lowest bits set (n <= 64).
uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1; }

// ------------------------------------------------------------------ packing
// Packs n <= 64 values (stride si) into the bits of *word (value 1 -> bit set); false when a value
// is neither 0 nor 1 (NaN included).
template <typename T>
bool pack_word_scalar(const T* s, int64_t si, int64_t n, uint64_t* word) {
  uint64_t bits = 0;
  int64_t n_bin = 0;  // counted rather than branched on
  for (int64_t j = 0; j < n; ++j) {
    const T v = s[j * si];
    bits |= static_cast<uint64_t>(v == T(1)) << j;
    n_bin += (v == T(0)) | (v == T(1));
  }
  *word = bits;
  return n_bin == n;
}

// The end of a vector packing loop that stopped at value j (n - j values left, fewer than one
// vector): those by the scalar code, merged into the vector part's bits; true when all n values
// were 0 or 1 (valid: the vector part's values that were).
template <typename T>
bool finish_word(const T* s, int64_t si, int64_t n, int64_t j, uint64_t bits, uint64_t valid, uint64_t* word) {
  uint64_t tail = 0;
  const bool ok = pack_word_scalar<T>(s + j * si, si, n - j, &tail);
  *word = bits | (tail << (j & 63));
  return ok && valid == low_bits(j);
}

#ifdef PVAE_X86
// The same with AVX-512, 8 doubles or 16 floats at a time: loads for strides 1 and 2 (channels
// first, and PyMKS's two-state channels last), gathers for others.
__attribute__((target("avx512f"))) bool pack_word_avx512(const double* s, int64_t si, int64_t n, uint64_t* word) {
  const __m512i idx = _mm512_set_epi64(7 * si, 6 * si, 5 * si, 4 * si, 3 * si, 2 * si, si, 0);
  const __m512i even = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  uint64_t bits = 0, valid = 0;
  for (int64_t j = 0; j < n; j += 8) {
    const __mmask8 m = n - j >= 8 ? __mmask8(0xFF) : static_cast<__mmask8>((1u << (n - j)) - 1);
    __m512d v;
    if (si == 1) {
      v = _mm512_maskz_loadu_pd(m, s + j);
    } else if (si == 2) {  // two loads and a shuffle beat a gather
      const int64_t last = 2 * std::min<int64_t>(8, n - j) - 1;  // elements to cover: [0, last)
      const __mmask8 m_lo = static_cast<__mmask8>((1u << std::min<int64_t>(8, last)) - 1);
      const __mmask8 m_hi = static_cast<__mmask8>((1u << std::max<int64_t>(0, last - 8)) - 1);
      v = _mm512_permutex2var_pd(_mm512_maskz_loadu_pd(m_lo, s + 2 * j), even,
                                 _mm512_maskz_loadu_pd(m_hi, s + 2 * j + 8));
    } else {
      v = _mm512_mask_i64gather_pd(zero, m, idx, s + j * si, 8);
    }
    const __mmask8 is1 = _mm512_mask_cmp_pd_mask(m, v, one, _CMP_EQ_OQ);
    bits |= static_cast<uint64_t>(is1) << j;
    valid |= static_cast<uint64_t>(is1 | _mm512_mask_cmp_pd_mask(m, v, zero, _CMP_EQ_OQ)) << j;
  }
  *word = bits;
  return valid == low_bits(n);
}

__attribute__((target("avx512f"))) bool pack_word_avx512(const float* s, int64_t si, int64_t n, uint64_t* word) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(si)));
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  uint64_t bits = 0, valid = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
    __m512 v;
    if (si == 1) {
      v = _mm512_maskz_loadu_ps(m, s + j);
    } else if (si == 2) {
      const int64_t last = 2 * std::min<int64_t>(16, n - j) - 1;
      const __mmask16 m_lo = static_cast<__mmask16>((1u << std::min<int64_t>(16, last)) - 1);
      const __mmask16 m_hi = static_cast<__mmask16>((1u << std::max<int64_t>(0, last - 16)) - 1);
      v = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(m_lo, s + 2 * j), even,
                                 _mm512_maskz_loadu_ps(m_hi, s + 2 * j + 16));
    } else {
      v = _mm512_mask_i32gather_ps(zero, m, idx, s + j * si, 4);
    }
    const __mmask16 is1 = _mm512_mask_cmp_ps_mask(m, v, one, _CMP_EQ_OQ);
    bits |= static_cast<uint64_t>(is1) << j;
    valid |= static_cast<uint64_t>(is1 | _mm512_mask_cmp_ps_mask(m, v, zero, _CMP_EQ_OQ)) << j;
  }
  *word = bits;
  return valid == low_bits(n);
}

// The same with AVX2 gathers, 4 doubles or 8 floats at a time.
__attribute__((target("avx2"))) bool pack_word_avx2(const double* s, int64_t si, int64_t n, uint64_t* word) {
  const __m256i idx = _mm256_set_epi64x(3 * si, 2 * si, si, 0);
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
  uint64_t bits = 0, valid = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m256d v = _mm256_i64gather_pd(s + j * si, idx, 8);
    const int is1 = _mm256_movemask_pd(_mm256_cmp_pd(v, one, _CMP_EQ_OQ));
    bits |= static_cast<uint64_t>(is1) << j;
    valid |= static_cast<uint64_t>(is1 | _mm256_movemask_pd(_mm256_cmp_pd(v, zero, _CMP_EQ_OQ))) << j;
  }
  return finish_word<double>(s, si, n, j, bits, valid, word);
}

__attribute__((target("avx2"))) bool pack_word_avx2(const float* s, int64_t si, int64_t n, uint64_t* word) {
  const int i = static_cast<int>(si);
  const __m256i idx = _mm256_set_epi32(7 * i, 6 * i, 5 * i, 4 * i, 3 * i, 2 * i, i, 0);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  uint64_t bits = 0, valid = 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_i32gather_ps(s + j * si, idx, 4);
    const int is1 = _mm256_movemask_ps(_mm256_cmp_ps(v, one, _CMP_EQ_OQ));
    bits |= static_cast<uint64_t>(is1) << j;
    valid |= static_cast<uint64_t>(is1 | _mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_EQ_OQ))) << j;
  }
  return finish_word<float>(s, si, n, j, bits, valid, word);
}
#endif

template <typename T>
bool pack_word(PackIsa isa, const T* s, int64_t si, int64_t n, uint64_t* word) {
#ifdef PVAE_X86
  if (isa == PackIsa::kAvx512) return pack_word_avx512(s, si, n, word);
  if (isa == PackIsa::kAvx2) return pack_word_avx2(s, si, n, word);
#endif
  return pack_word_scalar<T>(s, si, n, word);
}

// Packs one field (S values at stride si) word-major: words[k * R + r] is word k of row r, and
// tri[k * R + r] word k of the tripled row r. Returns false at the first value that is neither 0
// nor 1; *ones gets the number of 1s.
template <typename T>
bool pack_field(const T* src, int64_t si, const Layout& y, PackIsa isa, uint64_t* words, uint64_t* tri, int64_t* ones) {
  const int64_t R = y.na * y.nb, L = y.L;
  std::vector<uint64_t> w(y.wd), d(y.wd3);
  int64_t count = 0;
  for (int64_t r = 0; r < R; ++r) {
    const T* s = src + r * L * si;
    for (int64_t k = 0; k < y.wd; ++k) {
      const int64_t j0 = 64 * k, n = std::min<int64_t>(64, L - j0);
      if (!pack_word<T>(isa, s + j0 * si, si, n, &w[k])) return false;
      count += __builtin_popcountll(w[k]);
      words[k * R + r] = w[k];
    }
    // The tripled row: the row at bit L, and its periodic copies at bits 0 and 2L (or zeros).
    std::fill(d.begin(), d.end(), uint64_t(0));
    for (int64_t copy = y.periodic ? 0 : 1; copy < (y.periodic ? 3 : 2); ++copy) {
      const int64_t q = copy * L / 64, sh = copy * L % 64;
      for (int64_t k = 0; k < y.wd; ++k) {
        d[q + k] |= w[k] << sh;
        if (sh) d[q + k + 1] |= w[k] >> (64 - sh);
      }
    }
    for (int64_t k = 0; k < y.wd3; ++k) tri[k * R + r] = d[k];
  }
  *ones = count;
  return true;
}

// ------------------------------------------------------------------ counting
// Counts of base (a, b) for every lag of the box whose last component is rl, into cnt (the
// sample's box for this base). auto_pair: C(r) = C(-r), so only the lags whose first non-zero
// component is positive (and 0) are counted, and mirrored. ext is scratch of wd * na * (nb + 2 hb)
// words: word k of b's rows shifted by rl, each block of nb rows extended by hb rows on either
// side (periodically, or with zero rows), so that b(x + r) over a block is one contiguous run for
// every rb. Non-periodic, a 3D block shifted out of the field contributes nothing.
void count_lags(const Layout& y, const uint64_t* A, const uint64_t* Btri, int64_t rl, bool auto_pair, AndCount fn,
                uint64_t* ext, double* cnt) {
  const int64_t R = y.na * y.nb, off = y.L + rl, ext_rows = y.nb + 2 * y.hb;
  const int64_t lo = off / 64, sh = off % 64;  // the same bit offset in every row
  if (R == 1) {  // 1D: one row, its words contiguous
    for (int64_t k = 0; k < y.wd; ++k)
      ext[k] = sh ? (Btri[lo + k] >> sh) | (Btri[lo + k + 1] << (64 - sh)) : Btri[lo + k];
  }
  for (int64_t k = 0; k < y.wd && R > 1; ++k)
    for (int64_t ia = 0; ia < y.na; ++ia) {
      uint64_t* blk = ext + (k * y.na + ia) * ext_rows;
      const uint64_t* d0 = Btri + (lo + k) * R + ia * y.nb;
      const uint64_t* d1 = d0 + R;
      uint64_t* dst = blk + y.hb;
      if (sh == 0) {
        std::memcpy(dst, d0, y.nb * sizeof(uint64_t));
      } else {
        for (int64_t r = 0; r < y.nb; ++r) dst[r] = (d0[r] >> sh) | (d1[r] << (64 - sh));
      }
      if (y.periodic) {  // hb < nb: the rows before the block are its last hb rows, those after its first hb
        std::memcpy(blk, blk + y.nb, y.hb * sizeof(uint64_t));
        std::memcpy(blk + y.nb + y.hb, blk + y.hb, y.hb * sizeof(uint64_t));
      } else {
        std::memset(blk, 0, y.hb * sizeof(uint64_t));
        std::memset(blk + y.nb + y.hb, 0, y.hb * sizeof(uint64_t));
      }
    }
  int64_t part[kMaxLags];
  for (int64_t ra = -y.ha; ra <= y.ha; ++ra) {
    int64_t rb0 = -y.hb;
    if (auto_pair && ra < 0) continue;
    if (auto_pair && ra == 0) rb0 = rl >= 0 ? 0 : 1;  // rb < 0 (or rb = 0, rl < 0): mirrors
    for (; rb0 <= y.hb; rb0 += kMaxLags) {
      const int nk = static_cast<int>(std::min<int64_t>(kMaxLags, y.hb + 1 - rb0));
      int64_t total[kMaxLags] = {};
      if (R == 1) {  // 1D: the words of the one row are contiguous (nk is 1)
        fn(A, ext, y.wd, 1, nk, total);
      } else {
        for (int64_t k = 0; k < y.wd; ++k)
          for (int64_t ia = 0; ia < y.na; ++ia) {
            int64_t ib = ia + ra;  // the block holding b(x + r)
            if (y.periodic) {
              ib = wrap(ib, y.na) % y.na;
            } else if (ib < 0 || ib >= y.na) {
              continue;
            }
            fn(A + k * R + ia * y.nb, ext + (k * y.na + ib) * ext_rows + rb0 + y.hb, y.nb, 1, nk, part);
            for (int j = 0; j < nk; ++j) total[j] += part[j];
          }
      }
      for (int j = 0; j < nk; ++j) {
        cnt[box_index(y, ra, rb0 + j, rl)] = static_cast<double>(total[j]);
        if (auto_pair) cnt[box_index(y, -ra, -(rb0 + j), -rl)] = static_cast<double>(total[j]);
      }
    }
  }
}

// The cost model of the route chooser: the estimated wall time of each route for one sample, in
// nanoseconds, under the per-unit costs c (RouteCosts, two_point.h). Its form was fitted on the
// development VM (AMD EPYC, Zen 4, one thread) over 2D, 3D and 1D fields of 32^2 to 64^3 pixels
// and cutoffs from 2 to 1000: counting costs a time per word counted (half the box of lags for an
// auto-correlation), per kernel call and task, per word rotated and per pixel packed; the
// transforms a time per S log2 S for each forward and each inverse transform, S being the
// transforms' grid, and twice that for non-periodic statistics (zero-padded grid, whose passes
// around the transforms cost about as much again). How fast each unit runs differs between CPUs
// (MKL's FFTs are faster on Intel, popcount throughput differs), and with the dtype and the thread
// count, which is why the costs are measured on the CPU at hand (see measure_costs).
struct ModelParts {
  double pack_ns = 0, rest_ns = 0, fft_ns = 0;  // counting = pack_ns + rest_ns
  double fft_inverse_ns = 0;                    // the inverse transforms' share of fft_ns
};

// What the transforms route costs beyond the spectra of x: all of it, or with spectra_kept (a
// backward pass needs x's spectra, which both routes then compute) its inverse transforms alone.
double transforms_cost(const ModelParts& m, bool spectra_kept) { return spectra_kept ? m.fft_inverse_ns : m.fft_ns; }

ModelParts model_parts(const TwoPointPlan& plan, const Geometry& g, bool periodic, const RouteCosts& c, bool single) {
  const Layout y = make_layout(g, periodic);
  const double R = static_cast<double>(y.na * y.nb), wd = static_cast<double>(y.wd);
  double s = 1.0, grid = 1.0;
  for (int d = 0; d < g.ndim; ++d) {
    s *= static_cast<double>(g.n[d]);
    grid *= static_cast<double>(g.m[d]);
  }
  const double n_rl = 2.0 * y.hl + 1, n_ra = 2.0 * y.ha + 1, groups = std::ceil((2.0 * y.hb + 1) / kMaxLags);
  double words = 0.0, calls = 0.0, rotated = 0.0;
  for (size_t b = 0; b < plan.base_a.size(); ++b) {
    const double share = static_cast<int32_t>(b) < plan.n_auto ? 0.5 : 1.0;
    words += share * static_cast<double>(y.box) * R * wd;
    calls += y.na * y.nb == 1 ? share * n_rl : share * n_rl * n_ra * groups * wd * static_cast<double>(y.na);
    rotated += n_rl * wd * static_cast<double>(y.na * (y.nb + 2 * y.hb));
  }
  const double packed = s * static_cast<double>(plan.fwd_states.size() + 1);  // + the partition check
  ModelParts m;
  m.pack_ns = (single ? c.pack_f32_ns : c.pack_f64_ns) * packed;
  m.rest_ns = c.word_ns * words + c.call_ns * calls + c.rotate_ns * rotated;
  const double n_transforms = static_cast<double>(plan.fwd_states.size() + plan.base_a.size());
  const double per_unit = (single ? c.fft_f32_ns : c.fft_f64_ns) * (periodic ? 1.0 : 2.0);  // padding costs passes too
  const double one = per_unit * grid * std::log2(std::max(2.0, grid));
  m.fft_ns = one * n_transforms;
  m.fft_inverse_ns = one * static_cast<double>(plan.base_a.size());
  return m;
}

bool counting_cheaper(const TwoPointPlan& plan, const Geometry& g, bool periodic, const RouteCosts& c, bool single,
                      bool spectra_kept) {
  const ModelParts m = model_parts(plan, g, periodic, c, single);
  return m.pack_ns + m.rest_ns < transforms_cost(m, spectra_kept);
}

// Whether the packed states (slots 0..n-1 in state order) partition every pixel of sample b:
// each pixel has exactly one state at 1, i.e. their union covers the field and the 1s number S.
bool partition_exact(const std::vector<uint64_t>& packed, int64_t b, int64_t n, int64_t field_words,
                     const std::vector<int64_t>& ones, const Layout& y) {
  const int64_t R = y.na * y.nb;
  int64_t total = 0;
  for (int64_t u = 0; u < n; ++u) total += ones[b * n + u];
  if (total != R * y.L) return false;
  for (int64_t k = 0; k < y.wd; ++k) {
    const uint64_t full = low_bits(y.L - 64 * k);
    for (int64_t r = 0; r < R; ++r) {
      uint64_t any = 0;
      for (int64_t u = 0; u < n; ++u) any |= packed[(b * n + u) * field_words + k * R + r];
      if (any != full) return false;
    }
  }
  return true;
}

// The plans of one call, made once for all its chunks.
struct Plans {
  TwoPointPlan direct;          // every pair from its own states
  TwoPointPlan with_partition;  // with the partition relations (when check_partition)
  bool check_partition;         // pack every state and check the partition: only where it saves work
  std::vector<int64_t> states;  // the states packed, sorted
};

Plans make_plans(const std::vector<std::pair<int64_t, int64_t>>& req, int64_t n_state, bool check_partition) {
  Plans p;
  p.direct = make_plan(req, n_state, false);
  p.check_partition = false;
  if (check_partition) {
    p.with_partition = make_plan(req, n_state, true);
    p.check_partition = p.with_partition.fwd_states.size() + p.with_partition.base_a.size() <
                        p.direct.fwd_states.size() + p.direct.base_a.size();
  }
  if (p.check_partition) {
    for (int64_t k = 0; k < n_state; ++k) p.states.push_back(k);
  } else {
    p.states = p.direct.fwd_states;
  }
  return p;
}

// The whole binary path on one chunk of samples (see binary_stats_cpu); returns false if a value
// is not binary or if, after the partition check, counting is no longer the cheaper route.
template <typename T>
bool binary_stats_t(const at::Tensor& x, const Plans& plans, const Layout& y, const Geometry& g, const Choice& c,
                    at::Tensor& out) {
  const bool periodic = y.periodic;
  const int64_t B = x.size(0), R = y.na * y.nb;
  const std::vector<int64_t>& states = plans.states;
  const int64_t np = static_cast<int64_t>(states.size());
  const int64_t sb = x.stride(0), ss = x.stride(1), si = x.stride(x.dim() - 1);
  const T* px = x.data_ptr<T>();
  const int64_t field_words = R * (y.wd + y.wd3);
  std::vector<uint64_t> packed(static_cast<size_t>(B * np * field_words));
  std::vector<int64_t> ones(static_cast<size_t>(B * np));
  std::atomic<bool> binary{true};
  // The float gathers take 32-bit offsets.
  const PackIsa isa = si < (int64_t{1} << 26) ? c.kernel.pack : PackIsa::kScalar;

  // 1. Pack the states of every sample, checking that they are binary.
  at::parallel_for(0, B * np, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end && binary.load(std::memory_order_relaxed); ++t) {
      const int64_t b = t / np, u = t % np;
      uint64_t* words = packed.data() + t * field_words;
      if (!pack_field<T>(px + b * sb + states[u] * ss, si, y, isa, words, words + R * y.wd, &ones[t]))
        binary.store(false, std::memory_order_relaxed);
    }
  });
  if (!binary.load()) return false;

  bool partition = plans.check_partition;
  for (int64_t b = 0; b < B && partition; ++b) partition = partition_exact(packed, b, np, field_words, ones, y);
  const TwoPointPlan& plan = partition ? plans.with_partition : plans.direct;
  const bool single = x.scalar_type() == at::kFloat;
  if (plans.check_partition && !partition && !c.forced &&
      !counting_cheaper(plan, g, periodic, c.costs, single, c.spectra_kept))
    return false;
  // slot[p]: where the plan's p-th transformed state was packed.
  std::vector<int64_t> slot;
  for (int64_t st : plan.fwd_states)
    slot.push_back(std::find(states.begin(), states.end(), st) - states.begin());
  const int64_t nf = static_cast<int64_t>(slot.size()), nbase = static_cast<int64_t>(plan.base_a.size());

  // 2. The base counts on the box, one task per (sample, base, last-axis lag). Counts are held as
  // doubles: integers below 2^53 are exact, and so are the sums and differences of step 3.
  std::vector<double> counts(static_cast<size_t>(B * nbase * y.box));
  const int64_t nl = 2 * y.hl + 1;
  at::parallel_for(0, B * nbase * nl, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> ext(static_cast<size_t>(y.wd * y.na * (y.nb + 2 * y.hb)));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (nbase * nl), k = (t / nl) % nbase, rl = t % nl - y.hl;
      const bool auto_pair = k < plan.n_auto;
      if (auto_pair && R == 1 && rl < 0) continue;  // 1D: mirrored by the task of -rl
      const uint64_t* fa = packed.data() + (b * np + slot[plan.base_a[k]]) * field_words;
      const uint64_t* fb = packed.data() + (b * np + slot[plan.base_b[k]]) * field_words;
      count_lags(y, fa, fb + R * y.wd, rl, auto_pair, c.kernel.fn, ext.data(), counts.data() + (b * nbase + k) * y.box);
    }
  });

  // 3. Each requested correlation from the bases, then one (correctly rounded) division by S, or
  // non-periodic by the number of pixel pairs at that lag, prod_d (n_d - |r_d|).
  const int64_t nq = static_cast<int64_t>(plan.pairs.size());
  int64_t win = 1, s_total = 1;
  for (int d = 0; d < g.ndim; ++d) {
    win *= g.w[d];
    s_total *= g.n[d];
  }
  const int64_t wa = g.ndim == 3 ? g.w[0] : 1, wb = g.ndim >= 2 ? g.w[g.ndim - 2] : 1, wl = g.w[g.ndim - 1];
  T* o_all = out.data_ptr<T>();
  const double s_d = static_cast<double>(s_total);
  at::parallel_for(0, B * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> row(wl), ones_b(nf);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nq, q = t % nq;
      const PairPlan& p = plan.pairs[q];
      const double* cnt = counts.data() + b * nbase * y.box;
      for (int64_t u = 0; u < nf; ++u) ones_b[u] = static_cast<double>(ones[b * np + slot[u]]);
      const double cst = pair_constant<double>(p, plan.vfs.data(), ones_b.data(), s_d);
      T* o = o_all + t * win;
      for (int64_t ia = 0; ia < wa; ++ia)
        for (int64_t ib = 0; ib < wb; ++ib) {
          const int64_t ra = window_lag(ia, wa), rb = window_lag(ib, wb), rl0 = window_lag(0, wl);
          std::fill(row.begin(), row.end(), cst);
          for (int32_t k = p.term_begin; k < p.term_end; ++k) {
            const Term& tm = plan.terms[k];
            const double cf = tm.coef;
            const double* src = cnt + tm.base * y.box;
            if (tm.reversed) {  // C(-r): the mirrored row, read backwards
              src += box_index(y, -ra, -rb, -rl0);
              for (int64_t il = 0; il < wl; ++il) row[il] += cf * src[-il];
            } else {
              src += box_index(y, ra, rb, rl0);
              for (int64_t il = 0; il < wl; ++il) row[il] += cf * src[il];
            }
          }
          T* orow = o + (ia * wb + ib) * wl;
          if (periodic) {
            for (int64_t il = 0; il < wl; ++il) orow[il] = static_cast<T>(row[il] / s_d);
          } else {
            const double pairs_ab = static_cast<double>((y.na - std::abs(ra)) * (y.nb - std::abs(rb)));
            for (int64_t il = 0; il < wl; ++il)
              orow[il] = static_cast<T>(row[il] / (pairs_ab * static_cast<double>(y.L - std::abs(rl0 + il))));
          }
        }
    }
  });
  return true;
}

// The whole binary route on one call, with the route (or forced kernel) of c: see binary_stats_cpu.
bool binary_stats_with(const at::Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& req, bool check_partition,
                       bool periodic, const Geometry& g, const Choice& c, at::Tensor& out) {
  const Plans plans = make_plans(req, x.size(1), check_partition);
  // The estimate uses the plan the partition would allow: where it does not hold, the binary
  // path checks again once it knows.
  if (!c.forced && !counting_cheaper(plans.check_partition ? plans.with_partition : plans.direct, g, periodic,
                                     c.costs, x.scalar_type() == at::kFloat, c.spectra_kept))
    return false;
  // Chunks of samples whose packed fields take at most 16 MiB. Each chunk picks its own plan (the
  // partition may hold in one and not another): the counts are exact either way.
  const Layout y = make_layout(g, periodic);
  const int64_t B = x.size(0);
  const int64_t per_sample = x.size(1) * y.na * y.nb * (y.wd + y.wd3) * static_cast<int64_t>(sizeof(uint64_t));
  const int64_t chunk = std::max<int64_t>(1, (int64_t{16} << 20) / per_sample);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    at::Tensor out_c = out.narrow(0, b0, n);
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "binary_stats", [&] {
      done = binary_stats_t<scalar_t>(x.narrow(0, b0, n), plans, y, g, c, out_c);
    });
    if (!done) return false;  // the transforms redo the whole batch
  }
  return true;
}

// ------------------------------------------------------------------ calibration of the costs
// The constants fitted on the development VM (AMD EPYC, Zen 4, one thread): the starting point of
// the measurement, and what PYMKS_VAE_ROUTE_COSTS=fitted uses.
RouteCosts fitted_costs(const CountKernel& k) {
  RouteCosts c;
  c.word_ns = k.ns_per_word;
  c.call_ns = 50.0;
  c.rotate_ns = 0.3;
  c.pack_f32_ns = c.pack_f64_ns = 0.4;
  c.fft_f32_ns = 0.11;
  c.fft_f64_ns = 0.2;
  return c;
}

struct CostField {
  const char* name;
  double RouteCosts::*field;
};
const CostField kCostFields[] = {{"word_ns", &RouteCosts::word_ns},         {"call_ns", &RouteCosts::call_ns},
                                 {"rotate_ns", &RouteCosts::rotate_ns},     {"pack_f32_ns", &RouteCosts::pack_f32_ns},
                                 {"pack_f64_ns", &RouteCosts::pack_f64_ns}, {"fft_f32_ns", &RouteCosts::fft_f32_ns},
                                 {"fft_f64_ns", &RouteCosts::fft_f64_ns}};

void check_costs(const RouteCosts& c, const char* where) {
  for (const CostField& f : kCostFields) {
    const double v = c.*f.field;
    PYMKS_CHECK_VALUE(std::isfinite(v) && v > 0.0, where, ": ", f.name, " must be a finite number > 0, got ", v);
  }
}

// PYMKS_VAE_ROUTE_COSTS: "fitted" (the shipped constants), or "name=value,..." (those constants
// with some replaced, e.g. "fft_f32_ns=0.05"): a fixed, reproducible route choice without timing.
RouteCosts parse_costs(const std::string& v, const CountKernel& k) {
  RouteCosts c = fitted_costs(k);
  if (v == "fitted") return c;
  const char* kWhat = "PYMKS_VAE_ROUTE_COSTS";
  size_t pos = 0;
  while (pos <= v.size()) {
    const size_t end = std::min(v.find(',', pos), v.size());
    const std::string item = v.substr(pos, end - pos);
    const size_t eq = item.find('=');
    PYMKS_CHECK_VALUE(eq != std::string::npos, kWhat, " must be unset, 'measure', 'fitted' or a list of name=value ",
                      "(names: word_ns, call_ns, rotate_ns, pack_f32_ns, pack_f64_ns, fft_f32_ns, fft_f64_ns), got '",
                      v, "'");
    const std::string name = item.substr(0, eq), value = item.substr(eq + 1);
    const CostField* f = nullptr;
    for (const CostField& cand : kCostFields)
      if (name == cand.name) f = &cand;
    PYMKS_CHECK_VALUE(f != nullptr, kWhat, ": unknown cost '", name,
                      "' (names: word_ns, call_ns, rotate_ns, pack_f32_ns, pack_f64_ns, fft_f32_ns, fft_f64_ns)");
    char* stop = nullptr;
    const double d = std::strtod(value.c_str(), &stop);
    PYMKS_CHECK_VALUE(!value.empty() && stop == value.c_str() + value.size(), kWhat, ": ", name,
                      " must be a number, got '", value, "'");
    c.*(f->field) = d;
    pos = end + 1;
  }
  check_costs(c, kWhat);
  return c;
}

// A two-state one-hot field of B x n x n pixels of dtype dt: a fixed pseudo-random pattern, so
// that measuring never touches torch's random generator (the kernels' speed does not depend on
// the pattern: packing is branch-free and the counts and transforms are data-independent).
at::Tensor probe_field(int64_t B, int64_t n, at::ScalarType dt) {
  at::Tensor x = at::empty({B, 2, n, n}, at::TensorOptions().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "probe_field", [&] {
    scalar_t* p = x.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n * n; ++i) {
        const uint64_t h = (static_cast<uint64_t>(b * n * n + i) + 1) * 0x9E3779B97F4A7C15ULL;
        const scalar_t one = static_cast<scalar_t>(h >> 63);
        p[(2 * b + 1) * n * n + i] = one;
        p[2 * b * n * n + i] = 1 - one;
      }
  });
  return x;
}

// Measures the costs on this CPU at the calling thread's thread count: the counting route (kernel
// k) on two windows, so that packing and counting get their own scale, and the transforms route
// (the operator itself, forced), each in float32 and float64 (float64 counting on the small window
// only: its counting part is float32's). Every probe is B = 8 fields of 128^2, two states, pairs
// (1, 1) and (0, 1), periodic - PyMKS's case - and takes 0.05-0.7 ms; the best of 6 timed rounds
// (after two untimed) is kept, so that a probe preempted by another process now and then does not
// count. A machine loaded throughout the measurement (more runnable threads than cores) is measured
// as it is then: its threaded transforms, whose many short parallel passes wait on preempted
// threads, are then much slower than its counts, and the costs say so until measured again.
// The costs are the fitted ones scaled by measured / estimated time, each scale kept within
// [1/16, 16] of the fitted constant so that a badly disturbed measurement cannot make either route
// absurdly cheap. 15-40 ms in all with one or two threads on the idle development VM.
RouteCalibration measure_costs(const CountKernel& k, int threads) {
  const auto t_start = std::chrono::steady_clock::now();
  const RouteCosts fit = fitted_costs(k);
  constexpr int64_t B = 8, N = 128, kSmall = 3, kLarge = 24;
  const std::vector<std::pair<int64_t, int64_t>> req{{1, 1}, {0, 1}};
  const std::vector<int64_t> pi{1, 0}, pj{1, 1};
  auto geometry = [&](int64_t cutoff) {
    Geometry g{};
    g.ndim = 2;
    for (int d = 0; d < 2; ++d) {
      g.n[d] = g.m[d] = N;
      g.w[d] = 2 * cutoff + 1;
    }
    return g;
  };
  const Geometry gs = geometry(kSmall), gl = geometry(kLarge);
  const at::Tensor x32 = probe_field(B, N, at::kFloat), x64 = probe_field(B, N, at::kDouble);
  Choice forced;
  forced.forced = true;
  forced.kernel = k;
  auto count = [&](const at::Tensor& x, const Geometry& g) {
    at::Tensor out = at::empty({B, 2, g.w[0], g.w[1]}, x.options());
    TORCH_INTERNAL_ASSERT(binary_stats_with(x, req, true, true, g, forced, out), "route calibration: probe not counted");
  };
  auto transform = [&](const at::Tensor& x) {
    const TransformsOnly only;
    two_point_forward(x, pi, pj, true, {gl.w[0], gl.w[1]}, c10::nullopt, 2, cpu_two_point_backend());
  };
  const std::function<void()> probes[] = {[&] { count(x32, gs); }, [&] { count(x32, gl); }, [&] { count(x64, gs); },
                                          [&] { transform(x32); }, [&] { transform(x64); }};
  constexpr int kProbes = 5;
  double best[kProbes];
  std::fill(best, best + kProbes, std::numeric_limits<double>::infinity());
  // Interleaved rounds: each probe sees the same phases of a noisy machine. The first two are not
  // timed: at a process's first call the threaded transforms ran up to 3x slower for a round or two
  // more than the counts (thread pool and transform plans warming up), which made the transforms
  // look dearer than they are (measured with two threads on the development VM).
  constexpr int kRounds = 8, kUntimed = 2;
  for (int round = 0; round < kRounds; ++round)
    for (int p = 0; p < kProbes; ++p) {
      const auto t0 = std::chrono::steady_clock::now();
      probes[p]();
      const double t = seconds_since(t0) * 1e9;
      if (round >= kUntimed) best[p] = std::min(best[p], t);
    }

  const Plans plans = make_plans(req, 2, true);
  const TwoPointPlan& plan = plans.with_partition;  // the probes are partitions
  const double b = static_cast<double>(B);
  const ModelParts s32 = model_parts(plan, gs, true, fit, true), l32 = model_parts(plan, gl, true, fit, true);
  const ModelParts s64 = model_parts(plan, gs, true, fit, false), l64 = model_parts(plan, gl, true, fit, false);
  // best[0] = sp a1 + sw b1, best[1] = sp a2 + sw b2: the packing and counting scales.
  const double a1 = b * s32.pack_ns, b1 = b * s32.rest_ns, a2 = b * l32.pack_ns, b2 = b * l32.rest_ns;
  const double det = a1 * b2 - a2 * b1;
  double sp = (best[0] * b2 - best[1] * b1) / det, sw = (a1 * best[1] - a2 * best[0]) / det;
  if (!(sp > 0.0 && sw > 0.0)) sp = sw = (best[0] + best[1]) / (a1 + b1 + a2 + b2);  // noise: one scale for both
  double sp64 = (best[2] - sw * b * s64.rest_ns) / (b * s64.pack_ns);
  if (!(sp64 > 0.0)) sp64 = best[2] / (b * (s64.pack_ns + s64.rest_ns));
  const double sf32 = best[3] / (b * l32.fft_ns), sf64 = best[4] / (b * l64.fft_ns);
  auto clamp = [](double scale) { return std::min(16.0, std::max(1.0 / 16.0, scale)); };
  RouteCalibration cal;
  cal.costs = fit;
  cal.costs.word_ns *= clamp(sw);
  cal.costs.call_ns *= clamp(sw);
  cal.costs.rotate_ns *= clamp(sw);
  cal.costs.pack_f32_ns *= clamp(sp);
  cal.costs.pack_f64_ns *= clamp(sp64);
  cal.costs.fft_f32_ns *= clamp(sf32);
  cal.costs.fft_f64_ns *= clamp(sf64);
  cal.kernel = k.name;
  cal.source = "measured";
  cal.threads = threads;
  cal.seconds = seconds_since(t_start);
  return cal;
}

std::mutex g_costs_mutex;
std::optional<RouteCosts> g_set_costs;        // set_binary_route_costs
std::map<int, RouteCalibration> g_measured;   // by thread count

// The thread count a call runs its loops with: inside a parallel region ATen runs nested loops
// (and MKL its transforms) on the calling thread alone.
int effective_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// The costs in force for kernel k on this thread: set, else PYMKS_VAE_ROUTE_COSTS (read on every
// call, like PYMKS_VAE_BINARY_PATH), else the fitted ones under torch's deterministic algorithms,
// else measured once per thread count. Both routes parallelise,
// but not alike (tasks of counts against MKL's split of the transforms), so a measurement holds for
// the thread count it was made at.
RouteCalibration calibration_for(const CountKernel& k, bool remeasure = false) {
  const int threads = effective_threads();
  RouteCalibration cal;
  cal.kernel = k.name;
  cal.threads = threads;
  {
    std::lock_guard<std::mutex> lock(g_costs_mutex);
    if (g_set_costs) {
      cal.costs = *g_set_costs;
      cal.source = "set";
      return cal;
    }
  }
  const char* env = std::getenv("PYMKS_VAE_ROUTE_COSTS");
  const std::string v = env ? env : "";
  if (!v.empty() && v != "measure") {
    cal.costs = parse_costs(v, k);
    cal.source = v == "fitted" ? "fitted" : "env";
    return cal;
  }
  // Under torch's deterministic algorithms results must not depend on a timing: the shipped
  // constants, and (as their source is not "measured") no route trials either.
  if (at::globalContext().deterministicAlgorithms()) {
    cal.costs = fitted_costs(k);
    cal.source = "deterministic";
    return cal;
  }
  // Measured under the lock: a second thread needing the same costs waits a few ms for them
  // rather than measuring beside the first (which would disturb both measurements).
  std::lock_guard<std::mutex> lock(g_costs_mutex);
  auto it = g_measured.find(threads);
  if (remeasure && it != g_measured.end()) {
    g_measured.erase(it);
    it = g_measured.end();
  }
  if (it == g_measured.end()) it = g_measured.emplace(threads, measure_costs(k, threads)).first;
  return it->second;
}

}  // namespace

const char* binary_count_kernel() { return best_kernel().name; }

RouteCalibration binary_route_calibration(bool remeasure) {
  if (remeasure) clear_binary_route_trials();  // they were timed under the costs being replaced
  const CountKernel k = best_kernel();
  if (k.ns_per_word <= 0.0) {  // this CPU never counts by itself: nothing to measure
    RouteCalibration cal;
    cal.costs = fitted_costs(k);
    cal.kernel = k.name;
    cal.source = "unused";
    cal.threads = effective_threads();
    return cal;
  }
  return calibration_for(k, remeasure);
}

std::optional<RouteCosts> set_binary_route_costs(const RouteCosts* costs) {
  if (costs != nullptr) check_costs(*costs, "set_binary_route_costs");
  std::lock_guard<std::mutex> lock(g_costs_mutex);
  const std::optional<RouteCosts> prev = g_set_costs;
  if (costs != nullptr) {
    g_set_costs = *costs;
  } else {
    g_set_costs.reset();
  }
  return prev;
}

RouteEstimate binary_route_estimate(const std::vector<int64_t>& spatial, const std::vector<int64_t>& window, int64_t batch,
                                    const std::vector<std::pair<int64_t, int64_t>>& req, int64_t n_state, bool periodic,
                                    bool single, bool check_partition, const RouteCosts& costs,
                                    bool spectra_kept) {
  const char* op = "binary_route_estimate";
  check_costs(costs, op);
  const int64_t nd = static_cast<int64_t>(spatial.size());
  PYMKS_CHECK_VALUE(nd >= 1 && nd <= kMaxDims, op, ": spatial must have 1-3 sizes, got ", nd);
  PYMKS_CHECK_VALUE(static_cast<int64_t>(window.size()) == nd, op, ": window has ", window.size(), " entries for ",
                    nd, " spatial dims");
  PYMKS_CHECK_VALUE(batch >= 1, op, ": batch must be >= 1, got ", batch);
  PYMKS_CHECK_VALUE(n_state >= 1, op, ": n_state must be >= 1, got ", n_state);
  PYMKS_CHECK_VALUE(!req.empty(), op, ": pairs must not be empty");
  for (const auto& [i, j] : req)
    PYMKS_CHECK_VALUE(i >= 0 && i < n_state && j >= 0 && j < n_state, op, ": pair (", i, ", ", j,
                      ") out of range for n_state=", n_state);
  for (int64_t d = 0; d < nd; ++d)
    PYMKS_CHECK_VALUE(window[d] >= 1 && window[d] <= spatial[d], op, ": window ", window[d],
                      " does not fit spatial size ", spatial[d]);
  const Geometry g = lag_geometry(spatial, window, periodic);  // as the transforms route pads
  const Plans plans = make_plans(req, n_state, check_partition && periodic && n_state >= 2);
  const ModelParts m = model_parts(plans.check_partition ? plans.with_partition : plans.direct, g, periodic, costs, single);
  RouteEstimate e;
  e.count_ns = static_cast<double>(batch) * (m.pack_ns + m.rest_ns);
  e.transform_ns = static_cast<double>(batch) * transforms_cost(m, spectra_kept);
  e.counting = m.pack_ns + m.rest_ns < transforms_cost(m, spectra_kept);
  return e;
}

// ------------------------------------------------------------------ route trials
// The measured costs come from small probes that sit in cache; on a large input the two routes can
// scale otherwise (on an Intel Xeon, 2 threads, the model put counting 32 x 224^2 at cutoff 20 at
// 0.91 of the transforms where it took 1.68 of them). Where the model's two estimates lie within
// a factor g_trial_band of each other, the first call of a kind (shape, window, states, dtype,
// thread count) therefore times both routes on its own input, returns the faster route's result
// (so that it gives the bits of the calls of that kind that follow: a seeded optimisation that
// starts with a trial repeats itself) and remembers that route for them. Past kMaxTrials kinds the
// model decides for new ones (a cleared table would time, and could switch, the old ones again).
// Set or environment costs are never overridden (they exist to fix the route).
namespace {

std::mutex g_trials_mutex;
std::map<std::vector<int64_t>, bool> g_trials;  // kind -> counting was faster
double g_trial_band = 3.0;                      // 0: no trials
TrialRecord g_last_trial;                       // the latest trial's timings (for tests and diagnosis)
constexpr size_t kMaxTrials = 256;

std::vector<int64_t> trial_key(const at::Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& req,
                               bool check_partition, bool periodic, const Geometry& g) {
  std::vector<int64_t> k{effective_threads(), x.scalar_type() == at::kFloat, periodic, check_partition, x.size(0),
                         x.size(1), g.ndim};
  for (int d = 0; d < g.ndim; ++d) {
    k.push_back(g.n[d]);
    k.push_back(g.m[d]);
    k.push_back(g.w[d]);
  }
  for (const auto& [i, j] : req) {
    k.push_back(i);
    k.push_back(j);
  }
  return k;
}

// Counts into out and times both routes (the transforms into a scratch tensor), the faster time of
// each kept: two rounds, the second in the other order (a route run second can find the input in
// cache), and a third while the two are within 30% of each other. True where counting was faster
// (its result is in out); false where the transforms were, or x is not binary after all (the
// caller then runs the transforms, as for the later calls of a kind the transforms won).
// Why two rounds at least: on the 2-core Zen 3 EPYC, 2 threads, 8 x 64^3 float64 at cutoff 5
// (counting 24-28 ms, transforms 30-34 ms), a host busy for a few hundred milliseconds made one
// round count in 48-82 ms, and a trial stopping after a round 30% apart chose the transforms in
// 1-4 of 12-16 fresh trials (and in the one a benchmark run drew); with two rounds, 32 of 32 trials
// chose counting.
bool trial_routes(const at::Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& req, bool check_partition,
                  bool periodic, const Geometry& g, const Choice& c, const std::vector<int64_t>& key, at::Tensor& out) {
  Choice counting = c;
  counting.forced = true;
  std::vector<int64_t> pi, pj, window(g.w, g.w + g.ndim);
  for (const auto& [i, j] : req) {
    pi.push_back(i);
    pj.push_back(j);
  }
  double t_count = std::numeric_limits<double>::infinity(), t_transform = t_count;
  auto time_count = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    if (!binary_stats_with(x, req, check_partition, periodic, g, counting, out)) return false;
    t_count = std::min(t_count, seconds_since(t0));
    return true;
  };
  auto time_transforms = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    {
      const TransformsOnly only;
      two_point_forward(x, pi, pj, periodic, window, c10::nullopt, check_partition ? 2 : 0, cpu_two_point_backend());
    }
    t_transform = std::min(t_transform, seconds_since(t0));
  };
  int rounds = 0;
  while (rounds < 3) {
    if (rounds % 2 == 0) {
      if (!time_count()) return false;
      time_transforms();
    } else {  // the other order; counting's result stays in out either way
      time_transforms();
      if (!time_count()) return false;
    }
    ++rounds;
    if (rounds >= 2 && std::max(t_count, t_transform) > 1.3 * std::min(t_count, t_transform)) break;
  }
  const bool counting_won = t_count <= t_transform;
  std::lock_guard<std::mutex> lock(g_trials_mutex);
  g_last_trial = {rounds, t_count, t_transform};
  if (g_trials.size() < kMaxTrials) g_trials[key] = counting_won;
  return counting_won;
}

}  // namespace

bool binary_stats_cpu(const at::Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& req, bool check_partition,
                      bool periodic, const Geometry& g, at::Tensor& out, bool spectra_kept) {
  check_partition = check_partition && periodic;  // the relations hold for periodic statistics only
  Choice c = read_choice();
  if (c.off || (!c.forced && c.kernel.ns_per_word <= 0.0)) return false;
  if (c.forced) return binary_stats_with(x, req, check_partition, periodic, g, c, out);
  const RouteCalibration cal = calibration_for(c.kernel);
  c.costs = cal.costs;
  c.spectra_kept = spectra_kept;
  double band;
  {
    std::lock_guard<std::mutex> lock(g_trials_mutex);
    band = g_trial_band;
  }
  // A trial times the two forward routes as they run without a backward pass; with the spectra
  // kept the model decides alone.
  if (cal.source != "measured" || band <= 1.0 || spectra_kept)
    return binary_stats_with(x, req, check_partition, periodic, g, c, out);
  const Plans plans = make_plans(req, x.size(1), check_partition);
  const ModelParts m = model_parts(plans.check_partition ? plans.with_partition : plans.direct, g, periodic, c.costs,
                                   x.scalar_type() == at::kFloat);
  const double ratio = (m.pack_ns + m.rest_ns) / m.fft_ns;
  if (!(ratio > 1.0 / band && ratio < band)) return binary_stats_with(x, req, check_partition, periodic, g, c, out);
  const std::vector<int64_t> key = trial_key(x, req, check_partition, periodic, g);
  std::optional<bool> known;
  bool full = false;
  {
    std::lock_guard<std::mutex> lock(g_trials_mutex);
    const auto it = g_trials.find(key);
    if (it != g_trials.end()) known = it->second;
    full = g_trials.size() >= kMaxTrials;
  }
  if (!known && full) return binary_stats_with(x, req, check_partition, periodic, g, c, out);
  if (!known) return trial_routes(x, req, check_partition, periodic, g, c, key, out);
  if (!*known) return false;
  c.forced = true;  // counting was measured faster for this kind of call
  return binary_stats_with(x, req, check_partition, periodic, g, c, out);
}

int64_t binary_route_trials() {
  std::lock_guard<std::mutex> lock(g_trials_mutex);
  return static_cast<int64_t>(g_trials.size());
}

void clear_binary_route_trials() {
  std::lock_guard<std::mutex> lock(g_trials_mutex);
  g_trials.clear();
}

TrialRecord last_binary_route_trial() {
  std::lock_guard<std::mutex> lock(g_trials_mutex);
  return g_last_trial;
}

double set_binary_route_trial_band(double band) {
  TORCH_CHECK(std::isfinite(band) && band >= 0.0, "set_binary_route_trial_band: band must be a finite number >= 0, got ",
              band);
  std::lock_guard<std::mutex> lock(g_trials_mutex);
  const double prev = g_trial_band;
  g_trial_band = band;
  return prev;
}

}  // namespace pymks_vae
