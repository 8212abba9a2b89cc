// The CUDA kernels of lerp_: its math (csrc/ops/lerp.h) over the generic multi-tensor apply, one
// instantiation per dtype combination its lists allow. One file per op, so that the ops compile in parallel.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/lerp.h"

HBAT_CUDA_OP(lerp_)
