// Small 2D real transforms as matrix products.
//
// MKL's transforms of lengths with a large prime factor run far below its speed on smooth lengths
// on the CPU measured (the 2-core AMD EPYC, where its generic kernels run): the 2D transform of 32
// fields of 47^2 took 2.3 ms against 0.19 ms for 64^2. There a DFT written as matrix products,
// whose cost grows as m0 m1 (m0 + m1) per field whatever the factors, is faster.
//
// Two forms of the products, the same transform:
// * dense (grids under 25^2): r2c as A = x_rows . T1 over the last axis (rows (n, j0), T1 (m1, 2 h1)
//   holding cos and -sin of 2 pi j1 k1 / m1 interleaved, so that A is (N, m0, h1) complex), then
//   X_n = F0 . A_n over the first axis (F0 = exp(-2 pi i j0 k0 / m0), one batched complex product
//   into the output); the c2r reverses them, Z_n = conj(F0) . S_n, then Z's rows times T1inv
//   (2 h1, m1) holding w_k cos and -w_k sin of 2 pi k1 j1 / m1 times the scale (w_k = 1 for the bins
//   without a partner in the half spectrum, else 2; the sines of those bins are 0, which drops
//   their imaginary parts as c2r does). About m0 m1 (m1 + 2 m0) real multiply-adds per field.
// * symmetric (larger grids): cos(2 pi j k / m) is even and sin odd in j and in k, so each axis's
//   products take the even and odd parts of their input along it (e_j = v_j + v_{m-j},
//   o_j = v_j - v_{m-j}, j <= m / 2) against half tables of cosines and sines, and give the bins
//   k and m - k from the same two sums: with C = Cos . e and S = Sin . o, X_k = C - i S and
//   X_{m-k} = C + i S. The first axis's complex data are taken as real and imaginary planes, so
//   that its products are real ones too, over every field of a block (that axis outermost). About
//   m0 m1 (m0 + m1) / 2 multiply-adds per field, a third of the dense form's on square grids, at
//   the cost of four passes over the data; they run over blocks of fields that stay in cache.
// Timed against each other (windowed loss, forward + backward, B = 32, one thread, thread CPU time,
// alternating): the symmetric form took 1.17-1.19x the dense form's time at 15^2-19^2, 1.05-1.13x
// at 21^2-23^2, 0.93-0.94x at 25^2-31^2, 0.81-0.84x at 33^2-39^2, 0.66-0.71x at 45^2-63^2 and
// 0.57x at 101^2.
//
// Against MKL (the same loss and timing, 8 rounds; the products' time over MKL's): 0.23-0.89x on
// the sides m <= 127 whose largest prime factor p >= 17 has m <= 3p (0.83x at 17 and 19, 0.59x at
// 23, 0.23-0.71x on 29-62, 0.37-0.58x on 67-127 but 0.75-0.89x on 106, 118, 122), 0.58-0.71x on
// their odd multiples 85, 95, 115 (5p) and 119 (7p) and 0.47-0.60x on the primes 131-223;
// 0.78-1.05x on 4p and 6p (68, 76, 92, 102, 114, 116, 124) and on the primes 251-401 (0.75-0.80x,
// rounds 0.55-1.07x), 1.40x at 503;
// 0.72-0.97x on the odd sides 21-63 with small factors (21 0.95, 25 0.97, 27 0.85, 33 0.78,
// 39 0.72, 45 0.85, 63 0.78); 1.1-2.4x on the even smooth sides (32 1.36, 64 1.97, 128 2.39),
// 1.29x at 15 and 1.19-1.35x on 105, 121, 125. Hence the fixed rule (gemm_dft_rule): every side
// m <= 127 with p >= 17 and m / p odd or at most 3, and the primes up to 223.
//
// That rule is one CPU's: where MKL runs its optimised kernels (Intel) the crossover can move. So
// by default the rule only names candidates (with more sides, see side_candidate), and the first
// call of each kind on a candidate grid times both routes on its own input (trials, in
// transforms.cpp) and keeps the faster for the calls of that kind that follow; against the rule
// only by a margin and when a second trial in the same call agrees (gemm_dft_record). Results then
// depend on a timing in their last bits, so the fixed rule decides alone under torch's
// deterministic algorithms, with PYMKS_VAE_GEMM_DFT=rule, or after set_gemm_dft_trials(false).
// Tables are built in double with the phases reduced modulo m in integers (exact for any size).
#include "cpu/gemm_dft.h"

#include <pthread.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/trig_tables.h"

