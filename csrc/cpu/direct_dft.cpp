// The 2D real transforms written out (gemm_rfft2 / gemm_irfft2 of gemm_dft.h run them): along each
// axis the even and odd parts of the input against half tables of cosines and sines give the bins
// k and m - k from the same two sums (gemm_dft.cpp, top), about m0 m1 (m0 + m1) / 2 multiply-adds
// per field whatever the factors of the sides.
//
// Why loops: the same sums as matrix products (the route's first form) spent more on their passes
// and on short, thin products than on the arithmetic: at 21^2 (32 fields, one thread, the 2-core
// AMD EPYC) about 51 us per 2D transform, and MKL 59-71 us, for 9.3 K multiply-adds per field. Here
// a group of 8 float32 (4 float64) fields is interleaved by lane into buffers that stay in cache,
// transformed along both axes with one vector operation per point, and written back: 0.40-0.65x
// the products' time at 15^2-45^2, 0.81-0.94x at 79^2-131^2, level at 223^2. The loops are compiled
// twice, for the baseline x86-64 and for AVX2 with FMA, and the second runs where the CPU has both
// (the baseline build took 2.7x the AVX2 build's time at 21^2 and 4x at 40^2).
#include "cpu/direct_dft.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace pymks_vae {
namespace cpu {
namespace {

using VF = float __attribute__((vector_size(32)));
using VD = double __attribute__((vector_size(32)));

// The half tables (gemm_dft.cpp's half_table) of the first side, cos (h0, h0) and sin (o0, h0),
// and of the last: the same two for the forward; for the inverse, the c2r's weighted and scaled
// cosw (h1, h1) and sinw (h1, o1).
template <typename T>
struct Tables {
  const T *cos0, *sin0, *last_cos, *last_sin;
};

namespace generic {
#include "cpu/direct_dft_kernels.inc"
}  // namespace generic

#if defined(__x86_64__) || defined(__i386__)
#define PYMKS_VAE_DIRECT_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/direct_dft_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = VF;
};
template <>
struct Lanes<double> {
  using V = VD;
};

// The two builds of the group kernels.
template <typename T, typename V>
struct GroupKernels {
  void (*rfft2)(const T* const*, T* const*, int, int64_t, int64_t, bool, const Tables<T>&, V*, V*, V*, V*);
  void (*irfft2)(const T* const*, T* const*, int, int64_t, int64_t, bool, const Tables<T>&, V*, V*, V*, V*);
};
template <typename T, typename V>
constexpr GroupKernels<T, V> kGeneric{generic::rfft2_fields<T, V>, generic::irfft2_fields<T, V>};
#ifdef PYMKS_VAE_DIRECT_AVX2
template <typename T, typename V>
constexpr GroupKernels<T, V> kAvx2{avx2::rfft2_fields<T, V>, avx2::irfft2_fields<T, V>};
#else
template <typename T, typename V>
constexpr GroupKernels<T, V> kAvx2 = kGeneric<T, V>;  // never chosen: use_avx2() is false
#endif

// The instruction set the loops run with: "auto" (the best the CPU has), or one forced by tests.
thread_local DirectIsa tl_isa = DirectIsa::kAuto;

bool use_avx2() {
#ifdef PYMKS_VAE_DIRECT_AVX2
  if (tl_isa == DirectIsa::kGeneric) return false;
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <typename T>
Tables<T> tables(const at::Tensor& cos0, const at::Tensor& sin0, const at::Tensor& last_cos,
                 const at::Tensor& last_sin) {
  for (const auto* t : {&cos0, &sin0, &last_cos, &last_sin})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == c10::CppTypeToScalarType<T>::value,
                "direct_dft: the tables must be contiguous and of the data's real type");
  return {cos0.data_ptr<T>(), sin0.data_ptr<T>(), last_cos.data_ptr<T>(), last_sin.data_ptr<T>()};
}

// A task's lane buffers, 32-byte aligned: the AVX2 loops load and store whole vectors with aligned
// moves, and std::vector<V> gave 16-byte alignment here (the baseline build's alignment of V).
template <typename V>
struct LaneBuffer {
  explicit LaneBuffer(int64_t n)
      : p(static_cast<V*>(std::aligned_alloc(sizeof(V), sizeof(V) * std::max<int64_t>(1, n)))) {
    TORCH_CHECK(p != nullptr, "direct_dft: out of memory for ", n, " lane vectors");
  }
  ~LaneBuffer() { std::free(p); }
  LaneBuffer(const LaneBuffer&) = delete;
  LaneBuffer& operator=(const LaneBuffer&) = delete;
  V* data() const { return p; }
  V* p;
};

// The N fields of `in` (in_stride values each) through a group kernel into `out` (out_stride
// each), L fields per group over at::parallel_for, each task with its own lane buffers.
template <typename T, class Kernel>
void for_groups(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t N, int64_t m0, int64_t m1,
                bool moved, const Tables<T>& t, Kernel kernel) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t groups = (N + L - 1) / L, h1 = m1 / 2 + 1;
  // About 64 K multiply-adds per task at least: a group of 21^2 holds ~10 K vector ones. A partial
  // group costs what a full one does (a batch of 1 float32 field, 8 fields' work), which the
  // route's first-use trials weigh against MKL.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, m0 * m1 * (m0 + m1) / 2));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const LaneBuffer<V> a(m0 * m1), re(m0 * h1), im(m0 * h1), work(8 * (std::max(m0, m1) / 2 + 1));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t f0 = g * L, nf = std::min(L, N - f0);
      const T* src[L];
      T* dst[L];
      for (int64_t l = 0; l < L; ++l) {
        src[l] = in + (f0 + (l < nf ? l : 0)) * in_stride;
        dst[l] = out + (f0 + (l < nf ? l : 0)) * out_stride;
      }
      kernel(src, dst, static_cast<int>(nf), m0, m1, moved, t, a.data(), re.data(), im.data(), work.data());
    }
  });
}

}  // namespace

