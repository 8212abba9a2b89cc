// The one multi-tensor apply behind every op: a streaming kernel templated on the op (its math is
// OpMath<op>, csrc/ops/<op>.h; its lists' roles and dtype rules come from the op table) and on the element
// type of each list, plus the deterministic per-tensor reduction of its partial sums. The plan and its
// chunks: CONTRIBUTING.md, "Chunks: one plan, three planners".
// An op's .cu file instantiates it with HBAT_CUDA_OP(name).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/hbat_cuda.h"

namespace hbat {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;  // threads per block
constexpr int kVec = 8;        // elements per thread per vector step: one 16 B load of a 2-byte type, two of fp32
// vector steps whose loads are all issued before the first use: 2, or 1 for ops with more than 3 lists
// (AdamW's 5 lists x 8 elements x 2 steps would not fit the register cap below)
template <Op kOp> constexpr int kUnroll = OpTraits<kOp>::kNumLists <= 3 ? 2 : 1;
constexpr int kScalarUnroll = 4;
constexpr int kMinBlocksPerSM = 2;  // caps registers at 128/thread (tighter caps made ptxas spill on sm_80)

// ------------------------------------------------------------------------------------------ element types
template <typename T>
__device__ __forceinline__ float bits16_to_float(uint32_t bits) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __uint_as_float(bits << 16);  // exact
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t float_to_bits16(float v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

template <typename T>
__device__ __forceinline__ float load_one(const T* p) {
  if constexpr (std::is_same<T, float>::value) {
    return __ldcg(p);
  } else {
    return bits16_to_float<T>(__ldcg(reinterpret_cast<const unsigned short*>(p)));
  }
}

template <typename T>
__device__ __forceinline__ void store_one(T* p, float v) {
  if constexpr (std::is_same<T, float>::value) {
    __stwb(p, v);
  } else {
    __stwb(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(float_to_bits16<T>(v)));
  }
}

// Explicit global-space accesses (the addresses come from the table, so the compiler cannot infer the space):
// ld.global.cg (L2, coherent: safe when lerp_'s dst aliases a or b), st.global.wb.

// kVec elements at a 16-byte aligned address
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVec]) {
  if constexpr (std::is_same<T, float>::value) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldcg(reinterpret_cast<const float4*>(p) + 1);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = bits16_to_float<T>(words[k] & 0xffffu);
      out[2 * k + 1] = bits16_to_float<T>(words[k] >> 16);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVec]) {
  if constexpr (std::is_same<T, float>::value) {
    __stwb(reinterpret_cast<float4*>(p), make_float4(in[0], in[1], in[2], in[3]));
    __stwb(reinterpret_cast<float4*>(p) + 1, make_float4(in[4], in[5], in[6], in[7]));
  } else {
    uint32_t words[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) words[k] = float_to_bits16<T>(in[2 * k]) | (float_to_bits16<T>(in[2 * k + 1]) << 16);
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(words[0], words[1], words[2], words[3]));
  }
}

// ------------------------------------------------------------------------------------------ the lists
template <int I, typename... Ts>
using Nth = std::tuple_element_t<I, std::tuple<Ts...>>;

// Loads / stores of one list of the op, no-ops where its role does not load / store (the op table's roles)
template <Op kOp, int kList, typename T>
__device__ __forceinline__ void load_list_vec(void* const* base, int e, float (&v)[kVec]) {
  if constexpr (ListTraits<kOp, kList>::kLoads) {
    load_vec(static_cast<const T*>(base[kList]) + e, v);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = 0.0f;
  }
}

template <Op kOp, int kList, typename T>
__device__ __forceinline__ void store_list_vec(void* const* base, int e, const float (&v)[kVec]) {
  if constexpr (ListTraits<kOp, kList>::kStores) store_vec(static_cast<T*>(base[kList]) + e, v);
}

template <Op kOp, int kList, typename T>
__device__ __forceinline__ float load_list_one(void* const* base, int e) {
  if constexpr (ListTraits<kOp, kList>::kLoads) {
    return load_one(static_cast<const T*>(base[kList]) + e);
  } else {
    return 0.0f;
  }
}

template <Op kOp, int kList, typename T>
__device__ __forceinline__ void store_list_one(void* const* base, int e, float v) {
  if constexpr (ListTraits<kOp, kList>::kStores) store_one(static_cast<T*>(base[kList]) + e, v);
}

// The op's math on element k of a vector step of every list.
template <Op kOp, int N>
__device__ __forceinline__ void apply_vec(const OpMath<kOp>& math, float (&x)[N][kVec], float& acc) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    float e[N];
#pragma unroll
    for (int l = 0; l < N; ++l) e[l] = x[l][k];
    math(e, acc);
#pragma unroll
    for (int l = 0; l < N; ++l) x[l][k] = e[l];
  }
}

