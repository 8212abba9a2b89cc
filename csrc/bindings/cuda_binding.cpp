// CUDA implementations of the hbat ops (schemas: library.cpp, in hbat._C). Thin: minimal checks (the Python
// layer validates fully), the host plan, torch allocations on the tensors' device, and launches on torch's
// current CUDA stream. The kernels are plain CUDA (csrc/cuda, no torch headers).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <string>
#include <vector>

#include "cuda/hbat_cuda.h"

namespace {
namespace hc = hbat::cuda;

hc::DType dtype_of(const at::Tensor& t, const char* role, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return hc::DType::kFloat32;
    case at::kBFloat16: return hc::DType::kBFloat16;
    case at::kHalf: return hc::DType::kFloat16;
    default: TORCH_CHECK(false, "hbat (cuda): ", role, "[", i, "] has dtype ", t.scalar_type(),
                         "; float32, bfloat16 or float16 expected");
  }
  return hc::DType::kFloat32;
}

void check_tensor(const at::Tensor& t, const at::Tensor& lead, const char* role, size_t i) {
  TORCH_CHECK(t.is_cuda() && t.device() == lead.device(), "hbat (cuda): ", role, "[", i, "] is on ", t.device(),
              ", expected ", lead.device());
  TORCH_CHECK(t.is_contiguous(), "hbat (cuda): ", role, "[", i, "] must be contiguous");
  TORCH_CHECK(t.numel() == lead.numel(), "hbat (cuda): ", role, "[", i, "] has ", t.numel(), " elements, expected ",
              lead.numel());
}

void check_vector(const at::Tensor& v, const char* name, size_t n, const at::Tensor& lead) {
  TORCH_CHECK(v.device() == lead.device() && v.scalar_type() == at::kFloat && v.dim() == 1 &&
                  v.numel() == static_cast<int64_t>(n) && v.is_contiguous(),
              "hbat (cuda): ", name, " must be a contiguous float32 vector of ", n, " entries on ", lead.device());
}

// Runs one op: x, y, z are the role lists (z empty when the op has none); returns the per-tensor sums for the
// reducing ops (an undefined tensor otherwise).
at::Tensor run(hc::Op op, at::TensorList xs, at::TensorList ys, at::TensorList zs, const at::Tensor* coef) {
  const size_t n = xs.size();
  TORCH_CHECK(n >= 1, "hbat (cuda): empty tensor lists");
  TORCH_CHECK(ys.size() == n && (zs.empty() || zs.size() == n), "hbat (cuda): tensor lists of different lengths");
  const at::Tensor& lead = xs[0];
  const c10::cuda::CUDAGuard guard(lead.device());
  std::vector<hc::TensorArg> args(n);
  for (size_t i = 0; i < n; ++i) {
    check_tensor(xs[i], lead, "x", i);
    check_tensor(ys[i], xs[i], "y", i);
    args[i].numel = xs[i].numel();
    args[i].x = reinterpret_cast<std::uintptr_t>(xs[i].data_ptr());
    args[i].y = reinterpret_cast<std::uintptr_t>(ys[i].data_ptr());
    args[i].dx = dtype_of(xs[i], "x", i);
    args[i].dy = dtype_of(ys[i], "y", i);
    if (!zs.empty()) {
      check_tensor(zs[i], xs[i], "z", i);
      args[i].z = reinterpret_cast<std::uintptr_t>(zs[i].data_ptr());
      args[i].dz = dtype_of(zs[i], "z", i);
    }
  }
  if (coef != nullptr) check_vector(*coef, "coef", n, lead);

  int num_sms = 0;
  C10_CUDA_CHECK(hc::current_device_sm_count(&num_sms));
  const hc::Plan plan = hc::make_plan(op, args, num_sms);
  TORCH_CHECK(plan.error.empty(), "hbat (cuda): ", plan.error);

  // the table goes through pinned memory, stream-ordered: torch keeps the pinned block alive until the copy ends
  const auto words = static_cast<int64_t>(plan.table.size());
  at::Tensor host_table = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host_table.data_ptr(), plan.table.data(), plan.table.size() * sizeof(int64_t));
  at::Tensor table = at::empty({words}, lead.options().dtype(at::kLong));
  table.copy_(host_table, /*non_blocking=*/true);

  const bool reduces = hc::op_reduces(op);
  at::Tensor out, partials;
  if (reduces) {
    out = at::empty({static_cast<int64_t>(n)}, lead.options().dtype(at::kFloat));
    partials = at::empty({plan.num_chunks > 0 ? plan.num_chunks : 1}, lead.options().dtype(at::kDouble));
  }
  hc::DeviceBuffers buffers;
  buffers.table = table.data_ptr<int64_t>();
  buffers.coef = coef != nullptr ? coef->data_ptr<float>() : nullptr;
  buffers.partials = reduces ? partials.data_ptr<double>() : nullptr;
  buffers.out = reduces ? out.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(hc::launch(plan, buffers, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor sum_sq_diff(at::TensorList params, at::TensorList refs) {
  return run(hc::Op::kSumSqDiff, params, refs, {}, nullptr);
}

at::Tensor snapshot_(at::TensorList params, at::TensorList anchors) {
  return run(hc::Op::kSnapshot, params, anchors, {}, nullptr);
}

at::Tensor penalty_grad_(at::TensorList params, at::TensorList anchors, at::TensorList grads, const at::Tensor& coef) {
  return run(hc::Op::kPenaltyGrad, params, anchors, grads, &coef);
}

std::vector<at::Tensor> scaled_diff(at::TensorList params, at::TensorList anchors, const at::Tensor& coef) {
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const at::Tensor& p : params) outs.push_back(at::empty_like(p, at::MemoryFormat::Contiguous));
  run(hc::Op::kScaledDiff, params, anchors, outs, &coef);
  return outs;
}

void lerp_(at::TensorList dst, at::TensorList a, at::TensorList b, const at::Tensor& weights) {
  // roles: x = a, y = b, z = dst
  TORCH_CHECK(dst.size() == a.size(), "hbat (cuda): lerp_ lists of different lengths");
  run(hc::Op::kLerp, a, b, dst, &weights);
}
}  // namespace

TORCH_LIBRARY_IMPL(hbat, CUDA, m) {
  m.impl("sum_sq_diff", &sum_sq_diff);
  m.impl("snapshot_", &snapshot_);
  m.impl("penalty_grad_", &penalty_grad_);
  m.impl("scaled_diff", &scaled_diff);
  m.impl("lerp_", &lerp_);
}

static std::string build_info() {
  std::string s = "hbat._C_cuda built with CUDA ";
  s += std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "how this extension was compiled");
}