namespace pymks_vae {
namespace cpu {
namespace {

constexpr int64_t kMaxRuleSide = 127, kMaxRulePrime = 223, kMaxCandidateSide = 401;
constexpr int64_t kSymmetricArea = 25 * 25;  // the symmetric form from this area on
constexpr int64_t kMinPrime = 17;

thread_local bool tl_gemm_dft = true;
thread_local bool tl_trials = true;

// PYMKS_VAE_GEMM_DFT: "0" turns the route off, "rule" keeps the fixed rule (no trials). Read at
// every call, so that a process can pin it for a stretch (train_lines.py's reproducible runs).
const char* env_setting() { return std::getenv("PYMKS_VAE_GEMM_DFT"); }
bool env_enabled() { return env_setting() == nullptr || std::strcmp(env_setting(), "0") != 0; }
bool env_trials() { return env_setting() == nullptr || std::strcmp(env_setting(), "rule") != 0; }

// kind -> whether the products were timed faster. Pointers, renewed in a forked child (whose
// first transform must not wait on a lock another thread of the parent held).
std::mutex* g_trials_mutex_ptr = new std::mutex();
std::map<std::vector<int64_t>, bool>* g_trials_ptr = new std::map<std::vector<int64_t>, bool>();
const int g_trials_atfork = pthread_atfork(nullptr, nullptr, [] {
  g_trials_mutex_ptr = new std::mutex();
  g_trials_ptr = new std::map<std::vector<int64_t>, bool>();
});
std::atomic<double> g_bias{1.0};
constexpr size_t kMaxTrials = 256;
constexpr double kTrialMargin = 1.15;

std::vector<int64_t> trial_key(const GemmDftKind& k) {
  int64_t bucket = 0;  // batches within a factor of 2 share a trial
  for (int64_t b = k.batch; b > 1; b >>= 1) ++bucket;
  return {k.m0, k.m1, bucket, k.is_double, k.inverse, k.moved, k.strided, at::get_num_threads()};
}

int64_t largest_prime_factor(int64_t n) {
  int64_t largest = 1;
  for (int64_t p = 2; p * p <= n; ++p)
    while (n % p == 0) {
      largest = p;
      n /= p;
    }
  return n > 1 ? n : largest;
}

bool rule_side(int64_t m) {
  const int64_t p = largest_prime_factor(m);
  if (p < kMinPrime) return false;
  if (m <= kMaxRuleSide) return m <= 3 * p || (m / p) % 2 == 1;
  return m == p && m <= kMaxRulePrime;
}

// The sides on which the products are timed against the transforms: the rule's, the other
// multiples of a prime p >= 17 up to 401 (4p and 6p up to 127 came within 12% of MKL either way on
// the CPU measured, and the primes 251-401 within 25% with rounds past it) and the odd sides
// 21-63, whose factors are small but where the products came within reach of MKL (see the top of
// this file). Never the even smooth sides (1.1-2.4x MKL's time) nor 15 (1.29x) nor 503 (1.40x).
bool side_candidate(int64_t m) {
  if (largest_prime_factor(m) >= kMinPrime && m <= kMaxCandidateSide) return true;
  return m % 2 == 1 && m >= 21 && m <= 63;
}

enum class Table { kForwardLast, kInverseLast, kFirst, kFirstConj };

// A table for side m (and the scale of kInverseLast), built in double, cached (trig_tables.h).
at::Tensor table(Table which, int64_t m, double scale, at::ScalarType real) {
  using Key = std::tuple<int, int64_t, double, int>;
  const Key key{static_cast<int>(which), m, which == Table::kInverseLast ? scale : 1.0, static_cast<int>(real)};
  static auto* cache = new TableCache<Key>(64);
  return cache->get(key, [&] {
    const UnitCircle u(m);
    const int64_t h = m / 2 + 1;
    switch (which) {
      case Table::kForwardLast: {  // (m, 2h): [j][2k] = cos, [j][2k + 1] = -sin of 2 pi j k / m
        auto d = at::empty({m, 2 * h}, at::kDouble);
        double* p = d.data_ptr<double>();
        for (int64_t j = 0; j < m; ++j)
          for (int64_t k = 0; k < h; ++k) {
            const int64_t a = (j * k) % m;
            p[j * 2 * h + 2 * k] = u.c[a];
            p[j * 2 * h + 2 * k + 1] = -u.s[a];
          }
        return d.to(real);
      }
      case Table::kInverseLast: {  // (2h, m): [2k][j] = w cos, [2k + 1][j] = -w sin, times scale
        auto d = at::empty({2 * h, m}, at::kDouble);
        double* p = d.data_ptr<double>();
        for (int64_t k = 0; k < h; ++k) {
          const double w = scale * ((k == 0 || 2 * k == m) ? 1.0 : 2.0);
          for (int64_t j = 0; j < m; ++j) {
            const int64_t a = (j * k) % m;
            p[2 * k * m + j] = w * u.c[a];
            p[(2 * k + 1) * m + j] = -w * u.s[a];
          }
        }
        return d.to(real);
      }
      case Table::kFirst:
      case Table::kFirstConj:
        break;
    }
    // (m, m) complex exp(-+ 2 pi i a b / m)
    const double sign = which == Table::kFirst ? -1.0 : 1.0;
    auto d = at::empty({m, m, 2}, at::kDouble);
    double* p = d.data_ptr<double>();
    for (int64_t a = 0; a < m; ++a)
      for (int64_t b = 0; b < m; ++b) {
        const int64_t ph = (a * b) % m;
        p[(a * m + b) * 2] = u.c[ph];
        p[(a * m + b) * 2 + 1] = sign * u.s[ph];
      }
    return at::view_as_complex(d.to(real));
  });
}

// The half tables of the symmetric products (see gemm_rfft2): for side m, h = m / 2 + 1 and
// o = (m - 1) / 2,
//   kCos   (h, h)  cos(2 pi j k / m),
//   kSin   (o, h)  sin(2 pi (j + 1) k / m),
//   kCosW  (h, h)  [k][j] = scale w_k cos(2 pi j k / m),
//   kSinW  (h, o)  [k][j] = scale w_k sin(2 pi k (j + 1) / m),
// with w_k = 1 for the bins without a partner in the half spectrum (0 and m / 2), else 2.
enum class Half { kCos, kSin, kCosW, kSinW };

at::Tensor half_table(Half which, int64_t m, double scale, at::ScalarType real) {
  using Key = std::tuple<int, int64_t, double, int>;
  const bool weighted = which == Half::kCosW || which == Half::kSinW;
  const Key key{static_cast<int>(which), m, weighted ? scale : 1.0, static_cast<int>(real)};
  static auto* cache = new TableCache<Key>(64);
  return cache->get(key, [&] {
    const UnitCircle u(m);
    const int64_t h = m / 2 + 1, o = (m - 1) / 2;
    const int64_t rows = which == Half::kSin ? o : h, cols = which == Half::kSinW ? o : h;
    auto d = at::empty({rows, cols}, at::kDouble);
    double* p = d.data_ptr<double>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const double w = weighted ? scale * ((r == 0 || 2 * r == m) ? 1.0 : 2.0) : 1.0;
        switch (which) {
          case Half::kCos:
          case Half::kCosW:
            p[r * cols + c] = w * u.c[(r * c) % m];
            break;
          case Half::kSin:
            p[r * cols + c] = u.s[((r + 1) * c) % m];
            break;
          case Half::kSinW:
            p[r * cols + c] = w * u.s[(r * (c + 1)) % m];
            break;
        }
      }
    return d.to(real);
  });
}

// Work on items (fields or rows) [n0, n1) in blocks big enough to be worth a thread.
template <class F>
void for_fields(int64_t N, int64_t per_field, F f) {
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_field)), f);
}

