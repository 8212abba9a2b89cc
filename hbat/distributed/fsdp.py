"""Parameter view over PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) local shards.

FSDP2 turns every parameter into a ``DTensor`` sharded on dim 0 over a 1-D device mesh: rank r holds rows
``[r*c, min((r+1)*c, dim0))`` with ``c = ceil(dim0 / world)`` (``torch.chunk``), as a contiguous view of a
padded storage whose padding is zero-filled and outside the view. ``to_local()`` of the parameter is the
fp32 shard the optimizer updates; after backward (the one that reduce-scatters) ``param.grad.to_local()``
is the rank's averaged gradient shard, which ``clip_grad_norm_`` and the optimizer read afterwards. The
same EWC passes as under ZeRO therefore apply unchanged: one fragment per tensor and rank, one all-reduce
of a per-unit float vector over the mesh's process group, nothing gathered.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from ._view import ShardedView, clean_name, name_selector

__all__ = ["FSDPParamView", "is_fsdp2_module"]


def _is_dtensor(t) -> bool:
    return any(cls.__name__ == "DTensor" for cls in type(t).__mro__)


def is_fsdp2_module(module) -> bool:
    """True when ``module`` (an ``nn.Module``) has parameters sharded by FSDP2 (``fully_shard``)."""
    return isinstance(module, torch.nn.Module) and any(_is_dtensor(p) for p in module.parameters())


class FSDPParamView(ShardedView):
    """This rank's FSDP2 shards as EWC fragments (``ParamView`` protocol of ``hbat/ewc.py``).

    Args:
        module: the root module after ``fully_shard``. Every selected parameter must be a DTensor with
            placement ``(Shard(0),)`` on one shared 1-D mesh (HSDP's 2-D meshes are refused: the per-unit
            sums would be counted once per replica).
        include / exclude / select: parameter selection as for ``ZeroParamView``.
    """

    def __init__(self, module: torch.nn.Module, include=None, exclude=None,
                 select: Callable[[str], bool] | None = None):
        from torch.distributed.tensor import Shard

        keep = select if select is not None else name_selector(include, exclude)
        named = [(clean_name(n), p) for n, p in module.named_parameters()]
        named = [(n, p) for n, p in named if p.requires_grad and keep(n)]
        if not named:
            raise ValueError("no trainable parameter of the module matches include/exclude")
        mesh = None
        for n, p in named:
            if not _is_dtensor(p):
                raise TypeError(f"{n} is not sharded (not a DTensor): apply fully_shard to the whole model")
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(
                    f"{n}: placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; FSDPParamView "
                    "supports FSDP2's Shard(0) on a 1-D mesh (no HSDP / tensor parallel)"
                )
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise NotImplementedError(f"{n} is sharded over a different device mesh than the other parameters")
        self.module = module
        self.process_group = mesh.get_group()
        if mesh.device_type == "cuda":
            self.comm_device = torch.device("cuda", torch.cuda.current_device())
        elif mesh.device_type == "cpu":
            self.comm_device = torch.device("cpu")
        rank, world = dist.get_rank(group=self.process_group), dist.get_world_size(group=self.process_group)

        self.unit_names = [n for n, _ in named]
        self.unit_params = [p for _, p in named]
        self.unit_numel = [int(p.numel()) for p in self.unit_params]
        self.fragment_unit, self.fragment_names, self.fragment_offsets = [], [], []
        for unit, (name, p) in enumerate(named):
            local = p.to_local()
            if local.numel() == 0:  # fewer rows than ranks: nothing here
                continue
            if local.dtype != torch.float32 or not local.is_contiguous():
                raise TypeError(f"{name}: local shard is {local.dtype}, contiguous={local.is_contiguous()}; "
                                "expected contiguous float32")
            rows = math.ceil(p.shape[0] / world)
            offset = rank * rows * (p.numel() // max(p.shape[0], 1))
            self.fragment_unit.append(unit)
            self.fragment_offsets.append(offset)
            self.fragment_names.append(f"{name}[{offset}:{offset + local.numel()}]")

    def params(self) -> list[torch.Tensor]:
        """Local fp32 shards, flattened views of the storage the optimizer updates (looked up per call)."""
        return [self.unit_params[unit].to_local().view(-1) for unit in self.fragment_unit]

    def grads(self) -> list[torch.Tensor]:
        """Local reduce-scattered gradient shards (zeros are created where a parameter has no grad)."""
        out = []
        for unit in self.fragment_unit:
            p = self.unit_params[unit]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local = p.grad.to_local()
            if not local.is_contiguous():
                raise RuntimeError(f"{self.unit_names[unit]}: the local gradient shard is not contiguous")
            out.append(local.view(-1))
        return out

    def grads_ready(self) -> bool:
        return True  # FSDP2 reduce-scatters in backward: call apply_ after the backward that syncs gradients
