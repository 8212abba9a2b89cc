// A CPU stand-in for the CUDA runtime, just enough to run csrc/cuda's kernels on the host (tests only).
//
// A launch runs every thread of a block as a real std::thread (blocks one after another), so __syncthreads
// and __shfl_down_sync are real barriers and a missing one shows as a wrong sum or a hang, not as luck.
// Every global load and store of the kernels (__ldg, __ldcg, __stwb) is checked against the memory ranges
// the harness registered and against the natural alignment of its width (a 16-byte vector access at an
// address that is not 16-byte aligned faults on a GPU).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time

struct uint3 { unsigned int x = 0, y = 0, z = 0; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline uint3 gridDim;
inline uint3 blockDim;

namespace hbat_emu {

struct Range { std::uintptr_t begin, end; };

struct Memory {
  std::vector<Range> ranges;  // sorted by begin
  std::atomic<int64_t> faults{0};
  std::atomic<int64_t> vector_accesses{0};  // 16-byte loads and stores
  std::atomic<int64_t> scalar_accesses{0};  // element-sized loads and stores of the tensors
  std::mutex mutex;
  std::string first_fault;

  // Start a call: the buffers the kernels may touch (any order), counters at zero.
  void reset(std::vector<Range> buffers) {
    std::sort(buffers.begin(), buffers.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
    ranges = std::move(buffers);
    faults = 0;
    vector_accesses = 0;
    scalar_accesses = 0;
    first_fault.clear();
  }

  // True when no access faulted; otherwise false, with the count and the first fault in msg.
  bool report(char* msg, int msg_len) const {
    if (faults == 0) return true;
    std::snprintf(msg, msg_len, "%lld memory faults; first: %s", static_cast<long long>(faults.load()),
                  first_fault.c_str());
    return false;
  }
};
inline Memory memory;

inline void fault(const std::string& what) {
  if (memory.faults.fetch_add(1) == 0) {
    std::lock_guard<std::mutex> lock(memory.mutex);
    memory.first_fault = what;
  }
}

// Whether the access is inside a registered buffer and aligned; a faulting access is recorded and skipped
// (a load reads 0), so the harness reports it instead of crashing the process.
inline bool check(const void* p, std::size_t bytes, const char* kind) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  if (a % bytes != 0) {
    fault(std::string(kind) + " of " + std::to_string(bytes) + " bytes at a misaligned address");
    return false;
  }
  const auto& r = memory.ranges;
  auto it = std::upper_bound(r.begin(), r.end(), a, [](std::uintptr_t v, const Range& x) { return v < x.begin; });
  if (it == r.begin() || a + bytes > std::prev(it)->end) {
    fault(std::string(kind) + " of " + std::to_string(bytes) + " bytes outside every registered buffer");
    return false;
  }
  if (bytes == 16) memory.vector_accesses.fetch_add(1, std::memory_order_relaxed);
  else if (bytes <= 4) memory.scalar_accesses.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// One launch's block-level synchronisation.
struct Block {
  explicit Block(int threads) : sync(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    slots.resize(threads);
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> slots;  // one shuffle value per thread
};
inline Block* block = nullptr;

#ifndef HBAT_EMU_WATCHDOG_S
#define HBAT_EMU_WATCHDOG_S 300  // seconds a launch may run before the process is ended
#endif

inline int num_sms = 4;
inline int blocks_per_sm = 2;

template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, int grid, int threads, std::size_t /*shared*/, cudaStream_t, Args... args) {
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  Block b(threads);
  block = &b;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      for (int blk = 0; blk < grid; ++blk) {
        blockIdx = {static_cast<unsigned>(blk), 0, 0};
        kernel(args...);
        b.sync.arrive_and_wait();  // the next block starts when this one is done
      }
    });
  }
  {
    // a barrier that not every thread reaches would hang the test run: end the process with a message instead
    std::mutex m;
    std::condition_variable done;
    bool finished = false;
    std::thread watchdog([&] {
      std::unique_lock<std::mutex> lock(m);
      if (!done.wait_for(lock, std::chrono::seconds(HBAT_EMU_WATCHDOG_S), [&] { return finished; })) {
        std::fprintf(stderr, "hbat CUDA emulator: a launch of %d blocks is still running after %d s "
                     "(a __syncthreads or shuffle that not every thread reaches?)\n", grid, HBAT_EMU_WATCHDOG_S);
        std::_Exit(86);
      }
    });
    for (auto& th : pool) th.join();
    {
      std::lock_guard<std::mutex> lock(m);
      finished = true;
    }
    done.notify_one();
    watchdog.join();
  }
  block = nullptr;
}

}  // namespace hbat_emu

namespace hbat_emu {
// After a barrier, a few threads (pseudo-random, seeded per thread) pause briefly, so that a race a missing
// barrier leaves open (one thread still reading shared memory the others already overwrite) shows up.
inline void jitter() {
  thread_local uint32_t state = 0x9e3779b9u * (threadIdx.x + 1);
  state = state * 1664525u + 1013904223u;
  if ((state >> 24) == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // 1 in 256
}
}  // namespace hbat_emu

inline void __syncthreads() {
  hbat_emu::block->sync.arrive_and_wait();
  hbat_emu::jitter();
}

template <typename T>
T __shfl_down_sync(unsigned int /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(double), "shuffle of a wide type");
  auto& b = *hbat_emu::block;
  const int t = static_cast<int>(threadIdx.x), lane = t % 32;
  double slot = 0.0;
  std::memcpy(&slot, &value, sizeof(T));
  b.slots[t] = slot;
  b.warps[t / 32]->arrive_and_wait();
  T result = value;
  if (lane + offset < 32) std::memcpy(&result, &b.slots[t + offset], sizeof(T));
  b.warps[t / 32]->arrive_and_wait();  // the slots are reused by the next shuffle
  return result;
}

template <typename T> inline T __ldg(const T* p) { return hbat_emu::check(p, sizeof(T), "load") ? *p : T{}; }
template <typename T> inline T __ldcg(const T* p) { return hbat_emu::check(p, sizeof(T), "load") ? *p : T{}; }
template <typename T> inline void __stwb(T* p, T v) {
  if (hbat_emu::check(p, sizeof(T), "store")) *p = v;
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, std::size_t) {
  *blocks = hbat_emu::blocks_per_sm;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------- 16-bit floats
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.x, 2); return static_cast<float>(v); }
inline __half __float2half_rn(float f) {  // round to nearest even (libgcc's conversion)
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<unsigned short>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<unsigned short>(u >> 16)};
}
