// The CPU kernels of every table op: one generic multi-tensor apply over the op's math (csrc/ops/<op>.h,
// the functors the CUDA kernels use too), registered as a boxed kernel per op for the CPU dispatch key.
//
// Chunks as in csrc/chunking.h (kChunk elements; at::parallel_for runs over the global chunk list, parallel
// across tensors and within large ones). The dtypes of a chunk's tensors are dispatched once per chunk. The
// element loop works on blocks of kLanes elements with kLanes independent float accumulators (lane k sums the
// elements k, k + kLanes, ... of the chunk; the tail after the last whole block goes to lane 0). A reducing op
// writes one partial sum per chunk and adds a tensor's partials in chunk order in double: results are
// bit-identical run to run and for any number of threads.
//
// The block is explicit SIMD: the op's math runs on GCC vector types of W floats (kLanes / W of them per block),
// so every list is one vector load and store per W elements whatever the compiler's vectoriser decides. (A
// scalar loop over a block held in arrays was vectorised across blocks by GCC 12, through shuffles: up to 1.9x
// slower than the 7786d55 kernels, benchmarks/results/cpu-regression.md.) The loop is compiled twice: for the
// baseline target (x86-64: SSE, W = 4, so the wheel runs on any CPU) and for AVX2 (W = 8), which runs where the
// CPU has it (apply_chunk). Without FMA: contracting a * b + c into one rounding would change the results, which
// must not depend on the CPU; every lane does the same IEEE operations in either copy. HBAT_CPU_NO_AVX2=1 forces
// the baseline copy (tests/test_cpu_dispatch.py compares the two bit for bit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bindings/op_call.h"
#include "chunking.h"
#include "ops/all.h"  // every op's math (generated from the op table)

namespace hbat {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per chunk: large enough to amortise scheduling
constexpr int kLanes = 16;           // elements per block: independent accumulators, whole vectors of any width
// Each list is prefetched this many elements ahead (2 KB of fp32). One thread streaming five lists (adamw_ewc_step_)
// keeps too few cache misses in flight on its own: the prefetches took it from 2.6x to 2.1x a copy_'s time of the
// same elements (ewc_penalty_grad_, lerp_: 6-7% faster; benchmarks/results/cpu-regression.md). No effect on results.
constexpr int64_t kPrefetch = 512;

template <int I, typename... Ts>
using Nth = std::tuple_element_t<I, std::tuple<Ts...>>;

// W floats: one SSE (4) or AVX2 (8) register. Arithmetic is per lane, a float operand applies to every lane.
template <int W> struct Lanes;
template <> struct Lanes<4> { typedef float type __attribute__((vector_size(16))); };
template <> struct Lanes<8> { typedef float type __attribute__((vector_size(32))); };

template <Op kOp, int kList, typename T>
inline float load(const T* p, int64_t i) {
  if constexpr (ListTraits<kOp, kList>::kLoads) {
    return static_cast<float>(p[i]);
  } else {
    return 0.0f;
  }
}

template <Op kOp, int kList, typename T>
inline void store(T* p, int64_t i, float v) {
  if constexpr (ListTraits<kOp, kList>::kStores) p[i] = static_cast<T>(v);
}

// W elements from p (float: one unaligned vector load; bfloat16 / float16: converted lane by lane).
template <Op kOp, int kList, typename V, typename T>
inline V load_vec(const T* p) {
  V v{};
  if constexpr (!ListTraits<kOp, kList>::kLoads) {
    return v;
  } else if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof(V));
  } else {
    for (size_t l = 0; l < sizeof(V) / sizeof(float); ++l) v[l] = static_cast<float>(p[l]);
  }
  return v;
}

template <Op kOp, int kList, typename V, typename T>
inline void store_vec(T* p, const V& v) {
  if constexpr (!ListTraits<kOp, kList>::kStores) {
    return;
  } else if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, sizeof(V));
  } else {
    for (size_t l = 0; l < sizeof(V) / sizeof(float); ++l) p[l] = static_cast<T>(v[l]);
  }
}

// Elements [begin, end) of one tensor of every list, in vectors of W floats; returns the chunk's sum (reducing
// ops) in double. Per vector: all its lists' loads, then the math, then the stores (an exact alias such as
// lerp_'s dst == a reads before it writes, and the compiler needs no aliasing checks).
template <int W, Op kOp, typename... Ts, size_t... L>
double apply_range(void* const* base, int64_t begin, int64_t end, const OpMath<kOp>& op_math,
                   std::index_sequence<L...>) {
  using V = typename Lanes<W>::type;
  const OpMath<kOp> math = op_math;  // a local copy: the stores cannot alias its constants, which stay in registers
  constexpr int N = sizeof...(Ts);
  constexpr int J = kLanes / W;  // vectors per block; vector j holds lanes [j W, (j + 1) W)
  static_assert(kLanes % W == 0, "a block is whole vectors");
  const std::tuple<Ts*...> ptr{static_cast<Ts*>(base[L])...};
  V acc[J];
  for (int j = 0; j < J; ++j) acc[j] = V{};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    if (i + kPrefetch < end) (__builtin_prefetch(std::get<L>(ptr) + i + kPrefetch, 0, 3), ...);
    for (int j = 0; j < J; ++j) {
      V x[N] = {load_vec<kOp, L, V>(std::get<L>(ptr) + i + j * W)...};
      math(x, acc[j]);
      (store_vec<kOp, L>(std::get<L>(ptr) + i + j * W, x[L]), ...);
    }
  }
  float lane[kLanes];
  for (int j = 0; j < J; ++j) std::memcpy(lane + j * W, &acc[j], sizeof(V));
  for (; i < end; ++i) {
    float e[N] = {load<kOp, L>(std::get<L>(ptr), i)...};
    math(e, lane[0]);
    (store<kOp, L>(std::get<L>(ptr), i, e[L]), ...);
  }
  double total = 0;
  for (int k = 0; k < kLanes; ++k) total += lane[k];
  return total;
}

