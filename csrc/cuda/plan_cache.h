// The plans of recent calls, like the Triton backend's PlanCache (kernels/plan.py): a training loop calls an
// op with the same tensors every step, and a plan depends only on the tensors' addresses, sizes and dtypes
// (never their values), so its device table is built and copied once. Plain C++: `Value` is whatever the
// binding keeps per key (csrc/bindings/cuda_binding.cpp: the plan and the device copy of its table).
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda/multi_tensor_plan.h"

namespace hbat {
namespace cuda {

// Everything a plan depends on: the op, the context (device, stream, SM count: the binding's choice), and
// per tensor its numel and every list's address and dtype.
using PlanKey = std::vector<int64_t>;

inline PlanKey plan_key(Op op, const std::vector<TensorArg>& tensors, std::initializer_list<int64_t> context) {
  const int lists = op_info(op).num_lists;
  PlanKey key;
  key.reserve(2 + context.size() + tensors.size() * (1 + 2 * lists));
  key.push_back(static_cast<int64_t>(op));
  key.insert(key.end(), context.begin(), context.end());
  key.push_back(static_cast<int64_t>(tensors.size()));
  for (const TensorArg& t : tensors) {
    key.push_back(t.numel);
    for (int l = 0; l < lists; ++l) {
      key.push_back(static_cast<int64_t>(t.ptr[l]));
      key.push_back(static_cast<int64_t>(t.dtype[l]));
    }
  }
  return key;
}

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
    for (int64_t w : key) h = (h ^ static_cast<uint64_t>(w)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// The values of the least recently used keys, at most `capacity` of them. Not thread-safe: the binding
// holds a lock.
template <typename Value>
class PlanCache {
 public:
  explicit PlanCache(size_t capacity) : capacity_(capacity) {}

  // The value of `key` (now the most recently used), or nullptr.
  Value* find(const PlanKey& key) {
    auto it = index_.find(key);
    if (it == index_.end()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    entries_.splice(entries_.begin(), entries_, it->second);
    return &it->second->second;
  }

  // Adds a key that is not in the cache; evicts the least recently used one beyond the capacity.
  Value& insert(PlanKey key, Value value) {
    entries_.emplace_front(key, std::move(value));
    index_.emplace(std::move(key), entries_.begin());
    if (entries_.size() > capacity_) {
      index_.erase(entries_.back().first);
      entries_.pop_back();
    }
    return entries_.front().second;
  }

  size_t size() const { return entries_.size(); }
  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }

 private:
  using Item = std::pair<PlanKey, Value>;
  size_t capacity_;
  std::list<Item> entries_;  // most recently used first
  std::unordered_map<PlanKey, typename std::list<Item>::iterator, PlanKeyHash> index_;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace cuda
}  // namespace hbat
