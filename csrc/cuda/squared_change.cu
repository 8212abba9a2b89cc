// The CUDA kernels of squared_change: its math (csrc/ops/squared_change.h) over the generic multi-tensor apply, one
// instantiation per dtype combination its lists allow. One file per op, so that the ops compile in parallel.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/squared_change.h"

HBAT_CUDA_OP(squared_change)
