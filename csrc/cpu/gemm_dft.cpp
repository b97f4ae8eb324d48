// Small 2D real transforms without MKL (the "products" route of transforms.cpp), and the pruned
// one-dimensional window transforms of the windowed loss as matrix products.
//
// MKL's transforms of lengths with a large prime factor run far below its speed on smooth lengths
// on the CPU measured (the 2-core AMD EPYC, where its generic kernels run): the 2D transform of 32
// fields of 47^2 took 2.3 ms against 0.19 ms for 64^2. There a DFT written out, whose cost grows as
// m0 m1 (m0 + m1) per field whatever the factors, is faster; and on small grids of any factors,
// where MKL's cost is mostly per call and per line.
//
// The 2D transforms run in the direct form (direct_dft.cpp): cos(2 pi j k / m) is even and sin odd
// in j and in k, so each axis takes the even and odd parts of its input along it (e_j = v_j +
// v_{m-j} for j <= m / 2, o_j = v_j - v_{m-j} for 1 <= j <= (m - 1) / 2) against half tables of
// cosines and sines (half_table), and gives the bins k and m - k from the same two sums: with C =
// Cos . e and S = Sin . o, X_k = C - i S and X_{m-k} = C + i S; the first axis on the real and
// imaginary planes of the last axis's half spectrum. About m0 m1 (m0 + m1) / 2 multiply-adds per
// field, run as loops over groups of fields, one field per lane of a vector. It replaced two forms
// of matrix products (a dense one under 25^2 and the same sums as products over blocks of fields);
// the forward transform of 32 float32 fields (one thread, thread CPU time, 15 alternated rounds)
// took 0.40-0.65x their time at 15^2-45^2, 0.67-0.85x at 51^2-71^2, 0.81-0.94x at 79^2-131^2, 0.98x
// at 223^2 and 1.05x at 401^2, the inverse alike.
//
// Against MKL, measured with those matrix products (which the direct form only improves on): the
// windowed loss, forward + backward, B = 32, one thread, 8 rounds; the products' time over MKL's:
// 0.23-0.89x on the sides m <= 127 whose largest prime factor p >= 17 has m <= 3p (0.83x at 17 and
// 19, 0.59x at 23, 0.23-0.71x on 29-62, 0.37-0.58x on 67-127 but 0.75-0.89x on 106, 118, 122),
// 0.58-0.71x on their odd multiples 85, 95, 115 (5p) and 119 (7p) and 0.47-0.60x on the primes
// 131-223; 0.78-1.05x on 4p and 6p (68, 76, 92, 102, 114, 116, 124) and on the primes 251-401
// (0.75-0.80x, rounds 0.55-1.07x), 1.40x at 503; 0.72-0.97x on the odd sides 21-63 with small
// factors (21 0.95, 25 0.97, 27 0.85, 33 0.78, 39 0.72, 45 0.85, 63 0.78); 1.1-2.4x on the even
// smooth sides (32 1.36, 64 1.97, 128 2.39), 1.29x at 15 and 1.19-1.35x on 105, 121, 125. Hence the
// fixed rule (gemm_dft_rule): every side m <= 127 with p >= 17 and m / p odd or at most 3, and the
// primes up to 223.
//
// With the direct form, on the small sides (the operator, forward + backward, B = 32 two-state
// fields, the whole window, one thread, 6 alternated rounds; the direct form's time over MKL's):
// 0.59-0.86x on the odd sides 9-39 (21: 0.68, 27: 0.59, 39: 0.60), 0.68-0.90x on twice an odd side
// from 10 to 30, 0.85-1.00x on the multiples of 4 from 8 to 40 (32: 1.00); the windowed loss at
// cutoff 7 alike. So the rule also takes the sides 9-40 but the multiples of 4, and every side up
// to 40 is a candidate.
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
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/direct_dft.h"
#include "cpu/trig_tables.h"

