"""Parameter views over DeepSpeed ZeRO-1/2/3 partitions: the EWC math on the elements each rank owns.

A view is what ``HybridEWC`` runs its fused passes over (the ``ParamView`` protocol of ``hbat/ewc.py``):
``params()`` are this rank's fp32 master fragments (the tensors the ZeRO optimizer updates), ``grads()``
the matching fragments of the rank's REDUCED gradient partition, ``fragment_unit`` maps each fragment to
its parameter tensor (the paper's unit), ``unit_numel`` is the full element count of each tensor, and
``all_reduce_`` sums one float32 vector of per-unit partial sums over the ranks that share the partitions.
Nothing is ever gathered: per call, one vector of ``len(unit_names)`` floats crosses the network.

Where the pieces live (DeepSpeed 0.19):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): every parameter group is flattened (``round_robin_bit16_groups``
  with ``round_robin_bit16_padding``) and split evenly across the data-parallel ranks, so a tensor can
  straddle two ranks; this rank's fp32 master partition is ``single_partition_of_fp32_groups[group]``.
  After ``engine.backward()`` on a gradient-accumulation boundary ``optimizer.averaged_gradients[group]``
  lists the reduced gradient of each tensor piece in the partition, in the order of
  ``params_in_partition[group]`` with zero-padding entries (``_zero_padding``) in between; ``step()``
  flattens that list, computes the global norm, clips and runs the optimizer.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): rank r owns flat elements ``[r*ps, (r+1)*ps)`` of every
  tensor (``ps = param.partition_numel()``); the last rank's tail padding is never initialised and is left
  out of every fragment here. ``grad_position[param_id] = (sub_group, offset, ps)`` locates the partition
  in ``fp32_partitioned_groups_flat[sub_group]``, and after ``engine.backward()`` on a boundary
  ``averaged_gradients[sub_group]`` lists each tensor's reduced gradient partition, which ``step()``
  flattens, clips and hands to the optimizer.

In both cases an in-place add into those gradient tensors between ``engine.backward()`` (on the boundary)
and ``engine.step()`` is seen by the overflow check, the global-norm clipping and the optimizer exactly
like a loss term. With optimizer offload to the CPU the reduced partition is the ``.grad`` of the CPU fp32
flat partition instead, and the per-tensor gradient norms DeepSpeed recorded during backward must be
refreshed after the add (``grads_done_``). NVMe offload is refused.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ._view import ShardedView, clean_name, name_selector

__all__ = ["ZeroParamView", "is_deepspeed_engine"]

GRADS_UNAVAILABLE = (
    "the reduced gradient partition is only available after engine.backward() on a gradient-accumulation "
    "boundary and before engine.step(); call apply_() between the two (see hbat.distributed)"
)


def is_deepspeed_engine(obj) -> bool:
    """True for a ``deepspeed.DeepSpeedEngine`` (checked by class name, so deepspeed need not be imported)."""
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(obj).__mro__)


class ZeroParamView(ShardedView):
    """This rank's share of a ZeRO-1/2/3 model as EWC fragments (see the module docstring).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` with ZeRO stage 1, 2 or 3 (optimizer offload to the CPU is
            supported, NVMe offload is not). fp32 or bf16/fp16 models: the anchors follow the fp32 masters.
        include / exclude: parameter-name patterns (fnmatch globs or compiled regexes) choosing the units;
            names are those of ``engine.module.named_parameters()`` without wrapper prefixes (``module.``,
            ``_orig_mod.``). Frozen parameters are never units.
        select: alternatively, a callable ``name -> bool`` (overrides include / exclude).
    """

    def __init__(self, engine, include=None, exclude=None, select: Callable[[str], bool] | None = None):
        if not is_deepspeed_engine(engine):
            raise TypeError(f"ZeroParamView needs a deepspeed.DeepSpeedEngine, got {type(engine).__name__}")
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in (1, 2, 3):
            raise ValueError(
                f"ZeroParamView supports ZeRO stages 1, 2 and 3, the engine runs stage {self.stage}; without "
                "ZeRO every rank holds the whole model: pass engine.module to HybridEWC instead"
            )
        self.optimizer = engine.optimizer
        self.comm_device = torch.device(engine.device) if getattr(engine, "device", None) is not None else None
        keep = select if select is not None else name_selector(include, exclude)
        named = [(clean_name(n), p) for n, p in engine.module.named_parameters()]
        named = [(n, p) for n, p in named if p.requires_grad and keep(n)]
        if not named:
            raise ValueError("no trainable parameter of the engine's module matches include/exclude")

        self.unit_names: list[str] = [n for n, _ in named]
        self.unit_params: list[torch.nn.Parameter] = [p for _, p in named]
        self.fragment_unit: list[int] = []
        self.fragment_names: list[str] = []
        self.fragment_offsets: list[int] = []  # first element of each fragment inside its (flattened) tensor
        self._params: list[torch.Tensor] = []
        self._grad_locators: list[Callable[[], torch.Tensor]] = []
        self._norm_slots: list[tuple[int, Callable[[], torch.Tensor]]] = []  # offload: (param id, grad region)
        if self.stage == 3:
            self.unit_numel = [int(p.ds_numel) for p in self.unit_params]
            self._build_stage3()
        else:
            self.unit_numel = [int(p.numel()) for p in self.unit_params]
            self._build_stage12()

    # ------------------------------------------------------------------ construction
    def _add_fragment(self, unit: int, offset: int, master: torch.Tensor, grad_locator) -> None:
        if master.dtype != torch.float32 or not master.is_contiguous():
            raise TypeError(
                f"{self.unit_names[unit]}: the ZeRO master fragment is {master.dtype}"
                f"{'' if master.is_contiguous() else ', non-contiguous'}; expected contiguous float32"
            )
        self.fragment_unit.append(unit)
        self.fragment_offsets.append(offset)
        self.fragment_names.append(f"{self.unit_names[unit]}[{offset}:{offset + master.numel()}]")
        self._params.append(master)
        self._grad_locators.append(grad_locator)

    def _build_stage12(self) -> None:
        opt = self.optimizer
        if type(opt).__name__ != "DeepSpeedZeroOptimizer":
            raise TypeError(
                f"ZeRO-{self.stage} engine with optimizer wrapper {type(opt).__name__}; ZeroParamView supports "
                "DeepSpeedZeroOptimizer (DeepSpeed picks BF16_Optimizer for ZeRO-1 with bf16 parameters and fp32 "
                "gradient accumulation: use ZeRO-2 or ZeRO-3 there)"
            )
        self.offload = bool(getattr(opt, "cpu_offload", False))
        groups = {id(p): g for g, group in enumerate(opt.bit16_groups) for p in group}
        for unit, p in enumerate(self.unit_params):
            if id(p) not in groups:
                raise ValueError(f"{self.unit_names[unit]} is trainable but not managed by the ZeRO optimizer")
        used = sorted({groups[id(p)] for p in self.unit_params})
        self.process_group = self._single_group([opt.real_dp_process_group[g] for g in used])
        pieces = {}  # id(param) -> (group, offset in tensor, offset in fp32 partition, numel)
        for g in used:
            pieces.update(self._stage12_layout(g))
        for unit, p in enumerate(self.unit_params):
            if id(p) not in pieces:  # no element of this tensor in this rank's partition
                continue
            g, offset, dest, numel = pieces[id(p)]
            master = opt.single_partition_of_fp32_groups[g].narrow(0, dest, numel)
            if self.offload:
                locator = self._offload_grad_locator(unit, opt.single_partition_of_fp32_groups[g], dest, numel)
                self._norm_slots.append((opt.get_param_id(p), locator))
            else:
                locator = self._stage12_grad_locator(unit, p, g, offset, numel)
            self._add_fragment(unit, offset, master, locator)

    def _stage12_layout(self, g: int) -> dict:
        """Where each tensor of parameter group ``g`` lies in this rank's flat fp32 partition.

        The flat group is ``round_robin_bit16_groups[g]`` (the round-robin order when round_robin_gradients
        is on) with ``round_robin_bit16_padding[g]`` elements after each tensor, split into equal partitions
        of ``partition_size[g]`` (``get_partition_info`` of DeepSpeed). ``param._hp_mapping`` is not used: it
        assumes the unreordered order, which is wrong under round-robin reordering without padding.
        """
        opt = self.optimizer
        tensors = opt.round_robin_bit16_groups[g]
        paddings = getattr(opt, "round_robin_bit16_padding", None)
        paddings = paddings[g] if paddings is not None else [0] * len(tensors)
        size = int(opt.partition_size[g])
        start = size * dist.get_rank(group=opt.real_dp_process_group[g])
        layout, current = {}, 0
        for t, pad in zip(tensors, paddings):
            lo, hi = max(current, start), min(current + t.numel(), start + size)
            if lo < hi:
                layout[id(t)] = (g, lo - current, lo - start, hi - lo)
            current += t.numel() + int(pad)
        return layout

    def _stage12_grad_locator(self, unit: int, p: torch.nn.Parameter, group: int, offset: int, numel: int):
        # averaged_gradients[group] lists one entry per tensor of params_in_partition[group] (in that order,
        # the round-robin order when round_robin_gradients is on), with zero-padding entries in between;
        # param._index_in_param_group counts in bit16_groups order and is wrong under round-robin.
        name, opt = self.unit_names[unit], self.optimizer
        position = next(i for i, q in enumerate(opt.params_in_partition[group]) if q is p)

        def locate() -> torch.Tensor:
            entries = opt.averaged_gradients.get(group)
            if entries is None:
                raise RuntimeError(f"{name}: {GRADS_UNAVAILABLE}")
            grads = [g for g in entries if not getattr(g, "_zero_padding", False)]
            grad = grads[position] if position < len(grads) else None
            if grad is None or not grad.is_contiguous():
                raise RuntimeError(f"{name}: {GRADS_UNAVAILABLE}")
            flat = grad.view(-1)
            if flat.numel() == p.numel() and numel != p.numel():  # a whole-tensor buffer: keep our fragment
                flat = flat.narrow(0, offset, numel)
            if flat.numel() != numel:
                raise RuntimeError(f"{name}: gradient fragment has {flat.numel()} elements, {numel} expected")
            return flat

        return locate

    def _build_stage3(self) -> None:
        opt = self.optimizer
        if not hasattr(opt, "fp32_partitioned_groups_flat") or not hasattr(opt, "grad_position"):
            raise TypeError(f"ZeRO-3 engine with an unexpected optimizer wrapper {type(opt).__name__}")
        if getattr(opt, "swap_optimizer", False):
            raise NotImplementedError(
                "ZeRO-3 optimizer offload to NVMe swaps gradient partitions out during backward; offload the "
                "optimizer to the CPU instead (offload_optimizer.device: cpu)"
            )
        self.offload = bool(getattr(opt, "offload_optimizer", False))
        position_in_group = {id(p): i for group in opt.fp16_groups for i, p in enumerate(group)}
        self.process_group = self._single_group([opt._get_param_partition_group(p) for p in self.unit_params])
        rank = dist.get_rank(group=self.process_group)
        for unit, p in enumerate(self.unit_params):
            sub_group, dest_offset, part_numel = opt.grad_position[opt.get_param_id(p)]
            start = rank * int(part_numel)
            owned = max(0, min(int(part_numel), int(p.ds_numel) - start))  # the tail padding is not ours
            if owned == 0:
                continue
            flat = opt.fp32_partitioned_groups_flat[sub_group]
            master = flat.narrow(0, int(dest_offset), owned)
            if self.offload:  # the partition's norm covers its (zero) padding too
                locator = self._offload_grad_locator(unit, flat, int(dest_offset), owned)
                full = self._offload_grad_locator(unit, flat, int(dest_offset), int(part_numel))
                self._norm_slots.append((opt.get_param_id(p), full))
            else:
                locator = self._stage3_grad_locator(unit, sub_group, position_in_group[id(p)], owned)
            self._add_fragment(unit, start, master, locator)

    def _stage3_grad_locator(self, unit: int, sub_group: int, index: int, owned: int):
        name, opt = self.unit_names[unit], self.optimizer

        def locate() -> torch.Tensor:
            grads = opt.averaged_gradients.get(sub_group)
            if grads is None:
                raise RuntimeError(f"{name}: {GRADS_UNAVAILABLE}")
            return grads[index].view(-1).narrow(0, 0, owned)

        return locate

    def _offload_grad_locator(self, unit: int, flat_master: torch.Tensor, dest: int, numel: int):
        # optimizer offload: the boundary backward copies the reduced gradient partition into the .grad of
        # the (CPU) fp32 flat partition, and records its norm for clipping (refreshed by grads_done_)
        name, opt = self.unit_names[unit], self.optimizer

        def locate() -> torch.Tensor:
            if hasattr(opt, "_wait_for_offload_copies"):
                opt._wait_for_offload_copies()
            if flat_master.grad is None:
                raise RuntimeError(f"{name}: {GRADS_UNAVAILABLE}")
            return flat_master.grad.narrow(0, dest, numel)

        return locate

    @staticmethod
    def _single_group(groups):
        first = groups[0] if groups else None
        if any(g is not first for g in groups):
            raise NotImplementedError(
                "the selected parameters are partitioned over different process groups (MoE experts, "
                "MiCS); restrict include/exclude to one partitioning group per view"
            )
        return first

    # ------------------------------------------------------------------ ParamView protocol
    def params(self) -> list[torch.Tensor]:
        """This rank's fp32 master fragments (1-D views the ZeRO optimizer updates in place)."""
        return list(self._params)

    def grads(self) -> list[torch.Tensor]:
        """The matching fragments of the reduced gradient partition (views: in-place adds reach step())."""
        if not self.grads_ready():
            raise RuntimeError(
                "not on a gradient-accumulation boundary: the gradient partition is still being accumulated; "
                + GRADS_UNAVAILABLE
            )
        return [locate() for locate in self._grad_locators]

    def grads_done_(self) -> None:
        """Call after adding to ``grads()`` in place. With optimizer offload DeepSpeed computed each tensor's
        gradient norm during backward (for clipping); they are recomputed here from the updated partition.
        Without offload there is nothing to do: ``step()`` measures the norm itself."""
        if not self._norm_slots:
            return
        from deepspeed.runtime.zero.utils import get_norm_dtype

        norms = self.optimizer.norm_for_param_grads
        for param_id, locate in self._norm_slots:
            norms[param_id] = locate().to(get_norm_dtype()).norm(2)

    def grads_ready(self) -> bool:
        """True between ``engine.backward()`` on an accumulation boundary and ``engine.step()``: the only
        time a penalty gradient may be added (earlier micro-steps would add it once per micro-batch)."""
        return bool(self.engine.is_gradient_accumulation_boundary())

    @property
    def grad_scale(self) -> float:
        """The loss scale the stored gradients carry (fp16 dynamic scaling; 1 for fp32 / bf16): a penalty
        gradient must be multiplied by it, ``step()`` divides everything by it before clipping."""
        return float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0)
