// Generated from hbat/ops/table.py by `python -m hbat.ops.table --write`: do not edit.
// The CUDA kernels of snapshot_: its math (csrc/ops/snapshot.h) over the generic multi-tensor apply.
#include "cuda/multi_tensor_apply.cuh"
#include "ops/snapshot.h"

HBAT_CUDA_OP(snapshot_)
