"""Who takes the optimizer step: plain PyTorch (one process) or a DeepSpeed ZeRO engine (several ranks).

``hbat.trainer.common.train_loop`` drives a *stepper* with the same calls either way:

    stepper = make_stepper(model_or_engine, stage_cfg, total_steps)   # a fresh optimizer state + lr schedule
    for each optimizer step:
        for micro in stepper.micro_batches(batch, grad_accum_steps):  # this rank's share of the global batch
            stepper.backward(loss_of(micro), last=...)
        stats = stepper.reduce(stats)                                 # loss statistics summed over ranks
        stats.update(stepper.step(ewc))                               # penalty, clipping, optimizer, schedule

``TorchStepper`` is exactly the single-process loop (fresh AdamW per stage, clip_grad_norm_, LambdaLR).
``DeepSpeedStepper`` runs the same step on a ``deepspeed.DeepSpeedEngine``. Design decisions:

* **One engine per run, reset per stage.** HybridEWC's sharded view (hbat.distributed.ZeroParamView) is
  bound to the engine's fp32 partitions, so the run builds ONE engine (``build_engine``) and ONE
  ``HybridEWC(engine, ...)``. Each stage then starts like the paper's fresh optimizer: the optimizer state
  (Adam moments and step count) is cleared, lr / weight decay / clipping are set from the stage config
  and a new LambdaLR (``common.make_scheduler``) drives the lr of the inner optimizer. DeepSpeed gets no
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
  measures the global norm after ``ewc.apply_()`` added the penalty gradient to the rank's reduced
  partition, so the penalty is clipped like a loss term; ``train/grad_norm`` is that pre-clip norm. ZeRO-0
  (every rank holds all-reduced full gradients) clips with ``clip_grad_norm_`` as in one process.
* **Rank 0 writes, every rank computes.** Only rank 0 prints, shows bars, writes metrics, checkpoints and
  the final model; every rank runs evaluation identically (same weights, same seeds), which keeps the
  ranks in lockstep without long barriers. Each rank writes its own HybridEWC state (its anchor
  partition) next to the checkpoint (hbat.trainer.loop). ``prepare()`` runs on rank 0 first (it trains
  and caches the SFT reference and the reward model, unsharded); the other ranks wait at a barrier and
  then load the cache, so all ranks hold identical data, base weights and judges.
* **ZeRO-3 gathers at stage ends only.** The engine partitions the module's parameters in place, so the
  plain ``model`` of hbat.trainer.loop holds no full weights after ``build_engine``. Training (engine
  forward / backward / step, DeepSpeed's own per-layer gathers) and the per-step HybridEWC penalty
  (``ewc.apply_()`` on this rank's fp32 / gradient partitions) gather nothing of ours. What needs whole
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
  fp16 (skipped overflow steps would desynchronise the lr schedule; use bf16).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import NoReturn

import torch

from .common import StageConfig, make_optimizer, make_scheduler, split_micro

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping")


# --- process group ---------------------------------------------------------------------------------------------

_JOINED_HERE = False  # whether init_distributed created the process group (so shutdown_distributed may end it)


def init_distributed() -> None:
    """Join the process group torchrun / the deepspeed launcher set up (gloo on CPU), once; ValueError, saying
    how to launch, outside a launcher."""
    global _JOINED_HERE
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # else DeepSpeed would try MPI (mpi4py)
        raise ValueError("deepspeed is set, so every rank is its own process: start them with a launcher, e.g. "
                         "`torchrun --nproc_per_node N -m hbat.cli train CONFIG --set deepspeed=ds.json` (README: "
                         "Multi-process training under DeepSpeed)")
    try:
        import deepspeed
    except ImportError as exc:
        raise ValueError(f"deepspeed is set but the deepspeed package does not import ({exc}); "
                         "pip install deepspeed") from None
    from deepspeed.accelerator import get_accelerator

    backend = None
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before any NCCL call (prepare's barrier)
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed would first compile its shared-memory all-reduce op (about a minute); gloo does the job
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    _JOINED_HERE = True


_LEFT_GROUP = False  # whether shutdown_distributed ended a group (then finish ends the process with exit_process)


def shutdown_distributed() -> None:
    """Leave the process group init_distributed joined (a group the caller made is left alone): every rank
    waits for the others, then the group is destroyed."""
    global _JOINED_HERE, _LEFT_GROUP
    import torch.distributed as dist

    if _JOINED_HERE and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _LEFT_GROUP = True
    _JOINED_HERE = False


def finish(code: int) -> int:
    """The end of a CLI command: ``code``, or, in a worker that left its process group, exit_process(code)."""
    if _LEFT_GROUP:
        exit_process(code)
    return code


def exit_process(code: int) -> NoReturn:
    """End a worker that finished and left its process group, without Python's finalization.

    DeepSpeed keeps references to its gloo groups (e.g. ``deepspeed.utils.groups._WORLD_GROUP``) past
    destroy_process_group, so their threads still run when the interpreter tears down, and a rank can abort
    there ("terminate called without an active exception", pytorch/pytorch#190489; rare, but seen twice in CI
    here) after a run that wrote everything. Output is flushed first.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --- the DeepSpeed config --------------------------------------------------------------------------------------

