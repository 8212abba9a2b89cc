// launch(): one kernel per dtype group, then the deterministic per-tensor reduction of the partial sums.
#include "cuda/multi_tensor_kernel.cuh"

namespace hbat {
namespace cuda {
namespace detail {

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const int64_t* __restrict__ table, int64_t n,
                                                                const double* __restrict__ partials,
                                                                float* __restrict__ out) {
  const TableLayout L{n};
  const int64_t* first_chunk = table + L.first_chunk();
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t s = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; s < n; s += warps) {
    // lane l adds chunks l, l + 32, ... in order; then a fixed shuffle tree: the same order every run
    double sum = 0.0;
    for (int64_t c = first_chunk[s] + lane; c < first_chunk[s + 1]; c += 32) sum += partials[c];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[table[L.index() + s]] = static_cast<float>(sum);
  }
}

}  // namespace detail

cudaError_t current_device_sm_count(int* num_sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(num_sms, cudaDevAttrMultiProcessorCount, device);
  return err;
}

cudaError_t launch(const Plan& plan, const DeviceBuffers& buffers, cudaStream_t stream) {
  if (!plan.error.empty()) return cudaErrorInvalidValue;
  int num_sms = 0;
  cudaError_t err = current_device_sm_count(&num_sms);
  if (err != cudaSuccess) return err;
  const int64_t n = plan.num_tensors;
  for (const LaunchGroup& g : plan.groups) {
    switch (plan.op) {
      case Op::kSumSqDiff: err = launch_sum_sq_diff(g, n, plan.chunk_size, buffers, num_sms, stream); break;
      case Op::kSnapshot: err = launch_snapshot(g, n, plan.chunk_size, buffers, num_sms, stream); break;
      case Op::kPenaltyGrad: err = launch_penalty_grad(g, n, plan.chunk_size, buffers, num_sms, stream); break;
      case Op::kScaledDiff: err = launch_scaled_diff(g, n, plan.chunk_size, buffers, num_sms, stream); break;
      case Op::kLerp: err = launch_lerp(g, n, plan.chunk_size, buffers, num_sms, stream); break;
      default: err = cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  if (op_reduces(plan.op) && n > 0) {
    const int64_t warps_per_block = detail::kThreads / 32;
    const int64_t blocks = (n + warps_per_block - 1) / warps_per_block;
    const int grid = static_cast<int>(blocks < 65535 ? blocks : 65535);
    detail::sum_partials_kernel<<<grid, detail::kThreads, 0, stream>>>(buffers.table, n, buffers.partials,
                                                                         buffers.out);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace cuda
}  // namespace hbat