namespace pymks_vae {
namespace cpu {
namespace {

constexpr int64_t kMaxRuleSide = 127, kMaxRulePrime = 223, kMaxCandidateSide = 401;
constexpr int64_t kMinPrime = 17;
// Small sides: every one a candidate, and in the rule from 9 on unless a multiple of 4.
constexpr int64_t kMinSmallRuleSide = 9, kMaxSmallSide = 40;

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

// The sides with a large prime factor where the 2D products beat MKL (see the top of this file);
// the window transforms' products take these sides only.
bool prime_rule_side(int64_t m) {
  const int64_t p = largest_prime_factor(m);
  if (p < kMinPrime) return false;
  if (m <= kMaxRuleSide) return m <= 3 * p || (m / p) % 2 == 1;
  return m == p && m <= kMaxRulePrime;
}

bool rule_side(int64_t m) {
  return (m >= kMinSmallRuleSide && m <= kMaxSmallSide && m % 4 != 0) || prime_rule_side(m);
}

// The sides on which the products are timed against the transforms: every side up to 40 (the
// direct form came within 15% of MKL or better on all of them), the rule's, the other multiples of
// a prime p >= 17 up to 401 (4p and 6p up to 127 came within 12% of MKL either way on the CPU
// measured, and the primes 251-401 within 25% with rounds past it) and the odd sides 21-63, whose
// factors are small but where the products came within reach of MKL (see the top of this file).
// Not the larger even smooth sides (1.1-2.4x MKL's time with the matrix products) nor 503 (1.40x).
bool side_candidate(int64_t m) {
  if (m <= kMaxSmallSide) return true;
  if (largest_prime_factor(m) >= kMinPrime && m <= kMaxCandidateSide) return true;
  return m % 2 == 1 && m >= 21 && m <= 63;
}

enum class Table { kForwardLast, kInverseLast };

// A table of the last axis's transforms for side m (and the scale of kInverseLast), built in
// double, cached (trig_tables.h):
//   kForwardLast (m, 2h): [j][2k] = cos, [j][2k + 1] = -sin of 2 pi j k / m;
//   kInverseLast (2h, m): [2k][j] = w_k cos, [2k + 1][j] = -w_k sin, times scale, with w_k = 1 for
//   the bins without a partner in the half spectrum (0 and m / 2), else 2.
at::Tensor table(Table which, int64_t m, double scale, at::ScalarType real) {
  using Key = std::tuple<int, int64_t, double, int>;
  const bool inverse = which == Table::kInverseLast;
  const Key key{static_cast<int>(which), m, inverse ? scale : 1.0, static_cast<int>(real)};
  static auto* cache = new TableCache<Key>(64);
  return cache->get(key, [&] {
    const UnitCircle u(m);
    const int64_t h = m / 2 + 1;
    auto d = inverse ? at::empty({2 * h, m}, at::kDouble) : at::empty({m, 2 * h}, at::kDouble);
    double* p = d.data_ptr<double>();
    for (int64_t k = 0; k < h; ++k) {
      const double w = inverse ? scale * ((k == 0 || 2 * k == m) ? 1.0 : 2.0) : 1.0;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t a = (j * k) % m;
        if (inverse) {
          p[2 * k * m + j] = w * u.c[a];
          p[(2 * k + 1) * m + j] = -w * u.s[a];
        } else {
          p[j * 2 * h + 2 * k] = u.c[a];
          p[j * 2 * h + 2 * k + 1] = -u.s[a];
        }
      }
    }
    return d.to(real);
  });
}

// The half tables of the direct form (direct_dft.cpp): for side m, h = m / 2 + 1 and
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
  const auto real = x.scalar_type();
  direct_rfft2(x, out, moved, half_table(Half::kCos, m0, 1.0, real), half_table(Half::kSin, m0, 1.0, real),
               half_table(Half::kCos, m1, 1.0, real), half_table(Half::kSin, m1, 1.0, real));
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
  const auto real = out.scalar_type();
  // The first axis is inverted with the forward's tables (the conjugate twiddles by the signs of
  // the sums); the last axis's c2r with the weighted, scaled ones.
  direct_irfft2(spec, out, moved, half_table(Half::kCos, m0, 1.0, real), half_table(Half::kSin, m0, 1.0, real),
                half_table(Half::kCosW, m1, scale, real), half_table(Half::kSinW, m1, scale, real));
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
  return t.device().is_cpu() && tl_gemm_dft && env_enabled() && prime_rule_side(m) && w * m <= kMaxWork;
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
  // The last axis's forward table, its first `bins` bins (a strided view the product reads in
  // place).
  const auto t = table(Table::kForwardLast, x.size(-1), 1.0, x.scalar_type()).narrow(1, 0, 2 * bins);
  return rows_times(x, t, bins, true);
}

at::Tensor window_real_fft_last(const at::Tensor& win, int64_t m) {
  const auto real = c10::toRealValueType(win.scalar_type());
  return rows_times(win, window_table(Win::kRealPart, m, win.size(-1), real), m, false);
}

}  // namespace cpu
}  // namespace pymks_vae
