// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The CUDA kernels of adamw_ewc_step_: its math (csrc/ops/adamw_ewc_step.h) over the generic multi-tensor apply.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/adamw_ewc_step.h"

HBAT_CUDA_OP(adamw_ewc_step_)
