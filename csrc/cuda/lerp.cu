// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The CUDA kernels of lerp_: its math (csrc/ops/lerp.h) over the generic multi-tensor apply.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/lerp.h"

HBAT_CUDA_OP(lerp_)
