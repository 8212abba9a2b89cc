// Placeholder CPU implementations with ATen ops (replaced by the fused kernels in csrc/cpu).
#include <torch/library.h>
#include <ATen/ATen.h>

namespace {
at::Tensor sum_sq_diff(at::TensorList params, at::TensorList refs) {
  auto out = at::zeros({(int64_t)params.size()}, params[0].options().dtype(at::kFloat));
  for (size_t i = 0; i < params.size(); ++i)
    out[i] = (params[i].to(at::kFloat) - refs[i].to(at::kFloat)).square().sum();
  return out;
}
at::Tensor snapshot_(at::TensorList params, at::TensorList anchors) {
  auto out = sum_sq_diff(params, anchors);
  for (size_t i = 0; i < params.size(); ++i) const_cast<at::Tensor&>(anchors[i]).copy_(params[i]);
  return out;
}
at::Tensor penalty_grad_(at::TensorList params, at::TensorList anchors, at::TensorList grads, const at::Tensor& coef) {
  auto out = sum_sq_diff(params, anchors);
  for (size_t i = 0; i < params.size(); ++i) {
    auto d = params[i].to(at::kFloat) - anchors[i].to(at::kFloat);
    const_cast<at::Tensor&>(grads[i]).copy_(grads[i].to(at::kFloat) + coef[i] * d);
  }
  return out;
}
std::vector<at::Tensor> scaled_diff(at::TensorList params, at::TensorList anchors, const at::Tensor& coef) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < params.size(); ++i)
    out.push_back((coef[i] * (params[i].to(at::kFloat) - anchors[i].to(at::kFloat))).to(params[i].scalar_type()));
  return out;
}
void lerp_(at::TensorList dst, at::TensorList a, at::TensorList b, const at::Tensor& w) {
  for (size_t i = 0; i < dst.size(); ++i)
    const_cast<at::Tensor&>(dst[i]).copy_((1 - w[i]) * a[i].to(at::kFloat) + w[i] * b[i].to(at::kFloat));
}
}  // namespace

TORCH_LIBRARY_IMPL(hbat, CPU, m) {
  m.impl("sum_sq_diff", &sum_sq_diff);
  m.impl("snapshot_", &snapshot_);
  m.impl("penalty_grad_", &penalty_grad_);
  m.impl("scaled_diff", &scaled_diff);
  m.impl("lerp_", &lerp_);
}
