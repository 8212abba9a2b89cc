"""This rank's own share of a model's weights, as fragments that are averaged, swapped and restored in place.

``WeightShards(target)`` lists the tensors this process must write so that the model's forward and its
optimizer both see new weights, and keeps a start copy of exactly those tensors (beside them, or on the CPU).
Nothing is ever gathered: every operation is local to the rank (a fused ``hbat.ops.lerp_`` pass, or copies).

What a rank holds and writes, per sharding (the "slots"):

* one process, DDP: every trainable parameter, whole (DDP: every rank the same, so every rank averages alike).
* FSDP2: each parameter's local shard (``to_local()``), the tensor the optimizer updates. Modules left
  unsharded by a forward (the root after a ``no_grad`` forward) are resharded after every write, so that the
  next forward gathers the new shards instead of reusing stale full weights.
* DeepSpeed ZeRO-3: this rank's fp32 master partition of each tensor; after a write it is copied into the
  rank's 16-bit partition (``ds_tensor``, what the forward gathers; an alias for fp32 models without
  offload), as ``engine.step()`` does, and full copies of persistent / still-gathered parameters are freed
  (``param.partition()``, no communication) so that the next forward gathers the new partitions.
* DeepSpeed ZeRO-1/2: the rank's fp32 master partition, copied into its own range of the model's weights
  after a write, plus the rest of the model's weights, which every rank holds whole (ZeRO-1/2 shard the
  optimizer, not the weights): written locally with the same op against a start copy of those ranges. So the
  start copy under ZeRO-1/2 is (the model's weights - this rank's range) in their dtype + the fp32 master
  partition: about the size of the weights again, on every rank (``start_device="cpu"`` keeps it off the GPU).

A write replaces the weights, not the optimizer's moments (Adam's state is kept, as after any weight edit).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops
from ..distributed import FSDPParamView, ZeroParamView
from ..param_view import UnboundView, clean_name, make_view, module_of, unwrap_model

__all__ = ["WeightShards", "CHUNK_NUMEL"]

CHUNK_NUMEL = 1 << 24  # start copy on another device: moved over in pieces of at most this many elements


def _is_ddp(model) -> bool:
    return type(model).__name__ == "DistributedDataParallel"


def _is_fsdp2(module) -> bool:
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__)


def _copy_to(t: torch.Tensor, device) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device=device if device is not None else t.device)
    return out.copy_(t.detach())


class WeightShards:
    """This rank's weights of ``target`` (an ``nn.Module``, a DDP wrapper, an FSDP2 module or a DeepSpeed engine
    with ZeRO-1/2/3) as slots, with a start copy taken now (see the module docstring).

    Args:
        target: the model as it is trained (for DeepSpeed the engine: its fp32 masters are slots).
        include / exclude: parameter-name patterns, as for ``hbat.HybridEWC`` (trainable parameters only: a
            frozen one never changes, so it equals its start).
        start_device: where the start copy lives: None (beside each slot) or e.g. "cpu".
        start_from: one process only: another model of the same architecture whose parameters ARE the start
            (no copy is made: ``swap_`` and ``ema_`` write into them), e.g. the SFT model of ``hbat average``.
        backend: the ``hbat.ops`` backend of the fused passes.
    """

    def __init__(self, target, *, include=None, exclude=None, start_device=None, start_from=None,
                 backend: str = "auto"):
        view = make_view(target, include, exclude)
        if isinstance(view, UnboundView):
            raise ValueError("averaging needs the parameters the run trains; " + view.reason)
        self.view, self.backend = view, backend
        self.module = module_of(target)
        self.unit_names = list(view.unit_names)
        self._mirrors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (forward weights, master) copied after writes
        self._zero3_params: list[torch.nn.Parameter] = []
        self._fsdp_modules: list[torch.nn.Module] = []
        self._replicas: list[torch.Tensor] = []
        self.slot_names: list[str] = list(view.fragment_names)
        self.slot_unit: list[int] = list(view.fragment_unit)
        self.group = getattr(view, "process_group", None)
        if isinstance(view, ZeroParamView):
            self.kind = f"zero{view.stage}"
            self._build_zero(view)
        elif isinstance(view, FSDPParamView):
            self.kind = "fsdp2"
            self._fsdp_modules = [m for m in view.module.modules() if _is_fsdp2(m)]
        else:
            self.kind = "ddp" if _is_ddp(target) else "local"
            self.group = target.process_group if _is_ddp(target) else None
        sharing = self.kind != "local"  # these ranks evaluate shares of a batch and reduce the results together
        self.rank = dist.get_rank(self.group) if sharing else 0
        self.world = dist.get_world_size(self.group) if sharing else 1
        self.start_device = torch.device(start_device) if start_device is not None else None
        if start_from is not None:
            self.start = self._adopt(start_from)
        else:
            self.start = [_copy_to(s, self.start_device) for s in self.slots()]

    # ------------------------------------------------------------------ construction
    def _build_zero(self, view: ZeroParamView) -> None:
        if view.stage == 3:
            for unit, offset, master in zip(view.fragment_unit, view.fragment_offsets, view.params()):
                live = view.unit_params[unit].ds_tensor.data.view(-1).narrow(0, 0, master.numel())
                if live.data_ptr() != master.data_ptr():  # fp32 without offload: the partition IS the master
                    self._mirrors.append((live, master))
            self._zero3_params = list(view.unit_params)
            return
        own = {unit: (offset, master) for unit, offset, master in
               zip(view.fragment_unit, view.fragment_offsets, view.params())}
        for unit, p in enumerate(view.unit_params):
            full = p.data.view(-1)  # every rank holds the whole 16-bit (or fp32) weights under ZeRO-1/2
            lo, hi = 0, 0
            if unit in own:
                offset, master = own[unit]
                lo, hi = offset, offset + master.numel()
                self._mirrors.append((full.narrow(0, lo, hi - lo), master))
            for a, b in ((0, lo), (hi, full.numel())):
                if b > a:
                    self._replicas.append(full.narrow(0, a, b - a))
                    self.slot_names.append(f"{self.unit_names[unit]}[{a}:{b}] (replica)")
                    self.slot_unit.append(unit)

    def _adopt(self, model) -> list[torch.Tensor]:
        if self.kind != "local":
            raise ValueError(f"start_from needs a model in one process; this one is sharded or replicated ({self.kind})")
        named = {clean_name(n): p for n, p in unwrap_model(model).named_parameters()}
        start = []
        for name, slot in zip(self.slot_names, self.slots()):
            p = named.get(name)
            if p is None:
                raise ValueError(f"start_from has no parameter {name!r} (the models must share one architecture)")
            if p.shape != slot.shape or p.dtype != slot.dtype:
                raise ValueError(f"parameter {name!r}: start_from has {tuple(p.shape)} {p.dtype}, the model "
                                 f"{tuple(slot.shape)} {slot.dtype}")
            start.append(p.detach() if self.start_device is None else _copy_to(p, self.start_device))
        return start

    # ------------------------------------------------------------------ the tensors
    def slots(self) -> list[torch.Tensor]:
        """The tensors written, in ``slot_names`` order (looked up per call: FSDP2 may move its shards)."""
        return [t.detach() for t in self.view.params()] + self._replicas  # detached aliases: written in place

    @property
    def slot_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.start]

    @property
    def start_bytes(self) -> int:
        """Bytes of the start copy on this rank (what averaging adds to the memory plan)."""
        return sum(t.numel() * t.element_size() for t in self.start)

    def weights(self, unit_weights: torch.Tensor) -> torch.Tensor:
        """Per-slot weights (float32) from one weight per unit (``unit_names`` order)."""
        unit_weights = torch.as_tensor(unit_weights, dtype=torch.float32).reshape(-1)
        if unit_weights.numel() != len(self.unit_names):
            raise ValueError(f"unit weights have {unit_weights.numel()} entries but there are "
                             f"{len(self.unit_names)} parameter tensors")
        return unit_weights[torch.tensor(self.slot_unit, dtype=torch.long)]

    # ------------------------------------------------------------------ writes (all local)
    def _lerp(self, dst, a, b, weights: torch.Tensor) -> None:
        """``dst_i <- (1 - w_i) a_i + w_i b_i``: one fused pass per device of ``dst``; an operand on another
        device (a start copy on the CPU) is moved over in pieces of at most CHUNK_NUMEL elements."""
        by_device: dict[torch.device, list[int]] = {}
        for i, d in enumerate(dst):
            by_device.setdefault(d.device, []).append(i)
        for device, index in by_device.items():
            if all(a[i].device == device and b[i].device == device for i in index):
                pieces = [index]
            else:
                pieces, piece, size = [], [], 0
                for i in index:
                    if piece and size + dst[i].numel() > CHUNK_NUMEL:
                        pieces.append(piece)
                        piece, size = [], 0
                    piece.append(i)
                    size += dst[i].numel()
                pieces.append(piece)
            for piece in pieces:
                ops.lerp_([dst[i] for i in piece], [a[i].to(device) for i in piece], [b[i].to(device) for i in piece],
                          weights[piece], backend=self.backend)

    def _after_write(self) -> None:
        """Make the forward see the written slots: masters -> forward weights, stale full copies freed."""
        for live, master in self._mirrors:
            live.copy_(master)
        for p in self._zero3_params:
            if p.ds_status.name == "AVAILABLE":  # persistent or still gathered: drop it, the next forward gathers
                p.partition(has_been_updated=False)
        for module in self._fsdp_modules:
            module.reshard()  # frees unsharded weights a no_grad forward left; nothing is communicated

    @torch.no_grad()
    def blend_(self, slot_weights: torch.Tensor, post: list[torch.Tensor] | None = None) -> None:
        """``slot_i <- (1 - w_i) start_i + w_i post_i`` (``post`` defaults to the slots themselves)."""
        slots = self.slots()
        self._lerp(slots, self.start, slots if post is None else post, slot_weights)
        self._after_write()

    @torch.no_grad()
    def ema_(self, rate: float) -> None:
        """``start_i <- (1 - rate) start_i + rate slot_i``: the start copy becomes an EMA anchor of the weights."""
        weights = torch.full((len(self.start),), float(rate), dtype=torch.float32)
        self._lerp(self.start, self.start, self.slots(), weights)

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the slots (beside them): ``restore_`` puts them back bit for bit."""
        return [_copy_to(s, None) for s in self.slots()]

    @torch.no_grad()
    def restore_(self, snapshot: list[torch.Tensor]) -> None:
        for slot, saved in zip(self.slots(), snapshot):
            slot.copy_(saved)
        self._after_write()

    @torch.no_grad()
    def swap_(self) -> None:
        """Exchange the slots with the start copy (exact: same dtypes); a second call swaps them back. One
        temporary of the largest slot's size per device and dtype, reused for every slot."""
        buffers: dict[tuple, torch.Tensor] = {}
        for slot, start in zip(self.slots(), self.start):
            key = (slot.device, slot.dtype)
            if key not in buffers:
                size = max(t.numel() for t in self.start if (t.dtype == slot.dtype))
                buffers[key] = torch.empty(size, dtype=slot.dtype, device=slot.device)
            held = buffers[key][:slot.numel()].view(slot.shape)
            held.copy_(slot)
            slot.copy_(start)
            start.copy_(held)
        self._after_write()

    @torch.no_grad()
    def reset_start_(self) -> None:
        """The start copy <- the current weights."""
        for slot, start in zip(self.slots(), self.start):
            start.copy_(slot)

    # ------------------------------------------------------------------ across ranks
    def all_reduce_(self, vec: torch.Tensor) -> torch.Tensor:
        """Sum a small float64 vector over the ranks that share this model (no-op in one process)."""
        if self.world > 1:
            device = getattr(self.view, "comm_device", None) or vec.device
            moved = vec.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.group)
            vec.copy_(moved)
        return vec

    @torch.no_grad()
    def digest(self) -> list[float]:
        """Per-unit float64 sums of the slots and of the start copy, summed over the ranks: a fingerprint of
        the weights (a resumed sweep reuses its table only for the same weights)."""
        out = torch.zeros(2 * len(self.unit_names), dtype=torch.float64)
        for i, (slot, start) in enumerate(zip(self.slots(), self.start)):
            unit = self.slot_unit[i]
            out[unit] += float(slot.to(torch.float64).sum())
            out[len(self.unit_names) + unit] += float(start.to(torch.float64).sum())
        return self.all_reduce_(out).tolist()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The start copy (CPU tensors) with the slot names and shapes it belongs to."""
        return {"kind": self.kind, "slot_names": list(self.slot_names), "slot_shapes": [list(s) for s in self.slot_shapes],
                "start": [t.detach().cpu().clone() for t in self.start]}

    @torch.no_grad()
    def load_state_dict(self, state: dict, where: str = "state") -> None:
        """Restore ``state_dict()``; checks every field first and changes nothing on error."""
        if not isinstance(state, dict) or not {"slot_names", "slot_shapes", "start"} <= set(state):
            raise ValueError(f"{where}: not an averaging start copy (needs slot_names, slot_shapes, start)")
        if list(state["slot_names"]) != self.slot_names:
            saved = list(state["slot_names"])
            first = next((f"{a!r} where {b!r} is" for a, b in zip(saved, self.slot_names) if a != b),
                         f"{len(saved)} slots where {len(self.slot_names)} are")
            raise ValueError(f"{where}: saved for other weights or another sharding ({first}); resume with the same "
                             "model, sharding and world size")
        for name, shape, tensor, start in zip(self.slot_names, state["slot_shapes"], state["start"], self.start):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(start.shape) \
                    or list(shape) != list(start.shape) or tensor.dtype != start.dtype:
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{where}: {name} is {got}, expected {tuple(start.shape)} {start.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}: {name} holds NaN or inf")
        for start, tensor in zip(self.start, state["start"]):
            start.copy_(tensor)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self.start)
        return (f"WeightShards(kind={self.kind!r}, units={len(self.unit_names)}, slots={len(self.start)}, "
                f"numel={numel}, start_bytes={self.start_bytes}, rank={self.rank}/{self.world})")


def split_share(n: int, rank: int, world: int, what: str) -> slice:
    """The contiguous rows ``[rank*n/world, (rank+1)*n/world)`` of ``n``; equal shares, so that every rank runs
    the same number of forwards (ZeRO-3 and FSDP2 gather weights inside each one)."""
    if n % world or n == 0:
        raise ValueError(f"{what} has {n} rows; it must be a positive multiple of the {world} ranks (equal shares)")
    size = n // world
    return slice(rank * size, (rank + 1) * size)