// The passes between the products, for real type T. Along a side m the even and odd parts of a
// sequence v are e_0 = v_0, e_j = v_j + v_{m-j} (1 <= j <= o), e_{m/2} = v_{m/2} for even m, and
// o_j = v_{j+1} - v_{m-j-1} (0 <= j < o).

// Rows of x (R, m) -> e (R, h), and the odd parts negated, -o (R, o) (the r2c's sines are -sin).
template <typename T>
void split_rows(const T* x, T* e, T* od, int64_t R, int64_t m) {
  const int64_t h = m / 2 + 1, o = (m - 1) / 2;
  for_fields(R, m, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* v = x + r * m;
      T* er = e + r * h;
      T* orow = od + r * o;
      er[0] = v[0];
      for (int64_t j = 1; j <= o; ++j) {
        er[j] = v[j] + v[m - j];
        orow[j - 1] = v[m - j] - v[j];
      }
      if (m % 2 == 0) er[m / 2] = v[m / 2];
    }
  });
}

// The first axis's even and odd parts of the complex planes re, im (N, m0, c), written with that
// axis outermost: e (h0, 2, N, c) and o (o0, 2, N, c), real and imaginary planes side by side.
template <typename T>
void split_first(const T* re, const T* im, T* e, T* od, int64_t N, int64_t m0, int64_t c) {
  const int64_t h0 = m0 / 2 + 1, o0 = (m0 - 1) / 2;
  for_fields(N, m0 * c, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int p = 0; p < 2; ++p) {
        const T* v = (p == 0 ? re : im) + n * m0 * c;
        for (int64_t j = 0; j < h0; ++j) {
          T* dst = e + ((j * 2 + p) * N + n) * c;
          const T* a = v + j * c;
          if (j == 0 || 2 * j == m0) {
            std::memcpy(dst, a, sizeof(T) * c);
          } else {
            const T* b = v + (m0 - j) * c;
            for (int64_t q = 0; q < c; ++q) dst[q] = a[q] + b[q];
          }
        }
        for (int64_t j = 1; j <= o0; ++j) {
          T* dst = od + (((j - 1) * 2 + p) * N + n) * c;
          const T* a = v + j * c;
          const T* b = v + (m0 - j) * c;
          for (int64_t q = 0; q < c; ++q) dst[q] = a[q] - b[q];
        }
      }
  });
}

// As split_first, from interleaved complex spectra: natural (N, m0, c) or moved (N, c, m0).
template <typename T>
void split_first_complex(const T* s, T* e, T* od, int64_t N, int64_t m0, int64_t c, bool moved) {
  const int64_t h0 = m0 / 2 + 1, o0 = (m0 - 1) / 2;
  const int64_t sk = moved ? 2 : 2 * c, sq = moved ? 2 * m0 : 2;  // strides of k0 and the column
  for_fields(N, m0 * c, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* v = s + n * 2 * m0 * c;
      for (int64_t j = 0; j < h0; ++j) {
        T* dr = e + ((j * 2) * N + n) * c;
        T* di = e + ((j * 2 + 1) * N + n) * c;
        const T* a = v + j * sk;
        if (j == 0 || 2 * j == m0) {
          for (int64_t q = 0; q < c; ++q) {
            dr[q] = a[q * sq];
            di[q] = a[q * sq + 1];
          }
        } else {
          const T* b = v + (m0 - j) * sk;
          for (int64_t q = 0; q < c; ++q) {
            dr[q] = a[q * sq] + b[q * sq];
            di[q] = a[q * sq + 1] + b[q * sq + 1];
          }
        }
      }
      for (int64_t j = 1; j <= o0; ++j) {
        T* dr = od + (((j - 1) * 2) * N + n) * c;
        T* di = od + (((j - 1) * 2 + 1) * N + n) * c;
        const T* a = v + j * sk;
        const T* b = v + (m0 - j) * sk;
        for (int64_t q = 0; q < c; ++q) {
          dr[q] = a[q * sq] - b[q * sq];
          di[q] = a[q * sq + 1] - b[q * sq + 1];
        }
      }
    }
  });
}

