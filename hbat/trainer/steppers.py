"""The optimizer step: the one place where every stage (SFT, DPO, reward model, PPO policy and critic) adds
the EWC penalty, clips and steps.

    stepper = make_stepper(model_or_engine, settings, total_steps)  # a fresh AdamW and lr schedule
    for each optimizer step:
        for micro in stepper.micro_batches(batch, grad_accum_steps):  # this rank's share of the global batch
            stepper.backward(loss_of(micro), last=...)
        stats = stepper.reduce(stats)                                 # loss statistics summed over ranks
        stats.update(stepper.step(penalty))                           # penalty, clipping, optimizer, schedule

``settings`` is a ``hbat.trainer.common.StageConfig`` (lr, weight_decay, max_grad_norm, warmup_ratio,
lr_scheduler_type). ``step`` returns 0-dim tensors (``ewc/penalty``, ``train/grad_norm`` before clipping,
``train/lr``) and never reads them: no host synchronisation per step; the caller reads them when it logs.

``TorchStepper`` (one process), in this order: the penalty; ``clip_grad_norm_``; the optimizer step; the
schedule; ``zero_grad``. Every backend clips the penalty gradient like a loss term, so one config gives the same
weights in one process and under DeepSpeed. Hence: with clipping on (``max_grad_norm``), or any penalty other
than a ``HybridEWC`` of the parameters it steps, the optimizer is torch's AdamW and ``penalty.apply_()`` first adds
the penalty gradient to ``.grad``. With clipping off and the ``hbat`` regulariser, the optimizer is
``hbat.HybridAdamW``, which adds the penalty gradient inside its step (one fused pass: 32 bytes per fp32 element
instead of AdamW's 28 plus the separate penalty pass's 16; ``ewc/penalty`` is the step's ``last_penalty``), the
same weights to fp32 rounding (tests/test_steppers.py). (Clipping the sum needs its norm before the step: a
second pass, which is what ``apply_()`` costs.) Weights in
bfloat16 (``model.dtype``) are stepped through fp32 master copies: AdamW's moments and update run in fp32 on
the master, which is rounded back into the bf16 weight after each step (a plain bf16 AdamW loses every update
below bf16's resolution: lr 1e-6 on a weight of 1e-2 changes nothing). Each bf16 gradient is converted to fp32
and freed at the step; clipping measures the fp32 gradients. fp32 weights are their own master (no copy).
The EWC penalty of a bf16 model is measured on the masters (``master_named_parameters``, as DeepSpeed's bf16
engine does on its fp32 partitions): its gradient goes to the masters' gradients before clipping.
The masters belong to the model, not to a stage (``master_weights``): the next stage's stepper continues from
them, as DeepSpeed keeps its fp32 partitions, so progress below bf16's resolution is not lost at a stage
boundary; a weight changed from outside (``load_state_dict``) gets a fresh master. ``master_state`` /
``load_master_state`` carry them through a checkpoint (exact resume in bf16).

``DeepSpeedStepper`` runs the same step on a ``deepspeed.DeepSpeedEngine`` (hbat.trainer.engine): this rank's
micro-batches, ``engine.backward`` with an explicit accumulation boundary, the penalty added to the rank's
reduced gradient partition by ``penalty.apply_()`` (the engine's optimizer is DeepSpeed's to step), DeepSpeed's
clipping, master weights and step.
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
import torch.distributed as dist

from ..distributed import is_deepspeed_engine
from ..ewc import HybridEWC
from ..optim import HybridAdamW
from ..param_view import LocalParamView

# module -> {parameter: its fp32 master}; outside the module, so copies of the module (references) share none
_MASTERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a stage trains (frozen tensors, e.g. HBAT-Freeze or a LoRA base, are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


@torch.no_grad()
def master_weights(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The fp32 master of each of ``params`` (a weight of ``model``): the weight itself when it is fp32, else
    the master ``model`` keeps (one tensor for the whole run, which HybridEWC may hold), set again from the
    weight where the weight is no longer the master rounded (it was changed from outside)."""
    store = _MASTERS.setdefault(model, {})
    low = [p for p in params if p.dtype != torch.float32]
    for p in low:
        if p not in store:
            store[p] = p.detach().float().requires_grad_(True)  # a leaf HybridEWC's view accepts
    flags = [(store[p].to(p.dtype) == p).all() for p in low]
    valid = torch.stack([f.to(low[0].device) for f in flags]).tolist() if low else []  # one host sync
    for p, ok in zip(low, valid):
        if not ok:
            store[p].copy_(p)
    return [p if p.dtype == torch.float32 else store[p] for p in params]


