// The CUDA kernels of snapshot_: its math (csrc/ops/snapshot.h) over the generic multi-tensor apply, one
// instantiation per dtype combination its lists allow. One file per op, so that the ops compile in parallel.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/snapshot.h"

HBAT_CUDA_OP(snapshot_)