// The r2c's first axis put together: from C = Cos . e and S = Sin^T . o (h0, 2, N, c),
// X_k = C_k - i S_k and X_{m0-k} = C_k + i S_k, into interleaved out, natural or moved.
template <typename T>
void join_forward(const T* C, const T* S, T* out, int64_t N, int64_t m0, int64_t c, bool moved) {
  const int64_t h0 = m0 / 2 + 1, o0 = (m0 - 1) / 2;
  const int64_t sk = moved ? 2 : 2 * c, sq = moved ? 2 * m0 : 2;
  for_fields(N, m0 * c, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* v = out + n * 2 * m0 * c;
      for (int64_t k = 0; k < h0; ++k) {
        const T* cr = C + ((k * 2) * N + n) * c;
        const T* ci = C + ((k * 2 + 1) * N + n) * c;
        const T* sr = S + ((k * 2) * N + n) * c;
        const T* si = S + ((k * 2 + 1) * N + n) * c;
        T* a = v + k * sk;
        for (int64_t q = 0; q < c; ++q) {
          a[q * sq] = cr[q] + si[q];
          a[q * sq + 1] = ci[q] - sr[q];
        }
        if (k >= 1 && k <= o0) {
          T* b = v + (m0 - k) * sk;
          for (int64_t q = 0; q < c; ++q) {
            b[q * sq] = cr[q] - si[q];
            b[q * sq + 1] = ci[q] + sr[q];
          }
        }
      }
    }
  });
}

// The c2r's first axis put together: Z_j = C_j + i S_j and Z_{m0-j} = C_j - i S_j, as planes
// zr, zi (N, m0, c).
template <typename T>
void join_inverse(const T* C, const T* S, T* zr, T* zi, int64_t N, int64_t m0, int64_t c) {
  const int64_t h0 = m0 / 2 + 1, o0 = (m0 - 1) / 2;
  for_fields(N, m0 * c, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t j = 0; j < h0; ++j) {
        const T* cr = C + ((j * 2) * N + n) * c;
        const T* ci = C + ((j * 2 + 1) * N + n) * c;
        const T* sr = S + ((j * 2) * N + n) * c;
        const T* si = S + ((j * 2 + 1) * N + n) * c;
        T* ar = zr + (n * m0 + j) * c;
        T* ai = zi + (n * m0 + j) * c;
        for (int64_t q = 0; q < c; ++q) {
          ar[q] = cr[q] - si[q];
          ai[q] = ci[q] + sr[q];
        }
        if (j >= 1 && j <= o0) {
          T* br = zr + (n * m0 + m0 - j) * c;
          T* bi = zi + (n * m0 + m0 - j) * c;
          for (int64_t q = 0; q < c; ++q) {
            br[q] = cr[q] + si[q];
            bi[q] = ci[q] - sr[q];
          }
        }
      }
  });
}

// Rows of the c2r's last axis put together: out_0 = P_0, out_j = P_j - Q_{j-1} and
// out_{m-j} = P_j + Q_{j-1} (1 <= j <= o), out_{m/2} = P_{m/2} for even m.
template <typename T>
void join_rows(const T* P, const T* Q, T* out, int64_t R, int64_t m) {
  const int64_t h = m / 2 + 1, o = (m - 1) / 2;
  for_fields(R, m, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* p = P + r * h;
      const T* q = Q + r * o;
      T* v = out + r * m;
      v[0] = p[0];
      for (int64_t j = 1; j <= o; ++j) {
        v[j] = p[j] - q[j - 1];
        v[m - j] = p[j] + q[j - 1];
      }
      if (m % 2 == 0) v[m / 2] = p[m / 2];
    }
  });
}

// Fields per block: the products and passes run over blocks of fields of about 512 KB, so that
// the intermediates stay in cache between the passes (at 101^2, one thread, the operator's forward
// + backward took 0.87x the time of one block of all 64 fields; 0.88x with 256 KB, 0.89x with
// 1 MB, 0.90x with 128 KB; at 51^2 and 21^2 within noise of it).
int64_t block_fields(int64_t m0, int64_t m1, int64_t elem) {
  constexpr int64_t kBlockBytes = 512 * 1024;
  return std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, m0 * m1 * elem));
}

