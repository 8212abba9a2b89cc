"""Triton kernels of the fused multi-tensor ops: one launch per dtype group covers every tensor of a call.

Every op of the table (hbat/ops/table.py) runs through one generic kernel, ``_multi_tensor_kernel``: the op's
lists, their roles (which are loaded, which stored) and their dtype rules come from the table, and its math is
a ``@triton.jit`` function of kernels/op_math.py passed as a compile-time constant. Each program reads its row
of the chunk table (kernels/plan.py): the tensor index, and the int64 element range of the chunk; the
tensors' data addresses are int64 values turned into typed pointers with ``.to(tl.pointer_type(dtype))``.
The chunk is walked in BLOCK-element steps, unmasked (vectorisable) except for the one tail block.
Reductions accumulate a BLOCK-wide float32 vector and write one partial per chunk; ``_sum_partials_kernel``
then adds each tensor's partials in a fixed order, in float64. No atomics: the same inputs give
bit-identical results.

``call(op, *args)`` runs an op with the arguments of its torch.ops.hbat schema (``table.OpDef.schema``), and
this module has one function per op of the table with that name (``ewc.ewc_penalty_grad_(params, anchors,
grads, coef)``); ``chunk_size=`` / ``block=`` keywords override the defaults (tests use tiny ones).

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
import struct
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from hbat.ops import table

from .op_math import math_of
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
def _list_ptrs(addresses_ptr, tensor, DTYPES: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed data pointers of the tensor's lists (its address row of the table), a tuple in list order."""
    ptrs = ()
    for r in tl.static_range(len(DTYPES)):
        ptr = tl.load(addresses_ptr + tensor * len(DTYPES) + r).to(tl.pointer_type(DTYPES[r]))
        if ALIGNED:  # lets the compiler emit 16-byte vector loads and stores
            ptr = tl.multiple_of(ptr, 16)
        ptrs = ptrs + (ptr,)
    return ptrs


@triton.jit
def _load_list(ptr, offs, mask, LOAD: tl.constexpr, MASKED: tl.constexpr):
    if LOAD:
        value = _load_f32(ptr, offs, mask, MASKED)
    else:
        value = 0.0
    return value


@triton.jit
def _store_list(ptr, offs, value, mask, STORE: tl.constexpr, MASKED: tl.constexpr):
    if STORE:
        _store(ptr, offs, value, mask, MASKED)


@triton.jit
def _apply_block(ptrs, offs, mask, v, s, acc, MATH: tl.constexpr, LOADS: tl.constexpr, STORES: tl.constexpr,
                 REDUCES: tl.constexpr, MASKED: tl.constexpr):
    """One BLOCK of every list: load the loaded lists, run the op's math, store the stored lists; returns the
    updated per-tensor accumulator. Masked lanes load 0: they add nothing to a sum, NaN/inf propagate."""
    e = ()
    for r in tl.static_range(len(ptrs)):
        e = e + (_load_list(ptrs[r], offs, mask, (LOADS >> r) & 1, MASKED),)
    e, sq = MATH(e, v, s)
    for r in tl.static_range(len(ptrs)):
        _store_list(ptrs[r], offs, e[r], mask, (STORES >> r) & 1, MASKED)
    if REDUCES:
        acc += sq
    return acc


