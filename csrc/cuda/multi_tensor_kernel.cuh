// The one streaming kernel behind every op (the op and the three element types are template parameters),
// and the deterministic per-tensor reduction of its partial sums. See README.md for the design.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/hbat_cuda.h"

namespace hbat {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;  // threads per block
constexpr int kVec = 8;        // elements per thread per vector step: one 16 B load of a 2-byte type, two of fp32
constexpr int kUnroll = 2;     // vector steps whose loads are all issued before the first use
constexpr int kScalarUnroll = 4;
constexpr int kMinBlocksPerSM = 2;  // caps registers at 128/thread (tighter caps made ptxas spill on sm_80)

// ------------------------------------------------------------------------------------------ element types
template <DType D> struct Storage;
template <> struct Storage<DType::kFloat32> { using type = float; };
template <> struct Storage<DType::kBFloat16> { using type = __nv_bfloat16; };
template <> struct Storage<DType::kFloat16> { using type = __half; };

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

// ------------------------------------------------------------------------------------------ per element
template <Op kOp> struct OpTraits {
  static constexpr bool reduces = kOp == Op::kSumSqDiff || kOp == Op::kSnapshot || kOp == Op::kPenaltyGrad;
  static constexpr bool loads_z = kOp == Op::kPenaltyGrad;
  static constexpr bool stores_y = kOp == Op::kSnapshot;
  static constexpr bool stores_z = kOp == Op::kPenaltyGrad || kOp == Op::kScaledDiff || kOp == Op::kLerp;
  static constexpr bool uses_coef = kOp == Op::kPenaltyGrad || kOp == Op::kScaledDiff || kOp == Op::kLerp;
};

// Computes the outputs of one element in place of its inputs: y (snapshot) or z, and adds to acc.
template <Op kOp>
__device__ __forceinline__ void apply(float x, float& y, float& z, float c, float& acc) {
  if constexpr (kOp == Op::kLerp) {
    z = fmaf(c, y, (1.0f - c) * x);
  } else {
    const float d = x - y;
    if constexpr (OpTraits<kOp>::reduces) acc = fmaf(d, d, acc);
    if constexpr (kOp == Op::kSnapshot) y = x;
    if constexpr (kOp == Op::kPenaltyGrad) z = fmaf(c, d, z);
    if constexpr (kOp == Op::kScaledDiff) z = c * d;
  }
}

// ------------------------------------------------------------------------------------------ one chunk
// Elements [0, count) of a chunk whose roles start at x, y, z; `head` as in multi_tensor_plan.h.
// Element mapping depends only on (count, head, threadIdx), so partial sums are deterministic.
template <Op kOp, typename TX, typename TY, typename TZ>
__device__ __forceinline__ float process_chunk(const TX* x, TY* y, TZ* z, int count, int head, float c) {
  using Traits = OpTraits<kOp>;
  float acc = 0.0f;
  int scalar_begin = 0, scalar_end = count;  // [0, count) scalar unless a vector body exists
  if (head >= 0 && head < count) {
    const int num_vec = (count - head) / kVec;
    int v = threadIdx.x;
    // full unrolled steps: all loads first (independent, in flight together), then math and stores
    for (; v + (kUnroll - 1) * kThreads < num_vec; v += kUnroll * kThreads) {
      float xv[kUnroll][kVec], yv[kUnroll][kVec], zv[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int e = head + (v + u * kThreads) * kVec;
        load_vec(x + e, xv[u]);
        load_vec(y + e, yv[u]);
        if constexpr (Traits::loads_z) load_vec(z + e, zv[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int e = head + (v + u * kThreads) * kVec;
#pragma unroll
        for (int k = 0; k < kVec; ++k) apply<kOp>(xv[u][k], yv[u][k], zv[u][k], c, acc);
        if constexpr (Traits::stores_y) store_vec(y + e, yv[u]);
        if constexpr (Traits::stores_z) store_vec(z + e, zv[u]);
      }
    }
    for (; v < num_vec; v += kThreads) {
      float xv[kVec], yv[kVec], zv[kVec];
      const int e = head + v * kVec;
      load_vec(x + e, xv);
      load_vec(y + e, yv);
      if constexpr (Traits::loads_z) load_vec(z + e, zv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) apply<kOp>(xv[k], yv[k], zv[k], c, acc);
      if constexpr (Traits::stores_y) store_vec(y + e, yv);
      if constexpr (Traits::stores_z) store_vec(z + e, zv);
    }
    // the head [0, head) and the tail after the last full vector: at most 14 elements, one per thread
    const int vec_end = head + num_vec * kVec;
    const int t = threadIdx.x;
    const int e = t < head ? t : (t - head < count - vec_end ? vec_end + (t - head) : -1);
    if (e >= 0) {
      float xs = load_one(x + e), ys = load_one(y + e), zs = 0.0f;
      if constexpr (Traits::loads_z) zs = load_one(z + e);
      apply<kOp>(xs, ys, zs, c, acc);
      if constexpr (Traits::stores_y) store_one(y + e, ys);
      if constexpr (Traits::stores_z) store_one(z + e, zs);
    }
    scalar_begin = scalar_end = 0;
  }
  // scalar path (incompatible alignments, or a chunk shorter than its head): coalesced, kScalarUnroll in flight
  for (int e0 = scalar_begin + threadIdx.x; e0 < scalar_end; e0 += kScalarUnroll * kThreads) {
    float xs[kScalarUnroll], ys[kScalarUnroll], zs[kScalarUnroll];
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int e = e0 + u * kThreads;
      xs[u] = ys[u] = zs[u] = 0.0f;
      if (e < scalar_end) {
        xs[u] = load_one(x + e);
        ys[u] = load_one(y + e);
        if constexpr (Traits::loads_z) zs[u] = load_one(z + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int e = e0 + u * kThreads;
      if (e < scalar_end) {
        apply<kOp>(xs[u], ys[u], zs[u], c, acc);
        if constexpr (Traits::stores_y) store_one(y + e, ys[u]);
        if constexpr (Traits::stores_z) store_one(z + e, zs[u]);
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
// A persistent grid strides over the chunks [chunk_begin, chunk_end) of one dtype group, whose tensors are
// the table's segments [seg_begin, seg_end).
template <Op kOp, typename TX, typename TY, typename TZ>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) multi_tensor_kernel(const int64_t* __restrict__ table, int64_t n,
                                                                 int32_t seg_begin, int32_t seg_end,
                                                                 int64_t chunk_begin, int64_t chunk_end,
                                                                 int64_t chunk_size, const float* __restrict__ coef,
                                                                 double* __restrict__ partials) {
  const TableLayout L{n};
  const int64_t* first_chunk = table + L.first_chunk();
  for (int64_t chunk = chunk_begin + blockIdx.x; chunk < chunk_end; chunk += gridDim.x) {
    // the last segment whose first chunk is <= chunk; never an empty one (an empty segment shares its first
    // chunk with the next segment, or, last in the group, starts at chunk_end)
    int32_t lo = seg_begin, hi = seg_end - 1;
    while (lo < hi) {
      const int32_t mid = (lo + hi + 1) / 2;
      if (__ldg(first_chunk + mid) <= chunk) lo = mid; else hi = mid - 1;
    }
    const int32_t s = lo;
    const int64_t numel = __ldg(table + L.numel() + s);
    const int64_t start = (chunk - __ldg(first_chunk + s)) * chunk_size;
    const int count = static_cast<int>(numel - start < chunk_size ? numel - start : chunk_size);
    const int head = static_cast<int>(__ldg(table + L.head() + s));
    float c = 0.0f;
    if constexpr (OpTraits<kOp>::uses_coef) c = __ldg(coef + __ldg(table + L.index() + s));
    const TX* x = reinterpret_cast<const TX*>(__ldg(table + L.ptr_x() + s)) + start;
    TY* y = reinterpret_cast<TY*>(__ldg(table + L.ptr_y() + s)) + start;
    TZ* z = reinterpret_cast<TZ*>(__ldg(table + L.ptr_z() + s)) + start;
    const float acc = process_chunk<kOp, TX, TY, TZ>(x, y, z, count, head, c);
    if constexpr (OpTraits<kOp>::reduces) {
      const double total = block_sum(acc);
      if (threadIdx.x == 0) partials[chunk] = total;
    }
  }
}

// out[index[s]] = sum of segment s's partials, in chunk order then a fixed tree: one warp per segment.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const int64_t* __restrict__ table, int64_t n,
                                                                const double* __restrict__ partials,
                                                                float* __restrict__ out);

template <Op kOp, typename TX, typename TY, typename TZ>
cudaError_t launch_group(const LaunchGroup& g, int64_t n, int64_t chunk_size, const DeviceBuffers& b, int num_sms,
                         cudaStream_t stream) {
  auto kernel = multi_tensor_kernel<kOp, TX, TY, TZ>;
  static int blocks_per_sm = [&] {  // depends on the kernel and the architecture only
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess || blocks < 1)
      blocks = 1;
    return blocks;
  }();
  const int64_t chunks = g.chunk_end - g.chunk_begin;
  const int64_t resident = int64_t(num_sms) * blocks_per_sm;
  const int grid = static_cast<int>(chunks < resident ? chunks : resident);
  if (grid <= 0) return cudaSuccess;
  kernel<<<grid, kThreads, 0, stream>>>(b.table, n, g.seg_begin, g.seg_end, g.chunk_begin, g.chunk_end, chunk_size,
                                        b.coef, b.partials);
  return cudaGetLastError();
}

// Dispatch a group to the instantiation of its dtypes. kZMode: 0 = no z role, 1 = z has x's dtype,
// 2 = z has its own dtype.
template <Op kOp, int kZMode, typename TX, typename TY>
cudaError_t dispatch_z(const LaunchGroup& g, int64_t n, int64_t cs, const DeviceBuffers& b, int sms, cudaStream_t st) {
  if constexpr (kZMode == 0) {
    return launch_group<kOp, TX, TY, float>(g, n, cs, b, sms, st);
  } else if constexpr (kZMode == 1) {
    return launch_group<kOp, TX, TY, TX>(g, n, cs, b, sms, st);
  } else {
    switch (g.dz) {
      case DType::kFloat32: return launch_group<kOp, TX, TY, float>(g, n, cs, b, sms, st);
      case DType::kBFloat16: return launch_group<kOp, TX, TY, __nv_bfloat16>(g, n, cs, b, sms, st);
      case DType::kFloat16: return launch_group<kOp, TX, TY, __half>(g, n, cs, b, sms, st);
    }
    return cudaErrorInvalidValue;
  }
}

template <Op kOp, int kZMode, typename TX>
cudaError_t dispatch_y(const LaunchGroup& g, int64_t n, int64_t cs, const DeviceBuffers& b, int sms, cudaStream_t st) {
  switch (g.dy) {
    case DType::kFloat32: return dispatch_z<kOp, kZMode, TX, float>(g, n, cs, b, sms, st);
    case DType::kBFloat16: return dispatch_z<kOp, kZMode, TX, __nv_bfloat16>(g, n, cs, b, sms, st);
    case DType::kFloat16: return dispatch_z<kOp, kZMode, TX, __half>(g, n, cs, b, sms, st);
  }
  return cudaErrorInvalidValue;
}

template <Op kOp, int kZMode>
cudaError_t dispatch(const LaunchGroup& g, int64_t n, int64_t cs, const DeviceBuffers& b, int sms, cudaStream_t st) {
  switch (g.dx) {
    case DType::kFloat32: return dispatch_y<kOp, kZMode, float>(g, n, cs, b, sms, st);
    case DType::kBFloat16: return dispatch_y<kOp, kZMode, __nv_bfloat16>(g, n, cs, b, sms, st);
    case DType::kFloat16: return dispatch_y<kOp, kZMode, __half>(g, n, cs, b, sms, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace cuda
}  // namespace hbat
