"""``prepare_averaging``: in-place model averaging in a loop prepared by accelerate (DDP, DeepSpeed ZeRO-1/2/3,
FSDP2), and the schedule ``hbat.AveragingCallback`` runs in a Trainer.

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    avg = prepare_averaging(accelerator, model, method="uniform", alpha=0.5, kl_batch=heldout, kl_every=50)
    for step, batch in enumerate(loader, 1):
        ...backward, clip, optimizer.step()...
        metrics = avg.step(step)                   # EMA anchor, every-K averaging, the forgetting meter
    avg.finish(step)                              # theta <- (1 - alpha) theta_start + alpha theta
    table = avg.sweep([0, .25, .5, .75, 1, 1.25], evaluate, data=heldout)   # in memory, weights restored

Methods (``alpha`` is always the trained model's weight, as in ``hbat.averaging``):

* ``uniform``: ``theta <- (1 - alpha) theta_start + alpha theta``, alpha in [0, 1] (default 0.5).
* ``hma``: one ratio per block of layers (``ratios``, ``blocks``: Lin et al.'s HMA with given ratios, e.g.
  from ``hbat.averaging.learn_hma`` or a sweep).
* ``expo``: ``theta <- theta + alpha (theta - theta_start)``, alpha > 0 (ExPO; a lerp weight of 1 + alpha).
* ``ema``: the start copy is an EMA anchor, ``anchor <- (1 - alpha) anchor + alpha theta`` every
  ``ema_every`` optimizer steps (alpha = the rate b in (0, 1]); averaging replaces the weights by the anchor.

``every=K`` averages after every K-th optimizer step as well, ``at_end`` once when training ends (not twice
if the last step was a K-th). Each averaging is one fused ``lerp_`` pass over this rank's own shard, nothing
gathered (``hbat.averaging.WeightShards``); the optimizer's moments are kept. The forgetting meter
(``kl_batch``, ``kl_every``) logs ``ewc/kl_to_start`` and ``ewc/kl_to_start_reverse`` (``ewc/kl_to_anchor*``
with ``method="ema"``), see ``hbat.averaging.kl``.

Memory: the start copy, ``avg.averager.shards.start_bytes`` per rank: the weights' bytes (one process, DDP),
the local shards (FSDP2), the fp32 master partition (ZeRO-3), the fp32 master partition plus the other ranks'
ranges of the 16-bit weights (ZeRO-1/2, which replicate the weights). ``start_device="cpu"`` keeps it in host
memory. A sweep holds one more copy of this rank's share while it runs.

Refused with one line naming the setting: DeepSpeed without ZeRO, pipeline or tensor parallelism,
accelerate's tensor / context / sequence parallelism, FSDP1, ZeRO-3 hpZ secondary partitions, quantized
ZeRO-3 weights, NVMe offload, and what the sharded views refuse (BF16_Optimizer, HSDP).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

from ..averaging.inplace import InPlaceAverager, check_ratio
from ..averaging.kl import kl_to_start
from ..averaging.sweep import SweepResult, run_sweep
from ..distributed import is_deepspeed_engine
from ..param_view import unwrap_model
from ..trainer import checkpoint

__all__ = ["AveragingSpec", "PreparedAveraging", "prepare_averaging", "METHODS", "STATE_FILE", "STATE_VERSION"]

METHODS = ("uniform", "hma", "expo", "ema")
STATE_FILE = "hbat_average.pt"
STATE_VERSION = 1


def _positive_int(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


@dataclass
class AveragingSpec:
    """What to average and when; checked when built (see the module docstring for the methods)."""

    method: str = "uniform"
    alpha: float | None = None
    ratios: list | None = None
    blocks: int | str | None = None
    scope: str = "all"
    non_layer: str = "attach"
    every: int | None = None
    at_end: bool = True
    ema_every: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "hma":
            if self.ratios is None or self.blocks is None:
                raise ValueError("method='hma' needs ratios (one per block) and blocks (an int or 'layer')")
            if self.alpha is not None:
                raise ValueError("method='hma' takes ratios, not alpha")
            self.ratios = check_ratio(self.ratios, what="ratios")
            if not isinstance(self.ratios, list):
                raise ValueError("method='hma' takes a list of ratios, one per block")
        elif self.ratios is not None:
            raise ValueError(f"ratios are for method='hma', not {self.method!r}")
        if self.method != "hma":
            default = {"uniform": 0.5}.get(self.method)
            if self.alpha is None and default is None:
                raise ValueError(f"method={self.method!r} needs alpha (expo: the extrapolation a > 0; ema: the rate "
                                 "b in (0, 1])")
            self.alpha = check_ratio(default if self.alpha is None else self.alpha, what="alpha")
            low, high, closed = {"uniform": (0.0, 1.0, True), "expo": (0.0, math.inf, False),
                                 "ema": (0.0, 1.0, False)}[self.method]
            if not (low <= self.alpha <= high if closed else low < self.alpha <= high):
                raise ValueError(f"alpha of method={self.method!r} must be in {'[' if closed else '('}{low:g}, "
                                 f"{high:g}], got {self.alpha}")
        self.every = _positive_int("every", self.every)
        self.ema_every = _positive_int("ema_every", self.ema_every)
        if not isinstance(self.at_end, bool):
            raise TypeError(f"at_end must be a bool, got {type(self.at_end).__name__}")
        if self.every is None and not self.at_end and self.method != "ema":
            raise ValueError("nothing would be averaged: pass every=K, at_end=True, or method='ema'")

    def ratio(self):
        """The lerp weight(s) of the trained model at an averaging."""
        return {"uniform": self.alpha, "expo": 1.0 + (self.alpha or 0.0), "ema": 0.0}.get(self.method, self.ratios)

    def to_dict(self) -> dict:
        return asdict(self)


def refuse_unsupported(model, parallelism_config=None) -> None:
    """One line naming a setting averaging cannot follow, before anything is copied or changed."""
    if parallelism_config is not None:
        used = [kind for kind in ("tp", "cp", "sp") if getattr(parallelism_config, f"{kind}_enabled", False)]
        if used:
            raise NotImplementedError(f"averaging under accelerate's parallelism_config with {'/'.join(used)} "
                                      "parallelism: not supported (the weights are split over more than the "
                                      "data-parallel ranks); use DDP, DeepSpeed ZeRO or FSDP2 dp_shard")
    if is_deepspeed_engine(model):
        stage = int(model.zero_optimization_stage())
        if stage == 0:
            raise NotImplementedError("averaging under DeepSpeed without ZeRO (zero_optimization.stage 0): not "
                                      "supported (its optimizer wrappers keep master weights a write would miss); use "
                                      "zero_optimization.stage 1, 2 or 3, or plain DDP (no DeepSpeed config)")
        if type(model).__name__ == "PipelineEngine" or int(getattr(model, "autotp_size", lambda: 1)() or 1) > 1:
            raise NotImplementedError("averaging under DeepSpeed pipeline or tensor parallelism: not supported; use "
                                      "ZeRO data parallelism only")
        if int(getattr(model, "zero_hpz_partition_size", lambda: 1)() or 1) > 1:
            raise NotImplementedError("averaging under ZeRO++ hpZ (zero_hpz_partition_size > 1): not supported (the "
                                      "secondary partitions would keep the old weights); set it to 1")
        if bool(getattr(model, "zero_quantized_weights", lambda: False)()):
            raise NotImplementedError("averaging with ZeRO++ quantized weights (zero_quantized_weights): not "
                                      "supported; turn it off")
        for what in ("zero_offload_param", "zero_offload_optimizer"):
            offload = getattr(model, what, lambda: None)()
            if offload is not None and "nvme" in str(getattr(offload, "device", "")).lower():
                raise NotImplementedError(f"averaging with NVMe offload ({what[5:]}.device: nvme): not supported; "
                                          "offload to the CPU instead")
        return
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in unwrap_model(model).modules()):
        raise NotImplementedError("averaging under FSDP1 (FullyShardedDataParallel, flat parameters): not supported; "
                                  "use FSDP2 (accelerate fsdp_version: 2, or torch.distributed.fsdp.fully_shard)")


def prepare_averaging(accelerator, model, method: str = "uniform", alpha: float | None = None, **kwargs) -> "PreparedAveraging":
    """``PreparedAveraging`` of ``model`` as ``accelerator.prepare`` returned it (a DeepSpeed engine, an FSDP2 or
    DDP module); the start copy is taken now. Keyword arguments: those of ``AveragingSpec`` and of
    ``PreparedAveraging``."""
    spec_keys = set(AveragingSpec.__dataclass_fields__) - {"method", "alpha"}
    spec = AveragingSpec(method, alpha, **{k: kwargs.pop(k) for k in list(kwargs) if k in spec_keys})
    return PreparedAveraging(model, spec, parallelism_config=getattr(accelerator, "parallelism_config", None),
                             **kwargs)


class PreparedAveraging:
    """The averaging schedule over a prepared model (see the module docstring).

    Args:
        model: the prepared model: a DeepSpeed engine (ZeRO-1/2/3), an FSDP2 module, a DDP wrapper or a module.
        spec: an ``AveragingSpec``.
        start_device: where the start copy lives (None: beside the weights; "cpu").
        kl_batch / kl_every: the forgetting meter's fixed batch (a dict of tensors, rows split over the ranks)
            and its period in optimizer steps.
        include / exclude: parameter-name patterns of the averaged tensors (trainable ones only).
        backend: the ``hbat.ops`` backend.
        parallelism_config: ``accelerator.parallelism_config`` (refused when it splits more than the data).
    """

    def __init__(self, model, spec: AveragingSpec, *, start_device=None, kl_batch=None, kl_every: int | None = None,
                 include=None, exclude=None, backend: str = "auto", parallelism_config=None):
        if not isinstance(spec, AveragingSpec):
            raise TypeError(f"spec must be an AveragingSpec, not {type(spec).__name__}")
        self.kl_every = _positive_int("kl_every", kl_every)
        if (kl_batch is None) != (self.kl_every is None):
            raise ValueError("the forgetting meter needs both kl_batch (a dict of tensors) and kl_every (steps)")
        refuse_unsupported(model, parallelism_config)
        self.spec, self.kl_batch = spec, kl_batch
        self.averager = InPlaceAverager(model, scope=spec.scope, blocks=spec.blocks, non_layer=spec.non_layer,
                                        include=include, exclude=exclude, start_device=start_device, backend=backend)
        if spec.method == "hma":
            self.averager.check(spec.ratios, "ratios")
        self.ema_updates = 0
        self.averaged_steps: list[int] = []

    @property
    def shards(self):
        return self.averager.shards

    # ------------------------------------------------------------------ the schedule
    def step(self, step: int) -> dict[str, float]:
        """After optimizer step ``step`` (1-based): EMA anchor update, every-K averaging, the meter; returns the
        meter's metrics when it ran."""
        spec = self.spec
        if spec.method == "ema" and step % spec.ema_every == 0:
            self.averager.ema_(spec.alpha)
            self.ema_updates += 1
        if spec.every is not None and step % spec.every == 0:
            self.average_(step)
        if self.kl_every is not None and step % self.kl_every == 0:
            return self.kl()
        return {}

    def average_(self, step: int | None = None) -> None:
        """Average now with the spec's method (one fused pass over this rank's shard)."""
        self.averager.apply_(self.spec.ratio())
        self.averaged_steps.append(-1 if step is None else int(step))

    def finish(self, step: int | None = None) -> bool:
        """At the end of training: average if ``at_end`` (and the last step was not averaged already)."""
        if not self.spec.at_end or (step is not None and self.averaged_steps[-1:] == [step]):
            return False
        self.average_(step)
        return True

    def kl(self, batch=None) -> dict[str, float]:
        """The forgetting meter on ``batch`` (default: ``kl_batch``), under its logged names."""
        batch = self.kl_batch if batch is None else batch
        if batch is None:
            raise ValueError("no KL batch: pass kl_batch to prepare_averaging, or a batch here")
        name = "anchor" if self.spec.method == "ema" else "start"
        out = kl_to_start(self.shards, batch)
        return {f"ewc/kl_to_{name}": out["kl_to_start"], f"ewc/kl_to_{name}_reverse": out["kl_to_start_reverse"]}

    def sweep(self, ratios: Sequence, evaluate, **kwargs) -> SweepResult:
        """``hbat.averaging.run_sweep`` on this model and its start copy (weights restored exactly)."""
        return run_sweep(self.averager, ratios, evaluate, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "settings": self.spec.to_dict(), "plan": self.averager.describe(),
                "ema_updates": self.ema_updates, "averaged_steps": list(self.averaged_steps),
                "shards": self.shards.state_dict()}

    def load_state_dict(self, state: dict, where: str = "state") -> None:
        """Restore ``state_dict()``: every field is checked first; nothing changes on error."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"{where}: not a hbat averaging state (version {STATE_VERSION})")
        if state.get("settings") != self.spec.to_dict() or state.get("plan") != self.averager.describe():
            raise ValueError(f"{where}: saved with other averaging settings ({state.get('settings')}, plan "
                             f"{state.get('plan')}) than this run's ({self.spec.to_dict()}, {self.averager.describe()})")
        steps, updates = state.get("averaged_steps"), state.get("ema_updates")
        if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps) or not isinstance(updates, int):
            raise ValueError(f"{where}: averaged_steps must be a list of ints and ema_updates an int")
        self.shards.load_state_dict(state.get("shards"), where)
        self.averaged_steps, self.ema_updates = list(steps), updates

    def state_file(self) -> str:
        """``hbat_average.pt`` (one process, DDP: the same on every rank) or ``hbat_average-rank<r>.pt``."""
        return STATE_FILE if self.shards.kind in ("local", "ddp") else f"hbat_average-rank{self.shards.rank}.pt"

    def save(self, folder: str | os.PathLike) -> str | None:
        """Write the state into ``folder`` atomically with its sha256 beside it (DDP: rank 0 only)."""
        if self.shards.kind == "ddp" and self.shards.rank != 0:
            return None
        path = os.path.join(folder, self.state_file())
        checkpoint.save_atomic(self.state_dict(), path)
        return path

    def load(self, folder: str | os.PathLike, *, missing_ok: bool = False) -> bool:
        """Restore the state ``save`` wrote in ``folder`` (checksum, then a weights_only load)."""
        path = os.path.join(folder, self.state_file())
        if not os.path.isfile(path):
            if missing_ok:
                warnings.warn(f"resuming from {folder!s} without an averaging state ({self.state_file()}): the start "
                              "copy is the weights at this train() start", stacklevel=2)
                return False
            raise FileNotFoundError(f"no averaging state {path!r}; was the checkpoint saved with AveragingCallback "
                                    "(and, on sharded models, with the same number of ranks)?")
        state = checkpoint.load(path, remedy="delete the checkpoint's hbat_average files to resume without them")
        self.load_state_dict(state, path)
        return True

    def close(self) -> None:
        """Let go of the model's tensors (e.g. a finished DeepSpeed engine) and the start copy."""
        self.averager = None
        self.kl_batch = None

