"""Build checks of the CUDA sources that need no GPU.

- every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, with zero warnings, also under the half/bf16
  macros torch's CUDAExtension adds (skipped without nvcc);
- the host-side planner (csrc/cuda/multi_tensor_plan.h, plain C++) groups tensors by dtype, covers every
  element exactly once with its chunks and finds each tensor's 16-byte vector head (skipped without g++).
"""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
    assert {"launch.cu", "penalty_grad.cu", "sum_sq_diff.cu", "snapshot.cu", "scaled_diff.cu", "lerp.cu"} <= names
    for source in CUDA_SOURCES + sorted((ROOT / "csrc" / "cuda").glob("*.h*")):
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
#include <cstdio>
#include <cstdlib>
using namespace hbat::cuda;
#define CHECK(c) do { if (!(c)) { std::printf("FAILED line %d: %s\n", __LINE__, #c); std::exit(1); } } while (0)

int main() {
  // mixed dtypes, an empty tensor, misaligned views and a tensor larger than 2**31 elements
  std::vector<TensorArg> ts(6);
  ts[0] = {0x1000, 0x2000, 0x3000, 5000, DType::kFloat32, DType::kFloat32, DType::kFloat32};
  ts[1] = {0x4002, 0x5002, 0x6002, 70000, DType::kBFloat16, DType::kBFloat16, DType::kBFloat16};  // head 7
  ts[2] = {0x7000, 0x8000, 0x9000, 0, DType::kFloat32, DType::kFloat32, DType::kFloat32};         // empty
  ts[3] = {0xa004, 0xb000, 0xc000, 100, DType::kFloat32, DType::kFloat32, DType::kFloat32};       // incompatible
  ts[4] = {0xd000, 0xe000, 0xf000, (int64_t(1) << 31) + 7, DType::kFloat16, DType::kFloat32, DType::kFloat32};
  ts[5] = {0x10008, 0x11008, 0x12008, 33, DType::kFloat32, DType::kFloat32, DType::kFloat32};     // head 2
  const Plan plan = make_plan(Op::kPenaltyGrad, ts, 132);
  CHECK(plan.error.empty());
  CHECK(plan.chunk_size == kMaxChunk && plan.chunk_size % 8 == 0);
  const TableLayout L{6};
  CHECK((int64_t)plan.table.size() == L.words());
  // launch order: group of tensor 0 (0, 2, 3, 5), then 1, then 4
  const int64_t expected_order[6] = {0, 2, 3, 5, 1, 4};
  for (int s = 0; s < 6; ++s) CHECK(plan.table[L.index() + s] == expected_order[s]);
  CHECK(plan.groups.size() == 3);
  CHECK(plan.groups[0].seg_begin == 0 && plan.groups[0].seg_end == 4);
  CHECK(plan.groups[2].dx == DType::kFloat16 && plan.groups[2].dy == DType::kFloat32);
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
  // roles without z (sum_sq_diff) ignore z's alignment; small calls get small chunks
  std::vector<TensorArg> two = {{0x1000, 0x2000, 0x3, 10, DType::kFloat32, DType::kBFloat16, DType::kFloat16}};
  const Plan small = make_plan(Op::kSumSqDiff, two, 132);
  CHECK(small.error.empty() && small.chunk_size == kMinChunk && small.groups.size() == 1);
  CHECK(small.table[TableLayout{1}.head()] == 0 && small.table[TableLayout{1}.ptr_z()] == 0);
  // a pointer not aligned to its element size is refused
  std::vector<TensorArg> bad = {{0x1001, 0x2000, 0, 10, DType::kBFloat16, DType::kBFloat16, DType::kFloat32}};
  CHECK(!make_plan(Op::kSumSqDiff, bad, 132).error.empty());
  std::printf("ok\n");
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_host_plan_groups_chunks_and_vector_heads(tmp_path):
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
