// Small 2D real transforms as matrix products.
//
// MKL's transforms of lengths with a large prime factor run far below its speed on smooth lengths
// on the CPU measured (the 2-core AMD EPYC, where its generic kernels run): the 2D transform of 32
// fields of 47^2 took 2.3 ms against 0.19 ms for 64^2. There a DFT written as two matrix products,
// which costs m0 m1 (m0 + m1) per field whatever the factors, is faster. Timed against MKL in the
// same process, alternating (thread CPU time, 12 rounds, B = 32, one thread): the windowed loss,
// forward + backward, took 0.32-0.86x the time on every square side from 17 to 62 whose largest
// prime factor p is 17 or more, 0.50-0.85x on the primes 67-103 and 0.70-0.75x on 69, 87 and 93
// (3p), but 1.25-1.45x on 68, 76, 92 and 102 (4p, 6p: MKL's smooth factor helps), 0.86-0.94x on
// 85 and 95 (5p), 0.98x on 113 and 1.09x on 127; the transform alone (a first version of these
// products) took 1.0-3.8x MKL's time on smooth sides (21, 28, 32, 60, 64). Hence the fixed rule
// (gemm_dft_rule): every side m <= 103 with m <= 3p.
//
// That rule is one CPU's: where MKL runs its optimised kernels (Intel) the crossover can move. So
// by default the rule only names candidates (with a few more sides, see side_candidate), and the
// first call of each kind on a candidate grid times both routes on its own input (trials, in
// transforms.cpp) and keeps the faster for the calls of that kind that follow; against the rule
// only by a margin and when a second trial in the same call agrees (gemm_dft_record). Results then depend
// on a timing in their last bits, so the fixed rule decides alone under torch's deterministic
// algorithms, with PYMKS_VAE_GEMM_DFT=rule, or after set_gemm_dft_trials(false).
//
// r2c, for N = prod(leading dims) fields x_n (m0 x m1):
//   A = x_rows . T1, the last axis: rows (n, j0), T1 (m1 x 2 h1) holding cos and -sin of
//       2 pi j1 k1 / m1 interleaved, so that A is (N, m0, h1) complex;
//   X_n = F0 . A_n, the first axis: F0 (m0 x m0) = exp(-2 pi i j0 k0 / m0), one batched complex
//       product straight into the output.
// c2r reverses them: Z_n = conj(F0) . S_n, then rows (n, j0) of Z times T1inv (2 h1 x m1), which
// holds w_k cos and -w_k sin of 2 pi k1 j1 / m1 times the scale (w_k = 1 for the bins without a
// partner in the half spectrum, else 2; the sines of those bins are 0, which drops their
// imaginary parts as c2r does).
// Phases are reduced modulo m in integers before the cosines and sines (exact for any size).
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

#include "cpu/trig_tables.h"

namespace pymks_vae {
namespace cpu {
namespace {

constexpr int64_t kMaxSide = 103;
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
  return {k.m0, k.m1, bucket, k.is_double, k.inverse, k.moved, at::get_num_threads()};
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

// The sides on which the products are timed against the transforms: the rule's, its edges (5p,
// and up to 127), and the odd sides 21-39, whose factors are small but where the products still
// beat MKL on the CPU measured. Timed there as the rule was (loss with a lag window, forward +
// backward, B = 32, the products' time over MKL's): 21 0.92, 25 0.91, 27 0.87, 33 0.85, 35 0.96,
// 39 0.91; but 15 1.05, 18 1.03, 45 1.21, 49 1.22, 55 1.18, 63 1.13, 119 (7 x 17) 1.03, and 1.1-3.7
// on the even smooth sides 12-128 (32: 1.38, 64: 2.0, 128: 3.7), which are never timed.
bool side_candidate(int64_t m) {
  const int64_t p = largest_prime_factor(m);
  if (p >= kMinPrime && m <= 127 && (m <= 3 * p || m == 5 * p)) return true;
  return m % 2 == 1 && m >= 21 && m <= 39;
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

}  // namespace

bool gemm_dft_rule(at::IntArrayRef grid) {
  if (grid.size() != 2) return false;
  for (auto m : grid) {
    const int64_t p = largest_prime_factor(m);
    if (m > kMaxSide || p < kMinPrime || m > 3 * p) return false;
  }
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
  TORCH_CHECK(out.numel() == N * m0 * h1 && out.is_complex(), "gemm_rfft2: the output does not fit");
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

void gemm_irfft2(const at::Tensor& spec, at::Tensor& out, double scale, bool moved) {
  TORCH_CHECK(spec.dim() >= 2 && spec.is_contiguous() && out.is_contiguous() && spec.is_complex(),
              "gemm_irfft2: contiguous spectra expected");
  const int64_t m0 = out.size(-2), m1 = out.size(-1), h1 = m1 / 2 + 1;
  const int64_t N = m0 * m1 > 0 ? out.numel() / (m0 * m1) : 0;
  TORCH_CHECK(spec.numel() == N * m0 * h1 && spec.size(-1) == (moved ? m0 : h1) && spec.size(-2) == (moved ? h1 : m0),
              "gemm_irfft2: the spectra do not fit the output");
  const auto real = out.scalar_type();
  // The first axis, inverted as complex data: conj(F0) . S_n for every field (S_n read transposed
  // in place from the moved layout).
  const auto s = moved ? spec.view({N, h1, m0}).transpose(1, 2) : spec.view({N, m0, h1});
  const auto z = at::bmm(table(Table::kFirstConj, m0, 1.0, real).expand({N, m0, m0}), s);
  // The last axis, complex to real over every row: (N m0, 2 h1) . (2 h1, m1), scaled by the table.
  auto o = out.view({N * m0, m1});
  at::mm_out(o, at::view_as_real(z).reshape({N * m0, 2 * h1}), table(Table::kInverseLast, m1, scale, real));
}

}  // namespace cpu
}  // namespace pymks_vae
