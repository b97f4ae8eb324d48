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
#include <cstring>
#include <type_traits>

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
  void (*rfft2)(const V*, int64_t, int64_t, const Tables<T>&, V*, V*, V*);
  void (*irfft2)(V*, V*, int64_t, int64_t, const Tables<T>&, V*, V*);
};
template <typename T, typename V>
constexpr GroupKernels<T, V> kGeneric{generic::rfft2_group<T, V>, generic::irfft2_group<T, V>};
#ifdef PYMKS_VAE_DIRECT_AVX2
template <typename T, typename V>
constexpr GroupKernels<T, V> kAvx2{avx2::rfft2_group<T, V>, avx2::irfft2_group<T, V>};
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
Tables<T> tables(const at::Tensor& cos0, const at::Tensor& sin0, const at::Tensor& last_cos, const at::Tensor& last_sin) {
  for (const auto* t : {&cos0, &sin0, &last_cos, &last_sin})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == c10::CppTypeToScalarType<T>::value,
                "direct_dft: the tables must be contiguous and of the data's real type");
  return {cos0.data_ptr<T>(), sin0.data_ptr<T>(), last_cos.data_ptr<T>(), last_sin.data_ptr<T>()};
}

// A task's lane buffers, 32-byte aligned: the AVX2 loops load and store whole vectors with aligned
// moves, and std::vector<V> gave 16-byte alignment here (the baseline build's alignment of V).
template <typename V>
struct LaneBuffer {
  explicit LaneBuffer(int64_t n) : p(static_cast<V*>(std::aligned_alloc(sizeof(V), sizeof(V) * std::max<int64_t>(1, n)))) {
    TORCH_CHECK(p != nullptr, "direct_dft: out of memory for ", n, " lane vectors");
  }
  ~LaneBuffer() { std::free(p); }
  LaneBuffer(const LaneBuffer&) = delete;
  LaneBuffer& operator=(const LaneBuffer&) = delete;
  V* data() const { return p; }
  V* p;
};

// Groups of L fields over at::parallel_for, each task with its own lane buffers.
template <typename T, class F>
void for_groups(int64_t N, int64_t m0, int64_t m1, F f) {
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
      f(f0, nf, a.data(), re.data(), im.data(), work.data());
    }
  });
}

// One field to (kToLanes) or from lane l of a group's buffer: a real field of S points, or a half
// spectrum (interleaved complex, (m0, h1) or moved (h1, m0)) against the planes re, im (m0, h1).
template <typename T, bool kToLanes>
void move_field(std::conditional_t<kToLanes, const T*, T*> field, T* lanes, int64_t S, int64_t l) {
  constexpr int64_t L = sizeof(typename Lanes<T>::V) / sizeof(T);
  for (int64_t i = 0; i < S; ++i) {
    if constexpr (kToLanes)
      lanes[i * L + l] = field[i];
    else
      field[i] = lanes[i * L + l];
  }
}

template <typename T, bool kToLanes>
void move_spectrum(std::conditional_t<kToLanes, const T*, T*> spec, T* re, T* im, int64_t m0, int64_t h1, bool moved,
                   int64_t l) {
  constexpr int64_t L = sizeof(typename Lanes<T>::V) / sizeof(T);
  for (int64_t k = 0; k < m0; ++k)
    for (int64_t c = 0; c < h1; ++c) {
      const int64_t at = moved ? c * m0 + k : k * h1 + c, i = (k * h1 + c) * L + l;
      if constexpr (kToLanes) {
        re[i] = spec[2 * at];
        im[i] = spec[2 * at + 1];
      } else {
        spec[2 * at] = re[i];
        spec[2 * at + 1] = im[i];
      }
    }
}

template <typename T>
void rfft2_t(const T* x, T* out, int64_t N, int64_t m0, int64_t m1, bool moved, const Tables<T>& t) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t h1 = m1 / 2 + 1, S = m0 * m1;
  const bool avx = use_avx2();
  for_groups<T>(N, m0, m1, [&](int64_t f0, int64_t nf, V* a, V* re, V* im, V* work) {
    if (nf < L) std::memset(static_cast<void*>(a), 0, sizeof(V) * S);  // the empty lanes stay finite
    for (int64_t l = 0; l < nf; ++l)
      move_field<T, true>(x + (f0 + l) * S, reinterpret_cast<T*>(a), S, l);
    (avx ? kAvx2<T, V>.rfft2 : kGeneric<T, V>.rfft2)(a, m0, m1, t, re, im, work);
    for (int64_t l = 0; l < nf; ++l)
      move_spectrum<T, false>(out + 2 * (f0 + l) * m0 * h1, reinterpret_cast<T*>(re), reinterpret_cast<T*>(im), m0,
                              h1, moved, l);
  });
}

template <typename T>
void irfft2_t(const T* spec, T* out, int64_t N, int64_t m0, int64_t m1, bool moved, const Tables<T>& t) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t h1 = m1 / 2 + 1, S = m0 * m1;
  const bool avx = use_avx2();
  for_groups<T>(N, m0, m1, [&](int64_t f0, int64_t nf, V* a, V* re, V* im, V* work) {
    if (nf < L) {
      std::memset(static_cast<void*>(re), 0, sizeof(V) * m0 * h1);
      std::memset(static_cast<void*>(im), 0, sizeof(V) * m0 * h1);
    }
    for (int64_t l = 0; l < nf; ++l)
      move_spectrum<T, true>(spec + 2 * (f0 + l) * m0 * h1, reinterpret_cast<T*>(re),
                             reinterpret_cast<T*>(im), m0, h1, moved, l);
    (avx ? kAvx2<T, V>.irfft2 : kGeneric<T, V>.irfft2)(re, im, m0, m1, t, a, work);
    for (int64_t l = 0; l < nf; ++l) move_field<T, false>(out + (f0 + l) * S, reinterpret_cast<T*>(a), S, l);
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "direct_rfft2", [&] {
    rfft2_t<scalar_t>(x.data_ptr<scalar_t>(), reinterpret_cast<scalar_t*>(out.data_ptr()), N, m0, m1, moved,
                      tables<scalar_t>(cos0, sin0, cos1, sin1));
  });
}

void direct_irfft2(const at::Tensor& spec, at::Tensor& out, bool moved, const at::Tensor& cos0, const at::Tensor& sin0,
                   const at::Tensor& cosw1, const at::Tensor& sinw1) {
  const int64_t m0 = out.size(-2), m1 = out.size(-1), N = out.numel() / (m0 * m1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "direct_irfft2", [&] {
    irfft2_t<scalar_t>(reinterpret_cast<const scalar_t*>(spec.data_ptr()), out.data_ptr<scalar_t>(), N, m0, m1, moved,
                       tables<scalar_t>(cos0, sin0, cosw1, sinw1));
  });
}

}  // namespace cpu
}  // namespace pymks_vae
