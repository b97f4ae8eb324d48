// MKL DFTI reached at run time (see mkl_dft.h). The few DFTI constants used are those of MKL's
// public C interface (mkl_dfti.h), which this build does not have.
#include "cpu/mkl_dft.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace pymks_vae {
namespace cpu {
namespace {

using mkl_long = long;  // MKL_LONG of the LP64 interface torch links
using Handle = void*;

// DFTI's configuration parameters and values.
constexpr int kBackwardScale = 5, kNumberOfTransforms = 7, kConjugateEvenStorage = 10, kPlacement = 11;
constexpr int kInputStrides = 12, kOutputStrides = 13, kInputDistance = 14, kOutputDistance = 15;
constexpr int kThreadLimit = 27, kReal = 33, kComplexComplex = 39, kNotInplace = 44;

struct Dfti {
  mkl_long (*create_s)(Handle*, int, mkl_long, mkl_long*) = nullptr;  // DftiCreateDescriptor_s_md
  mkl_long (*create_d)(Handle*, int, mkl_long, mkl_long*) = nullptr;  // DftiCreateDescriptor_d_md
  mkl_long (*set)(Handle, int, ...) = nullptr;
  mkl_long (*commit)(Handle) = nullptr;
  mkl_long (*forward)(Handle, void*, ...) = nullptr;
  mkl_long (*backward)(Handle, void*, ...) = nullptr;
  mkl_long (*release)(Handle*) = nullptr;
  bool ok = false;
};

template <typename F>
void find(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
}

const Dfti& dfti() {
  static const Dfti table = [] {
    Dfti t;
    const char* env = std::getenv("PYMKS_VAE_MKL_DFT");
    if (env != nullptr && std::strcmp(env, "0") == 0) return t;
    // libtorch_cpu is loaded already (this extension links it); RTLD_NOLOAD only looks it up. Every
    // entry point comes from that one library (or, failing it, all from the global scope), never
    // a mix of two MKLs.
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) lib = RTLD_DEFAULT;
    find(lib, "DftiCreateDescriptor_s_md", &t.create_s);
    find(lib, "DftiCreateDescriptor_d_md", &t.create_d);
    find(lib, "DftiSetValue", &t.set);
    find(lib, "DftiCommitDescriptor", &t.commit);
    find(lib, "DftiComputeForward", &t.forward);
    find(lib, "DftiComputeBackward", &t.backward);
    find(lib, "DftiFreeDescriptor", &t.release);
    t.ok = t.create_s && t.create_d && t.set && t.commit && t.forward && t.backward && t.release;
    return t;
  }();
  return table;
}

std::atomic<bool> g_enabled{true};

// A committed descriptor, freed with the cache entry that owns it.
struct Plan {
  Handle h = nullptr;
  ~Plan() {
    if (h != nullptr) dfti().release(&h);
  }
};

using Key = std::tuple<bool, bool, std::vector<int64_t>, int64_t, std::vector<int64_t>, int64_t, std::vector<int64_t>,
                       int64_t, int, double>;

// Never destroyed: freeing descriptors from a static destructor at exit could run after MKL's own
// clean-up. A forked child (a DataLoader worker) starts with a fresh lock and an empty cache: the
// parent's lock may have been held by a thread the child does not have, and the parent's
// descriptors are left alone.
std::mutex* g_mutex_ptr = new std::mutex();
std::map<Key, std::shared_ptr<Plan>>* g_cache_ptr = new std::map<Key, std::shared_ptr<Plan>>();
const int g_atfork = pthread_atfork(nullptr, nullptr, [] {
  g_mutex_ptr = new std::mutex();
  g_cache_ptr = new std::map<Key, std::shared_ptr<Plan>>();
});
constexpr size_t kMaxPlans = 64;

bool fits(int64_t v) { return v >= 0 && v <= static_cast<int64_t>(std::numeric_limits<mkl_long>::max()); }

// A descriptor for this transform, from the cache or made and committed; null where DFTI refuses.
std::shared_ptr<Plan> plan_for(const DftLayout& l, bool is_double, bool backward, double scale) {
  const int threads = at::get_num_threads();
  Key key{backward, is_double, l.lengths, l.count, l.real_strides, l.real_dist, l.half_strides, l.half_dist, threads,
          backward ? scale : 1.0};
  {
    std::lock_guard<std::mutex> lock(*g_mutex_ptr);
    auto it = g_cache_ptr->find(key);
    if (it != g_cache_ptr->end()) return it->second;
  }
  const Dfti& d = dfti();
  const size_t nd = l.lengths.size();
  std::vector<mkl_long> lengths(l.lengths.begin(), l.lengths.end());
  // DFTI strides: a first entry for the offset (0), then one per axis.
  std::vector<mkl_long> rs{0}, hs{0};
  for (size_t k = 0; k < nd; ++k) {
    if (!fits(l.real_strides[k]) || !fits(l.half_strides[k]) || !fits(l.lengths[k])) return nullptr;
    rs.push_back(static_cast<mkl_long>(l.real_strides[k]));
    hs.push_back(static_cast<mkl_long>(l.half_strides[k]));
  }
  if (!fits(l.count) || !fits(l.real_dist) || !fits(l.half_dist)) return nullptr;
  auto p = std::make_shared<Plan>();
  auto create = is_double ? d.create_d : d.create_s;
  if (create(&p->h, kReal, static_cast<mkl_long>(nd), lengths.data()) != 0) p->h = nullptr;
  // Variadic arguments in the types DFTI reads: enumerated values as int, counts and distances as
  // MKL_LONG, strides as MKL_LONG arrays, scales as double.
  bool ok = p->h != nullptr && d.set(p->h, kPlacement, kNotInplace) == 0 &&
            d.set(p->h, kConjugateEvenStorage, kComplexComplex) == 0 &&
            d.set(p->h, kNumberOfTransforms, static_cast<mkl_long>(l.count)) == 0 &&
            d.set(p->h, kInputStrides, backward ? hs.data() : rs.data()) == 0 &&
            d.set(p->h, kOutputStrides, backward ? rs.data() : hs.data()) == 0 &&
            d.set(p->h, kInputDistance, static_cast<mkl_long>(backward ? l.half_dist : l.real_dist)) == 0 &&
            d.set(p->h, kOutputDistance, static_cast<mkl_long>(backward ? l.real_dist : l.half_dist)) == 0 &&
            d.set(p->h, kThreadLimit, threads) == 0;
  if (ok && backward && scale != 1.0) ok = d.set(p->h, kBackwardScale, scale) == 0;
  ok = ok && d.commit(p->h) == 0;
  if (!ok) p.reset();  // ~Plan frees the descriptor; the refusal is cached too, as a null plan
  std::lock_guard<std::mutex> lock(*g_mutex_ptr);
  if (g_cache_ptr->size() >= kMaxPlans) g_cache_ptr->clear();  // shapes vary little in practice: start over
  g_cache_ptr->emplace(key, p);
  return p;
}

bool usable(const DftLayout& l, const at::Tensor& real, const at::Tensor& half) {
  if (!dft_enabled()) return false;
  if (!real.device().is_cpu() || !half.device().is_cpu()) return false;
  const auto rt = real.scalar_type();
  if (!((rt == at::kFloat && half.scalar_type() == at::kComplexFloat) ||
        (rt == at::kDouble && half.scalar_type() == at::kComplexDouble)))
    return false;
  const size_t nd = l.lengths.size();
  if (nd < 1 || nd > 3 || l.real_strides.size() != nd || l.half_strides.size() != nd || l.count < 1) return false;
  // Every element the layout addresses must lie inside the tensors (their storage from data_ptr).
  int64_t real_span = (l.count - 1) * l.real_dist + 1, half_span = (l.count - 1) * l.half_dist + 1;
  for (size_t k = 0; k < nd; ++k) {
    const int64_t n = l.lengths[k], h = k + 1 == nd ? n / 2 + 1 : n;
    if (n < 1 || l.real_strides[k] < 1 || l.half_strides[k] < 1) return false;
    real_span += (n - 1) * l.real_strides[k];
    half_span += (h - 1) * l.half_strides[k];
  }
  // A view that is not contiguous (some states of a batch) is addressed through the layout's
  // strides from its first element: what its storage holds from there bounds the span.
  auto room = [](const at::Tensor& t) {
    if (t.is_contiguous()) return t.numel();
    return static_cast<int64_t>(t.storage().nbytes() / t.element_size()) - t.storage_offset();
  };
  return real_span <= room(real) && half_span <= room(half);
}

}  // namespace