// ------------------------------------------------------------------------------------------ one chunk
// Elements [0, count) of a chunk whose lists start at base[l]; `head` as in multi_tensor_plan.h.
// Element mapping depends only on (count, head, threadIdx), so partial sums are deterministic.
template <Op kOp, typename... Ts, size_t... L>
__device__ __forceinline__ float process_chunk(void* const* base, int count, int head, const OpMath<kOp>& math,
                                               std::index_sequence<L...>) {
  constexpr int N = sizeof...(Ts);
  constexpr int U = kUnroll<kOp>;
  float acc = 0.0f;
  int scalar_begin = 0, scalar_end = count;  // [0, count) scalar unless a vector body exists
  if (head >= 0 && head < count) {
    const int num_vec = (count - head) / kVec;
    int v = threadIdx.x;
    // full unrolled steps: all loads first (independent, in flight together), then math and stores
    for (; v + (U - 1) * kThreads < num_vec; v += U * kThreads) {
      float x[U][N][kVec];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int e = head + (v + u * kThreads) * kVec;
        (load_list_vec<kOp, L, Ts>(base, e, x[u][L]), ...);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int e = head + (v + u * kThreads) * kVec;
        apply_vec<kOp, N>(math, x[u], acc);
        (store_list_vec<kOp, L, Ts>(base, e, x[u][L]), ...);
      }
    }
    for (; v < num_vec; v += kThreads) {
      float x[N][kVec];
      const int e = head + v * kVec;
      (load_list_vec<kOp, L, Ts>(base, e, x[L]), ...);
      apply_vec<kOp, N>(math, x, acc);
      (store_list_vec<kOp, L, Ts>(base, e, x[L]), ...);
    }
    // the head [0, head) and the tail after the last full vector: at most 14 elements, one per thread
    const int vec_end = head + num_vec * kVec;
    const int t = threadIdx.x;
    const int e = t < head ? t : (t - head < count - vec_end ? vec_end + (t - head) : -1);
    if (e >= 0) {
      float x[N] = {load_list_one<kOp, L, Ts>(base, e)...};
      math(x, acc);
      (store_list_one<kOp, L, Ts>(base, e, x[L]), ...);
    }
    scalar_begin = scalar_end = 0;
  }
  // scalar path (incompatible alignments, or a chunk shorter than its head): coalesced, kScalarUnroll in flight
  for (int e0 = scalar_begin + threadIdx.x; e0 < scalar_end; e0 += kScalarUnroll * kThreads) {
    float x[kScalarUnroll][N];
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int e = e0 + u * kThreads;
#pragma unroll
      for (int l = 0; l < N; ++l) x[u][l] = 0.0f;
      if (e < scalar_end) ((x[u][L] = load_list_one<kOp, L, Ts>(base, e)), ...);
    }
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int e = e0 + u * kThreads;
      if (e < scalar_end) {
        math(x[u], acc);
        (store_list_one<kOp, L, Ts>(base, e, x[u][L]), ...);
      }
    }
  }
  return acc;
}

// Sum over the block in a fixed order (double), valid in thread 0.
__device__ __forceinline__ double block_sum(float value) {
  __shared__ double warp_sums[kThreads / 32];
  double v = value;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  __syncthreads();  // warp_sums is reused by the block's next chunk
  return total;
}

// ------------------------------------------------------------------------------------------ kernels
// Everything a launch of one dtype group needs (passed by value: the per-tensor data is in the table).
struct KernelArgs {
  const int64_t* table;
  int64_t n;
  int32_t seg_begin, seg_end;    // the group's tensors (table segments)
  int64_t chunk_begin, chunk_end;  // the group's chunks
  int64_t chunk_size;
  const float* vectors[kMaxVectors];
  double scalars[kMaxScalars];
  double* partials;
};

