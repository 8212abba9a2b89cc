#!/usr/bin/env bash
# The GPU checks of issues #3, #4 and #16 in one prepared run (for a CUDA machine with torch, triton, pytest and
# transformers installed; no package registry needed). Results go to $OUT (default benchmarks/results).
# Two parts, each under 10 minutes (one device-tool call each; the build stays on a warm machine):
#   bash benchmarks/gpu_check.sh test       # build + GPU tests
#   bash benchmarks/gpu_check.sh bench      # the four benchmarks
# 1. builds hbat with the CUDA extension against the installed torch (no dependency resolution);
# 2. runs the op, Triton, CUDA-build, HybridEWC and optimizer tests on the GPU backends (bit-identical repeats, the
#    2**31-element case included);
# 3. runs the four benchmarks on the GPU and writes <gpu>-ops/-importance/-step/-optim .md/.csv/.png.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
status=0
part=${1:-test}

step() { echo; echo "=== $*"; }

if [ "$part" = test ]; then
  step "build (CUDA extension, against the installed torch)"
  timeout 300 python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -5 || status=1
  python -m hbat.info 2>&1 | tee "$OUT/gpu-info.txt" || status=1
  step "tests on the GPU backends"
  timeout 270 python -m pytest -q tests/test_ops.py tests/test_triton_kernels.py tests/test_cuda_build.py \
      tests/test_ewc.py tests/test_adamw_ewc_step.py tests/test_optim.py 2>&1 | tee "$OUT/gpu-tests.txt" | tail -15 || status=1
elif [ "$part" = bench ]; then
  step "benchmarks"
  timeout 300 python benchmarks/bench_ops.py --device cuda --sizes 1e6,1e7,1e8,1e9 --out "$OUT" 2>&1 | tail -25 || status=1
  timeout 150 python benchmarks/bench_step.py --device cuda --out "$OUT" 2>&1 | tail -12 || status=1
  timeout 120 python benchmarks/bench_importance.py --device cuda --out "$OUT" 2>&1 | tail -12 || status=1
  timeout 90 python benchmarks/bench_optim.py --device cuda --sizes 1e7,1e8,5e8 --out "$OUT" 2>&1 | tail -12 || status=1
else
  echo "usage: $0 test|bench" >&2; exit 2
fi
exit $status
