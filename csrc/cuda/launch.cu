// launch(): one kernel per dtype group, then the deterministic per-tensor reduction of the partial sums.
#include "cuda/multi_tensor_apply.cuh"

namespace hbat {
namespace cuda {
namespace detail {

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const int64_t* __restrict__ table, int64_t n,
                                                                int64_t lists, const double* __restrict__ partials,
                                                                float* __restrict__ out) {
  const TableLayout L{n, lists};
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
#define HBAT_X(name, ...) \
  case Op::name: err = launch_##name(g, n, plan.chunk_size, buffers, num_sms, stream); break;
      HBAT_OPS(HBAT_X)
#undef HBAT_X
      default: err = cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  if (op_info(plan.op).reduces && n > 0) {
    const int64_t warps_per_block = detail::kThreads / 32;
    const int64_t blocks = (n + warps_per_block - 1) / warps_per_block;
    const int grid = static_cast<int>(blocks < 65535 ? blocks : 65535);
    detail::sum_partials_kernel<<<grid, detail::kThreads, 0, stream>>>(buffers.table, n, plan.num_lists,
                                                                         buffers.partials, buffers.out);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace cuda
}  // namespace hbat
