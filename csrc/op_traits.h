// The op table (csrc/op_table.h, generated from hbat/ops/table.py) as C++: the Op enum, compile-time traits
// of each op and of each of its tensor lists (host and device code), a run-time view for host code, and the
// OpMath template that each op specialises with its math (csrc/ops/<op>.h). Plain C++: no torch, no CUDA.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>

#include "op_table.h"

#if defined(__CUDACC__)
#define HBAT_HOST_DEVICE __host__ __device__
#else
#define HBAT_HOST_DEVICE
#endif

namespace hbat {

enum class Op : int32_t {
#define HBAT_X(name, code, ...) name = code,
  HBAT_OPS(HBAT_X)
#undef HBAT_X
};

constexpr int kNumOps = HBAT_NUM_OPS;
constexpr int kMaxLists = HBAT_MAX_LISTS;
constexpr int kMaxVectors = HBAT_MAX_VECTORS;
constexpr int kMaxScalars = HBAT_MAX_SCALARS;

// How an op uses a tensor list (hbat/ops/table.py: READ, UPDATE, WRITE, RETURN).
enum class Role : int32_t { kRead, kUpdate, kWrite, kReturn };
// dtype rules of a list; a rule i >= 0 means "the dtype of list i"
constexpr int kAnyFloat = -1;     // float32, bfloat16 or float16
constexpr int kFloat32Only = -2;  // float32

constexpr bool role_loads(Role r) { return r == Role::kRead || r == Role::kUpdate; }
constexpr bool role_stores(Role r) { return r != Role::kRead; }

// ------------------------------------------------------------------------------------ compile time
template <Op kOp> struct OpTraits;
#define HBAT_X(op_name, code, reduces, num_lists, num_vectors, num_scalars, schema_text) \
  template <> struct OpTraits<Op::op_name> {                                               \
    static constexpr bool kReduces = (reduces) != 0;                                        \
    static constexpr int kNumLists = num_lists;                                             \
    static constexpr int kNumVectors = num_vectors;                                         \
    static constexpr int kNumScalars = num_scalars;                                         \
  };
HBAT_OPS(HBAT_X)
#undef HBAT_X

template <Op kOp, int kList> struct ListTraits;
#define HBAT_X(op_name, index, list_name, role, dtype)             \
  template <> struct ListTraits<Op::op_name, index> {              \
    static constexpr Role kRole = Role::role;                      \
    static constexpr int kDType = dtype;                           \
    static constexpr bool kLoads = role_loads(Role::role);         \
    static constexpr bool kStores = role_stores(Role::role);       \
  };
HBAT_OP_LISTS(HBAT_X)
#undef HBAT_X

// Each op's math, one specialisation per op in csrc/ops/<op>.h (see CONTRIBUTING.md, "Adding an op"):
//   OpMath(const float* vectors, const double* scalars)   once per chunk: the tensor's entry of each
//                                                         per-tensor vector, and the call's scalars
//   template <typename F> void operator()(F (&e)[kNumLists], F& sum) const
//                                                         one element: e[i] is list i's value (loaded lists
//                                                         hold the input); the op writes its stored lists
//                                                         into e and, if it reduces, adds to sum
// F is float (CUDA, the CPU loop's tail) or a GCC vector of floats (the CPU loop: every lane one element), so
// the math uses + - * / (a float operand applies to every lane) and lane_sqrt, nothing that needs a scalar.
template <Op kOp> struct OpMath;

HBAT_HOST_DEVICE inline float lane_sqrt(float x) { return sqrtf(x); }
#if !defined(__CUDACC__)
// Lane by lane (correctly rounded, like sqrtf); the compiler emits one sqrtps for the whole vector.
template <typename V>
inline V lane_sqrt(V x) {
  for (size_t l = 0; l < sizeof(V) / sizeof(float); ++l) x[l] = __builtin_sqrtf(x[l]);
  return x;
}
#endif

// ------------------------------------------------------------------------------------ run time (host)
struct OpInfo {
  const char* name = "";
  const char* schema = "";
  bool reduces = false;
  int num_lists = 0, num_vectors = 0, num_scalars = 0;
  Role roles[kMaxLists] = {};
  int dtypes[kMaxLists] = {};
  const char* list_names[kMaxLists] = {};
  // the RETURN list, or -1
  int returned() const {
    for (int i = 0; i < num_lists; ++i)
      if (roles[i] == Role::kReturn) return i;
    return -1;
  }
};

inline const OpInfo& op_info(Op op) {
  static const struct Table {
    OpInfo ops[kNumOps];
    Table() {
#define HBAT_X(op_name, code, reduces_, lists, vectors, scalars, schema_text) \
  ops[code].name = #op_name;                                                  \
  ops[code].schema = schema_text;                                             \
  ops[code].reduces = (reduces_) != 0;                                        \
  ops[code].num_lists = lists;                                                \
  ops[code].num_vectors = vectors;                                            \
  ops[code].num_scalars = scalars;
      HBAT_OPS(HBAT_X)
#undef HBAT_X
#define HBAT_X(op_name, index, list_name, role, dtype)         \
  ops[static_cast<int>(Op::op_name)].roles[index] = Role::role; \
  ops[static_cast<int>(Op::op_name)].dtypes[index] = dtype;     \
  ops[static_cast<int>(Op::op_name)].list_names[index] = #list_name;
      HBAT_OP_LISTS(HBAT_X)
#undef HBAT_X
    }
  } table;
  return table.ops[static_cast<int>(op)];
}

}  // namespace hbat
