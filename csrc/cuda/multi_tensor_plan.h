// Host-side plan of one multi-tensor call: which tensors go into which launch, and the table the kernels
// read. Plain C++ (no CUDA, no torch), so the binding and host-only tests can include it.
//
// Device table (int64 words; n = number of tensors, L = the op's number of lists, tensors in launch order =
// grouped by dtypes):
//   ptr[L][n]                   data addresses, list by list (the op's lists in table order)
//   numel[n]
//   first_chunk[n + 1]          prefix sum of chunks per tensor (global over all launches of the call)
//   index[n]                    the tensor's position in the caller's lists (per-tensor vectors, output index)
//   head[n]                     elements before the first 16-byte aligned vector in every list (0..7), or
//                               -1: the lists' alignments are incompatible, scalar loads only
// Chunks as in csrc/chunking.h, of chunk_size elements (a multiple of 8, so the head is the same in every
// chunk); one block processes one chunk at a time and writes one partial sum per chunk.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "chunking.h"
#include "op_traits.h"

namespace hbat {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
constexpr int kNumDTypes = 3;
inline int dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// One tensor of each of the op's lists (entries past the op's number of lists are unused).
struct TensorArg {
  std::uintptr_t ptr[kMaxLists] = {};
  DType dtype[kMaxLists] = {};
  int64_t numel = 0;
};

// One kernel launch: the tensors [seg_begin, seg_end) of the table, all with these dtypes, whose chunks are
// [chunk_begin, chunk_end).
struct LaunchGroup {
  DType dtype[kMaxLists] = {};
  int32_t seg_begin = 0, seg_end = 0;
  int64_t chunk_begin = 0, chunk_end = 0;
};

// Tuning knobs (CONTRIBUTING.md, "Chunks: one plan, three planners"): chunks are powers of two in
// [kMinChunk, kMaxChunk] elements; small calls get smaller chunks so that every SM has about kMinChunksPerSM of them.
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxChunk = 32768;
constexpr int64_t kMinChunksPerSM = 4;

struct Plan {
  Op op = Op::squared_change;
  int32_t num_lists = 0;
  int32_t num_tensors = 0;
  int64_t chunk_size = kMinChunk;
  int64_t num_chunks = 0;
  std::vector<LaunchGroup> groups;  // launches with at least one chunk
  std::vector<int64_t> table;       // host image of the device table (layout above)
  std::string error;                // non-empty: the call cannot be planned (nothing was launched)
};

// Offsets (in int64 words) of the table's arrays.
struct TableLayout {
  int64_t n, lists;
  HBAT_HOST_DEVICE int64_t ptr(int64_t list) const { return list * n; }
  HBAT_HOST_DEVICE int64_t numel() const { return lists * n; }
  HBAT_HOST_DEVICE int64_t first_chunk() const { return (lists + 1) * n; }
  HBAT_HOST_DEVICE int64_t index() const { return (lists + 2) * n + 1; }
  HBAT_HOST_DEVICE int64_t head() const { return (lists + 3) * n + 1; }
  HBAT_HOST_DEVICE int64_t words() const { return (lists + 4) * n + 1; }
};

// The smallest h in [0, 8) that makes element h 16-byte aligned in every list, or -1.
inline int32_t vector_head(const TensorArg& t, int lists) {
  for (int32_t h = 0; h < 8; ++h) {
    bool ok = true;
    for (int l = 0; l < lists; ++l) ok = ok && (t.ptr[l] + h * dtype_size(t.dtype[l])) % 16 == 0;
    if (ok) return h;
  }
  return -1;
}

inline int64_t choose_chunk_size(int64_t total_elements, int num_sms) {
  const int64_t target = total_elements / std::max<int64_t>(1, int64_t(num_sms) * kMinChunksPerSM);
  int64_t chunk = kMinChunk;
  while (chunk < kMaxChunk && chunk < target) chunk *= 2;
  return chunk;
}

inline Plan make_plan(Op op, const std::vector<TensorArg>& tensors, int num_sms) {
  Plan plan;
  plan.op = op;
  const int lists = op_info(op).num_lists;
  plan.num_lists = lists;
  const int64_t n = static_cast<int64_t>(tensors.size());
  plan.num_tensors = static_cast<int32_t>(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const TensorArg& t = tensors[i];
    if (t.numel < 0) {
      plan.error = "tensor " + std::to_string(i) + " has a negative numel";
      return plan;
    }
    for (int l = 0; t.numel > 0 && l < lists; ++l) {
      if (t.ptr[l] % dtype_size(t.dtype[l])) {
        plan.error = std::string(op_info(op).list_names[l]) + "[" + std::to_string(i) +
                     "] has a data pointer that is not aligned to its element size";
        return plan;
      }
    }
    total += t.numel;
  }
  plan.chunk_size = choose_chunk_size(total, num_sms);

  // Launch order: dtype groups in order of first appearance, stable inside a group.
  auto key = [&](const TensorArg& t) {
    int k = 0;
    for (int l = lists - 1; l >= 0; --l) k = k * kNumDTypes + static_cast<int>(t.dtype[l]);
    return k;
  };
  int num_keys = 1;
  for (int l = 0; l < lists; ++l) num_keys *= kNumDTypes;
  std::vector<int> group_rank(num_keys, -1);
  int ranks = 0;
  for (const TensorArg& t : tensors)
    if (group_rank[key(t)] < 0) group_rank[key(t)] = ranks++;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return group_rank[key(tensors[a])] < group_rank[key(tensors[b])]; });
  const std::vector<int64_t> first =
      first_chunks(order, [&](int64_t i) { return tensors[i].numel; }, plan.chunk_size);

  const TableLayout L{n, lists};
  plan.table.assign(L.words(), 0);
  for (int64_t s = 0; s < n; ++s) {
    const TensorArg& t = tensors[order[s]];
    for (int l = 0; l < lists; ++l) plan.table[L.ptr(l) + s] = static_cast<int64_t>(t.ptr[l]);
    plan.table[L.numel() + s] = t.numel;
    plan.table[L.first_chunk() + s] = first[s];
    plan.table[L.index() + s] = order[s];
    plan.table[L.head() + s] = vector_head(t, lists);
    const bool last_of_group = s + 1 == n || key(tensors[order[s + 1]]) != key(t);
    if (last_of_group) {
      int32_t begin = static_cast<int32_t>(s);
      while (begin > 0 && key(tensors[order[begin - 1]]) == key(t)) --begin;
      if (first[s + 1] > first[begin]) {
        LaunchGroup g;
        for (int l = 0; l < lists; ++l) g.dtype[l] = t.dtype[l];
        g.seg_begin = begin;
        g.seg_end = static_cast<int32_t>(s + 1);
        g.chunk_begin = first[begin];
        g.chunk_end = first[s + 1];
        plan.groups.push_back(g);
      }
    }
  }
  plan.table[L.first_chunk() + n] = first[n];
  plan.num_chunks = first[n];
  return plan;
}

}  // namespace cuda
}  // namespace hbat
