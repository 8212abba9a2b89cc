// The one definition of the hbat operator schemas: torch.ops.hbat.<op> for every op of the table
// (hbat/ops/table.py, as X-macros in csrc/op_table.h; OpDef.schema is the string registered here). Each
// backend registers one boxed kernel per op for its dispatch key (csrc/cpu/multi_tensor_cpu.cpp for CPU,
// csrc/bindings/cuda_binding.cpp for CUDA), so torch.ops.hbat.<op> runs the kernel of the tensors' device.
//
// Contract shared by every implementation (inputs are validated in Python, hbat/ops/validate.py; the
// bindings re-check devices, sizes and dtypes, csrc/bindings/op_call.h):
//   - all lists have the same length n, tensors are contiguous, on one device, sizes match pairwise;
//   - each tensor's dtype follows its list's rule in the table (float32 / bfloat16 / float16 per tensor,
//     float32 only, or the dtype of another list);
//   - per-tensor vectors: floating [n] on the same device (used as float32); scalars: float (double);
//   - arithmetic in float32; per-tensor sums accumulated in float32 or wider, combined in a fixed order
//     (deterministic, no float atomics); results are float32 [n] on the same device;
//   - NaN / inf in the inputs propagate into the results.
//
// The ADInplaceOrView kernel of every op that writes a list bumps the version counter of each tensor it writes
// (what torch's own in-place ops do, so autograd refuses a backward through overwritten values), here in C++
// for every device: as a Python kernel (hbat/ops/_library.py does so for the Python namespaces) it cost more
// than the whole CPU kernel on a few hundred small tensors.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>
#include <torch/extension.h>

#include "bindings/check_lists.h"
#include "op_traits.h"

TORCH_LIBRARY(hbat, m) {
#define HBAT_X(name, code, reduces, lists, vectors, scalars, schema) m.def(schema);
  HBAT_OPS(HBAT_X)
#undef HBAT_X
}

namespace hbat {
namespace {

// Bumps the written lists' tensors (inference tensors have no counter: skipped, as increment_version does),
// then runs the kernel below this key.
template <Op kOp>
void bump_then_run(const c10::OperatorHandle& handle, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const OpInfo& info = op_info(kOp);
  const int returned = info.returned();
  const int num_args = info.num_lists - (returned >= 0) + info.num_vectors + info.num_scalars;
  auto args = torch::jit::last(*stack, num_args);
  int a = 0;
  for (int l = 0; l < info.num_lists; ++l) {
    if (l == returned) continue;
    if (role_stores(info.roles[l])) {
      for (const c10::IValue& t : args[a].toListRef()) {
        const at::Tensor& tensor = t.toTensor();
        if (!tensor.is_inference()) torch::autograd::increment_version(tensor);
      }
    }
    ++a;
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  handle.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

bool op_writes_in_place(Op op) {
  const OpInfo& info = op_info(op);
  for (int l = 0; l < info.num_lists; ++l)
    if (info.roles[l] == Role::kUpdate || info.roles[l] == Role::kWrite) return true;
  return false;
}

}  // namespace
}  // namespace hbat

TORCH_LIBRARY_IMPL(hbat, ADInplaceOrView, m) {
#define HBAT_X(name, ...)                                                                        \
  if (hbat::op_writes_in_place(hbat::Op::name))                                                    \
    m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&hbat::bump_then_run<hbat::Op::name>>());
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
  m.def("lists_pass", &hbat::lists_pass, "whether an op's tensor lists pass hbat/ops/validate.py's checks "
        "(csrc/bindings/check_lists.h)");
}
