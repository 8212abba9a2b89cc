// Host-side plan of one multi-tensor call: which tensors go into which launch, and the table the kernels
// read. Plain C++ (no CUDA, no torch), so the binding and host-only tests can include it.
//
// Device table (int64 words, n = number of tensors, tensors in launch order = grouped by dtypes):
//   ptr_x[n] ptr_y[n] ptr_z[n]   data addresses (0 where a role is absent)
//   numel[n]
//   first_chunk[n + 1]          prefix sum of chunks per tensor (global over all launches of the call)
//   index[n]                    the tensor's position in the caller's lists (coef / output index)
//   head[n]                     elements before the first 16-byte aligned vector in every role (0..7), or
//                               -1: the roles' alignments are incompatible, scalar loads only
// A tensor is cut into chunks of chunk_size elements (a multiple of 8, so the head is the same in every
// chunk); one block processes one chunk at a time and writes one partial sum per chunk.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

// TableLayout is also used in device code
#if defined(__CUDACC__)
#define HBAT_HOST_DEVICE __host__ __device__
#else
#define HBAT_HOST_DEVICE
#endif

namespace hbat {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
constexpr int kNumDTypes = 3;

// x, y, z roles per op:  x        y        z
enum class Op : int32_t {
  kSumSqDiff = 0,    //    params   refs     -          sum (x-y)^2
  kSnapshot = 1,     //    params   anchors  -          sum (x-y)^2; y <- x
  kPenaltyGrad = 2,  //    params   anchors  grads      sum (x-y)^2; z <- z + c (x-y)
  kScaledDiff = 3,   //    params   anchors  out        z <- c (x-y)
  kLerp = 4,         //    a        b        dst        z <- (1-c) x + c y
};

inline bool op_reduces(Op op) { return op == Op::kSumSqDiff || op == Op::kSnapshot || op == Op::kPenaltyGrad; }
inline bool op_has_z(Op op) { return op == Op::kPenaltyGrad || op == Op::kScaledDiff || op == Op::kLerp; }
inline int dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

struct TensorArg {
  std::uintptr_t x = 0, y = 0, z = 0;
  int64_t numel = 0;
  DType dx = DType::kFloat32, dy = DType::kFloat32, dz = DType::kFloat32;
};

// One kernel launch: the tensors [seg_begin, seg_end) of the table, all with dtypes (dx, dy, dz), whose
// chunks are [chunk_begin, chunk_end).
struct LaunchGroup {
  DType dx, dy, dz;
  int32_t seg_begin, seg_end;
  int64_t chunk_begin, chunk_end;
};

// Tuning knobs (see README.md): chunks are powers of two in [kMinChunk, kMaxChunk] elements; small calls
// get smaller chunks so that every SM has about kMinChunksPerSM of them.
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxChunk = 32768;
constexpr int64_t kMinChunksPerSM = 4;

struct Plan {
  Op op = Op::kSumSqDiff;
  int32_t num_tensors = 0;
  int64_t chunk_size = kMinChunk;
  int64_t num_chunks = 0;
  std::vector<LaunchGroup> groups;  // launches with at least one chunk
  std::vector<int64_t> table;       // host image of the device table (layout above)
  std::string error;                // non-empty: the call cannot be planned (nothing was launched)
};

// Offsets (in int64 words) of the table's arrays.
struct TableLayout {
  int64_t n;
  HBAT_HOST_DEVICE int64_t ptr_x() const { return 0; }
  HBAT_HOST_DEVICE int64_t ptr_y() const { return n; }
  HBAT_HOST_DEVICE int64_t ptr_z() const { return 2 * n; }
  HBAT_HOST_DEVICE int64_t numel() const { return 3 * n; }
  HBAT_HOST_DEVICE int64_t first_chunk() const { return 4 * n; }
  HBAT_HOST_DEVICE int64_t index() const { return 5 * n + 1; }
  HBAT_HOST_DEVICE int64_t head() const { return 6 * n + 1; }
  HBAT_HOST_DEVICE int64_t words() const { return 7 * n + 1; }
};

// The smallest h in [0, 8) that makes element h 16-byte aligned in every present role, or -1.
inline int32_t vector_head(const TensorArg& t, bool has_z) {
  for (int32_t h = 0; h < 8; ++h) {
    bool ok = (t.x + h * dtype_size(t.dx)) % 16 == 0 && (t.y + h * dtype_size(t.dy)) % 16 == 0;
    if (has_z) ok = ok && (t.z + h * dtype_size(t.dz)) % 16 == 0;
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
  const int64_t n = static_cast<int64_t>(tensors.size());
  plan.num_tensors = static_cast<int32_t>(n);
  const bool has_z = op_has_z(op);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const TensorArg& t = tensors[i];
    if (t.numel < 0) {
      plan.error = "tensor " + std::to_string(i) + " has a negative numel";
      return plan;
    }
    if (t.numel > 0) {
      const bool misaligned = t.x % dtype_size(t.dx) || t.y % dtype_size(t.dy) || (has_z && t.z % dtype_size(t.dz));
      if (misaligned) {
        plan.error = "tensor " + std::to_string(i) + " has a data pointer that is not aligned to its element size";
        return plan;
      }
    }
    total += t.numel;
  }
  plan.chunk_size = choose_chunk_size(total, num_sms);

  // Launch order: dtype groups in order of first appearance, stable inside a group.
  auto key = [&](const TensorArg& t) {
    return int(t.dx) * kNumDTypes * kNumDTypes + int(t.dy) * kNumDTypes + (has_z ? int(t.dz) : 0);
  };
  std::vector<int> group_rank(kNumDTypes * kNumDTypes * kNumDTypes, -1);
  int num_keys = 0;
  for (const TensorArg& t : tensors)
    if (group_rank[key(t)] < 0) group_rank[key(t)] = num_keys++;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return group_rank[key(tensors[a])] < group_rank[key(tensors[b])]; });

  const TableLayout L{n};
  plan.table.assign(L.words(), 0);
  int64_t chunk = 0;
  for (int64_t s = 0; s < n; ++s) {
    const TensorArg& t = tensors[order[s]];
    plan.table[L.ptr_x() + s] = static_cast<int64_t>(t.x);
    plan.table[L.ptr_y() + s] = static_cast<int64_t>(t.y);
    plan.table[L.ptr_z() + s] = has_z ? static_cast<int64_t>(t.z) : 0;
    plan.table[L.numel() + s] = t.numel;
    plan.table[L.first_chunk() + s] = chunk;
    plan.table[L.index() + s] = order[s];
    plan.table[L.head() + s] = vector_head(t, has_z);
    chunk += (t.numel + plan.chunk_size - 1) / plan.chunk_size;
    const bool last_of_group = s + 1 == n || key(tensors[order[s + 1]]) != key(t);
    if (last_of_group) {
      int32_t begin = static_cast<int32_t>(s);
      while (begin > 0 && key(tensors[order[begin - 1]]) == key(t)) --begin;
      const int64_t chunk_begin = plan.table[L.first_chunk() + begin];
      if (chunk > chunk_begin)
        plan.groups.push_back({t.dx, t.dy, has_z ? t.dz : DType::kFloat32, begin, static_cast<int32_t>(s + 1),
                               chunk_begin, chunk});
    }
  }
  plan.table[L.first_chunk() + n] = chunk;
  plan.num_chunks = chunk;
  return plan;
}

}  // namespace cuda
}  // namespace hbat