// The first axis's buffers for a block of up to nb fields of (m0, c) complex values: its even and
// odd parts (h0 | o0, 2, n, c) and their products with the half tables, C = Cos . e and
// S = Sin^T . o (h0, 2, n, c); head(n) views the first n fields' part of each, contiguous.
struct FirstAxisBlock {
  at::Tensor e, o, c, s;
  FirstAxisBlock(int64_t m0, int64_t nb, int64_t cols, const at::TensorOptions& opt)
      : e(at::empty({(m0 / 2 + 1) * 2 * nb * cols}, opt)),
        o(at::empty({((m0 - 1) / 2) * 2 * nb * cols}, opt)),
        c(at::empty({(m0 / 2 + 1) * 2 * nb * cols}, opt)),
        s(at::empty({(m0 / 2 + 1) * 2 * nb * cols}, opt)) {}
  FirstAxisBlock(at::Tensor e_, at::Tensor o_, at::Tensor c_, at::Tensor s_)
      : e(std::move(e_)), o(std::move(o_)), c(std::move(c_)), s(std::move(s_)) {}
  FirstAxisBlock head(int64_t m0, int64_t n, int64_t cols) const {
    const int64_t h0 = m0 / 2 + 1, o0 = (m0 - 1) / 2, w = 2 * n * cols;
    return {e.narrow(0, 0, h0 * w).view({h0, w}), o.narrow(0, 0, o0 * w).view({o0, w}),
            c.narrow(0, 0, h0 * w).view({h0, w}), s.narrow(0, 0, h0 * w).view({h0, w})};
  }
  // C and S from the parts (on a head).
  void products(const at::Tensor& cos0, const at::Tensor& sin0t) {
    at::mm_out(c, cos0, e);
    at::mm_out(s, sin0t, o);
  }
};

// The two forms, on inputs gemm_rfft2 / gemm_irfft2 have checked (at least one field).
void symmetric_rfft2(const at::Tensor& x, at::Tensor& out, bool moved) {
  const int64_t m0 = x.size(-2), m1 = x.size(-1), h1 = m1 / 2 + 1, N = x.numel() / (m0 * m1);
  const int64_t o1 = (m1 - 1) / 2;
  const auto real = x.scalar_type();
  const auto opt = x.options();
  const int64_t nb = std::min(N, block_fields(m0, m1, x.element_size()));
  // The last axis, over every row: real parts e . Cos, imaginary parts (-o) . Sin.
  auto e = at::empty({nb * m0, h1}, opt), od = at::empty({nb * m0, o1}, opt);
  auto re = at::empty({nb * m0, h1}, opt), im = at::empty({nb * m0, h1}, opt);
  // The first axis's even and odd parts, that axis outermost: (h0 | o0, 2, n, h1).
  const FirstAxisBlock first(m0, nb, h1, opt);
  const auto cos1 = half_table(Half::kCos, m1, 1.0, real), sin1 = half_table(Half::kSin, m1, 1.0, real);
  const auto cos0 = half_table(Half::kCos, m0, 1.0, real), sin0t = half_table(Half::kSin, m0, 1.0, real).t();
  for (int64_t b0 = 0; b0 < N; b0 += nb) {
    const int64_t n = std::min(nb, N - b0);
    auto e_ = e.narrow(0, 0, n * m0), od_ = od.narrow(0, 0, n * m0), re_ = re.narrow(0, 0, n * m0),
         im_ = im.narrow(0, 0, n * m0);
    auto f = first.head(m0, n, h1);
    AT_DISPATCH_FLOATING_TYPES(real, "gemm_rfft2", [&] {
      split_rows<scalar_t>(x.data_ptr<scalar_t>() + b0 * m0 * m1, e_.data_ptr<scalar_t>(), od_.data_ptr<scalar_t>(),
                           n * m0, m1);
      at::mm_out(re_, e_, cos1);
      at::mm_out(im_, od_, sin1);
      split_first<scalar_t>(re_.data_ptr<scalar_t>(), im_.data_ptr<scalar_t>(), f.e.data_ptr<scalar_t>(),
                            f.o.data_ptr<scalar_t>(), n, m0, h1);
      f.products(cos0, sin0t);
      join_forward<scalar_t>(f.c.data_ptr<scalar_t>(), f.s.data_ptr<scalar_t>(),
                             reinterpret_cast<scalar_t*>(out.data_ptr()) + 2 * b0 * m0 * h1, n, m0, h1, moved);
    });
  }
}

