// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The CUDA kernels of squared_change: its math (csrc/ops/squared_change.h) over the generic multi-tensor apply.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/squared_change.h"

HBAT_CUDA_OP(squared_change)
