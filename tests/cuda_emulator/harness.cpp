// C entry point of the emulated CUDA backend (tests only): the binding's job (csrc/bindings/cuda_binding.cpp)
// without torch: plan the call, copy the table, run launch() on the CPU stand-in, report memory faults.
#include <sys/mman.h>

#include <cmath>
#include <cstdio>
#include <utility>

#include "cuda/hbat_cuda.h"
#include "emu_core.h"
#include "ops/ewc_penalty_grad.h"

namespace hbat_emu {
int num_sms_value() { return num_sms; }
}  // namespace hbat_emu

namespace hc = hbat::cuda;

extern "C" {

// One call of op `op` (hbat::Op) over n tensors per list: ptrs and dtypes (hc::DType codes) list by list
// ([num_lists][n], the op's lists in table order), numel per tensor, the op's per-tensor vectors (float32 [n]
// each) and scalars. stats receives: chunk_size, num_chunks, launch groups, 16-byte accesses, scalar
// accesses. Returns 0, or 1 with a message in msg.
int hbat_emu_run(int op, int64_t n, const int64_t* ptrs, const int64_t* numel, const int32_t* dtypes,
                 const float* const* vectors, const double* scalars, float* out, int num_sms, int64_t* stats,
                 char* msg, int msg_len) {
  const hbat::Op the_op = static_cast<hbat::Op>(op);
  const hbat::OpInfo& info = hbat::op_info(the_op);
  std::vector<hc::TensorArg> args(n);
  std::vector<hbat_emu::Range> registered;
  auto add_range = [&](const void* p, int64_t bytes) {
    if (bytes > 0) {
      const auto a = reinterpret_cast<std::uintptr_t>(p);
      registered.push_back({a, a + static_cast<std::uintptr_t>(bytes)});
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    hc::TensorArg& t = args[i];
    t.numel = numel[i];
    for (int l = 0; l < info.num_lists; ++l) {
      t.ptr[l] = static_cast<std::uintptr_t>(ptrs[l * n + i]);
      t.dtype[l] = static_cast<hc::DType>(dtypes[l * n + i]);
      add_range(reinterpret_cast<const void*>(t.ptr[l]), t.numel * hc::dtype_size(t.dtype[l]));
    }
  }
  hbat_emu::num_sms = num_sms;
  const hc::Plan plan = hc::make_plan(the_op, args, num_sms);
  if (!plan.error.empty()) {
    std::snprintf(msg, msg_len, "%s", plan.error.c_str());
    return 1;
  }
  std::vector<int64_t> table(plan.table);  // "device" copy
  std::vector<double> partials(plan.num_chunks > 0 ? plan.num_chunks : 1, -1.0);
  add_range(table.data(), static_cast<int64_t>(table.size() * sizeof(int64_t)));
  hc::DeviceBuffers buffers;
  for (int k = 0; k < info.num_vectors; ++k) {
    add_range(vectors[k], n * static_cast<int64_t>(sizeof(float)));
    buffers.vectors[k] = vectors[k];
  }
  for (int k = 0; k < info.num_scalars; ++k) buffers.scalars[k] = scalars[k];
  hbat_emu::memory.reset(std::move(registered));
  buffers.table = table.data();
  buffers.partials = info.reduces ? partials.data() : nullptr;
  buffers.out = info.reduces ? out : nullptr;
  const cudaError_t err = hc::launch(plan, buffers, nullptr);
  stats[0] = plan.chunk_size;
  stats[1] = plan.num_chunks;
  stats[2] = static_cast<int64_t>(plan.groups.size());
  stats[3] = hbat_emu::memory.vector_accesses;
  stats[4] = hbat_emu::memory.scalar_accesses;
  if (err != cudaSuccess) {
    std::snprintf(msg, msg_len, "launch returned error %d", static_cast<int>(err));
    return 1;
  }
  return hbat_emu::memory.report(msg, msg_len) ? 0 : 1;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------- > 2**31 elements

namespace {
void* map_virtual(std::size_t bytes) {  // reserved address space; only the touched pages get memory
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
float pattern(int64_t i, int k) { return static_cast<float>(((i * (7 + k)) % 41) - 20) / 16.0f; }  // exact in bf16
}  // namespace

extern "C" {

// ewc_penalty_grad_ on one tensor of `numel` elements (bf16 params and anchors, fp32 grads, each starting 3
// elements into its mapping: a 16-byte head of 5) whose data lies in reserved address space. Only the last
// `tail_chunks` chunks run (the group is cut there), and only their memory is registered, so a wrong 64-bit
// offset faults. Writes the kernel's partial sums of those chunks and the exact ones (double), and returns
// the number of wrong grads there (-1 with msg on a failure, -2 when the address space cannot be reserved).
int64_t hbat_emu_huge_tail(int64_t numel, int64_t tail_chunks, float coef, double* partials_out, double* expected_out,
                           int64_t* chunk_size_out, char* msg, int msg_len) {
  constexpr int64_t kOffset = 3;
  const std::size_t n_alloc = static_cast<std::size_t>(numel + kOffset);
  auto* x = static_cast<uint16_t*>(map_virtual(n_alloc * 2));
  auto* y = static_cast<uint16_t*>(map_virtual(n_alloc * 2));
  auto* z = static_cast<float*>(map_virtual(n_alloc * 4));
  if (!x || !y || !z) {
    std::snprintf(msg, msg_len, "reserving address space for %lld elements failed", static_cast<long long>(numel));
    return -2;
  }
  hc::TensorArg arg;
  arg.ptr[0] = reinterpret_cast<std::uintptr_t>(x + kOffset);
  arg.ptr[1] = reinterpret_cast<std::uintptr_t>(y + kOffset);
  arg.ptr[2] = reinterpret_cast<std::uintptr_t>(z + kOffset);
  arg.numel = numel;
  arg.dtype[0] = arg.dtype[1] = hc::DType::kBFloat16;
  arg.dtype[2] = hc::DType::kFloat32;
  hbat_emu::num_sms = 4;
  const hc::Plan plan = hc::make_plan(hbat::Op::ewc_penalty_grad_, {arg}, 4);
  *chunk_size_out = plan.chunk_size;
  if (!plan.error.empty() || plan.groups.size() != 1 || plan.num_chunks < tail_chunks) {
    std::snprintf(msg, msg_len, "unexpected plan: %s", plan.error.c_str());
    return -1;
  }
  const int64_t first = plan.num_chunks - tail_chunks, begin = first * plan.chunk_size;
  auto* px = x + kOffset; auto* py = y + kOffset; auto* pz = z + kOffset;
  for (int64_t i = begin; i < numel; ++i) {
    px[i] = __bfloat16_as_ushort(__float2bfloat16_rn(pattern(i, 0)));
    py[i] = __bfloat16_as_ushort(__float2bfloat16_rn(pattern(i, 1)));
    pz[i] = 0.5f;
  }
  std::vector<int64_t> table(plan.table);
  std::vector<double> partials(plan.num_chunks, -1.0);
  hbat_emu::memory.reset({
      {reinterpret_cast<std::uintptr_t>(px + begin), reinterpret_cast<std::uintptr_t>(px + numel)},
      {reinterpret_cast<std::uintptr_t>(py + begin), reinterpret_cast<std::uintptr_t>(py + numel)},
      {reinterpret_cast<std::uintptr_t>(pz + begin), reinterpret_cast<std::uintptr_t>(pz + numel)},
      {reinterpret_cast<std::uintptr_t>(table.data()), reinterpret_cast<std::uintptr_t>(table.data() + table.size())},
      {reinterpret_cast<std::uintptr_t>(&coef), reinterpret_cast<std::uintptr_t>(&coef + 1)}});
  hc::LaunchGroup group = plan.groups[0];
  group.chunk_begin = first;
  hc::DeviceBuffers buffers;
  buffers.table = table.data();
  buffers.vectors[0] = &coef;
  buffers.partials = partials.data();
  hc::launch_ewc_penalty_grad_(group, 1, plan.chunk_size, buffers, 4, nullptr);
  const hbat::OpMath<hbat::Op::ewc_penalty_grad_> math(&coef, nullptr);  // the expected grads: the same math
  int64_t wrong = 0;
  for (int64_t c = 0; c < tail_chunks; ++c) {
    double exact = 0.0;
    for (int64_t i = (first + c) * plan.chunk_size; i < std::min(numel, (first + c + 1) * plan.chunk_size); ++i) {
      const double d = double(pattern(i, 0)) - double(pattern(i, 1));
      exact += d * d;
      float e[3] = {pattern(i, 0), pattern(i, 1), 0.5f}, unused = 0.0f;
      math(e, unused);
      if (pz[i] != e[2]) ++wrong;
    }
    partials_out[c] = partials[first + c];
    expected_out[c] = exact;
  }
  munmap(x, n_alloc * 2);
  munmap(y, n_alloc * 2);
  munmap(z, n_alloc * 4);
  return hbat_emu::memory.report(msg, msg_len) ? wrong : -1;
}

}  // extern "C"
