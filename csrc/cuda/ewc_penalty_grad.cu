// The CUDA kernels of ewc_penalty_grad_: its math (csrc/ops/ewc_penalty_grad.h) over the generic multi-tensor apply, one
// instantiation per dtype combination its lists allow. One file per op, so that the ops compile in parallel.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/ewc_penalty_grad.h"

HBAT_CUDA_OP(ewc_penalty_grad_)
