"""Triton kernels of the fused EWC ops: one launch per dtype group covers every tensor of a call.

The ops (contract: csrc/bindings/library.cpp) all stream over pairs or triples of tensors:

    op              x        y          z          per element                        per tensor
    sum_sq_diff     params   refs       -          (x - y)^2                          sum
    snapshot_       params   anchors    -          (x - y)^2; y <- x                  sum
    penalty_grad_   params   anchors    grads      (x - y)^2; z <- z + c_i (x - y)    sum
    scaled_diff     params   anchors    out        z <- c_i (x - y)                   -
    lerp_           a        b          dst        z <- (1 - c_i) x + c_i y           -

One kernel, ``_ewc_chunk_kernel``, serves them all (the op is a compile-time constant). Each program
reads its row of the chunk table (kernels/plan.py): the tensor index, and the int64 element range of the
chunk; the tensor's data addresses are int64 values turned into typed pointers with
``.to(tl.pointer_type(dtype))``. The chunk is walked in BLOCK-element steps, unmasked (vectorisable)
except for the one tail block. Reductions accumulate a BLOCK-wide float32 vector and write one partial per
chunk; ``_sum_partials_kernel`` then adds each tensor's partials in a fixed order, in float64. No atomics:
the same inputs give bit-identical results.

Tuning on a GPU (unverified here, no GPU was available when this was written): BLOCK, ITERS_PER_CHUNK
(chunk = BLOCK * ITERS elements), num_warps_for() and MIN_CHUNKS_PER_SM below.
``python -m hbat.kernels.compile_check`` compiles every variant for sm_80/sm_90 without a GPU and counts
the 16-byte vector loads/stores in the PTX. A streaming kernel reaches the
copy bandwidth when each thread issues several independent 16-byte loads per stream and enough programs
are resident per SM; measure ``ewc_penalty_grad_`` over ~1e9 elements in ~200+ tensors against a
device-to-device copy and sweep BLOCK in {1024, 2048, 4096}, num_warps in {4, 8}, ITERS in {4, 8, 16, 32}.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .plan import MultiTensorPlan, PlanCache

# ----------------------------------------------------------------------------------------- configuration
#: elements per loop step of a program: 2048 fp32 over 4 warps = 16 per thread = 4 x 16-byte vectors
BLOCK = 2048
#: loop steps per chunk (the largest chunk is BLOCK * ITERS_PER_CHUNK elements); warps: num_warps_for(BLOCK)
ITERS_PER_CHUNK = 16
#: when the whole call is small, shrink chunks (down to one BLOCK) until there are this many per SM
MIN_CHUNKS_PER_SM = 4
#: partial sums added per step by the final per-tensor reduction
PARTIALS_BLOCK = 256

# The ops of _ewc_chunk_kernel, compile-time constants usable inside the kernels. Numbered so that the ops
# that reduce are <= OP_PENALTY_GRAD and the ops that read a per-tensor coefficient are >= OP_PENALTY_GRAD.
OP_SUM_SQ_DIFF = tl.constexpr(0)
OP_SNAPSHOT = tl.constexpr(1)
OP_PENALTY_GRAD = tl.constexpr(2)
OP_SCALED_DIFF = tl.constexpr(3)
OP_LERP = tl.constexpr(4)
_REDUCING_OPS = (OP_SUM_SQ_DIFF, OP_SNAPSHOT, OP_PENALTY_GRAD)

_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: the chunk tables of recent calls (see kernels/plan.py)
PLANS = PlanCache()


def interpreter_on() -> bool:
    """Triton's CPU interpreter is on (it must be set before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _bf16_to_f32(value):
    # exact widening by bits (Triton's interpreter flushes bf16 subnormals when it converts)
    return (value.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16(value):
    # round to nearest even, by bits: what torch and the GPU's cvt.rn do (Triton's interpreter truncates)
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(value != value, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_f32(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        value = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        value = tl.load(ptr + offs)
    if ptr.dtype.element_ty == tl.bfloat16:
        return _bf16_to_f32(value)
    else:
        return value.to(tl.float32)


@triton.jit
def _store(ptr, offs, value, mask, MASKED: tl.constexpr):
    if ptr.dtype.element_ty == tl.bfloat16:
        value = _f32_to_bf16(value)
    else:
        value = value.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _ewc_block(x_ptr, y_ptr, z_ptr, offs, mask, coef, acc, OP: tl.constexpr, MASKED: tl.constexpr):
    """One BLOCK of one op; returns the updated squared-difference accumulator (unchanged if no sum)."""
    x = _load_f32(x_ptr, offs, mask, MASKED)
    y = _load_f32(y_ptr, offs, mask, MASKED)
    if OP == OP_LERP:  # (1 - w) a + w b keeps both endpoints exact (w = 0 gives a, w = 1 gives b)
        _store(z_ptr, offs, (1.0 - coef) * x + coef * y, mask, MASKED)
    else:
        diff = x - y
        if OP == OP_SCALED_DIFF:
            _store(z_ptr, offs, coef * diff, mask, MASKED)
        else:
            acc += diff * diff  # masked lanes loaded 0 - 0: they add nothing, NaN/inf propagate
            if OP == OP_SNAPSHOT:  # the anchor takes the params' value after its old value was read
                _store(y_ptr, offs, x, mask, MASKED)
            if OP == OP_PENALTY_GRAD:
                grad = _load_f32(z_ptr, offs, mask, MASKED)
                _store(z_ptr, offs, grad + coef * diff, mask, MASKED)
    return acc


@triton.jit(do_not_specialize=["chunk_begin"])
def _ewc_chunk_kernel(
    addresses_ptr,  # int64 [n, 3]: data addresses of x[i], y[i], z[i]
    chunks_ptr,  # int64 [num_chunks, 3]: tensor index, first element, end element
    coef_ptr,  # float32 [n]: coef (penalty_grad_, scaled_diff) or weights (lerp_); unused otherwise
    partials_ptr,  # float32 [num_chunks]: one partial sum per chunk (reducing ops); unused otherwise
    chunk_begin,  # this launch covers chunks [chunk_begin, chunk_begin + grid)
    OP: tl.constexpr,
    X_DTYPE: tl.constexpr,
    Y_DTYPE: tl.constexpr,
    Z_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # data addresses are 16-byte aligned and chunk starts are multiples of BLOCK
):
    chunk = chunk_begin + tl.program_id(0).to(tl.int64)
    row = chunks_ptr + chunk * 3
    tensor = tl.load(row)
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)

    x_ptr = tl.load(addresses_ptr + tensor * 3).to(tl.pointer_type(X_DTYPE))
    y_ptr = tl.load(addresses_ptr + tensor * 3 + 1).to(tl.pointer_type(Y_DTYPE))
    z_ptr = tl.load(addresses_ptr + tensor * 3 + 2).to(tl.pointer_type(Z_DTYPE))
    if ALIGNED:  # lets the compiler emit 16-byte vector loads and stores
        x_ptr = tl.multiple_of(x_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
        z_ptr = tl.multiple_of(z_ptr, 16)

    coef = 0.0
    if OP >= OP_PENALTY_GRAD:  # the ops with a per-tensor coefficient
        coef = tl.load(coef_ptr + tensor)

    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    num_full = (end - start) // BLOCK
    for k in range(0, num_full):  # int64 offsets: tensors may exceed 2**31 elements
        offs = start + k * BLOCK + lanes
        acc = _ewc_block(x_ptr, y_ptr, z_ptr, offs, None, coef, acc, OP, False)
    full_end = start + num_full * BLOCK
    if full_end < end:  # the tail of the tensor's last chunk
        offs = full_end + lanes
        acc = _ewc_block(x_ptr, y_ptr, z_ptr, offs, offs < end, coef, acc, OP, True)

    if OP <= OP_PENALTY_GRAD:  # the reducing ops: one partial per chunk, summed by _sum_partials_kernel
        tl.store(partials_ptr + chunk, tl.sum(acc, axis=0))


@triton.jit
def _sum_partials_kernel(partials_ptr, slots_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[i] = the sum, in slot order and in float64, of tensor i's chunk partials (0 when it has none)."""
    tensor = tl.program_id(0).to(tl.int64)
    first = tl.load(slots_ptr + tensor * 2)
    count = tl.load(slots_ptr + tensor * 2 + 1)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, count, BLOCK):
        idx = i + lanes
        acc += tl.load(partials_ptr + first + idx, mask=idx < count, other=0.0).to(tl.float64)
    tl.store(out_ptr + tensor, tl.sum(acc, axis=0).to(tl.float32))


# ----------------------------------------------------------------------------------------- launching
def _chunk_size(total_elements: int, device: torch.device) -> int:
    """BLOCK * ITERS_PER_CHUNK, halved (down to BLOCK) while a small call would leave SMs idle."""
    chunk = BLOCK * ITERS_PER_CHUNK
    if device.type != "cuda":
        return chunk
    target_chunks = MIN_CHUNKS_PER_SM * _sm_count(device)
    while chunk > BLOCK and total_elements // chunk < target_chunks:
        chunk //= 2
    return chunk


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def num_warps_for(block: int) -> int:
    """4 warps per 2048 elements (16 per thread: 4 x 16-byte fp32 vectors), between 1 and 8."""
    return max(1, min(8, block // 512))


def launch(op: int, plan: MultiTensorPlan, coef: Optional[torch.Tensor], block: int = BLOCK) -> Optional[torch.Tensor]:
    """Run ``op`` over the tensors of ``plan``: one launch per dtype group, then, for the reducing ops, one
    launch of the per-tensor reduction. Returns the float32 [n] sums (reducing ops) or None. No host sync."""
    device = plan.table.device
    reducing = op in _REDUCING_OPS
    partials = torch.empty(plan.num_chunks if reducing else 0, dtype=torch.float32, device=device)
    out = torch.empty(plan.num_tensors, dtype=torch.float32, device=device) if reducing else None
    if coef is None:
        coef = partials  # a placeholder: never read by the ops without a coefficient
    if not reducing:
        partials = coef  # a placeholder: never written by the ops without a sum
    # Triton launches on the current device: make it the tensors' one
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for group in plan.groups:
            x_dtype, y_dtype, z_dtype = (_TRITON_DTYPES.get(d) for d in group.dtypes)
            _ewc_chunk_kernel[(group.num_chunks,)](
                plan.addresses,
                plan.chunks,
                coef,
                partials,
                group.chunk_begin,
                OP=op,
                X_DTYPE=x_dtype,
                Y_DTYPE=y_dtype,
                Z_DTYPE=z_dtype if z_dtype is not None else x_dtype,  # no z: the pointer is never used
                BLOCK=block,
                ALIGNED=group.aligned,
                num_warps=num_warps_for(block),
            )
        if reducing:
            _sum_partials_kernel[(plan.num_tensors,)](partials, plan.slots, out, BLOCK=PARTIALS_BLOCK, num_warps=1)
    return out


def _run(
    op: int,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    zs: Optional[Sequence[torch.Tensor]],
    coef: Optional[torch.Tensor],
    *,
    chunk_size: Optional[int] = None,
    block: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """``op`` over parallel lists of tensors (validated by the caller). ``block`` / ``chunk_size`` override
    the defaults (tests use tiny ones so that small tensors span several chunks)."""
    if chunk_size is None:
        chunk_size = _chunk_size(sum(t.numel() for t in xs), xs[0].device) if block is None else block * ITERS_PER_CHUNK
    block = block or BLOCK
    if block & (block - 1):
        raise ValueError(f"block ({block}) must be a power of two")
    if chunk_size % block:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of block ({block})")
    return launch(op, PLANS.get(xs, ys, zs, chunk_size), coef, block)


# ----------------------------------------------------------------------------------------- the ops
def sum_sq_diff(params, refs, **config) -> torch.Tensor:
    """float32 [n]: sum_j (params[i]_j - refs[i]_j)^2 for each i."""
    return _run(OP_SUM_SQ_DIFF, params, refs, None, None, **config)


def snapshot_(params, anchors, **config) -> torch.Tensor:
    """The sums of sum_sq_diff against the anchors' old values; anchors[i] <- params[i] in the same pass."""
    return _run(OP_SNAPSHOT, params, anchors, None, None, **config)


def penalty_grad_(params, anchors, grads, coef, **config) -> torch.Tensor:
    """The sums of (p - a)^2 and, in the same pass, grads[i] += coef[i] * (p - a)."""
    return _run(OP_PENALTY_GRAD, params, anchors, grads, coef, **config)


def scaled_diff(params, anchors, coef, **config) -> list:
    """New tensors coef[i] * (params[i] - anchors[i]) in params[i]'s dtype."""
    outs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
    _run(OP_SCALED_DIFF, params, anchors, outs, coef, **config)
    return outs


def lerp_(dst, a, b, weights, **config) -> None:
    """dst[i] <- (1 - weights[i]) * a[i] + weights[i] * b[i]; dst may alias a or b."""
    _run(OP_LERP, a, b, dst, weights, **config)