void symmetric_irfft2(const at::Tensor& spec, at::Tensor& out, double scale, bool moved) {
  const int64_t m0 = out.size(-2), m1 = out.size(-1), h1 = m1 / 2 + 1, N = out.numel() / (m0 * m1);
  const int64_t o1 = (m1 - 1) / 2;
  const auto real = out.scalar_type();
  const auto opt = out.options();
  const int64_t nb = std::min(N, block_fields(m0, m1, out.element_size()));
  // The first axis, inverted as complex data from its even and odd parts (h0 | o0, 2, n, h1).
  const FirstAxisBlock first(m0, nb, h1, opt);
  auto zr = at::empty({nb * m0, h1}, opt), zi = at::empty({nb * m0, h1}, opt);
  // The last axis, complex to real over every row: P = Zr . CosW, Q = Zi . SinW (scaled; the
  // sines of bins 0 and m1 / 2 are 0, which drops their imaginary parts as c2r does).
  auto pr = at::empty({nb * m0, h1}, opt), qr = at::empty({nb * m0, o1}, opt);
  const auto cos0 = half_table(Half::kCos, m0, 1.0, real), sin0t = half_table(Half::kSin, m0, 1.0, real).t();
  const auto cosw = half_table(Half::kCosW, m1, scale, real), sinw = half_table(Half::kSinW, m1, scale, real);
  for (int64_t b0 = 0; b0 < N; b0 += nb) {
    const int64_t n = std::min(nb, N - b0);
    auto f = first.head(m0, n, h1);
    auto zr_ = zr.narrow(0, 0, n * m0), zi_ = zi.narrow(0, 0, n * m0), pr_ = pr.narrow(0, 0, n * m0),
         qr_ = qr.narrow(0, 0, n * m0);
    AT_DISPATCH_FLOATING_TYPES(real, "gemm_irfft2", [&] {
      split_first_complex<scalar_t>(reinterpret_cast<const scalar_t*>(spec.data_ptr()) + 2 * b0 * m0 * h1,
                                    f.e.data_ptr<scalar_t>(), f.o.data_ptr<scalar_t>(), n, m0, h1, moved);
      f.products(cos0, sin0t);
      join_inverse<scalar_t>(f.c.data_ptr<scalar_t>(), f.s.data_ptr<scalar_t>(), zr_.data_ptr<scalar_t>(),
                             zi_.data_ptr<scalar_t>(), n, m0, h1);
      at::mm_out(pr_, zr_, cosw);
      at::mm_out(qr_, zi_, sinw);
      join_rows<scalar_t>(pr_.data_ptr<scalar_t>(), qr_.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + b0 * m0 * m1,
                          n * m0, m1);
    });
  }
}

void dense_rfft2(const at::Tensor& x, at::Tensor& out, bool moved) {
  const int64_t m0 = x.size(-2), m1 = x.size(-1), h1 = m1 / 2 + 1, N = x.numel() / (m0 * m1);
  const auto real = x.scalar_type();
  // The last axis: one real product over every row of every field, (N m0, m1) . (m1, 2 h1).
  const auto a = at::mm(x.view({N * m0, m1}), table(Table::kForwardLast, m1, 1.0, real));
  const auto a_c = at::view_as_complex(a.view({N, m0, h1, 2}));
  // The first axis: F0 . A_n for every field, into the output; in the moved layout its transpose
  // A_n^T . F0 (F0 is symmetric), the transposed A read in place by the product.
  const auto f0 = table(Table::kFirst, m0, 1.0, real).expand({N, m0, m0});
  if (moved) {
    auto o = out.view({N, h1, m0});
    at::bmm_out(o, a_c.transpose(1, 2), f0);
  } else {
    auto o = out.view({N, m0, h1});
    at::bmm_out(o, f0, a_c);
  }
}

void dense_irfft2(const at::Tensor& spec, at::Tensor& out, double scale, bool moved) {
  const int64_t m0 = out.size(-2), m1 = out.size(-1), h1 = m1 / 2 + 1, N = out.numel() / (m0 * m1);
  const auto real = out.scalar_type();
  // The first axis, inverted as complex data: conj(F0) . S_n for every field (S_n read transposed
  // in place from the moved layout).
  const auto s = moved ? spec.view({N, h1, m0}).transpose(1, 2) : spec.view({N, m0, h1});
  const auto z = at::bmm(table(Table::kFirstConj, m0, 1.0, real).expand({N, m0, m0}), s);
  // The last axis, complex to real over every row: (N m0, 2 h1) . (2 h1, m1), scaled by the table.
  auto o = out.view({N * m0, m1});
  at::mm_out(o, at::view_as_real(z).reshape({N * m0, 2 * h1}), table(Table::kInverseLast, m1, scale, real));
}

}  // namespace

bool gemm_dft_rule(at::IntArrayRef grid) {
  if (grid.size() != 2) return false;
  for (auto m : grid)
    if (!rule_side(m)) return false;
  return true;
}

bool gemm_dft_candidate(at::IntArrayRef grid) {
  if (!tl_gemm_dft || !env_enabled() || grid.size() != 2) return false;
  for (auto m : grid)
    if (!side_candidate(m)) return false;
  return true;
}

GemmDftChoice gemm_dft_choice(const GemmDftKind& kind) {
  const int64_t g[2] = {kind.m0, kind.m1};
  const GemmDftChoice rule = gemm_dft_rule(g) ? GemmDftChoice::kProducts : GemmDftChoice::kTransforms;
  if (!tl_trials || !env_trials() || at::globalContext().deterministicAlgorithms()) return rule;
  std::lock_guard<std::mutex> lock(*g_trials_mutex_ptr);
  const auto it = g_trials_ptr->find(trial_key(kind));
  if (it != g_trials_ptr->end()) return it->second ? GemmDftChoice::kProducts : GemmDftChoice::kTransforms;
  // Kinds past the bound keep the rule rather than forget the others (whose calls would be timed
  // again, and could change route mid-run).
  return g_trials_ptr->size() >= kMaxTrials ? rule : GemmDftChoice::kTrial;
}

GemmDftVerdict gemm_dft_record(const GemmDftKind& kind, double t_products, double t_transforms, bool confirming) {
  // Trials overturn the fixed rule only by a margin and twice in a row: on the noisy 2-core VM a
  // single trial at 101^2 (where the products take about 0.6x MKL's time) picked MKL in 4 of 30
  // repeats with neither, and in 1 of 30 with the margin alone.
  const int64_t g[2] = {kind.m0, kind.m1};
  const auto verdict = gemm_dft_verdict(g, t_products * g_bias.load(), t_transforms, confirming);
  if (verdict == GemmDftVerdict::kConfirm) return verdict;
  std::lock_guard<std::mutex> lock(*g_trials_mutex_ptr);
  if (g_trials_ptr->size() < kMaxTrials) (*g_trials_ptr)[trial_key(kind)] = verdict == GemmDftVerdict::kProducts;
  return verdict;
}

