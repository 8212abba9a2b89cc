"""``HybridEWCCallback``: the HBAT penalty in ``transformers.Trainer`` and TRL's SFT / DPO / reward trainers.

    ewc = hbat.HybridEWC(model, f_max=100, lam=1)
    for n in range(N):                                        # Algorithm 1, one trainer run per stage
        SFTTrainer(model, ..., callbacks=[HybridEWCCallback(ewc, objective="ifa")]).train()
        DPOTrainer(model, ..., callbacks=[HybridEWCCallback(ewc, objective="hpa")]).train()

The same code runs in one process, under DDP, DeepSpeed ZeRO-1/2/3 (with or without optimizer offload) and
FSDP2. The engine or sharded model of a run exists only once ``train()`` starts, and every Trainer builds a
new one, so ``on_train_begin`` hands the run's prepared model to ``hbat.integrations.accelerate.PreparedEWC``,
which binds the HybridEWC to it (``ewc.bind``: the anchors are cut to this rank's share; nothing is gathered)
and, under DeepSpeed, wraps the ZeRO optimizer's ``step`` so that the penalty gradient goes into this rank's
reduced gradient partition before DeepSpeed's norm, clipping and step. At ``on_train_end`` it lets go of
the engine again. Between two Trainers under DeepSpeed call ``release_trainer(trainer)``: accelerate allows one
DeepSpeed configuration per process, and a finished engine keeps its gradient hooks on the model.

When the penalty gradient is added without DeepSpeed. ``Trainer`` (transformers 5.x) runs, once per optimizer
step after the last micro-batch's backward: ``_clip_grad_norm`` (if ``max_grad_norm > 0``), ``_get_grad_norm``,
``on_pre_optimizer_step``, ``optimizer.step()``. The ``on_pre_optimizer_step`` callback therefore comes
AFTER clipping, and no callback runs between the last backward and clipping. So for the duration of
``train()`` the callback wraps the trainer's ``_clip_grad_norm`` and ``_get_grad_norm`` (instance
attributes, removed again in ``on_train_end``): whichever of the two runs first in a step adds the penalty
(under DeepSpeed it only collects the value the engine step added), so the penalty gradient is added exactly
once per optimizer step, to the complete accumulated gradient, before clipping, and counts in the logged
``grad_norm`` exactly like a loss term. With an fp16 ``GradScaler`` the gradients are still scaled at that
point (accelerate unscales inside its ``clip_grad_norm_``), so the penalty gradient is scaled by the same
factor; the scale is a power of two, so unscaling gives exactly the unscaled penalty gradient. If a trainer
subclass bypasses both methods, ``on_pre_optimizer_step`` applies it (after clipping) and warns once.

Transformers does not hand the trainer to callbacks, so ``on_train_begin`` finds it on the call stack (the
``Trainer`` whose callback list holds this callback); ``callback.bind(trainer)`` makes that explicit.

Checkpoints: ``on_save`` writes ``<output_dir>/checkpoint-<step>/hbat_ewc.pt`` (one process, DDP: rank 0) or,
on sharded models, ``hbat_ewc-rank<r>.pt`` on every rank (its anchor partition), each atomically.
``trainer.train(resume_from_checkpoint=...)`` (a path or True) restores it in ``on_train_begin`` after binding,
before the stage logic runs; ``callback.load(dir)`` restores it by hand (a per-rank state is loaded when
``train()`` has bound the HybridEWC, e.g. to continue in a new process with the next stage).

Metrics: ``ewc/penalty`` (the mean penalty over the optimizer steps of the logging window, read from the
device once per log) and ``ewc/importance_entropy`` are added to the trainer's training logs, together with
the stage-boundary metrics of ``begin_stage`` at the first log. They are added in ``Trainer.log`` itself
(wrapped like the clipping call), not in ``on_log``: ``Trainer.log`` copies the logs into
``state.log_history`` before ``on_log``, and the reporting callbacks (wandb, tensorboard, the printer) run
their ``on_log`` before a user callback's, so keys added there would reach neither.

The forgetting meter (``kl_batch``, ``kl_every``): every ``kl_every`` optimizer steps, ``ewc/kl_to_start`` and
``ewc/kl_to_start_reverse`` (``hbat.averaging.kl``: the exact token-level KL between the start model of this
``train()`` and the current one on a fixed held-out batch of the task's data) join the next training log. The
start weights are a copy of this rank's share taken when ``train()`` starts (``kl_start_device="cpu"`` keeps it
in host memory), swapped into the live model for one forward and back, exactly; nothing is gathered.

With ``Trainer(optimizers=(hbat.HybridAdamW(model, ewc, ...), None))`` the optimizer adds the penalty gradient
inside its step: the callback then adds none itself (no ``apply_()``), and keeps the stage boundaries, the
checkpoints and ``ewc/penalty`` (the optimizer's ``last_penalty`` of each step). Single process or DDP only,
as HybridAdamW is.

If ``train()`` raises, the wrappers stay on that trainer instance until its next ``train()`` with the
callback. Refused at ``train()`` start, with an error naming the setting: see ``hbat.integrations.accelerate``.
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch
from transformers import Trainer, TrainerCallback

from ..averaging.kl import kl_to_start
from ..averaging.shards import WeightShards
from ..importance import importance_entropy
from ..optim import HybridAdamW
from ..param_view import LocalParamView, UnboundView
from .accelerate import PreparedEWC

__all__ = ["HybridEWCCallback", "release_trainer", "STATE_FILE"]

STATE_FILE = "hbat_ewc.pt"
_WRAPPED = ("_clip_grad_norm", "_get_grad_norm", "log")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def rank_state_file() -> str:
    """The file of this rank's HybridEWC state on sharded models (its anchor partition)."""
    return f"hbat_ewc-rank{_rank()}.pt"


