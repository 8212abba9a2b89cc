"""The DeepSpeed engine of a multi-process run (``deepspeed`` in the config): built once, reset per stage,
its full weights gathered at stage ends under ZeRO-3.

The pieces around it, one job each: hbat.trainer.procgroup (joining the process group, ranks, barriers,
leaving), hbat.trainer.ds_config (the DeepSpeed JSON, checked against the stage configs) and
``DeepSpeedStepper`` below (the stage's optimizer step on the engine, beside hbat.trainer.step's one-process
``TorchStepper``). Design decisions:

* **One engine per run, reset per stage.** HybridEWC's sharded view (hbat.distributed.ZeroParamView) is
  bound to the engine's fp32 partitions, so the run builds ONE engine (``build_engine``) and ONE
  ``HybridEWC(engine, ...)``. Each stage then starts like the paper's fresh optimizer: the optimizer state
  (Adam moments and step count) is cleared, lr / weight decay / clipping are set from the stage config
  and a new LambdaLR (``optimizer.make_scheduler``) drives the lr of the inner optimizer. DeepSpeed gets no
  scheduler of its own.
* **The stage configs own the batch.** ``batch_size`` is the GLOBAL batch (rows per optimizer step over
  all ranks) and ``grad_accum_steps`` the micro-batches per rank per step; each global batch is cut into
  ``world * grad_accum_steps`` chunks and rank r takes chunks ``r*G .. r*G+G-1`` (a rank with no rows
  left runs a zero-weighted micro-batch so every rank joins every reduction). Each stage weights a
  micro-batch's loss by its share of the global batch, so the backward loss is multiplied by the world
  size (DeepSpeed averages over ranks and we disable its 1/gradient_accumulation_steps): the gradient
  equals the single-process one for any batch split. The accumulation boundary is set explicitly
  (``set_gradient_accumulation_boundary``), so SFT and DPO may use different ``grad_accum_steps`` on one
  engine. The DeepSpeed JSON's ``train_batch_size``, ``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps`` and ``gradient_clipping`` are derived from the first stage (SFT); if the
  JSON sets one of them ("auto" means unset) it must agree with EVERY stage, else ValueError. A
  ``scheduler`` section is refused (the stage configs set the schedule); an ``optimizer`` section is
  used (its lr / weight decay are overridden per stage), otherwise ``torch.optim.AdamW`` as in one process.
* **Clipping is DeepSpeed's** under ZeRO (``gradient_clipping``, set per stage on the ZeRO optimizer); it
  measures the global norm after ``penalty.apply_()`` added the penalty gradient to the rank's reduced
  partition, so the penalty is clipped like a loss term; ``train/grad_norm`` is that pre-clip norm. ZeRO-0
  (every rank holds all-reduced full gradients) clips with ``clip_grad_norm_`` as in one process.
* **Rank 0 writes, every rank computes.** Only rank 0 prints, shows bars, writes metrics, checkpoints and
  the final model; every rank runs evaluation identically (same weights, same seeds), which keeps the
  ranks in lockstep without long barriers. Each rank writes its own HybridEWC state (its anchor
  partition) next to the checkpoint (hbat.trainer.runstate). ``prepare()`` runs on rank 0 first (it trains
  and caches the SFT reference and the reward model, unsharded); the other ranks wait at a barrier and
  then load the cache, so all ranks hold identical data, base weights and judges.
* **ZeRO-3 gathers at stage ends only.** The engine partitions the module's parameters in place, so the
  plain ``model`` of hbat.trainer.runstate holds no full weights after ``build_engine``. Training (engine
  forward / backward / step, DeepSpeed's own per-layer gathers) and the per-step HybridEWC penalty
  (``penalty.apply_()`` on this rank's fp32 / gradient partitions) gather nothing of ours. What needs whole
  weights gathers them with ``deepspeed.zero.GatheredParameters`` over every parameter, on every rank (a
  collective): ``full_state_dict`` once per completed stage, whose CPU copy is evaluated on a plain copy of
  the model (``plain_copy``; a forward inside the gather context would re-partition the parameters) and
  written as checkpoint.pt / best.pt, and once more at the end for ``save_pretrained`` (keep=last). So
  each rank briefly holds the full weights at every stage end. The DPO reference log-probs (computed once
  per stage) and HybridEWC's importance pass run forward passes of the engine, which fetch each layer's
  parameters through ZeRO-3's hooks, every rank in lockstep. Resuming loads the checkpoint's weights into
  the module before ``build_engine`` partitions it.
* Supported: ZeRO stages 0, 1, 2 and 3 (fp32 or bf16), methods whose regulariser is HybridEWC or none (the
  mixed-loss baselines too), DPO as HPA. Refused with NotImplementedError: PPO (generation and a critic
  under ZeRO), HBAT-Freeze and the Fisher baseline (they change ``requires_grad`` or need full gradients),
  LoRA, fp16 (skipped overflow steps would desynchronise the lr schedule; use bf16). Precision is the JSON's
  ``bf16`` section (DeepSpeed's fp32 master partitions); ``model.dtype`` sets the frozen models' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import is_deepspeed_engine
from .ds_config import check_supported, resolve_ds_config, run_ds_config  # noqa: F401 (public names before the split)
from .procgroup import exit_process, finish, init_distributed, shutdown_distributed  # noqa: F401 (hbat.cli, docs)
from .optimizer import make_optimizer, make_scheduler, split_micro, trainable_parameters


def build_engine(model: torch.nn.Module, cfg):
    """One DeepSpeed engine for the whole run (``cfg.deepspeed`` names its JSON config)."""
    import deepspeed  # optional, heavy: not for runs without it

    init_distributed()
    config = run_ds_config(cfg)
    params = trainable_parameters(model)
    optimizer = None if "optimizer" in config else make_optimizer(params, cfg.sft)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                      model_parameters=params if optimizer is None else None)
    return engine


def is_zero3(engine) -> bool:
    """True for a DeepSpeed engine running ZeRO stage 3 (its module's parameters are partitioned)."""
    return engine is not None and is_deepspeed_engine(engine) and engine.zero_optimization_stage() == 3


def full_state_dict(module: torch.nn.Module, engine=None) -> dict:
    """The full weights of ``module`` on the CPU. Under ZeRO-3 (``engine``) this GATHERS every parameter
    (``deepspeed.zero.GatheredParameters``): a collective, so every rank calls it; the gathered values are
    copied before the context re-partitions them. Otherwise the module's own tensors (no copy on the CPU)."""
    if not is_zero3(engine):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    import deepspeed  # optional, heavy: not for runs without it

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def plain_copy(build, weights: dict, like: torch.nn.Module) -> torch.nn.Module:
    """A plain (unpartitioned) model from ``build()`` holding ``weights``, in the dtype of ``like`` (the
    engine's module): what evaluation and ``save_pretrained`` run on under ZeRO-3. The global RNG is left
    as it was, so the run's random streams do not depend on the ZeRO stage."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model = build()
    dtype = next(like.parameters()).dtype
    if dtype.is_floating_point:
        model.to(dtype=dtype)
    model.load_state_dict(weights)
    return model.requires_grad_(False)


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
