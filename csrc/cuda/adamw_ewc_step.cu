// The CUDA kernels of adamw_ewc_step_: its math (csrc/ops/adamw_ewc_step.h) over the generic multi-tensor apply, one
// instantiation per dtype combination its lists allow. One file per op, so that the ops compile in parallel.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/adamw_ewc_step.h"

HBAT_CUDA_OP(adamw_ewc_step_)
