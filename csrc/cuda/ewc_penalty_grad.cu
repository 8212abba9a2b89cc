// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The CUDA kernels of ewc_penalty_grad_: its math (csrc/ops/ewc_penalty_grad.h) over the generic multi-tensor apply.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/ewc_penalty_grad.h"

HBAT_CUDA_OP(ewc_penalty_grad_)