def release_trainer(trainer: Trainer) -> None:
    """Free a finished Trainer's engine so that the next Trainer of Algorithm 1 can run in this process.

    Under DeepSpeed a second Trainer fails in accelerate ("You cannot pass in a `deepspeed_plugin` when creating
    a second `Accelerator`"), and the finished engine keeps its gradient hooks on the model. This destroys the
    engine (``accelerator.free_memory()``), drops the trainer's references to it and, under DeepSpeed, resets
    accelerate's process-wide state (its ``AcceleratorState._reset_state``, which accelerate's own tests use for
    this). The model keeps its trained weights (under ZeRO-3 still partitioned, for the next engine). Call it
    after you are done with ``trainer`` (e.g. after ``trainer.save_model()``); a no-op beyond freeing otherwise.
    An ``AveragingCallback`` of the trainer lets go of the model and its start copy here too.
    """
    for callback in trainer.callback_handler.callbacks:
        if getattr(callback, "_hbat_releases_with_trainer", False):
            callback.close()
    deepspeed = bool(getattr(trainer, "is_deepspeed_enabled", False))
    trainer.accelerator.free_memory()
    trainer.model_wrapped, trainer.optimizer, trainer.lr_scheduler = trainer.model, None, None
    if deepspeed:
        from accelerate.state import AcceleratorState

        trainer.deepspeed = None
        AcceleratorState._reset_state()