def load_ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"deepspeed config {path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed config {path}: the top level must be a JSON object")
    return config


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def _stage_batch(cfg: StageConfig, world: int) -> dict:
    micro = max(1, cfg.batch_size // (world * cfg.grad_accum_steps))
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": cfg.grad_accum_steps,
            "train_batch_size": micro * cfg.grad_accum_steps * world,
            "gradient_clipping": float(cfg.max_grad_norm or 0.0)}


def resolve_ds_config(raw: dict, stages: dict[str, StageConfig], world: int, *, source: str = "deepspeed") -> dict:
    """The DeepSpeed config of a run: ``raw`` plus the batch settings derived from the stages (module docstring).

    ``stages`` maps a stage name (e.g. "sft", "dpo") to its config, in run order; the first one sets the
    engine's nominal batch settings. Raises ValueError naming the key and the stage on a conflict.
    """
    if "scheduler" in raw:
        raise ValueError(f"{source}: remove the 'scheduler' section; the stage configs set the lr schedule "
                         "(lr, warmup_ratio, lr_scheduler_type), restarted at every stage")
    if raw.get("fp16", {}).get("enabled") is True:
        raise NotImplementedError(f"{source}: fp16 is not supported by the trainer (overflow-skipped steps would "
                                  "desynchronise the per-stage lr schedule); use bf16")
    if zero_stage(raw) not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage={zero_stage(raw)}; use 0, 1, 2 or 3")
    for name, cfg in stages.items():
        derived = _stage_batch(cfg, world)
        exact = cfg.batch_size % (world * cfg.grad_accum_steps) == 0
        for key in BATCH_KEYS:
            value = raw.get(key, "auto")
            if value == "auto":
                continue
            if key == "train_batch_size":
                want = cfg.batch_size
            elif key == "train_micro_batch_size_per_gpu":
                want = derived[key] if exact else None
            else:
                want = derived[key]
            if want is None or float(value) != float(want):
                raise ValueError(
                    f"{source}: {key}={value!r} disagrees with {name} (batch_size={cfg.batch_size}, "
                    f"grad_accum_steps={cfg.grad_accum_steps}, max_grad_norm={cfg.max_grad_norm}, {world} ranks); "
                    f"remove {key} from the DeepSpeed config (the stage configs set it) or make them agree")
        if not exact:
            warnings.warn(f"{name}.batch_size={cfg.batch_size} is not a multiple of {world} ranks x "
                          f"{cfg.grad_accum_steps} micro-batches: micro-batches differ in size (the gradient is "
                          "still the one of the whole batch)", stacklevel=2)
    first = next(iter(stages.values()))
    config = {**raw, **_stage_batch(first, world)}
    config.setdefault("zero_allow_untested_optimizer", True)  # torch.optim.AdamW, as in one process
    config.setdefault("steps_per_print", 10**9)
    try:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            config.setdefault("zero_force_ds_cpu_optimizer", False)
    except ImportError:
        pass
    return config


def run_ds_config(cfg) -> dict:
    """The resolved DeepSpeed config of a TrainConfig (errors name the file and the key; call it early)."""
    return resolve_ds_config(load_ds_config(cfg.deepspeed), {"sft": cfg.sft, "dpo": cfg.dpo}, world_size(),
                             source=cfg.deepspeed)


