"""The one training loop and the optimizer step of every stage (SFT, DPO, the reward model; PPO steps its
policy and critic with the same ``TorchStepper``).

    stepper = make_stepper(model_or_engine, settings, total_steps)  # a fresh AdamW and lr schedule
    for each optimizer step:                                         # train_loop
        for micro in stepper.micro_batches(batch, grad_accum_steps):  # this rank's share of the global batch
            stepper.backward(objective.micro_loss(micro, batch), last=...)
        stats = stepper.reduce(stats)                                 # loss statistics summed over ranks
        stepper.backward(objective.extra_loss(step))                  # a mixed-in loss (RLHF+pt / SFT+ppo)
        stats.update(stepper.step(penalty))                           # penalty, clipping, optimizer, schedule

``batch_size`` counts the rows of one optimizer step; they are split into ``grad_accum_steps`` micro-batches.
Each objective weights a micro-batch's loss by its share of the batch (tokens for SFT, pairs for DPO and the
reward model), so accumulating gives the same gradient as one big batch; a plain ``1 / grad_accum_steps`` is
only exact when all micro-batches have the same share.

``settings`` is a ``hbat.trainer.common.StageConfig``. ``step`` returns 0-dim tensors (``ewc/penalty``,
``train/grad_norm`` before clipping, ``train/lr``) and never reads them: no host synchronisation per step; the
loop reads them when it logs.

``TorchStepper`` (one process), in this order: the penalty; ``clip_grad_norm_``; the optimizer step; the
schedule; ``zero_grad``. Every backend clips the penalty gradient like a loss term, so one config gives the same
weights in one process and under DeepSpeed. Hence: with clipping on (``max_grad_norm``), or any penalty other
than a ``HybridEWC`` of the parameters it steps, the optimizer is torch's AdamW and ``penalty.apply_()`` first adds
the penalty gradient to ``.grad``. With clipping off and the ``hbat`` regulariser, the optimizer is
``hbat.HybridAdamW``, which adds the penalty gradient inside its step (one fused pass: 32 bytes per fp32 element
instead of AdamW's 28 plus the separate penalty pass's 16; ``ewc/penalty`` is the step's ``last_penalty``), the
same weights to fp32 rounding (tests/test_steppers.py). (Clipping the sum needs its norm before the step: a
second pass, which is what ``apply_()`` costs.) Low-precision weights are stepped through their fp32 masters
(hbat.trainer.optimizer): each bf16 gradient is converted to fp32 and freed at the step; clipping measures the
fp32 gradients. Under DeepSpeed, ``make_stepper`` gives the engine's ``DeepSpeedStepper`` (hbat.trainer.engine).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed import is_deepspeed_engine
from ..ewc import HybridEWC
from ..optim import HybridAdamW
from ..param_view import LocalParamView
from .engine import DeepSpeedStepper
from .guards import check_values
from .optimizer import make_optimizer, make_scheduler, master_weights, split_micro, trainable_parameters

# micro_loss(micro_indices, batch_indices) -> (weighted loss, weighted detached stats)
MicroLoss = Callable[[list, list], tuple]


@dataclass
class Objective:
    """What ``train_loop`` minimises: the loss of a micro-batch of ``n_rows`` rows (built by each stage:
    ``sft_objective``, ``dpo_objective``, the reward model's ranking loss), plus an optional mixed-in loss.

    ``micro_loss(micro_indices, batch_indices) -> (loss, stats)``: the micro-batch's loss already weighted by
    its share of the batch, and detached 0-dim stats weighted the same way (summed over the micro-batches they
    give the batch means). ``stats[loss_key]`` is the bar's live loss. ``extra_loss(step)`` is added to every
    step (the same rows on every rank) and logged as ``extra_key``."""

    n_rows: int
    micro_loss: MicroLoss
    desc: str  # the progress bar's label and the stage named in a divergence's hint ("sft", "dpo", "reward")
    loss_key: str
    extra_loss: Callable[[int], torch.Tensor] | None = None
    extra_key: str = "train/extra_loss"


def read_scalars(values: dict) -> dict[str, float]:
    """0-dim tensors (or numbers) as floats, in ONE host synchronisation (they are gathered on one device)."""
    tensors = [torch.as_tensor(v).detach().float().reshape(()) for v in values.values()]
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    read = torch.stack([t.to(device) for t in tensors]).tolist() if tensors else []
    return dict(zip(values, read))


def planned_steps(cfg, n_rows: int) -> int:
    return cfg.epochs * math.ceil(n_rows / cfg.batch_size) if cfg.max_steps is None else cfg.max_steps


def train_loop(model: torch.nn.Module, objective: Objective, cfg, *, penalty=None,
               log: Callable[[dict], None] | None = None, progress: bool = True,
               after_step: Callable[[], None] | None = None) -> dict:
    """Optimise ``model`` (or a DeepSpeed engine) on ``objective`` with the settings ``cfg`` (a StageConfig).

    Logs the objective's stats plus ``train/lr``, ``train/grad_norm`` (before clipping), ``train/step``,
    ``train/epoch``, ``ewc/penalty`` (with ``penalty``) and its ``extra_key`` (with an ``extra_loss``). Returns the
    means over the run, ``train/steps`` and ``<loss_key>_last``. A non-finite loss, mixed-in loss or penalty
    raises hbat.trainer.guards.TrainingDiverged at the next log call. ``after_step()`` runs after every optimizer
    step (hbat.trainer.ema).
    """
    from tqdm.auto import tqdm  # optional: hbat[train]

    n_rows, micro_loss, loss_key = objective.n_rows, objective.micro_loss, objective.loss_key
    extra_loss, extra_key = objective.extra_loss, objective.extra_key
    total_steps = planned_steps(cfg, n_rows)
    stepper = make_stepper(model, cfg, total_steps)  # plain PyTorch, or this rank's part of a DeepSpeed engine
    generator = torch.Generator().manual_seed(cfg.seed)  # the same order on every rank
    sums: dict[str, torch.Tensor] = {}
    window: dict[str, torch.Tensor] = {}  # stats since the last log call
    step, last = 0, {}
    was_training = model.training
    model.train()
    stepper.start()
    bar = tqdm(total=total_steps, desc=objective.desc, disable=not progress, leave=False)
    try:
        while step < total_steps:
            order = torch.randperm(n_rows, generator=generator).tolist()
            for start in range(0, n_rows, cfg.batch_size):
                if step >= total_steps:
                    break
                batch = order[start:start + cfg.batch_size]
                stats: dict[str, torch.Tensor] = {}
                micros = stepper.micro_batches(batch, cfg.grad_accum_steps)
                for index, micro in enumerate(micros):
                    if micro:
                        loss, micro_stats = micro_loss(micro, batch)
                    else:  # DeepSpeed: this rank's share ran out; it still joins every reduction, with weight 0
                        loss, micro_stats = micro_loss(batch[:1], batch)
                        loss, micro_stats = loss * 0.0, {k: v * 0.0 for k, v in micro_stats.items()}
                    stepper.backward(loss, last=extra_loss is None and index == len(micros) - 1)
                    for key, value in micro_stats.items():
                        stats[key] = stats.get(key, 0.0) + value.detach().float()
                stats = stepper.reduce(stats)
                if extra_loss is not None:
                    extra = extra_loss(step)  # the same rows on every rank
                    stepper.backward(extra, last=True, replicated=True)
                    stats[extra_key] = extra.detach().float()
                stats.update(stepper.step(penalty))  # ewc/penalty, train/grad_norm (before clipping), train/lr
                if after_step is not None:
                    after_step()
                step += 1
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                    window[key] = window.get(key, 0.0) + value
                bar.update(1)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    count = (step - 1) % cfg.logging_steps + 1
                    last = {key: value / count for key, value in read_scalars(window).items()}
                    window.clear()
                    # a NaN at any step of the interval is in its sum (hbat.trainer.guards)
                    check_values(last, (loss_key, extra_key, "ewc/penalty"),
                                 f"step {step}" if count == 1 else f"steps {step - count + 1}-{step}",
                                 f" (a smaller {objective.desc}.lr may help)")
                    last.update({"train/step": step, "train/epoch": (start + len(batch)) / n_rows
                                 + (step - 1) // math.ceil(n_rows / cfg.batch_size)})
                    if log is not None:
                        log(dict(last))
                    bar.set_postfix(loss=f"{last[loss_key]:.4f}")
    finally:
        bar.close()
        stepper.close()
        model.train(was_training)
    summary = {key: float(value) / max(step, 1) for key, value in sums.items()}
    summary.update({"train/steps": step, f"{loss_key}_last": last.get(loss_key, float("nan"))})
    return summary


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



def make_stepper(model, cfg, total_steps: int):
    """A ``DeepSpeedStepper`` for a DeepSpeed engine, else a ``TorchStepper``."""
    if is_deepspeed_engine(model):
        return DeepSpeedStepper(model, cfg, total_steps)
    return TorchStepper(model, cfg, total_steps)
