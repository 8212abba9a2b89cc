// One call of a table op (csrc/op_table.h) taken from torch's boxed argument stack, checked against the op's
// table entry; shared by the CPU and CUDA bindings, which register one boxed kernel per op and so need no
// per-op code. The Python layer (hbat/ops/validate.py) checks its arguments first, with its own messages;
// these checks keep a direct torch.ops.hbat call from reading memory with the wrong type or size.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <string>
#include <vector>

#include "op_traits.h"

namespace hbat {

// One tensor list of a call: the IValues of the argument on the stack (no copy, no reference count touched per
// tensor: on a few hundred small tensors that was a tenth of the call), or the RETURN list's new tensors.
class TensorListView {
 public:
  TensorListView() = default;
  explicit TensorListView(c10::ArrayRef<c10::IValue> ivalues) : ivalues_(ivalues) {}
  explicit TensorListView(const std::vector<at::Tensor>* tensors) : tensors_(tensors) {}
  const at::Tensor& operator[](size_t i) const { return tensors_ ? (*tensors_)[i] : ivalues_[i].toTensor(); }
  size_t size() const { return tensors_ ? tensors_->size() : ivalues_.size(); }

 private:
  c10::ArrayRef<c10::IValue> ivalues_;
  const std::vector<at::Tensor>* tensors_ = nullptr;
};

// Valid from read_call to push_result: the lists view the arguments, which stay on the stack until then.
struct OpCall {
  const OpInfo* info = nullptr;
  int num_args = 0;                             // on the stack
  int64_t n = 0;                                // tensors per list
  TensorListView lists[kMaxLists];              // every list of the op
  std::vector<at::Tensor> returned;             // the RETURN list's tensors, allocated here
  std::vector<at::Tensor> vectors;              // float32 [n], contiguous, on the tensors' device
  double scalars[kMaxScalars] = {};
  at::Device device = at::kCPU;                 // of the tensors (CPU for an empty call)

  OpCall() = default;
  OpCall(const OpCall&) = delete;  // lists[returned] points into returned
  OpCall& operator=(const OpCall&) = delete;
};

inline bool float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Reads the op's arguments (they stay on the stack until push_result); checks every tensor's device type,
// contiguity, size and dtype rule; allocates the RETURN list (contiguous, the dtype of the list its rule names).
inline void read_call(OpCall& call, Op op, const c10::OperatorHandle& handle, torch::jit::Stack* stack,
                      at::DeviceType device_type, const char* backend) {
  const OpInfo& info = op_info(op);
  call.info = &info;
  const auto where = [&] { return std::string("hbat ") + info.name + " (" + backend + "): "; };
  const int returned = info.returned();
  const int num_args = info.num_lists - (returned >= 0) + info.num_vectors + info.num_scalars;
  call.num_args = num_args;
  auto args = torch::jit::last(*stack, num_args);
  const int first_vector = info.num_lists - (returned >= 0);
  int a = 0;
  for (int l = 0; l < info.num_lists; ++l)
    if (l != returned) call.lists[l] = TensorListView(args[a++].toListRef());
  std::vector<at::Tensor> vectors;
  for (int k = 0; k < info.num_vectors; ++k) vectors.push_back(args[a++].toTensor());
  for (int k = 0; k < info.num_scalars; ++k) call.scalars[k] = args[a++].toDouble();

  const TensorListView& lead = call.lists[0];
  call.n = static_cast<int64_t>(lead.size());
  if (call.n > 0) call.device = lead[0].device();
  for (int l = 0; l < info.num_lists; ++l) {
    if (l == returned) continue;
    const TensorListView& ts = call.lists[l];
    TORCH_CHECK(static_cast<int64_t>(ts.size()) == call.n, where(), info.list_names[l], " has ", ts.size(),
                " tensors but ", info.list_names[0], " has ", call.n);
    for (int64_t i = 0; i < call.n; ++i) {
      const at::Tensor& t = ts[i];
      TORCH_CHECK(t.device().type() == device_type && t.device() == call.device, where(), info.list_names[l], "[", i,
                  "] is on ", t.device(), ", expected ", call.device);
      TORCH_CHECK(t.is_contiguous(), where(), info.list_names[l], "[", i, "] must be contiguous");
      TORCH_CHECK(t.numel() == lead[i].numel(), where(), info.list_names[l], "[", i, "] has ", t.numel(),
                  " elements but ", info.list_names[0], "[", i, "] has ", lead[i].numel());
      const int rule = info.dtypes[l];
      const bool ok = rule == kAnyFloat ? float_dtype(t.scalar_type())
                      : rule == kFloat32Only ? t.scalar_type() == at::kFloat
                                             : t.scalar_type() == call.lists[rule][i].scalar_type();
      TORCH_CHECK(ok, where(), info.list_names[l], "[", i, "] has dtype ", t.scalar_type(), "; expected ",
                  rule == kAnyFloat ? std::string("float32, bfloat16 or float16")
                  : rule == kFloat32Only ? std::string("float32")
                                         : std::string("the dtype of ") + info.list_names[rule] + "[" +
                                               std::to_string(i) + "]");
    }
  }
  for (int k = 0; k < info.num_vectors; ++k) {
    const at::Tensor& v = vectors[k];
    const std::string& name = handle.schema().arguments()[first_vector + k].name();
    TORCH_CHECK(v.dim() == 1 && v.numel() == call.n && v.is_floating_point(), where(), name,
                " must be a 1-D floating tensor of ", call.n, " entries (one per tensor), got shape ", v.sizes(),
                " and dtype ", v.scalar_type());
    TORCH_CHECK(call.n == 0 || v.device() == call.device, where(), name, " is on ", v.device(), ", expected ",
                call.device);
    call.vectors.push_back(v.scalar_type() == at::kFloat && v.is_contiguous() ? v : v.to(at::kFloat).contiguous());
  }
  if (returned >= 0) {
    const int like = info.dtypes[returned];
    call.returned.reserve(call.n);
    for (int64_t i = 0; i < call.n; ++i)
      call.returned.push_back(like >= 0 ? at::empty_like(call.lists[like][i], at::MemoryFormat::Contiguous)
                                        : at::empty(lead[i].sizes(), lead[i].options().dtype(at::kFloat)));
    call.lists[returned] = TensorListView(&call.returned);
  }
}

// Drops the arguments and pushes the op's result: the per-tensor sums (reducing ops), the RETURN list, or nothing.
inline void push_result(OpCall& call, const at::Tensor& sums, torch::jit::Stack* stack) {
  torch::jit::drop(*stack, call.num_args);
  for (auto& list : call.lists) list = TensorListView();
  if (call.info->reduces) {
    torch::jit::push(*stack, sums);
  } else if (call.info->returned() >= 0) {
    torch::jit::push(*stack, std::move(call.returned));
  }
}

}  // namespace hbat
