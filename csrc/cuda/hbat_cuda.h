// Plain C++ API of the hbat CUDA kernels: pointers, sizes, dtype enums and a stream; no torch.
//
// Usage (csrc/bindings/cuda_binding.cpp does exactly this):
//   1. plan = make_plan(op, tensors, num_sms)                  host only (multi_tensor_plan.h; plan_cache.h
//                                                              keeps recent plans)
//   2. copy plan.table to device memory (table.size() int64 words), stream-ordered
//   3. allocate partials: double[max(plan.num_chunks, 1)] (reducing ops), out: float[num_tensors]
//   4. launch(plan, buffers, stream)
// All work is enqueued on `stream`; nothing synchronises the host and nothing is allocated.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/multi_tensor_plan.h"

namespace hbat {
namespace cuda {

struct DeviceBuffers {
  const int64_t* table = nullptr;              // the plan's table, in device memory
  const float* vectors[kMaxVectors] = {};      // the op's per-tensor vectors, float32 [num_tensors] each
  double scalars[kMaxScalars] = {};            // the op's scalars
  double* partials = nullptr;                  // [num_chunks] per-chunk partial sums (reducing ops)
  float* out = nullptr;                        // float32 [num_tensors] per-tensor sums (reducing ops)
};

// Number of multiprocessors of the current device (make_plan sizes chunks with it).
cudaError_t current_device_sm_count(int* num_sms);

// Enqueue every launch of the plan (one per dtype group) and, for the reducing ops, the per-tensor
// reduction of the partials. Returns the first CUDA error (cudaSuccess when all launches were enqueued).
cudaError_t launch(const Plan& plan, const DeviceBuffers& buffers, cudaStream_t stream);

// Launch one dtype group of op <name> (used by launch(); exposed for tests and benchmarks). Each is defined
// in csrc/cuda/<name>.cu, so that the instantiations of the ops compile in parallel.
#define HBAT_X(name, ...)                                                                            \
  cudaError_t launch_##name(const LaunchGroup& g, int64_t num_tensors, int64_t chunk_size, const DeviceBuffers& b, \
                            int num_sms, cudaStream_t stream);
HBAT_OPS(HBAT_X)
#undef HBAT_X

}  // namespace cuda
}  // namespace hbat