def master_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model``'s trainable (name, parameter) pairs with each bf16 weight replaced by its fp32 master: what the
    EWC penalty of a bf16 model measures and adds its gradient to (the step folds it in before clipping)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return list(zip([name for name, _ in named], master_weights(model, [p for _, p in named])))


def has_low_precision(model: torch.nn.Module) -> bool:
    return any(p.requires_grad and p.dtype != torch.float32 for p in model.parameters())


def drop_master_weights(model: torch.nn.Module) -> None:
    """Forget the masters of ``model`` (a model that is trained no more, e.g. the shared SFT model)."""
    _MASTERS.pop(model, None)


def master_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The masters ``model`` keeps, by parameter name (CPU copies), for a checkpoint."""
    store = _MASTERS.get(model, {})
    return {name: store[p].detach().cpu().clone() for name, p in model.named_parameters() if p in store}


@torch.no_grad()
def load_master_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Masters from ``master_state``, loaded after the weights (each must round to its weight)."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params or params[name].dtype == torch.float32]
    if missing:
        raise ValueError(f"master weight {missing[0]!r} is not a low-precision parameter of the model")
    for master, value in zip(master_weights(model, [params[name] for name in state]), state.values()):
        master.copy_(value)


def make_optimizer(params: Sequence[torch.Tensor], cfg) -> torch.optim.Optimizer:
    """A fresh AdamW over ``params`` with the stage's lr and weight decay."""
    return torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio * total_steps`` steps, then constant / linear / cosine decay to 0."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_micro(indices: Sequence[int], parts: int) -> list[list[int]]:
    """``parts`` near-equal consecutive chunks (fewer when there are fewer rows than parts)."""
    size = math.ceil(len(indices) / parts)
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


