"""Host side of the multi-tensor launches: the chunk table (apex multi-tensor-apply style) and its cache.

A call covers n tensors in each of an op's L lists (e.g. params, anchors, grads). The chunks are those of
every backend (CONTRIBUTING.md, "Chunks"): each tensor is cut into chunks of ``chunk_size`` elements (its
last chunk may be shorter; an empty tensor has none) and one Triton program handles one chunk. Everything a
program needs is in one int64 table on the device:

    addresses [n, L]         data addresses of tensor i of every list
    chunks    [n_chunks, 3]  tensor index, first element, end element (exclusive), int64 offsets
    slots     [n, 2]         first partial slot and number of chunks of tensor i (for the final sums)

Unlike the CUDA table (one row per tensor, whose blocks binary-search it), there is one row per chunk: a
Triton program then needs no search loop, and the table is built with a few vectorised torch ops.

Tensors whose dtypes differ cannot share a launch (the element type of a pointer is a compile-time
constant), so chunks are ordered by dtype group and each group is one launch over a contiguous range of the
chunk table. Within a group a tensor's chunks are contiguous, so partial sums of one tensor occupy
consecutive slots and are summed in a fixed order: results are bit-identical run to run.

A training loop calls the ops with the same tensors every step; the table depends only on the tensors'
addresses, sizes and dtypes (never their values), so it is built once, copied to the device once and kept
in a small LRU cache keyed on exactly those properties. A cache hit costs no host-to-device copy and no
host synchronisation.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

#: the alignment (bytes) that lets the kernels use 16-byte vector loads (data pointers and chunk starts)
VECTOR_ALIGNMENT = 16
#: table entries kept per process: enough for the few distinct lists of a training loop (params/anchors,
#: params/anchors/grads, optimizer states, the fresh outputs of ewc_penalty's backward) without holding
#: stale tables forever
CACHE_SIZE = 64


@dataclass(frozen=True)
class LaunchGroup:
    """One kernel launch: the chunks ``[chunk_begin, chunk_end)`` of tensors sharing these dtypes."""

    dtypes: tuple  # the torch dtype of each list
    chunk_begin: int
    chunk_end: int
    aligned: bool  # every data pointer of the group is 16-byte aligned (chunk starts must also be multiples
    #                of the kernel's BLOCK, which ewc._run checks): the vector-load hints are valid

    @property
    def num_chunks(self) -> int:
        return self.chunk_end - self.chunk_begin


@dataclass(frozen=True)
class MultiTensorPlan:
    """The device-resident table of one call and the launches that read it (see the module docstring)."""

    table: torch.Tensor  # int64, on the tensors' device
    num_tensors: int
    num_lists: int
    num_chunks: int
    chunk_size: int
    groups: tuple  # of LaunchGroup

    @property
    def addresses(self) -> torch.Tensor:
        return self.table[: self.num_lists * self.num_tensors]

    @property
    def chunks(self) -> torch.Tensor:
        start = self.num_lists * self.num_tensors
        return self.table[start : start + 3 * self.num_chunks]

    @property
    def slots(self) -> torch.Tensor:
        return self.table[self.num_lists * self.num_tensors + 3 * self.num_chunks :]


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + (b - 1), b, rounding_mode="floor")


def build_plan(lists: Sequence[Sequence[torch.Tensor]], chunk_size: int) -> MultiTensorPlan:
    """Build the table for the tensors ``lists[l][i]`` (the same numel for every l; lists[0] sets the sizes)."""
    xs = lists[0]
    n = len(xs)
    device = xs[0].device
    dtype_keys = [tuple(role[i].dtype for role in lists) for i in range(n)]

    # dtype groups in order of first appearance; stable within a group
    group_of: dict = {}
    for key in dtype_keys:
        group_of.setdefault(key, len(group_of))
    order = sorted(range(n), key=lambda i: group_of[dtype_keys[i]])

    addresses = torch.zeros(n, len(lists), dtype=torch.int64)
    for r, role in enumerate(lists):
        addresses[:, r] = torch.tensor([t.data_ptr() for t in role], dtype=torch.int64)
    numels = torch.tensor([t.numel() for t in xs], dtype=torch.int64)

    order_t = torch.tensor(order, dtype=torch.int64)
    counts = _ceil_div(numels[order_t], chunk_size)  # chunks per tensor, in launch order
    num_chunks = int(counts.sum())
    firsts = torch.cumsum(counts, 0) - counts
    tensor_of_chunk = torch.repeat_interleave(order_t, counts)
    local = torch.arange(num_chunks, dtype=torch.int64) - torch.repeat_interleave(firsts, counts)
    starts = local * chunk_size
    ends = torch.minimum(starts + chunk_size, numels[tensor_of_chunk])
    chunks = torch.stack([tensor_of_chunk, starts, ends], dim=1)
    slots = torch.zeros(n, 2, dtype=torch.int64)
    slots[order_t, 0] = firsts
    slots[order_t, 1] = counts

    groups = []
    position = 0  # index into `order`
    chunk_pos = 0
    counts_list = counts.tolist()
    for key, _ in sorted(group_of.items(), key=lambda kv: kv[1]):
        members = [i for i in order if dtype_keys[i] == key]
        group_chunks = sum(counts_list[position : position + len(members)])
        aligned = all(
            role[i].data_ptr() % VECTOR_ALIGNMENT == 0 for i in members for role in lists
        )
        if group_chunks:
            groups.append(LaunchGroup(key, chunk_pos, chunk_pos + group_chunks, aligned))
        position += len(members)
        chunk_pos += group_chunks

    table = torch.cat([addresses.reshape(-1), chunks.reshape(-1), slots.reshape(-1)])
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    else:
        table = table.to(device)
    return MultiTensorPlan(table, n, len(lists), num_chunks, chunk_size, tuple(groups))


class PlanCache:
    """LRU cache of plans keyed on everything a plan depends on: device, chunk size, and per tensor and
    role its address, numel and dtype. Values of the tensors never matter, so a hit is always correct,
    even for new tensors that happen to reuse a freed tensor's memory."""

    def __init__(self, max_entries: int = CACHE_SIZE):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(lists, chunk_size: int) -> tuple:
        return (
            lists[0][0].device,
            chunk_size,
            len(lists),
            tuple(t.numel() for t in lists[0]),
            tuple(t.data_ptr() for role in lists for t in role),
            tuple(t.dtype for role in lists for t in role),
        )

    def get(self, lists, chunk_size: int) -> MultiTensorPlan:
        key = self.key(lists, chunk_size)
        plan = self._entries.get(key)
        if plan is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return plan
        self.misses += 1
        plan = build_plan(lists, chunk_size)
        self._entries[key] = plan
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)  # a kernel still reading it is safe: frees are stream-ordered
        return plan

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)
