// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The CUDA kernels of scaled_diff: its math (csrc/ops/scaled_diff.h) over the generic multi-tensor apply.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/scaled_diff.h"

HBAT_CUDA_OP(scaled_diff)
