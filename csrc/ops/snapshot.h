// snapshot_ (hbat/ops/table.py): per tensor sum_j (params - anchors)^2 against the anchors' old values, then
// anchors <- params (rounded to the anchors' dtype) in the same pass.
#pragma once

#include "op_traits.h"

namespace hbat {

template <> struct OpMath<Op::snapshot_> {
  HBAT_HOST_DEVICE OpMath(const float*, const double*) {}
  // e: params, anchors
  template <typename F>
  HBAT_HOST_DEVICE void operator()(F (&e)[2], F& sum) const {
    const F d = e[0] - e[1];
    sum += d * d;
    e[1] = e[0];
  }
};

}  // namespace hbat