@triton.jit(do_not_specialize=["chunk_begin", "scalar_bits"])
def _multi_tensor_kernel(
    addresses_ptr,  # int64 [n, len(DTYPES)]: data addresses of tensor i of every list
    chunks_ptr,  # int64 [num_chunks, 3]: tensor index, first element, end element
    vector_ptrs,  # tuple of float32 [n]: the op's per-tensor vectors
    partials_ptr,  # float32 [num_chunks]: one partial sum per chunk (reducing ops); unused otherwise
    chunk_begin,  # this launch covers chunks [chunk_begin, chunk_begin + grid)
    scalar_bits,  # tuple of int64: the op's float64 scalars, bit for bit (see launch)
    MATH: tl.constexpr,  # the op's math (kernels/op_math.py)
    DTYPES: tl.constexpr,  # tuple: the element type of each list (this launch group's)
    LOADS: tl.constexpr,  # bit l: list l is loaded (its role reads it)
    STORES: tl.constexpr,  # bit l: list l is stored
    REDUCES: tl.constexpr,
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
    ptrs = _list_ptrs(addresses_ptr, tensor, DTYPES, ALIGNED)
    v = ()
    for k in tl.static_range(len(vector_ptrs)):
        v = v + (tl.load(vector_ptrs[k] + tensor),)
    s = ()
    for k in tl.static_range(len(scalar_bits)):
        s = s + (scalar_bits[k].to(tl.int64).to(tl.float64, bitcast=True),)

    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    num_full = (end - start) // BLOCK
    for k in range(0, num_full):  # int64 offsets: tensors may exceed 2**31 elements
        offs = start + k * BLOCK + lanes
        acc = _apply_block(ptrs, offs, None, v, s, acc, MATH, LOADS, STORES, REDUCES, False)
    full_end = start + num_full * BLOCK
    if full_end < end:  # the tail of the tensor's last chunk
        offs = full_end + lanes
        acc = _apply_block(ptrs, offs, offs < end, v, s, acc, MATH, LOADS, STORES, REDUCES, True)

    if REDUCES:  # one partial per chunk, summed by _sum_partials_kernel
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


def op_constexprs(op: table.OpDef) -> dict:
    """The compile-time constants of ``op`` in ``_multi_tensor_kernel``, all from the op table (DTYPES, one
    element type per list, comes from each launch group)."""
    return dict(
        MATH=math_of(op.name),
        LOADS=sum(1 << i for i, t in enumerate(op.lists) if t.loaded),
        STORES=sum(1 << i for i, t in enumerate(op.lists) if t.stored),
        REDUCES=op.reduces,
    )


def scalar_bits(scalars: Sequence[float]) -> tuple:
    """The scalars as the int64 bit patterns of their float64 values: Triton types a Python float inside a tuple
    argument float32 (a tuple's elements take no annotation); the kernel bitcasts them back to float64."""
    return tuple(struct.unpack("<q", struct.pack("<d", float(x)))[0] for x in scalars)


def launch(op: table.OpDef, plan: MultiTensorPlan, vectors: Sequence[torch.Tensor], scalars: Sequence[float] = (),
           block: int = BLOCK) -> Optional[torch.Tensor]:
    """Run ``op`` over the tensors of ``plan``: one launch per dtype group, then, for the reducing ops, one
    launch of the per-tensor reduction. ``vectors``: the op's float32 [n] vectors, ``scalars`` its floats.
    Returns the float32 [n] sums (reducing ops) or None. No host sync."""
    device = plan.table.device
    partials = torch.empty(plan.num_chunks if op.reduces else 0, dtype=torch.float32, device=device)
    out = torch.empty(plan.num_tensors, dtype=torch.float32, device=device) if op.reduces else None
    bits = scalar_bits(scalars)
    constexprs = op_constexprs(op)
    # Triton launches on the current device: make it the tensors' one
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for group in plan.groups:
            _multi_tensor_kernel[(group.num_chunks,)](
                plan.addresses,
                plan.chunks,
                tuple(vectors),
                partials,
                group.chunk_begin,
                bits,
                **constexprs,
                DTYPES=tuple(_TRITON_DTYPES[d] for d in group.dtypes),
                BLOCK=block,
                ALIGNED=group.aligned,
                num_warps=num_warps_for(block),
            )
        if op.reduces:
            _sum_partials_kernel[(plan.num_tensors,)](partials, plan.slots, out, BLOCK=PARTIALS_BLOCK, num_warps=1)
    return out


def call(op, *args, chunk_size: Optional[int] = None, block: Optional[int] = None):
    """Run ``op`` (an ``OpDef`` or its name) with the arguments of its schema: its tensor lists (validated by
    the caller), per-tensor vectors and scalars. Returns the per-tensor sums, the new tensors of its RETURN
    list, or None. ``block`` / ``chunk_size`` override the defaults (tests use tiny ones so that small tensors
    span several chunks)."""
    op = table.op(op) if isinstance(op, str) else op
    num_lists, num_vectors = len(op.arguments), len(op.vectors)
    if len(args) != num_lists + num_vectors + len(op.scalars):
        raise TypeError(f"{op.name} takes {op.schema}")
    given = dict(zip((t.name for t in op.arguments), args[:num_lists]))
    if op.returned is not None:  # new tensors, like the list the RETURN list's dtype rule names
        like = given[op.returned.dtype]
        given[op.returned.name] = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
    lists = [list(given[t.name]) for t in op.lists]
    vectors = [v.to(torch.float32).contiguous() for v in args[num_lists:num_lists + num_vectors]]
    xs = lists[0]
    if chunk_size is None:
        chunk_size = _chunk_size(sum(t.numel() for t in xs), xs[0].device) if block is None else block * ITERS_PER_CHUNK
    block = block or BLOCK
    if block & (block - 1):
        raise ValueError(f"block ({block}) must be a power of two")
    if chunk_size % block:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of block ({block})")
    sums = launch(op, PLANS.get(lists, chunk_size), vectors, args[num_lists + num_vectors:], block)
    if op.reduces:
        return sums
    return given[op.returned.name] if op.returned is not None else None


# ----------------------------------------------------------------------------------------- the ops
def _op_function(op: table.OpDef):
    def run(*args, **config):
        return call(op, *args, **config)

    run.__name__ = run.__qualname__ = op.name
    run.__doc__ = f"{op.schema}: {op.doc}"
    return run


# one function per op of the table, e.g. ewc_penalty_grad_(params, anchors, grads, coef, **config)
for _op in table.OPS:
    globals()[_op.name] = _op_function(_op)
del _op