def _find_trainer_frame(callback) -> tuple[Trainer | None, str | None]:
    """The Trainer whose callback list holds ``callback``, and the checkpoint its ``train()`` resumes from."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
                resume = frame.f_locals.get("resume_from_checkpoint")  # a local of Trainer._inner_training_loop
                return owner, resume if isinstance(resume, (str, os.PathLike)) else None
            frame = frame.f_back
        return None, None
    finally:
        del frame


class HybridEWCCallback(TrainerCallback):
    """Applies ``ewc``'s penalty gradient in a ``transformers.Trainer`` run, logs it, checkpoints ``ewc``.

    Args:
        ewc: a ``hbat.HybridEWC`` built on the model the trainer trains (after any PEFT wrapping). Under
            DeepSpeed or FSDP2 it is bound to the run's engine / sharded model when ``train()`` starts.
        objective: if given, ``ewc.begin_stage(objective)`` runs at the start of training (unless ``ewc`` is
            already in that stage, e.g. restored from a checkpoint or continued by a second ``train()``), so
            one ``Trainer`` run is one stage of Algorithm 1. Without it the stages are the caller's business.
        kl_batch / kl_every / kl_start_device: the forgetting meter (module docstring): a fixed batch (a dict
            of tensors, rows split over the ranks), its period in optimizer steps, where the start copy lives.
    """

    def __init__(self, ewc, objective: str | None = None, *, kl_batch=None, kl_every: int | None = None,
                 kl_start_device=None):
        for attr in ("apply_", "begin_stage", "bind", "state_dict", "load_state_dict", "objectives"):
            if not hasattr(ewc, attr):
                raise TypeError(f"ewc must be a hbat.HybridEWC (it has no {attr!r}), got {type(ewc).__name__}")
        if objective is not None and objective not in ewc.objectives:
            raise ValueError(f"unknown objective {objective!r}; this HybridEWC has objectives {ewc.objectives}")
        if (kl_batch is None) != (kl_every is None) or (kl_every is not None and (
                isinstance(kl_every, bool) or not isinstance(kl_every, int) or kl_every < 1)):
            raise ValueError("the forgetting meter needs kl_batch (a dict of tensors) and kl_every (a positive int)")
        self.ewc = ewc
        self.objective = objective
        self._kl_options, self._kl_shards, self._kl_metrics = (kl_batch, kl_every, kl_start_device), None, {}
        self.trainer: Trainer | None = None
        self._bound_explicitly = False
        self._originals: dict[str, object] = {}
        self._prepared: PreparedEWC | None = None
        self._pending_load: str | os.PathLike | None = None
        self._applied_step: int | None = None
        self._fused: HybridAdamW | None = None  # the trainer's optimizer, when it adds the penalty in its step
        self._warned_late = False
        self._reset_window()
        self._stage_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ wiring
    def bind(self, trainer: Trainer) -> "HybridEWCCallback":
        """Use ``trainer`` instead of finding it on the call stack in ``on_train_begin``."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind() needs a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer, self._bound_explicitly = trainer, True
        return self

    def _install(self, trainer: Trainer) -> None:
        self._uninstall()
        other = getattr(trainer, "_hbat_ewc_callback", None)
        if other is not None and other is not self:
            other._uninstall()  # left over from an interrupted run; one callback owns the wrappers
        for name in _WRAPPED:
            self._originals[name] = (trainer.__dict__.get(name), name in trainer.__dict__, getattr(trainer, name))
        clip, norm, log = (self._originals[n][2] for n in _WRAPPED)

        def clip_grad_norm(model, *args, **kwargs):
            self._apply_once()
            return clip(model, *args, **kwargs)

        def get_grad_norm(model, *args, **kwargs):
            self._apply_once()
            return norm(model, *args, **kwargs)

        def log_with_ewc(logs, *args, **kwargs):
            if "loss" in logs:  # training logs only (eval logs have eval_ keys, the final summary train_loss)
                logs.update(self.metrics())
            return log(logs, *args, **kwargs)

        trainer._clip_grad_norm, trainer._get_grad_norm, trainer.log = clip_grad_norm, get_grad_norm, log_with_ewc
        trainer._hbat_ewc_callback = self
        self.trainer = trainer

    def _uninstall(self) -> None:
        self._kl_shards = None
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None
        trainer = self.trainer
        if trainer is None or not self._originals:
            return
        for name, (value, was_instance_attr, _) in self._originals.items():
            if was_instance_attr:
                setattr(trainer, name, value)
            else:
                trainer.__dict__.pop(name, None)
        if trainer.__dict__.get("_hbat_ewc_callback") is self:
            del trainer._hbat_ewc_callback
        self._originals = {}

    # ------------------------------------------------------------------ the penalty
    def _apply_once(self, grad_scale=None) -> None:
        step = self.trainer.state.global_step
        if self._fused is not None or self._applied_step == step:
            return
        self._applied_step = step
        self._add_penalty(self._prepared.apply_(grad_scale=grad_scale).detach())

    def _add_penalty(self, penalty: torch.Tensor) -> None:
        self._penalty_sum = penalty if self._penalty_sum is None else self._penalty_sum + penalty
        self._penalty_steps += 1

    def _reset_window(self) -> None:
        self._penalty_sum: torch.Tensor | None = None
        self._penalty_steps = 0

    def metrics(self) -> dict[str, float]:
        """``ewc/penalty`` (mean since the last call) and ``ewc/importance_entropy``; starts a new window."""
        out = dict(self._stage_metrics)
        self._stage_metrics = {}
        if self._penalty_steps:
            out["ewc/penalty"] = float(self._penalty_sum) / self._penalty_steps  # one host sync per log
        out["ewc/importance_entropy"] = importance_entropy(self.ewc.importance)
        out.update(self._kl_metrics)
        self._kl_metrics = {}
        self._reset_window()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _state_file(self) -> str:
        return STATE_FILE if isinstance(self.ewc.view, LocalParamView) else rank_state_file()

    def save(self, checkpoint_dir: str | os.PathLike) -> str:
        """Write the ewc state into ``checkpoint_dir`` atomically; returns the file's path."""
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(checkpoint_dir, self._state_file())
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:  # on disk before the rename, so a crash leaves the old file or the new one
            torch.save(self.ewc.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def load(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore the ewc state saved by ``save()`` / ``on_save`` in ``checkpoint_dir``.

        A per-rank state (``hbat_ewc-rank<r>.pt``: saved under DeepSpeed or FSDP2) is loaded when ``train()``
        has bound the HybridEWC to its engine, if it is not bound to one yet."""
        view = self.ewc.view
        not_yet_sharded = isinstance(view, LocalParamView) or (isinstance(view, UnboundView) and view.pending)
        if not_yet_sharded and not os.path.isfile(os.path.join(checkpoint_dir, self._state_file())) \
                and os.path.isfile(os.path.join(checkpoint_dir, rank_state_file())):
            self._pending_load = checkpoint_dir
            return
        self._load_now(checkpoint_dir)

    def _load_now(self, checkpoint_dir) -> None:
        path = os.path.join(checkpoint_dir, self._state_file())
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HybridEWC state {path!r}; was the checkpoint saved with HybridEWCCallback "
                                    "(and, on sharded models, with the same number of ranks)?")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, corrupt or not a tensor-only file: name it, never unpickle it
            raise ValueError(f"cannot load HybridEWC state {path!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from err
        self.ewc.load_state_dict(state)

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        trainer, resume = _find_trainer_frame(self)
        if self._bound_explicitly:
            trainer = self.trainer
        if trainer is None:
            raise RuntimeError("HybridEWCCallback could not find its Trainer on the call stack; "
                               "call callback.bind(trainer) before trainer.train()")
        self._uninstall()
        # the run's engine / sharded model exists from here on: bind to it (refuses unsupported setups)
        prepared = PreparedEWC(self.ewc, trainer.model_wrapped, scaler=getattr(trainer.accelerator, "scaler", None),
                               parallelism_config=getattr(trainer.accelerator, "parallelism_config", None))
        try:
            if resume is None and state.global_step > 0:  # resumed, not through train(resume_from_checkpoint=)
                resume = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if resume is not None:
                if os.path.isfile(os.path.join(resume, self._state_file())):
                    self._load_now(resume)
                else:
                    warnings.warn(f"resuming from {resume!s} without a HybridEWC state ({self._state_file()}); "
                                  "the ewc keeps its current anchor and importance", stacklevel=2)
            elif self._pending_load is not None:
                self._load_now(self._pending_load)
            self._pending_load = None
            self._fused = self._fused_optimizer(trainer)
            # the forgetting meter's start: a copy of this rank's share of the weights at this train()
            kl_shards = None if self._kl_options[1] is None else \
                WeightShards(trainer.model_wrapped, start_device=self._kl_options[2])
            if self.objective is not None and self.ewc.objective != self.objective:
                self._stage_metrics = self.ewc.begin_stage(self.objective)
        except BaseException:
            prepared.close()
            raise
        self._applied_step = None
        self._reset_window()
        self._install(trainer)
        self._prepared, self._kl_shards = prepared, kl_shards

    def _fused_optimizer(self, trainer: Trainer) -> HybridAdamW | None:
        """The trainer's HybridAdamW (under accelerate's wrapper), checked to hold this callback's ewc."""
        optimizer = getattr(trainer, "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if not isinstance(optimizer, HybridAdamW):
            return None
        if optimizer.ewc is not self.ewc:
            raise ValueError("the trainer's HybridAdamW adds the penalty of another HybridEWC than this callback's; "
                             "build both on the same ewc")
        optimizer.ewc.fused_terms()  # refuses the HybridEWC the run has sharded (DeepSpeed, FSDP2) now
        return optimizer

    def on_step_end(self, args, state, control, **kwargs):
        if self._fused is not None:
            self._add_penalty(self._fused.last_penalty.detach())
        batch, every, _ = self._kl_options
        if self._kl_shards is not None and state.global_step % every == 0:
            kl = kl_to_start(self._kl_shards, batch)
            self._kl_metrics = {"ewc/kl_to_start": kl["kl_to_start"], "ewc/kl_to_start_reverse": kl["kl_to_start_reverse"]}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._prepared is None or self._fused is not None or self._applied_step == state.global_step:
            return
        if not self._warned_late:  # a trainer subclass bypassed _clip_grad_norm and _get_grad_norm
            warnings.warn("HybridEWCCallback: the trainer did not call _clip_grad_norm/_get_grad_norm; the penalty "
                          "gradient is added in on_pre_optimizer_step, after gradient clipping", stacklevel=2)
            self._warned_late = True
        self._apply_once(grad_scale=1.0)  # gradients are unscaled by now

    def on_save(self, args, state, control, **kwargs):
        if isinstance(self.ewc.view, LocalParamView) and not args.should_save:
            return
        self.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()
