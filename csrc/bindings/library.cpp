// The one definition of the hbat operator schemas: torch.ops.hbat.<op> for every op of the table
// (hbat/ops/table.py, as X-macros in csrc/op_table.h; OpDef.schema is the string registered here). Each
// backend registers one boxed kernel per op for its dispatch key (csrc/cpu/multi_tensor_cpu.cpp for CPU,
// csrc/bindings/cuda_binding.cpp for CUDA), so torch.ops.hbat.<op> runs the kernel of the tensors' device.
//
// Contract shared by every implementation (inputs are validated in Python, hbat/ops/_validate.py; the
// bindings re-check devices, sizes and dtypes, csrc/bindings/op_call.h):
//   - all lists have the same length n, tensors are contiguous, on one device, sizes match pairwise;
//   - each tensor's dtype follows its list's rule in the table (float32 / bfloat16 / float16 per tensor,
//     float32 only, or the dtype of another list);
//   - per-tensor vectors: floating [n] on the same device (used as float32); scalars: float (double);
//   - arithmetic in float32; per-tensor sums accumulated in float32 or wider, combined in a fixed order
//     (deterministic, no float atomics); results are float32 [n] on the same device;
//   - NaN / inf in the inputs propagate into the results.
#include <torch/library.h>
#include <torch/extension.h>

#include "op_traits.h"

TORCH_LIBRARY(hbat, m) {
#define HBAT_X(name, code, reduces, lists, vectors, scalars, schema) m.def(schema);
  HBAT_OPS(HBAT_X)
#undef HBAT_X
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