GemmDftVerdict gemm_dft_verdict(at::IntArrayRef grid, double t_products, double t_transforms, bool confirming) {
  const bool rule = gemm_dft_rule(grid);
  const double margin = rule ? kTrialMargin : 1.0 / kTrialMargin;
  const bool products = t_products < t_transforms * margin;
  if (products != rule && !confirming) return GemmDftVerdict::kConfirm;
  return products ? GemmDftVerdict::kProducts : GemmDftVerdict::kTransforms;
}

bool set_gemm_dft(bool enabled) {
  const bool prev = tl_gemm_dft;
  tl_gemm_dft = enabled;
  return prev;
}

bool set_gemm_dft_trials(bool enabled) {
  const bool prev = tl_trials;
  tl_trials = enabled;
  return prev;
}

int64_t gemm_dft_trials() {
  std::lock_guard<std::mutex> lock(*g_trials_mutex_ptr);
  return static_cast<int64_t>(g_trials_ptr->size());
}

void clear_gemm_dft_trials() {
  std::lock_guard<std::mutex> lock(*g_trials_mutex_ptr);
  g_trials_ptr->clear();
}

double set_gemm_dft_trial_bias(double bias) {
  TORCH_CHECK(std::isfinite(bias) && bias > 0.0, "set_gemm_dft_trial_bias: bias must be a finite number > 0, got ",
              bias);
  return g_bias.exchange(bias);
}

void gemm_rfft2(const at::Tensor& x, at::Tensor& out, bool moved) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous() && out.is_contiguous(), "gemm_rfft2: contiguous fields expected");
  const int64_t m0 = x.size(-2), m1 = x.size(-1), h1 = m1 / 2 + 1, N = m0 * m1 > 0 ? x.numel() / (m0 * m1) : 0;
  TORCH_CHECK(out.numel() == N * m0 * h1 && out.scalar_type() == c10::toComplexType(x.scalar_type()) &&
                  out.size(-1) == (moved ? m0 : h1) && out.size(-2) == (moved ? h1 : m0),
              "gemm_rfft2: the output does not fit");
  if (N == 0) return;
  if (m0 * m1 < kSymmetricArea) return dense_rfft2(x, out, moved);
  symmetric_rfft2(x, out, moved);
}

void gemm_irfft2(const at::Tensor& spec, at::Tensor& out, double scale, bool moved) {
  TORCH_CHECK(spec.dim() >= 2 && spec.is_contiguous() && out.is_contiguous() && spec.is_complex(),
              "gemm_irfft2: contiguous spectra expected");
  const int64_t m0 = out.size(-2), m1 = out.size(-1), h1 = m1 / 2 + 1;
  const int64_t N = m0 * m1 > 0 ? out.numel() / (m0 * m1) : 0;
  TORCH_CHECK(spec.numel() == N * m0 * h1 && spec.size(-1) == (moved ? m0 : h1) && spec.size(-2) == (moved ? h1 : m0) &&
                  spec.scalar_type() == c10::toComplexType(out.scalar_type()),
              "gemm_irfft2: the spectra do not fit the output");
  if (N == 0) return;
  if (m0 * m1 < kSymmetricArea) return dense_irfft2(spec, out, scale, moved);
  symmetric_irfft2(spec, out, scale, moved);
}

