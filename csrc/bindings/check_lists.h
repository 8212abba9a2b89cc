// hbat._C.lists_pass(lists, rules, written, may_alias): whether the tensor lists of one op call pass every
// check of hbat/ops/validate.py check_lists for a native backend, answered in C++ in one pass over the
// tensors (about 20x faster than the Python loop on a few hundred tensors, which made an op's per-call cost
// twice 7786d55's once the overlap checks came). It only says yes or no: on no, or on anything unusual (a
// tensor subclass, a meta tensor, an empty list, a non-contiguous tensor, which Python may pass as a
// contiguous view), Python runs its own checks, which word the error. So it may refuse more than Python does,
// never less (tests/test_ops_safety.py holds the two to that on random calls).
//
//   lists      the op's argument lists, in order (Python lists; any item that is not a tensor: no)
//   rules      per list: -1 float32 / bfloat16 / float16, -2 float32 only, i >= 0 the dtype of list i's tensor
//   written    per list: written in place (must not be a leaf requiring grad, nor overlap another tensor)
//   may_alias  (written list, list) pairs whose tensor i may be the very same view (lerp_'s dst and a)
//
// Checked per tensor: the dtype rule, the lead list's shape and device, contiguity, and across the call the
// memory spans (first to last byte) of the written tensors against every other tensor's: one sort and one
// sweep, as check_no_overlap does.
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace hbat {

inline bool native_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

inline bool lists_pass(const pybind11::list& lists, const std::vector<int>& rules, const std::vector<bool>& written,
                       const std::vector<std::pair<int, int>>& may_alias) {
  const size_t num_lists = lists.size();
  if (num_lists == 0 || rules.size() != num_lists || written.size() != num_lists) return false;
  std::vector<std::vector<const at::Tensor*>> ts(num_lists);
  for (size_t l = 0; l < num_lists; ++l) {
    PyObject* seq = lists[l].ptr();
    if (!PyList_Check(seq)) return false;
    const Py_ssize_t n = PyList_GET_SIZE(seq);
    ts[l].reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(seq, i);
      if (!THPVariable_Check(item)) return false;
      ts[l].push_back(&THPVariable_Unpack(item));
    }
  }
  const size_t n = ts[0].size();
  if (n == 0) return false;
  for (size_t l = 1; l < num_lists; ++l)
    if (ts[l].size() != n) return false;
  const at::Device device = ts[0][0]->device();
  bool any_written = false;
  for (size_t l = 0; l < num_lists; ++l) {
    any_written = any_written || written[l];
    if (rules[l] >= static_cast<int>(num_lists)) return false;
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& lead = *ts[0][i];
    for (size_t l = 0; l < num_lists; ++l) {
      const at::Tensor& t = *ts[l][i];
      // tensor subclasses that dispatch to Python (FakeTensor, ...) and meta tensors: Python decides
      if (t.key_set().has(c10::DispatchKey::Python) || t.is_meta() || t.layout() != at::kStrided) return false;
      const at::ScalarType dtype = t.scalar_type();
      if (!native_dtype(dtype)) return false;
      const int rule = rules[l];
      if (rule == -2 && dtype != at::kFloat) return false;
      if (rule >= 0 && dtype != ts[rule][i]->scalar_type()) return false;
      if (t.sizes() != lead.sizes() || t.device() != device || !t.is_contiguous()) return false;
      if (written[l] && t.requires_grad() && t.is_leaf()) return false;
    }
  }
  if (!any_written) return true;
  // the reader tensors that are exactly their written partner's view: left out of the spans
  auto same_view = [](const at::Tensor& x, const at::Tensor& y) {
    return x.data_ptr() == y.data_ptr() && x.sizes() == y.sizes() && x.strides() == y.strides() &&
           x.scalar_type() == y.scalar_type();
  };
  std::vector<std::vector<bool>> skip(num_lists);
  for (const auto& [w, r] : may_alias) {
    if (w < 0 || r < 0 || w >= static_cast<int>(num_lists) || r >= static_cast<int>(num_lists)) return false;
    skip[r].resize(n, false);
    for (size_t i = 0; i < n; ++i)
      if (same_view(*ts[w][i], *ts[r][i])) skip[r][i] = true;
  }
  struct Span {
    uintptr_t start, end;
    bool written;
  };
  std::vector<Span> spans;
  spans.reserve(n * num_lists);
  for (size_t l = 0; l < num_lists; ++l) {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = *ts[l][i];
      if (t.numel() == 0 || (!skip[l].empty() && skip[l][i])) continue;
      const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({start, start + static_cast<uintptr_t>(t.numel()) * t.element_size(), written[l]});
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.start != b.start ? a.start < b.start : (a.end != b.end ? a.end < b.end : a.written < b.written);
  });
  uintptr_t furthest = 0, furthest_written = 0;
  for (const Span& s : spans) {
    if (s.start < (s.written ? furthest : furthest_written)) return false;
    furthest = std::max(furthest, s.end);
    if (s.written) furthest_written = std::max(furthest_written, s.end);
  }
  return true;
}

}  // namespace hbat