def check_supported(cfg, regularizer_kind: str) -> None:
    """Refuse, before any work, what the DeepSpeed path does not do (module docstring)."""
    from .methods import spec

    if cfg.hpa == "ppo" and spec(cfg.method).hpa:
        raise NotImplementedError("deepspeed: PPO stages are not supported under DeepSpeed yet; use hpa=dpo")
    if regularizer_kind not in ("hbat", "none"):
        raise NotImplementedError(f"deepspeed: method {cfg.method!r} (regulariser {regularizer_kind!r}) is not "
                                  "supported under DeepSpeed; HBAT-Freeze and the Fisher baseline need full, "
                                  "unsharded parameters")
    if not cfg.dpo.precompute_ref_logprobs:
        raise NotImplementedError("deepspeed: dpo.precompute_ref_logprobs=false is not supported (the policy "
                                  "copy would be a copy of the engine)")


def build_engine(model: torch.nn.Module, cfg):
    """One DeepSpeed engine for the whole run (``cfg.deepspeed`` names its JSON config)."""
    import deepspeed

    init_distributed()
    config = run_ds_config(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if "optimizer" in config else make_optimizer(model, cfg.sft)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                      model_parameters=params if optimizer is None else None)
    return engine


# --- steppers --------------------------------------------------------------------------------------------------

class TorchStepper:
    """One process: a fresh AdamW and lr schedule per stage, ``clip_grad_norm_`` after the EWC hook."""

    def __init__(self, model: torch.nn.Module, cfg: StageConfig, total_steps: int):
        self.cfg = cfg
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def start(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batches(self, batch: list, parts: int) -> list[list]:
        return split_micro(batch, parts)

    def backward(self, loss: torch.Tensor, *, last: bool, replicated: bool = False) -> None:
        loss.backward()

    def reduce(self, stats: dict) -> dict:
        return stats

    def step(self, ewc=None) -> dict:
        stats = {}
        if ewc is not None:
            stats["ewc/penalty"] = ewc.apply_().detach().float()
        stats["train/grad_norm"] = torch.nn.utils.clip_grad_norm_(
            self.params, self.cfg.max_grad_norm if self.cfg.max_grad_norm else float("inf")).detach().float()
        stats["train/lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


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

    def __init__(self, engine, cfg: StageConfig, total_steps: int):
        import torch.distributed as dist

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
        import torch.distributed as dist

        if not stats:
            return stats
        keys = sorted(stats)
        vec = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32).reshape(()).to(self.engine.device)
                           for k in keys])
        dist.all_reduce(vec)
        return dict(zip(keys, vec.unbind()))  # left on the device: train_loop reads them when it logs

    def step(self, ewc=None) -> dict:
        stats = {}
        if ewc is not None:  # on the boundary: adds lam*F*(p-a) to this rank's reduced gradient partition
            stats["ewc/penalty"] = ewc.apply_().detach().float()
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


def make_stepper(model, cfg: StageConfig, total_steps: int):
    from ..distributed import is_deepspeed_engine

    if is_deepspeed_engine(model):
        return DeepSpeedStepper(model, cfg, total_steps)
    return TorchStepper(model, cfg, total_steps)


def is_zero3(engine) -> bool:
    """True for a DeepSpeed engine running ZeRO stage 3 (its module's parameters are partitioned)."""
    from ..distributed import is_deepspeed_engine

    return engine is not None and is_deepspeed_engine(engine) and engine.zero_optimization_stage() == 3


def full_state_dict(module: torch.nn.Module, engine=None) -> dict:
    """The full weights of ``module`` on the CPU. Under ZeRO-3 (``engine``) this GATHERS every parameter
    (``deepspeed.zero.GatheredParameters``): a collective, so every rank calls it; the gathered values are
    copied before the context re-partitions them. Otherwise the module's own tensors (no copy on the CPU)."""
    if not is_zero3(engine):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    import deepspeed

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


def save_rank_file(obj, folder: str, position: int) -> None:
    """This rank's part of the checkpoint after ``position`` stages (its HybridEWC anchor partition)."""
    from .checkpoint import save_atomic

    save_atomic(obj, rank_file(folder, rank(), position))


def rank_file(folder: str, rank_index: int, position: int) -> str:
    return os.path.join(folder, f"checkpoint-rank{rank_index}-stage{position}.pt")
