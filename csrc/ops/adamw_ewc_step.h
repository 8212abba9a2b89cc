// adamw_ewc_step_ (hbat/ops/table.py): one torch.optim.AdamW step whose gradient carries the EWC term, in one
// pass. Per element, in the order of torch's _single_tensor_adam (decoupled weight decay):
//   d = p - a;  sum += d^2                      (the penalty's sums, before the step)
//   g = grad + coef d                           (the gradient of (coef/2) ||p - a||^2, as a loss term would add)
//   p *= 1 - lr wd                              (param.mul_(1 - lr * weight_decay))
//   m += (1 - beta1) (g - m)                    (exp_avg.lerp_(grad, 1 - beta1))
//   v = beta2 v + (1 - beta2) g^2               (exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2))
//   p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)  (param.addcdiv_(exp_avg, denom, value=-step_size))
// grads is only read. Element arithmetic in float32; the per-tensor constants are formed once per chunk in
// double and rounded once, like torch's Python-float scalars.
#pragma once

#include <math.h>

#include "op_traits.h"

namespace hbat {

template <> struct OpMath<Op::adamw_ewc_step_> {
  float coef, decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps;
  // vectors: coef, lr, weight_decay, bias_correction1, bias_correction2; scalars: beta1, beta2, eps
  HBAT_HOST_DEVICE OpMath(const float* v, const double* s)
      : coef(v[0]),
        decay(static_cast<float>(1.0 - double(v[1]) * double(v[2]))),
        step_size(static_cast<float>(double(v[1]) / double(v[3]))),
        bc2_sqrt(static_cast<float>(sqrt(double(v[4])))),
        // 1 - beta in double (1 - 0.999f in float32 would be off by 1e-5 relative)
        one_minus_beta1(static_cast<float>(1.0 - s[0])),
        beta2(static_cast<float>(s[1])),
        one_minus_beta2(static_cast<float>(1.0 - s[1])),
        eps(static_cast<float>(s[2])) {}
  // e: params, grads, exp_avg, exp_avg_sq, anchors
  template <typename F>
  HBAT_HOST_DEVICE void operator()(F (&e)[5], F& sum) const {
    const F d = e[0] - e[4];
    sum += d * d;
    const F g = e[1] + coef * d;
    const F p = e[0] * decay;
    const F m = e[2] + one_minus_beta1 * (g - e[2]);
    const F v = e[3] * beta2 + one_minus_beta2 * g * g;
    e[0] = p - step_size * m / (lane_sqrt(v) / bc2_sqrt + eps);  // addcdiv: value * t1 / t2
    e[2] = m;
    e[3] = v;
  }
};

}  // namespace hbat
