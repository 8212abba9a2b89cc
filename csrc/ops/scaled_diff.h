// scaled_diff (hbat/ops/table.py): new tensors out = coef_i (params - anchors), the backward of ewc_penalty.
#pragma once

#include "op_traits.h"

namespace hbat {

template <> struct OpMath<Op::scaled_diff> {
  float coef;
  // vectors: coef
  HBAT_HOST_DEVICE OpMath(const float* v, const double*) : coef(v[0]) {}
  // e: params, anchors, out
  template <typename F>
  HBAT_HOST_DEVICE void operator()(F (&e)[3], F&) const { e[2] = coef * (e[0] - e[1]); }
};

}  // namespace hbat
