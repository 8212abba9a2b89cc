"""Build checks of the CUDA sources that need no GPU.

- every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, with zero warnings, also under the half/bf16
  macros torch's CUDAExtension adds (skipped without nvcc);
- the host-side planner (csrc/cuda/multi_tensor_plan.h, plain C++) groups tensors by dtype, covers every
  element exactly once with its chunks and finds each tensor's 16-byte vector head, and the plan cache
  (csrc/cuda/plan_cache.h) hits, misses and evicts (skipped without g++);
- the torch binding (csrc/bindings/cuda_binding.cpp) compiles against the installed torch's headers and the
  CUDA headers (skipped without them): nothing else builds it without a GPU.
"""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hbat.ops import table

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# the defines torch.utils.cpp_extension.CUDAExtension passes to nvcc
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc")


def test_cuda_sources_exist():
    names = {p.name for p in CUDA_SOURCES}
    assert {"launch.cu"} | {f"{table.stem(op)}.cu" for op in table.OPS} <= names
    plain = CUDA_SOURCES + sorted((ROOT / "csrc" / "cuda").glob("*.h*")) + sorted((ROOT / "csrc").glob("*.h"))
    for source in plain + sorted((ROOT / "csrc" / "ops").glob("*.h")):
        text = source.read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text, (
            f"{source.name} includes torch headers; the CUDA sources must build without them"
        )


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_every_cu_file_compiles_without_warnings(tmp_path):
    nvcc = _nvcc()

    def compile_one(source):
        cmd = [
            nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}", *TORCH_NVCC_DEFINES,
            "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
            "-Xptxas", "-warn-spills", "-c", str(source), "-o", str(tmp_path / f"{source.name}.o"),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return source.name, done.returncode, (done.stdout + done.stderr).strip()

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES))
    for name, returncode, output in results:
        assert returncode == 0, f"nvcc failed on {name}:\n{output}"
        assert output == "", f"nvcc printed warnings for {name}:\n{output}"


