// The chunk plan of the C++ backends (CPU and CUDA; Triton's kernels/plan.py builds the same one in torch).
// See CONTRIBUTING.md, "Chunks": each tensor is cut into chunks of chunk_size elements (the last one may be
// shorter, an empty tensor has none); a chunk never spans two tensors, so one worker handles one chunk of one
// tensor, and a reducing op writes one partial sum per chunk. A tensor's chunks are consecutive, and its sum
// adds its partials in chunk order: results never depend on the number of threads or blocks.
#pragma once

#include <cstdint>
#include <vector>

namespace hbat {

inline int64_t num_chunks_of(int64_t numel, int64_t chunk_size) { return (numel + chunk_size - 1) / chunk_size; }

// first[k] = the first chunk of the k-th tensor in `order` (first[n] = all chunks); numel_of(i) is tensor i's size.
template <typename NumelOf>
std::vector<int64_t> first_chunks(const std::vector<int64_t>& order, NumelOf&& numel_of, int64_t chunk_size) {
  std::vector<int64_t> first(order.size() + 1, 0);
  for (size_t k = 0; k < order.size(); ++k) first[k + 1] = first[k] + num_chunks_of(numel_of(order[k]), chunk_size);
  return first;
}

}  // namespace hbat