// The two compiled copies of apply_range (flatten: the loop and the op's math inlined into each).
template <Op kOp, typename... Ts, size_t... L>
__attribute__((flatten)) double apply_range_baseline(void* const* base, int64_t begin, int64_t end,
                                                     const OpMath<kOp>& math, std::index_sequence<L...> lists) {
  return apply_range<4, kOp, Ts...>(base, begin, end, math, lists);
}

#if defined(__x86_64__)
template <Op kOp, typename... Ts, size_t... L>
__attribute__((target("avx2"), flatten)) double apply_range_avx2(void* const* base, int64_t begin, int64_t end,
                                                                 const OpMath<kOp>& math,
                                                                 std::index_sequence<L...> lists) {
  return apply_range<8, kOp, Ts...>(base, begin, end, math, lists);
}

// Decided once per process: the CPU has AVX2 and HBAT_CPU_NO_AVX2 is unset, empty or "0".
bool use_avx2() {
  static const bool yes = [] {
    const char* off = std::getenv("HBAT_CPU_NO_AVX2");
    return __builtin_cpu_supports("avx2") && !(off && *off && std::strcmp(off, "0") != 0);
  }();
  return yes;
}
#endif

// Runs elements [begin, end) through the copy of the loop this CPU runs best.
template <Op kOp, typename... Ts, size_t... L>
double apply_chunk(void* const* base, int64_t begin, int64_t end, const OpMath<kOp>& math,
                   std::index_sequence<L...> lists) {
#if defined(__x86_64__)
  if (use_avx2()) return apply_range_avx2<kOp, Ts...>(base, begin, end, math, lists);
#endif
  return apply_range_baseline<kOp, Ts...>(base, begin, end, math, lists);
}

// Picks the element type of each list (by its dtype rule and tensor t's dtype), then runs the chunk.
template <Op kOp, typename... Ts>
double run_chunk(const OpCall& call, int64_t t, int64_t begin, int64_t end) {
  constexpr int R = sizeof...(Ts);
  if constexpr (R == OpTraits<kOp>::kNumLists) {
    void* base[R];
    for (int l = 0; l < R; ++l) base[l] = call.lists[l][t].data_ptr();
    float v[kMaxVectors] = {0};
    for (int k = 0; k < OpTraits<kOp>::kNumVectors; ++k) v[k] = call.vectors[k].const_data_ptr<float>()[t];
    const OpMath<kOp> math(v, call.scalars);
    return apply_chunk<kOp, Ts...>(base, begin, end, math, std::make_index_sequence<R>());
  } else {
    constexpr int rule = ListTraits<kOp, R>::kDType;
    if constexpr (rule == kFloat32Only) {
      return run_chunk<kOp, Ts..., float>(call, t, begin, end);
    } else if constexpr (rule >= 0) {
      return run_chunk<kOp, Ts..., Nth<rule, Ts...>>(call, t, begin, end);
    } else {
      switch (call.lists[R][t].scalar_type()) {
        case at::kFloat: return run_chunk<kOp, Ts..., float>(call, t, begin, end);
        case at::kBFloat16: return run_chunk<kOp, Ts..., c10::BFloat16>(call, t, begin, end);
        case at::kHalf: return run_chunk<kOp, Ts..., c10::Half>(call, t, begin, end);
        default: TORCH_CHECK(false, "hbat (cpu): unsupported dtype ", call.lists[R][t].scalar_type());
      }
    }
  }
}

// Runs the op over every chunk of the call; returns the float32 per-tensor sums (reducing ops).
template <Op kOp>
at::Tensor run(const OpCall& call) {
  std::vector<int64_t> order(call.n);
  for (int64_t i = 0; i < call.n; ++i) order[i] = i;
  const auto& lead = call.lists[0];
  const std::vector<int64_t> first = first_chunks(order, [&](int64_t i) { return lead[i].numel(); }, kChunk);
  const int64_t num_chunks = first.back();
  constexpr bool kReduces = OpTraits<kOp>::kReduces;
  std::vector<double> partial(kReduces ? num_chunks : 0, 0.0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
      const int64_t start = (c - first[t]) * kChunk;
      const double s = run_chunk<kOp>(call, t, start, std::min(lead[t].numel(), start + kChunk));
      if constexpr (kReduces) partial[c] = s;
    }
  });
  if constexpr (!kReduces) {
    return at::Tensor();
  } else {
    auto out = at::empty({call.n}, at::TensorOptions().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    for (int64_t t = 0; t < call.n; ++t) {
      double sum = 0.0;
      for (int64_t c = first[t]; c < first[t + 1]; ++c) sum += partial[c];
      o[t] = static_cast<float>(sum);
    }
    return out;
  }
}

template <Op kOp>
void boxed_kernel(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  OpCall call;
  read_call(call, kOp, handle, stack, at::kCPU, "cpu");
  const at::Tensor sums = run<kOp>(call);
  push_result(call, sums, stack);
}

}  // namespace
}  // namespace cpu
}  // namespace hbat

TORCH_LIBRARY_IMPL(hbat, CPU, m) {
#define HBAT_X(name, ...) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&hbat::cpu::boxed_kernel<hbat::Op::name>>());
  HBAT_OPS(HBAT_X)
#undef HBAT_X
}
