// Instantiations of the multi-tensor kernel for one op (every dtype combination); see multi_tensor_kernel.cuh.
#include "cuda/multi_tensor_kernel.cuh"

namespace hbat {
namespace cuda {

cudaError_t launch_scaled_diff(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size, const DeviceBuffers& b,
                         int num_sms, cudaStream_t stream) {
  return detail::dispatch<Op::kScaledDiff, 1>(g, num_tensors, chunk_size, b, num_sms, stream);
}

}  // namespace cuda
}  // namespace hbat
