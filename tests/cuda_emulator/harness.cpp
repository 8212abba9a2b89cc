// C entry point of the emulated CUDA backend (tests only): the binding's job (csrc/bindings/cuda_binding.cpp)
// without torch: plan the call, copy the table, run launch() on the CPU stand-in, report memory faults.
#include <cstdio>

#include "cuda/hbat_cuda.h"
#include "emu_core.h"

namespace hbat_emu {
int num_sms_value() { return num_sms; }
}  // namespace hbat_emu

namespace hc = hbat::cuda;

extern "C" {

// Tensors are given role by role (x, y, z addresses; z = 0 where the op has none), with numel and the
// three dtype codes per tensor (hc::DType). stats receives: chunk_size, num_chunks, launch groups,
// 16-byte accesses, scalar accesses. Returns 0, or 1 with a message in msg.
int hbat_emu_run(int op, int64_t n, const int64_t* x, const int64_t* y, const int64_t* z, const int64_t* numel,
                 const int32_t* dtypes, const float* coef, float* out, int num_sms, int64_t* stats, char* msg,
                 int msg_len) {
  const hc::Op the_op = static_cast<hc::Op>(op);
  std::vector<hc::TensorArg> args(n);
  auto& mem = hbat_emu::memory;
  mem.ranges.clear();
  mem.faults = 0;
  mem.vector_accesses = 0;
  mem.scalar_accesses = 0;
  mem.first_fault.clear();
  auto add_range = [&](const void* p, int64_t bytes) {
    if (bytes > 0) {
      const auto a = reinterpret_cast<std::uintptr_t>(p);
      mem.ranges.push_back({a, a + static_cast<std::uintptr_t>(bytes)});
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    hc::TensorArg& t = args[i];
    t.x = static_cast<std::uintptr_t>(x[i]);
    t.y = static_cast<std::uintptr_t>(y[i]);
    t.z = static_cast<std::uintptr_t>(z[i]);
    t.numel = numel[i];
    t.dx = static_cast<hc::DType>(dtypes[3 * i]);
    t.dy = static_cast<hc::DType>(dtypes[3 * i + 1]);
    t.dz = static_cast<hc::DType>(dtypes[3 * i + 2]);
    add_range(reinterpret_cast<const void*>(t.x), t.numel * hc::dtype_size(t.dx));
    add_range(reinterpret_cast<const void*>(t.y), t.numel * hc::dtype_size(t.dy));
    if (hc::op_has_z(the_op)) add_range(reinterpret_cast<const void*>(t.z), t.numel * hc::dtype_size(t.dz));
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
  if (coef != nullptr) add_range(coef, n * static_cast<int64_t>(sizeof(float)));
  std::sort(mem.ranges.begin(), mem.ranges.end(),
            [](const hbat_emu::Range& a, const hbat_emu::Range& b) { return a.begin < b.begin; });
  hc::DeviceBuffers buffers;
  buffers.table = table.data();
  buffers.coef = coef;
  buffers.partials = hc::op_reduces(the_op) ? partials.data() : nullptr;
  buffers.out = hc::op_reduces(the_op) ? out : nullptr;
  const cudaError_t err = hc::launch(plan, buffers, nullptr);
  stats[0] = plan.chunk_size;
  stats[1] = plan.num_chunks;
  stats[2] = static_cast<int64_t>(plan.groups.size());
  stats[3] = mem.vector_accesses;
  stats[4] = mem.scalar_accesses;
  if (err != cudaSuccess) {
    std::snprintf(msg, msg_len, "launch returned error %d", static_cast<int>(err));
    return 1;
  }
  if (mem.faults > 0) {
    std::snprintf(msg, msg_len, "%lld memory faults; first: %s", static_cast<long long>(mem.faults.load()),
                  mem.first_fault.c_str());
    return 1;
  }
  return 0;
}

}  // extern "C"
