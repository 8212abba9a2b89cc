// lerp_ (hbat/ops/table.py): dst <- (1 - w_i) a + w_i b; dst may be a or b.
#pragma once

#include "op_traits.h"

namespace hbat {

template <> struct OpMath<Op::lerp_> {
  float w;
  // vectors: weights
  HBAT_HOST_DEVICE OpMath(const float* v, const double*) : w(v[0]) {}
  // e: dst, a, b. This form keeps both endpoints exact: w = 0 gives a, w = 1 gives b.
  template <typename F>
  HBAT_HOST_DEVICE void operator()(F (&e)[3], F&) const { e[0] = (1.0f - w) * e[1] + w * e[2]; }
};

}  // namespace hbat