// A persistent grid strides over the chunks [chunk_begin, chunk_end) of one dtype group, whose tensors are
// the table's segments [seg_begin, seg_end). Ts: the element type of each of the op's lists.
template <Op kOp, typename... Ts>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) multi_tensor_kernel(const KernelArgs args) {
  constexpr int N = sizeof...(Ts);
  constexpr int kElementBytes[N] = {static_cast<int>(sizeof(Ts))...};
  const TableLayout L{args.n, N};
  const int64_t* table = args.table;
  const int64_t* first_chunk = table + L.first_chunk();
  for (int64_t chunk = args.chunk_begin + blockIdx.x; chunk < args.chunk_end; chunk += gridDim.x) {
    // the last segment whose first chunk is <= chunk; never an empty one (an empty segment shares its first
    // chunk with the next segment, or, last in the group, starts at chunk_end)
    int32_t lo = args.seg_begin, hi = args.seg_end - 1;
    while (lo < hi) {
      const int32_t mid = (lo + hi + 1) / 2;
      if (__ldg(first_chunk + mid) <= chunk) lo = mid; else hi = mid - 1;
    }
    const int32_t s = lo;
    const int64_t numel = __ldg(table + L.numel() + s);
    const int64_t start = (chunk - __ldg(first_chunk + s)) * args.chunk_size;
    const int count = static_cast<int>(numel - start < args.chunk_size ? numel - start : args.chunk_size);
    const int head = static_cast<int>(__ldg(table + L.head() + s));
    float vec[kMaxVectors] = {};
    if constexpr (OpTraits<kOp>::kNumVectors > 0) {
      const int64_t index = __ldg(table + L.index() + s);
#pragma unroll
      for (int k = 0; k < OpTraits<kOp>::kNumVectors; ++k) vec[k] = __ldg(args.vectors[k] + index);
    }
    const OpMath<kOp> math(vec, args.scalars);
    void* base[N];
#pragma unroll
    for (int l = 0; l < N; ++l)
      base[l] = reinterpret_cast<char*>(__ldg(table + L.ptr(l) + s)) + start * kElementBytes[l];
    const float acc = process_chunk<kOp, Ts...>(base, count, head, math, std::make_index_sequence<N>());
    if constexpr (OpTraits<kOp>::kReduces) {
      const double total = block_sum(acc);
      if (threadIdx.x == 0) args.partials[chunk] = total;
    }
  }
}

// out[index[s]] = sum of segment s's partials, in chunk order then a fixed tree: one warp per segment.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const int64_t* __restrict__ table, int64_t n,
                                                                int64_t lists, const double* __restrict__ partials,
                                                                float* __restrict__ out);

template <Op kOp, typename... Ts>
cudaError_t launch_group(const KernelArgs& args, int num_sms, cudaStream_t stream) {
  auto kernel = multi_tensor_kernel<kOp, Ts...>;
  static int blocks_per_sm = [&] {  // depends on the kernel and the architecture only
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess || blocks < 1)
      blocks = 1;
    return blocks;
  }();
  const int64_t chunks = args.chunk_end - args.chunk_begin;
  const int64_t resident = int64_t(num_sms) * blocks_per_sm;
  const int grid = static_cast<int>(chunks < resident ? chunks : resident);
  if (grid <= 0) return cudaSuccess;
  kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// Picks the element type of each list from the group's dtypes and the list's dtype rule (the op table:
// any float, float32 only, or another list's type), then launches that instantiation.
template <Op kOp, typename... Ts>
cudaError_t dispatch(const LaunchGroup& g, const KernelArgs& args, int num_sms, cudaStream_t stream) {
  constexpr int R = sizeof...(Ts);
  if constexpr (R == OpTraits<kOp>::kNumLists) {
    return launch_group<kOp, Ts...>(args, num_sms, stream);
  } else {
    constexpr int rule = ListTraits<kOp, R>::kDType;
    if constexpr (rule == kFloat32Only) {
      return dispatch<kOp, Ts..., float>(g, args, num_sms, stream);
    } else if constexpr (rule >= 0) {
      return dispatch<kOp, Ts..., Nth<rule, Ts...>>(g, args, num_sms, stream);
    } else {
      switch (g.dtype[R]) {
        case DType::kFloat32: return dispatch<kOp, Ts..., float>(g, args, num_sms, stream);
        case DType::kBFloat16: return dispatch<kOp, Ts..., __nv_bfloat16>(g, args, num_sms, stream);
        case DType::kFloat16: return dispatch<kOp, Ts..., __half>(g, args, num_sms, stream);
      }
      return cudaErrorInvalidValue;
    }
  }
}

inline KernelArgs kernel_args(const LaunchGroup& g, int64_t n, int64_t chunk_size, const DeviceBuffers& b) {
  KernelArgs args{};
  args.table = b.table;
  args.n = n;
  args.seg_begin = g.seg_begin;
  args.seg_end = g.seg_end;
  args.chunk_begin = g.chunk_begin;
  args.chunk_end = g.chunk_end;
  args.chunk_size = chunk_size;
  for (int k = 0; k < kMaxVectors; ++k) args.vectors[k] = b.vectors[k];
  for (int k = 0; k < kMaxScalars; ++k) args.scalars[k] = b.scalars[k];
  args.partials = b.partials;
  return args;
}

}  // namespace detail
}  // namespace cuda
}  // namespace hbat

// Defines launch_<name> (hbat_cuda.h): every dtype combination of op <name> that its lists' rules allow.
#define HBAT_CUDA_OP(name)                                                                                  \
  namespace hbat {                                                                                          \
  namespace cuda {                                                                                          \
  cudaError_t launch_##name(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size, const DeviceBuffers& b, \
                            int num_sms, cudaStream_t stream) {                                             \
    return detail::dispatch<Op::name>(g, detail::kernel_args(g, num_tensors, chunk_size, b), num_sms, stream); \
  }                                                                                                         \
  }                                                                                                         \
  }