class TorchStepper:
    """One process: a fresh AdamW (HybridAdamW with a HybridEWC) and lr schedule per stage, fp32 masters for
    low-precision weights."""

    def __init__(self, model: torch.nn.Module, cfg, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.params = trainable_parameters(model)
        self.masters = master_weights(model, self.params)
        self.low_precision = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        self.optimizer = make_optimizer(self.masters, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        self.steps = 0

    def fuses(self, penalty) -> bool:
        """Whether ``penalty``'s gradient goes inside the optimizer step: no clipping (it would clip the loss
        gradient alone) and a single-process HybridEWC of parameters this stepper steps (a ``HybridAdamW`` is built
        for it at the stage's first step)."""
        if isinstance(self.optimizer, HybridAdamW):
            return self.optimizer.ewc is penalty
        if self.cfg.max_grad_norm or not isinstance(penalty, HybridEWC) \
                or not isinstance(penalty.view, LocalParamView) or self.steps:
            return False
        stepped = {id(m) for m in self.masters}
        return all(id(p) in stepped for p in penalty.view.params())

    def start(self) -> None:
        self.close()

    def micro_batches(self, batch: list, parts: int) -> list[list]:
        return split_micro(batch, parts)

    def backward(self, loss: torch.Tensor, *, last: bool = True, replicated: bool = False) -> None:
        loss.backward()

    def reduce(self, stats: dict) -> dict:
        return stats

    def step(self, penalty=None) -> dict:
        stats = {}
        self._gradients_to_masters()
        fused = penalty is not None and self.fuses(penalty)
        if fused and not isinstance(self.optimizer, HybridAdamW):  # the stage's first step: nothing stepped yet
            self.optimizer = HybridAdamW(self.masters, penalty, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            self.scheduler = make_scheduler(self.optimizer, self.cfg, self.total_steps)
        if penalty is not None and not fused:  # a bf16 model's HybridEWC: its masters' gradients
            stats["ewc/penalty"] = penalty.apply_().detach().float()
        self._gradients_to_masters()
        stats["train/grad_norm"] = torch.nn.utils.clip_grad_norm_(
            self.masters, self.cfg.max_grad_norm if self.cfg.max_grad_norm else float("inf")).detach().float()
        stats["train/lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        if fused:
            stats["ewc/penalty"] = self.optimizer.last_penalty.detach().float()  # before the step, as apply_()'s
        self.steps += 1
        self.scheduler.step()
        with torch.no_grad():
            for weight, master in self.low_precision:
                weight.copy_(master)
        self.close()
        return stats

    def _gradients_to_masters(self) -> None:
        """Add each bf16 gradient, in fp32, to its master's gradient, freeing the bf16 one as it goes."""
        for weight, master in self.low_precision:
            if weight.grad is not None:
                grad = weight.grad.float()
                master.grad = grad if master.grad is None else master.grad.add_(grad)
                weight.grad = None

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for weight, _ in self.low_precision:
            weight.grad = None


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer a DeepSpeed engine steps (under ZeRO: over this rank's fp32 partitions)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"cannot find the torch optimizer inside {type(engine.optimizer).__name__}")
    return opt


class DeepSpeedStepper:
    """A stage on a DeepSpeed engine: this rank's micro-batches, explicit boundary, DeepSpeed's clipping."""

    def __init__(self, engine, cfg, total_steps: int):
        self.engine, self.cfg = engine, cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.optimizer = inner_optimizer(engine)
        self.optimizer.state.clear()  # a fresh optimizer per stage (the paper): Adam moments and step count
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = cfg.lr
            group["weight_decay"] = cfg.weight_decay
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        clip = float(cfg.max_grad_norm or 0.0)
        # ZeRO-0 holds full all-reduced gradients in .grad but its clipping discards the norm: clip here, as in
        # one process; under ZeRO the optimizer clips (and records the norm) over the rank partitions
        self.own_clip = not engine.zero_optimization()
        self.clip_params = [p for p in engine.module.parameters() if p.requires_grad] if self.own_clip else []
        engine._config.gradient_clipping = 0.0 if self.own_clip else clip  # no public setter: read by step()
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = clip  # the ZeRO optimizer copied it at init

    def start(self) -> None:
        self.engine.zero_grad()

    def micro_batches(self, batch: list, parts: int) -> list[list]:
        """This rank's ``parts`` micro-batches of the global batch (empty ones where rows ran out)."""
        chunks = split_micro(batch, parts * self.world_size)
        chunks += [[] for _ in range(parts * self.world_size - len(chunks))]
        return chunks[self.rank * parts:(self.rank + 1) * parts]

    def backward(self, loss: torch.Tensor, *, last: bool, replicated: bool = False) -> None:
        """``loss`` is this micro-batch's share of the global batch's loss (a ``replicated`` loss is the same
        on every rank); DeepSpeed averages gradients over ranks, hence the factor."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss if replicated else loss * self.world_size, scale_wrt_gas=False)

    def reduce(self, stats: dict) -> dict:
        """Sum each rank's share-weighted statistics: the global batch's means (one small all-reduce)."""
        if not stats:
            return stats
        keys = sorted(stats)
        vec = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32).reshape(()).to(self.engine.device)
                           for k in keys])
        dist.all_reduce(vec)
        return dict(zip(keys, vec.unbind()))  # left on the device: train_loop reads them when it logs

    def step(self, penalty=None) -> dict:
        stats = {}
        if penalty is not None:  # on the boundary: adds lam*F*(p-a) to this rank's reduced gradient partition
            stats["ewc/penalty"] = penalty.apply_().detach().float()
        norm = None
        if self.own_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.cfg.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()
        if not self.own_clip:
            norm = self.engine.get_global_grad_norm()
        # a tensor norm stays where it is (no host sync per step); DeepSpeed may also hand back a float or None
        stats["train/grad_norm"] = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        stats["train/lr"] = torch.tensor(lr)
        self.scheduler.step()
        return stats

    def close(self) -> None:
        self.engine.zero_grad()


def make_stepper(model, cfg, total_steps: int):
    """A ``DeepSpeedStepper`` for a DeepSpeed engine, else a ``TorchStepper``."""
    if is_deepspeed_engine(model):
        return DeepSpeedStepper(model, cfg, total_steps)
    return TorchStepper(model, cfg, total_steps)
