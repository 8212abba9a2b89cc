// ewc_penalty_grad_ (hbat/ops/table.py): per tensor sum_j (params - anchors)^2 and, in the same pass,
// grads += coef_i (params - anchors).
#pragma once

#include "op_traits.h"

namespace hbat {

template <> struct OpMath<Op::ewc_penalty_grad_> {
  float coef;
  // vectors: coef
  HBAT_HOST_DEVICE OpMath(const float* v, const double*) : coef(v[0]) {}
  // e: params, anchors, grads
  template <typename F>
  HBAT_HOST_DEVICE void operator()(F (&e)[3], F& sum) const {
    const F d = e[0] - e[1];
    sum += d * d;
    e[2] += coef * d;
  }
};

}  // namespace hbat
