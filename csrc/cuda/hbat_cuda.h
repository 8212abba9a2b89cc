// Plain C++ API of the hbat CUDA kernels: pointers, sizes, dtype enums and a stream; no torch.
//
// Usage (csrc/bindings/cuda_binding.cpp does exactly this):
//   1. plan = make_plan(op, tensors, num_sms)                  host only (multi_tensor_plan.h)
//   2. copy plan.table to device memory (table_words() int64 words), stream-ordered
//   3. allocate partials: double[max(plan.num_chunks, 1)] (reducing ops), out: float[num_tensors]
//   4. launch(plan, device_table, coef, partials, out, stream)
// All work is enqueued on `stream`; nothing synchronises the host and nothing is allocated.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/multi_tensor_plan.h"

namespace hbat {
namespace cuda {

struct DeviceBuffers {
  const int64_t* table = nullptr;  // the plan's table, in device memory
  const float* coef = nullptr;     // float32 [num_tensors]: coef (penalty_grad_, scaled_diff), weights (lerp_)
  double* partials = nullptr;      // [num_chunks] per-chunk partial sums (reducing ops)
  float* out = nullptr;            // float32 [num_tensors] per-tensor sums (reducing ops)
};

// Number of multiprocessors of the current device (make_plan sizes chunks with it).
cudaError_t current_device_sm_count(int* num_sms);

// Enqueue every launch of the plan (one per dtype group) and, for the reducing ops, the per-tensor
// reduction of the partials. Returns the first CUDA error (cudaSuccess when all launches were enqueued).
cudaError_t launch(const Plan& plan, const DeviceBuffers& buffers, cudaStream_t stream);

// Launch one dtype group (used by launch(); exposed for tests and benchmarks). One function per op, each
// defined in its own .cu file so that the instantiations compile in parallel.
cudaError_t launch_sum_sq_diff(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size,
                               const DeviceBuffers& b, int num_sms, cudaStream_t stream);
cudaError_t launch_snapshot(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size,
                            const DeviceBuffers& b, int num_sms, cudaStream_t stream);
cudaError_t launch_penalty_grad(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size,
                                const DeviceBuffers& b, int num_sms, cudaStream_t stream);
cudaError_t launch_scaled_diff(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size,
                               const DeviceBuffers& b, int num_sms, cudaStream_t stream);
cudaError_t launch_lerp(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size, const DeviceBuffers& b,
                        int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace hbat