PLAN_TEST = r"""
#include "cuda/multi_tensor_plan.h"
#include "cuda/plan_cache.h"
#include <cstdio>
#include <cstdlib>
using namespace hbat::cuda;
using hbat::Op;
#define CHECK(...) do { if (!(__VA_ARGS__)) { std::printf("FAILED line %d: %s\n", __LINE__, #__VA_ARGS__); std::exit(1); } } while (0)

TensorArg arg(std::uintptr_t x, std::uintptr_t y, std::uintptr_t z, int64_t numel, DType dx, DType dy, DType dz) {
  TensorArg t;
  t.ptr[0] = x; t.ptr[1] = y; t.ptr[2] = z;
  t.dtype[0] = dx; t.dtype[1] = dy; t.dtype[2] = dz;
  t.numel = numel;
  return t;
}

int main() {
  const DType F = DType::kFloat32, B = DType::kBFloat16, H = DType::kFloat16;
  // mixed dtypes, an empty tensor, misaligned views and a tensor larger than 2**31 elements
  std::vector<TensorArg> ts = {
      arg(0x1000, 0x2000, 0x3000, 5000, F, F, F),
      arg(0x4002, 0x5002, 0x6002, 70000, B, B, B),                 // head 7
      arg(0x7000, 0x8000, 0x9000, 0, F, F, F),                     // empty
      arg(0xa004, 0xb000, 0xc000, 100, F, F, F),                   // incompatible
      arg(0xd000, 0xe000, 0xf000, (int64_t(1) << 31) + 7, H, F, F),
      arg(0x10008, 0x11008, 0x12008, 33, F, F, F)};                // head 2
  const Plan plan = make_plan(Op::ewc_penalty_grad_, ts, 132);
  CHECK(plan.error.empty());
  CHECK(plan.num_lists == 3);
  CHECK(plan.chunk_size == kMaxChunk && plan.chunk_size % 8 == 0);
  const TableLayout L{6, 3};
  CHECK((int64_t)plan.table.size() == L.words());
  // launch order: group of tensor 0 (0, 2, 3, 5), then 1, then 4
  const int64_t expected_order[6] = {0, 2, 3, 5, 1, 4};
  for (int s = 0; s < 6; ++s) CHECK(plan.table[L.index() + s] == expected_order[s]);
  for (int s = 0; s < 6; ++s)
    for (int l = 0; l < 3; ++l) CHECK(plan.table[L.ptr(l) + s] == (int64_t)ts[expected_order[s]].ptr[l]);
  CHECK(plan.groups.size() == 3);
  CHECK(plan.groups[0].seg_begin == 0 && plan.groups[0].seg_end == 4);
  CHECK(plan.groups[2].dtype[0] == H && plan.groups[2].dtype[1] == F);
  const int64_t expected_head[6] = {0, 0, -1, 2, 7, 0};
  for (int s = 0; s < 6; ++s) CHECK(plan.table[L.head() + s] == expected_head[s]);
  // chunks: contiguous per tensor, groups contiguous, every element covered exactly once
  int64_t chunks = 0;
  for (int s = 0; s < 6; ++s) {
    const int64_t numel = plan.table[L.numel() + s];
    CHECK(plan.table[L.first_chunk() + s] == chunks);
    chunks += (numel + plan.chunk_size - 1) / plan.chunk_size;
  }
  CHECK(plan.table[L.first_chunk() + 6] == chunks && plan.num_chunks == chunks);
  CHECK(plan.groups[0].chunk_begin == 0 && plan.groups[2].chunk_end == chunks);
  for (size_t g = 1; g < plan.groups.size(); ++g) CHECK(plan.groups[g].chunk_begin == plan.groups[g - 1].chunk_end);
  // an op with two lists ignores a third pointer (and its alignment); small calls get small chunks
  std::vector<TensorArg> two = {arg(0x1000, 0x2000, 0x3, 10, F, B, H)};
  const Plan small = make_plan(Op::squared_change, two, 132);
  CHECK(small.error.empty() && small.chunk_size == kMinChunk && small.groups.size() == 1 && small.num_lists == 2);
  CHECK(small.table[TableLayout{1, 2}.head()] == 0 && (int64_t)small.table.size() == TableLayout{1, 2}.words());
  // five lists (adamw_ewc_step_): every list's alignment counts for the head
  TensorArg five = arg(0x1000, 0x2000, 0x3000, 100, F, F, F);
  five.ptr[3] = 0x4000; five.ptr[4] = 0x5004;
  const Plan adamw = make_plan(Op::adamw_ewc_step_, {five}, 132);
  CHECK(adamw.error.empty() && adamw.num_lists == 5 && adamw.table[TableLayout{1, 5}.head()] == -1);
  // a pointer not aligned to its element size is refused, naming the list
  std::vector<TensorArg> bad = {arg(0x1001, 0x2000, 0, 10, B, B, F)};
  CHECK(make_plan(Op::squared_change, bad, 132).error.rfind("params[0]", 0) == 0);

  // the plan cache: same tensors hit, any other address, dtype, size or context misses; LRU eviction
  PlanCache<int> cache(2);
  const PlanKey k1 = plan_key(Op::ewc_penalty_grad_, ts, {0, 7, 132});
  CHECK(cache.find(k1) == nullptr);
  cache.insert(k1, 1);
  CHECK(cache.find(k1) != nullptr && *cache.find(k1) == 1 && cache.hits() == 2 && cache.misses() == 1);
  std::vector<TensorArg> moved = ts;
  moved[3].ptr[1] += 16;
  std::vector<TensorArg> retyped = ts;
  retyped[0].dtype[2] = B;
  CHECK(plan_key(Op::ewc_penalty_grad_, moved, {0, 7, 132}) != k1 && plan_key(Op::ewc_penalty_grad_, retyped, {0, 7, 132}) != k1);
  CHECK(plan_key(Op::ewc_penalty_grad_, ts, {0, 8, 132}) != k1 && plan_key(Op::squared_change, ts, {0, 7, 132}) != k1);
  cache.insert(plan_key(Op::ewc_penalty_grad_, moved, {0, 7, 132}), 2);
  CHECK(cache.find(k1) != nullptr);  // now the most recently used
  cache.insert(plan_key(Op::ewc_penalty_grad_, retyped, {0, 7, 132}), 3);  // evicts `moved`
  CHECK(cache.size() == 2 && cache.find(k1) != nullptr);
  CHECK(cache.find(plan_key(Op::ewc_penalty_grad_, moved, {0, 7, 132})) == nullptr);
  std::printf("ok\n");
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_host_plan_and_plan_cache(tmp_path):
    source = tmp_path / "plan_test.cpp"
    source.write_text(PLAN_TEST)
    exe = tmp_path / "plan_test"
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", str(source), "-o", str(exe)],
        capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def _cuda_include_dir():
    nvcc = _nvcc()
    if nvcc is None:
        return None
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(os.path.realpath(nvcc)).parents[1], "/usr/local/cuda"]
    for root in (Path(h) for h in homes if h):
        if (root / "include" / "cuda_runtime_api.h").exists():
            return root / "include"
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include_dir() is None, reason="g++ or CUDA headers not found")
def test_torch_binding_compiles(tmp_path):
    """csrc/bindings/cuda_binding.cpp against this torch's headers (a CPU wheel's lack one generated CUDA
    header, stubbed here) and the CUDA headers: a syntax and template check, nothing is linked."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", f"-I{ROOT / 'csrc'}", f"-I{tmp_path}",
           *[f"-I{p}" for p in include_paths()], f"-I{_cuda_include_dir()}", f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H", "-w",
           str(ROOT / "csrc" / "bindings" / "cuda_binding.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
