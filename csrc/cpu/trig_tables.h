// What the CPU's matrix-product routes (even_gemm.cpp, gemm_dft.cpp) share for their cosine and
// sine tables: the m angles of the unit circle, and a bounded cache of built tables.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <mutex>
#include <vector>

namespace pymks_vae {
namespace cpu {

// cos and sin of 2 pi j / m for j = 0 .. m - 1: index them with a phase j k reduced modulo m in
// integers, which keeps every table entry exact to rounding whatever the size.
struct UnitCircle {
  std::vector<double> c, s;
  explicit UnitCircle(int64_t m) : c(m), s(m) {
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    for (int64_t j = 0; j < m; ++j) {
      c[j] = std::cos(kTwoPi * static_cast<double>(j) / static_cast<double>(m));
      s[j] = std::sin(kTwoPi * static_cast<double>(j) / static_cast<double>(m));
    }
    // The half and quarter turns exactly (sin(pi) is 1.2e-16 in double): the c2r tables' sines of
    // bin m / 2 must drop its imaginary part, as a complex-to-real transform does.
    if (m % 2 == 0) s[m / 2] = 0.0, c[m / 2] = -1.0;
    if (m % 4 == 0) c[m / 4] = 0.0, s[m / 4] = 1.0, c[3 * m / 4] = 0.0, s[3 * m / 4] = -1.0;
  }
};

// Tables built once and kept, shared read-only by every caller (they depend on sizes, dtype and
// such only). Cleared when `capacity` are held; create with `new` and never destroy, so that no
// static destructor runs after the tensors' allocator is gone.
template <typename Key>
class TableCache {
 public:
  explicit TableCache(size_t capacity) : capacity_(capacity) {}

  template <typename Build>
  at::Tensor get(const Key& key, Build&& build) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second;
    }
    at::Tensor t = build();  // outside the lock: building takes sines and cosines of every angle
    std::lock_guard<std::mutex> lock(mu_);
    if (map_.size() >= capacity_) map_.clear();
    map_.emplace(key, t);
    return t;
  }

 private:
  std::mutex mu_;
  std::map<Key, at::Tensor> map_;
  size_t capacity_;
};

}  // namespace cpu
}  // namespace pymks_vae
