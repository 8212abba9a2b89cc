// The CUDA kernels of sum_sq_diff: its math (csrc/ops/sum_sq_diff.h) over the generic multi-tensor apply, one
// instantiation per dtype combination its lists allow. One file per op, so that the ops compile in parallel.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/sum_sq_diff.h"

HBAT_CUDA_OP(sum_sq_diff)
