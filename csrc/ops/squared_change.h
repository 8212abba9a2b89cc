// squared_change (hbat/ops/table.py): per tensor sum_j (params - refs)^2.
#pragma once

#include "op_traits.h"

namespace hbat {

template <> struct OpMath<Op::squared_change> {
  HBAT_HOST_DEVICE OpMath(const float*, const double*) {}
  // e: params, refs
  template <typename F>
  HBAT_HOST_DEVICE void operator()(F (&e)[2], F& sum) const {
    const F d = e[0] - e[1];
    sum += d * d;
  }
};

}  // namespace hbat
