// Fused multi-tensor EWC kernels for the CPU (the contract is in csrc/bindings/library.cpp).
//
// All tensors of a call are cut into fixed-size chunks that never span two tensors; at::parallel_for
// runs over the global chunk list (parallel across tensors and within large ones). Each chunk writes one
// partial sum; per-tensor sums add the partials in chunk order in double. Chunking does not depend on the
// thread count, so results are bit-identical run to run and for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace hbat_cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per chunk: large enough to amortise scheduling
constexpr int kLanes = 16;           // independent float accumulators, so the loop vectorises

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

template <typename F>
void dispatch_float(at::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "hbat cpu: ", what, " has unsupported dtype ", type);
  }
}

// Sum of (x - y)^2 over [b, e), fp32 lanes combined in double; optional fused side effect per element.
template <typename X, typename Y, typename Body>
double chunk_sum(const X* x, const Y* y, int64_t b, int64_t e, Body&& body) {
  float acc[kLanes] = {0};
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float d = static_cast<float>(x[i + k]) - static_cast<float>(y[i + k]);
      body(i + k, d);
      acc[k] += d * d;
    }
  }
  for (; i < e; ++i) {
    const float d = static_cast<float>(x[i]) - static_cast<float>(y[i]);
    body(i, d);
    acc[0] += d * d;
  }
  double total = 0;
  for (int k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

// Runs `per_chunk(chunk) -> double` over all chunks in parallel; returns float32 per-tensor sums.
template <typename PerChunk>
at::Tensor reduce_chunks(at::TensorList tensors, PerChunk&& per_chunk) {
  const auto chunks = make_chunks(tensors);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) partial[c] = per_chunk(chunks[c]);
  });
  std::vector<double> sums(tensors.size(), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) sums[chunks[c].tensor] += partial[c];
  auto out = at::empty({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (size_t t = 0; t < sums.size(); ++t) o[t] = static_cast<float>(sums[t]);
  return out;
}

at::Tensor sum_sq_diff(at::TensorList params, at::TensorList refs) {
  return reduce_chunks(params, [&](const Chunk& c) {
    double s = 0;
    dispatch_float(params[c.tensor].scalar_type(), "params", [&](auto pt) {
      dispatch_float(refs[c.tensor].scalar_type(), "refs", [&](auto rt) {
        using P = decltype(pt);
        using R = decltype(rt);
        s = chunk_sum(params[c.tensor].const_data_ptr<P>(), refs[c.tensor].const_data_ptr<R>(), c.begin, c.end,
                      [](int64_t, float) {});
      });
    });
    return s;
  });
}

at::Tensor snapshot_(at::TensorList params, at::TensorList anchors) {
  return reduce_chunks(params, [&](const Chunk& c) {
    double s = 0;
    dispatch_float(params[c.tensor].scalar_type(), "params", [&](auto pt) {
      dispatch_float(anchors[c.tensor].scalar_type(), "anchors", [&](auto at_) {
        using P = decltype(pt);
        using A = decltype(at_);
        const P* p = params[c.tensor].const_data_ptr<P>();
        A* a = anchors[c.tensor].data_ptr<A>();
        // the old anchor value is read before it is overwritten with the (cast) parameter
        s = chunk_sum(p, a, c.begin, c.end, [&](int64_t i, float) { a[i] = static_cast<A>(static_cast<float>(p[i])); });
      });
    });
    return s;
  });
}

at::Tensor penalty_grad_(at::TensorList params, at::TensorList anchors, at::TensorList grads, const at::Tensor& coef) {
  const auto coef32 = coef.to(at::kFloat).contiguous();
  const float* k = coef32.const_data_ptr<float>();
  return reduce_chunks(params, [&](const Chunk& c) {
    double s = 0;
    const float kc = k[c.tensor];
    dispatch_float(params[c.tensor].scalar_type(), "params", [&](auto pt) {
      dispatch_float(anchors[c.tensor].scalar_type(), "anchors", [&](auto at_) {
        dispatch_float(grads[c.tensor].scalar_type(), "grads", [&](auto gt) {
          using P = decltype(pt);
          using A = decltype(at_);
          using G = decltype(gt);
          G* g = grads[c.tensor].data_ptr<G>();
          s = chunk_sum(params[c.tensor].const_data_ptr<P>(), anchors[c.tensor].const_data_ptr<A>(), c.begin, c.end,
                        [&](int64_t i, float d) { g[i] = static_cast<G>(static_cast<float>(g[i]) + kc * d); });
        });
      });
    });
    return s;
  });
}

std::vector<at::Tensor> scaled_diff(at::TensorList params, at::TensorList anchors, const at::Tensor& coef) {
  const auto coef32 = coef.to(at::kFloat).contiguous();
  const float* k = coef32.const_data_ptr<float>();
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(at::empty_like(p));
  reduce_chunks(params, [&](const Chunk& c) {
    const float kc = k[c.tensor];
    dispatch_float(params[c.tensor].scalar_type(), "params", [&](auto pt) {
      dispatch_float(anchors[c.tensor].scalar_type(), "anchors", [&](auto at_) {
        using P = decltype(pt);
        using A = decltype(at_);
        P* o = out[c.tensor].data_ptr<P>();
        chunk_sum(params[c.tensor].const_data_ptr<P>(), anchors[c.tensor].const_data_ptr<A>(), c.begin, c.end,
                  [&](int64_t i, float d) { o[i] = static_cast<P>(kc * d); });
      });
    });
    return 0.0;
  });
  return out;
}

void lerp_(at::TensorList dst, at::TensorList a, at::TensorList b, const at::Tensor& weights) {
  const auto w32 = weights.to(at::kFloat).contiguous();
  const float* w = w32.const_data_ptr<float>();
  reduce_chunks(dst, [&](const Chunk& c) {
    const float wc = w[c.tensor];
    dispatch_float(dst[c.tensor].scalar_type(), "dst", [&](auto dt) {
      dispatch_float(a[c.tensor].scalar_type(), "a", [&](auto at_) {
        dispatch_float(b[c.tensor].scalar_type(), "b", [&](auto bt) {
          using D = decltype(dt);
          using A = decltype(at_);
          using B = decltype(bt);
          D* d = dst[c.tensor].data_ptr<D>();
          const A* x = a[c.tensor].const_data_ptr<A>();
          const B* y = b[c.tensor].const_data_ptr<B>();
          for (int64_t i = c.begin; i < c.end; ++i)
            d[i] = static_cast<D>((1.0f - wc) * static_cast<float>(x[i]) + wc * static_cast<float>(y[i]));
        });
      });
    });
    return 0.0;
  });
}

}  // namespace
}  // namespace hbat_cpu

TORCH_LIBRARY_IMPL(hbat, CPU, m) {
  m.impl("sum_sq_diff", &hbat_cpu::sum_sq_diff);
  m.impl("snapshot_", &hbat_cpu::snapshot_);
  m.impl("penalty_grad_", &hbat_cpu::penalty_grad_);
  m.impl("scaled_diff", &hbat_cpu::scaled_diff);
  m.impl("lerp_", &hbat_cpu::lerp_);
}