DirectIsa set_direct_dft_isa(DirectIsa isa) {
  const DirectIsa prev = tl_isa;
  tl_isa = isa;
  return prev;
}

const char* direct_dft_isa() { return use_avx2() ? "avx2" : "generic"; }

void direct_rfft2(const at::Tensor& x, at::Tensor& out, bool moved, const at::Tensor& cos0, const at::Tensor& sin0,
                  const at::Tensor& cos1, const at::Tensor& sin1) {
  const int64_t m0 = x.size(-2), m1 = x.size(-1), N = x.numel() / (m0 * m1);
  const bool avx = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_rfft2", [&] {
    using V = typename Lanes<scalar_t>::V;
    for_groups<scalar_t>(x.data_ptr<scalar_t>(), m0 * m1, reinterpret_cast<scalar_t*>(out.data_ptr()),
                         2 * m0 * (m1 / 2 + 1), N, m0, m1, moved, tables<scalar_t>(cos0, sin0, cos1, sin1),
                         avx ? kAvx2<scalar_t, V>.rfft2 : kGeneric<scalar_t, V>.rfft2);
  });
}

void direct_irfft2(const at::Tensor& spec, at::Tensor& out, bool moved, const at::Tensor& cos0, const at::Tensor& sin0,
                   const at::Tensor& cosw1, const at::Tensor& sinw1) {
  const int64_t m0 = out.size(-2), m1 = out.size(-1), N = out.numel() / (m0 * m1);
  const bool avx = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "direct_irfft2", [&] {
    using V = typename Lanes<scalar_t>::V;
    for_groups<scalar_t>(reinterpret_cast<const scalar_t*>(spec.data_ptr()), 2 * m0 * (m1 / 2 + 1),
                         out.data_ptr<scalar_t>(), m0 * m1, N, m0, m1, moved,
                         tables<scalar_t>(cos0, sin0, cosw1, sinw1),
                         avx ? kAvx2<scalar_t, V>.irfft2 : kGeneric<scalar_t, V>.irfft2);
  });
}

}  // namespace cpu
}  // namespace pymks_vae
