// CUDA implementations of the hbat ops (schemas: library.cpp, in hbat._C): one boxed kernel per op of the
// table, all the same code. Thin: the generic argument checks (op_call.h), the host plan (cached, like the
// Triton backend's), torch allocations on the tensors' device, and launches on torch's current CUDA stream.
// The kernels are plain CUDA (csrc/cuda, no torch headers).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings/op_call.h"
#include "cuda/hbat_cuda.h"
#include "cuda/plan_cache.h"

namespace {
namespace hc = hbat::cuda;

// plans of the last calls; a training loop has a few distinct lists (params/anchors/grads, optimizer states)
constexpr size_t kPlanCacheSize = 64;

hc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return hc::DType::kBFloat16;
    case at::kHalf: return hc::DType::kFloat16;
    default: return hc::DType::kFloat32;  // op_call.h admitted float32, bfloat16 and float16 only
  }
}

struct DevicePlan {
  hc::Plan plan;
  at::Tensor table;  // plan.table in device memory
};

// The plan of the call and its table in device memory: built and copied on the first call with these tensors
// on this stream, then reused. A cached table is only read, by launches on the stream that copied it (it was
// allocated there, so its memory is reused only after those launches, even once evicted).
std::shared_ptr<const DevicePlan> cached_plan(const hbat::OpCall& call, hbat::Op op, cudaStream_t stream) {
  static std::mutex mutex;
  // never destroyed: no CUDA frees during interpreter shutdown
  static auto* cache = new hc::PlanCache<std::shared_ptr<const DevicePlan>>(kPlanCacheSize);
  const int lists = call.info->num_lists;
  std::vector<hc::TensorArg> args(call.n);
  for (int64_t i = 0; i < call.n; ++i) {
    args[i].numel = call.lists[0][i].numel();
    for (int l = 0; l < lists; ++l) {
      args[i].ptr[l] = reinterpret_cast<std::uintptr_t>(call.lists[l][i].data_ptr());
      args[i].dtype[l] = dtype_of(call.lists[l][i]);
    }
  }
  int num_sms = 0;
  C10_CUDA_CHECK(hc::current_device_sm_count(&num_sms));
  hc::PlanKey key = hc::plan_key(op, args, {call.device.index(), reinterpret_cast<int64_t>(stream), num_sms});
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto* hit = cache->find(key)) return *hit;
  auto entry = std::make_shared<DevicePlan>();
  hc::Plan& plan = entry->plan;
  plan = hc::make_plan(op, args, num_sms);
  TORCH_CHECK(plan.error.empty(), "hbat ", call.info->name, " (cuda): ", plan.error);
  // the table goes through pinned memory, stream-ordered: torch keeps the pinned block alive until the copy ends
  const auto words = static_cast<int64_t>(plan.table.size());
  at::Tensor host_table = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host_table.data_ptr(), plan.table.data(), plan.table.size() * sizeof(int64_t));
  entry->table = at::empty({words}, at::TensorOptions().dtype(at::kLong).device(call.device));
  entry->table.copy_(host_table, /*non_blocking=*/true);
  return cache->insert(std::move(key), std::move(entry));
}

template <hbat::Op kOp>
void boxed_kernel(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  hbat::OpCall call;
  hbat::read_call(call, kOp, handle, stack, at::kCUDA, "cuda");
  at::Tensor sums;
  if (call.n > 0) {
    const c10::cuda::CUDAGuard guard(call.device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const std::shared_ptr<const DevicePlan> entry = cached_plan(call, kOp, stream);
    const hc::Plan& plan = entry->plan;
    const auto on_device = at::TensorOptions().device(call.device);
    at::Tensor partials;
    hc::DeviceBuffers buffers;
    buffers.table = entry->table.data_ptr<int64_t>();
    for (int k = 0; k < call.info->num_vectors; ++k) buffers.vectors[k] = call.vectors[k].data_ptr<float>();
    for (int k = 0; k < call.info->num_scalars; ++k) buffers.scalars[k] = call.scalars[k];
    if (call.info->reduces) {
      sums = at::empty({call.n}, on_device.dtype(at::kFloat));
      partials = at::empty({plan.num_chunks > 0 ? plan.num_chunks : 1}, on_device.dtype(at::kDouble));
      buffers.partials = partials.data_ptr<double>();
      buffers.out = sums.data_ptr<float>();
    }
    C10_CUDA_CHECK(hc::launch(plan, buffers, stream));
  } else if (call.info->reduces) {
    sums = at::empty({0}, at::TensorOptions().dtype(at::kFloat).device(call.device));
  }
  hbat::push_result(call, sums, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(hbat, CUDA, m) {
#define HBAT_X(name, ...) m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&boxed_kernel<hbat::Op::name>>());
  HBAT_OPS(HBAT_X)
#undef HBAT_X
}

static std::string build_info() {
  std::string s = "hbat._C_cuda built with CUDA ";
  s += std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "how this extension was compiled");
}