std::vector<int64_t> row_major_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> st(sizes.size(), 1);
  for (int64_t k = static_cast<int64_t>(sizes.size()) - 2; k >= 0; --k) st[k] = st[k + 1] * sizes[k + 1];
  return st;
}

DftLayout contiguous_layout(const std::vector<int64_t>& lengths, int64_t count, bool moved) {
  DftLayout l;
  l.lengths = lengths;
  l.count = count;
  const size_t nd = lengths.size();
  l.real_strides = row_major_strides(lengths);
  l.real_dist = 1;
  for (auto n : lengths) l.real_dist *= n;
  std::vector<int64_t> half = lengths;
  half.back() = half.back() / 2 + 1;
  l.half_dist = 1;
  for (auto n : half) l.half_dist *= n;
  if (!moved || nd == 1) {
    l.half_strides = row_major_strides(half);
    return l;
  }
  // Stored as (m_1, .., h_{d-1}, m_0): axis 0 innermost, the others row-major outside it.
  std::vector<int64_t> stored(half.begin() + 1, half.end());
  stored.push_back(half[0]);
  const auto st = row_major_strides(stored);
  l.half_strides.assign(nd, 0);
  l.half_strides[0] = st.back();
  for (size_t k = 1; k < nd; ++k) l.half_strides[k] = st[k - 1];
  return l;
}

bool dft_available() { return dfti().ok; }

bool set_dft_enabled(bool enabled) { return g_enabled.exchange(enabled); }

bool dft_enabled() { return g_enabled.load() && dft_available(); }

bool dft_r2c(const DftLayout& layout, const at::Tensor& real, at::Tensor& half) {
  if (!usable(layout, real, half)) return false;
  auto p = plan_for(layout, real.scalar_type() == at::kDouble, false, 1.0);
  if (!p) return false;
  TORCH_CHECK(dfti().forward(p->h, real.data_ptr(), half.data_ptr()) == 0, "MKL DFTI: the forward transform failed");
  return true;
}

bool dft_c2r(const DftLayout& layout, const at::Tensor& half, at::Tensor& real, double scale) {
  if (!usable(layout, real, half)) return false;
  auto p = plan_for(layout, real.scalar_type() == at::kDouble, true, scale);
  if (!p) return false;
  TORCH_CHECK(dfti().backward(p->h, half.data_ptr(), real.data_ptr()) == 0, "MKL DFTI: the inverse transform failed");
  return true;
}

void dft_clear_cache() {
  std::lock_guard<std::mutex> lock(*g_mutex_ptr);
  g_cache_ptr->clear();
}

int64_t dft_cache_size() {
  std::lock_guard<std::mutex> lock(*g_mutex_ptr);
  return static_cast<int64_t>(g_cache_ptr->size());
}

}  // namespace cpu
}  // namespace pymks_vae