namespace {

// Tables of the window transforms (window_products), built in double and cached. Lag i of a
// window of w is i - w / 2; its phase with bin k is (k lag) mod m, reduced in integers.
enum class Win { kRealForward, kForward, kInverseToWindow, kRealPart };

at::Tensor window_table(Win which, int64_t m, int64_t w, at::ScalarType real) {
  using Key = std::tuple<int, int64_t, int64_t, int>;
  static auto* cache = new TableCache<Key>(64);
  return cache->get(Key{static_cast<int>(which), m, w, static_cast<int>(real)}, [&] {
    const UnitCircle u(m);
    const int64_t hw = w / 2, h = m / 2 + 1;
    auto phase = [&](int64_t i, int64_t k) { return ((((i - hw) % m + m) % m) * k) % m; };
    at::Tensor d;
    switch (which) {
      case Win::kRealForward: {  // (w, 2h): x_i . (cos, -sin)
        d = at::empty({w, 2 * h}, at::kDouble);
        double* p = d.data_ptr<double>();
        for (int64_t i = 0; i < w; ++i)
          for (int64_t k = 0; k < h; ++k) {
            p[i * 2 * h + 2 * k] = u.c[phase(i, k)];
            p[i * 2 * h + 2 * k + 1] = -u.s[phase(i, k)];
          }
        break;
      }
      case Win::kForward: {  // (2w, 2m): (re, im)_i times exp(-i theta) as a real block
        d = at::empty({2 * w, 2 * m}, at::kDouble);
        double* p = d.data_ptr<double>();
        for (int64_t i = 0; i < w; ++i)
          for (int64_t k = 0; k < m; ++k) {
            const double c = u.c[phase(i, k)], s = -u.s[phase(i, k)];
            p[(2 * i) * 2 * m + 2 * k] = c;
            p[(2 * i) * 2 * m + 2 * k + 1] = s;
            p[(2 * i + 1) * 2 * m + 2 * k] = -s;
            p[(2 * i + 1) * 2 * m + 2 * k + 1] = c;
          }
        break;
      }
      case Win::kInverseToWindow: {  // (2m, 2w): (re, im)_k times exp(+i theta) / m
        d = at::empty({2 * m, 2 * w}, at::kDouble);
        double* p = d.data_ptr<double>();
        const double inv = 1.0 / static_cast<double>(m);
        for (int64_t k = 0; k < m; ++k)
          for (int64_t i = 0; i < w; ++i) {
            const double c = inv * u.c[phase(i, k)], s = inv * u.s[phase(i, k)];
            p[(2 * k) * 2 * w + 2 * i] = c;
            p[(2 * k) * 2 * w + 2 * i + 1] = s;
            p[(2 * k + 1) * 2 * w + 2 * i] = -s;
            p[(2 * k + 1) * 2 * w + 2 * i + 1] = c;
          }
        break;
      }
      case Win::kRealPart: {  // (2w, m): Re((re + i im)_i exp(-i theta)) = re cos + im sin
        d = at::empty({2 * w, m}, at::kDouble);
        double* p = d.data_ptr<double>();
        for (int64_t i = 0; i < w; ++i)
          for (int64_t k = 0; k < m; ++k) {
            p[(2 * i) * m + k] = u.c[phase(i, k)];
            p[(2 * i + 1) * m + k] = u.s[phase(i, k)];
          }
        break;
      }
    }
    return d.to(real);
  });
}

// rows (.., n) of x as a (rows, n) real matrix (complex as interleaved pairs) times table.
at::Tensor rows_times(const at::Tensor& x, const at::Tensor& table, int64_t out_last, bool complex_out) {
  const auto xc = x.contiguous();
  const at::Tensor xr = xc.is_complex() ? at::view_as_real(xc) : xc;
  const int64_t cols = table.size(0), rows = cols > 0 ? xr.numel() / cols : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = out_last;
  const auto real = xr.scalar_type();
  at::Tensor out = at::empty(sizes, xc.options().dtype(complex_out ? c10::toComplexType(real) : real));
  auto o = (complex_out ? at::view_as_real(out) : out).view({rows, table.size(1)});
  at::mm_out(o, xr.reshape({rows, cols}), table);
  return out;
}

}  // namespace

bool window_products(const at::Tensor& t, int64_t m, int64_t w) {
  // At 51^2, three pairs with a cross pair, cutoff 20, ATen's pruned transforms were about 60% of
  // the loss's time. Up to w m = 12000 the products were faster than ATen's transforms (the loss with a cross pair,
  // ad-hoc, 0.75-0.84x at 51^2-223^2 with windows of 41-101 lags), level at 131^2 with 121 lags
  // (15700) and slower at 223^2 over the whole window (49700: 1.22x).
  constexpr int64_t kMaxWork = 12000;
  return t.device().is_cpu() && tl_gemm_dft && env_enabled() && rule_side(m) && w * m <= kMaxWork;
}

at::Tensor window_rfft_last(const at::Tensor& win, int64_t m) {
  return rows_times(win, window_table(Win::kRealForward, m, win.size(-1), win.scalar_type()), m / 2 + 1, true);
}

at::Tensor window_fft_last(const at::Tensor& win, int64_t m) {
  const auto real = c10::toRealValueType(win.scalar_type());
  return rows_times(win, window_table(Win::kForward, m, win.size(-1), real), m, true);
}

at::Tensor ifft_last_to_window(const at::Tensor& spec, int64_t w) {
  const auto real = c10::toRealValueType(spec.scalar_type());
  return rows_times(spec, window_table(Win::kInverseToWindow, spec.size(-1), w, real), w, true);
}

at::Tensor irfft_last(const at::Tensor& spec, int64_t m) {
  TORCH_CHECK(spec.size(-1) == m / 2 + 1, "irfft_last: ", spec.size(-1), " bins do not fit m = ", m);
  const auto real = c10::toRealValueType(spec.scalar_type());
  return rows_times(spec, table(Table::kInverseLast, m, 1.0 / static_cast<double>(m), real), m, false);
}

at::Tensor rfft_last_bins(const at::Tensor& x, int64_t bins) {
  TORCH_CHECK(bins >= 0 && bins <= x.size(-1) / 2 + 1, "rfft_last_bins: ", bins, " bins of a length ", x.size(-1));
  // The dense form's table of the last axis, its first `bins` bins (a strided view the product reads
  // in place).
  const auto t = table(Table::kForwardLast, x.size(-1), 1.0, x.scalar_type()).narrow(1, 0, 2 * bins);
  return rows_times(x, t, bins, true);
}

at::Tensor window_real_fft_last(const at::Tensor& win, int64_t m) {
  const auto real = c10::toRealValueType(win.scalar_type());
  return rows_times(win, window_table(Win::kRealPart, m, win.size(-1), real), m, false);
}

}  // namespace cpu
}  // namespace pymks_vae
