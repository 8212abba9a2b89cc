// The one definition of the hbat operator schemas. Each backend registers implementations for its
// dispatch key (cpu_binding.cpp for CPU, cuda_binding.cpp for CUDA), so torch.ops.hbat.<op> runs the
// kernel that matches the tensors' device.
//
// Contract shared by every implementation (inputs are validated in Python, hbat/ops/_validate.py):
//   - all lists have the same length n >= 1, tensors are contiguous, on one device, shapes match pairwise;
//   - params / refs / grads / dst / a / b: float32, bfloat16 or float16, each tensor its own dtype;
//   - coef / weights: float32 [n] on the same device;
//   - arithmetic in float32; per-tensor sums accumulated in float32 or wider, combined in a fixed order
//     (deterministic, no float atomics); results are float32 [n] on the same device;
//   - NaN / inf in the inputs propagate into the results.
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(hbat, m) {
  // sum_j (params[i]_j - refs[i]_j)^2 for each i
  m.def("sum_sq_diff(Tensor[] params, Tensor[] refs) -> Tensor");
  // the same sums against the anchors' old values; then anchors[i] <- params[i] (cast), in one pass
  m.def("snapshot_(Tensor[] params, Tensor(a!)[] anchors) -> Tensor");
  // sums of (p - a)^2 and, in the same pass, grads[i] += coef[i] * (p - a)
  m.def("penalty_grad_(Tensor[] params, Tensor[] anchors, Tensor(a!)[] grads, Tensor coef) -> Tensor");
  // new tensors coef[i] * (params[i] - anchors[i]) in params[i]'s dtype (backward of ewc_penalty)
  m.def("scaled_diff(Tensor[] params, Tensor[] anchors, Tensor coef) -> Tensor[]");
  // dst[i] <- (1 - weights[i]) * a[i] + weights[i] * b[i]  (dst may alias a or b)
  m.def("lerp_(Tensor(a!)[] dst, Tensor[] a, Tensor[] b, Tensor weights) -> ()");
}

static std::string build_info() {
  std::string s = "hbat._C built with";
#ifdef _OPENMP
  s += " OpenMP";
#endif
#if defined(__AVX512F__)
  s += " AVX512";
#elif defined(__AVX2__)
  s += " AVX2";
#endif
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "how this extension was compiled");
}
