"""``HybridEWCCallback``: the HBAT penalty in ``transformers.Trainer`` and TRL's SFT / DPO / reward trainers.

    ewc = hbat.HybridEWC(model, f_max=100, lam=1)
    for n in range(N):                                        # Algorithm 1, one trainer run per stage
        SFTTrainer(model, ..., callbacks=[HybridEWCCallback(ewc, objective="ifa")]).train()
        DPOTrainer(model, ..., callbacks=[HybridEWCCallback(ewc, objective="hpa")]).train()

When the penalty gradient is added. ``Trainer`` (transformers 5.x) runs, once per optimizer step after the
last micro-batch's backward: ``_clip_grad_norm`` (if ``max_grad_norm > 0``), ``_get_grad_norm``,
``on_pre_optimizer_step``, ``optimizer.step()``. The ``on_pre_optimizer_step`` callback therefore comes
AFTER clipping, and no callback runs between the last backward and clipping. So for the duration of
``train()`` the callback wraps the trainer's ``_clip_grad_norm`` and ``_get_grad_norm`` (instance
attributes, removed again in ``on_train_end``): whichever of the two runs first in a step calls
``ewc.apply_()``, so the penalty gradient is added exactly once per optimizer step, to the complete
accumulated gradient, before clipping, and counts in the logged ``grad_norm`` exactly like a loss term.
With ``max_grad_norm=0`` the trainer still calls ``_get_grad_norm`` before the step. With an fp16
``GradScaler`` the gradients are still scaled at that point (accelerate unscales inside its
``clip_grad_norm_``), so the penalty gradient is scaled by the same factor (``apply_(grad_scale=...)``);
the scale is a power of two, so unscaling gives exactly the unscaled penalty gradient. If a trainer
subclass bypasses both methods, ``on_pre_optimizer_step`` applies it (after clipping) and warns once.

Transformers does not hand the trainer to callbacks, so ``on_train_begin`` finds it on the call stack (the
``Trainer`` whose callback list holds this callback); ``callback.bind(trainer)`` makes that explicit.

Checkpoints: ``on_save`` writes ``<output_dir>/checkpoint-<step>/hbat_ewc.pt`` (temp file + ``os.replace``).
``trainer.train(resume_from_checkpoint=...)`` (a path or True) restores it in ``on_train_begin``, before
the stage logic runs; ``callback.load(checkpoint_dir)`` restores it by hand.

Metrics: ``ewc/penalty`` (the mean penalty over the optimizer steps of the logging window, read from the
device once per log) and ``ewc/importance_entropy`` are added to the trainer's training logs, together with
the stage-boundary metrics of ``begin_stage`` at the first log. They are added in ``Trainer.log`` itself
(wrapped like the clipping call), not in ``on_log``: ``Trainer.log`` copies the logs into
``state.log_history`` before ``on_log``, and the reporting callbacks (wandb, tensorboard, the printer) run
their ``on_log`` before a user callback's, so keys added there would reach neither.

If ``train()`` raises, the wrappers stay on that trainer instance until its next ``train()`` with the
callback. Not supported: DeepSpeed through ``Trainer`` (the engine clips and steps inside
``accelerator.backward``; use ``HybridEWC(engine)`` and ``apply_()`` in your own loop, see hbat.distributed).
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch
from transformers import Trainer, TrainerCallback

from ..importance import importance_entropy
from ..param_view import LocalParamView

__all__ = ["HybridEWCCallback", "STATE_FILE"]

STATE_FILE = "hbat_ewc.pt"
_WRAPPED = ("_clip_grad_norm", "_get_grad_norm", "log")


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
        ewc: a ``hbat.HybridEWC`` built on the model the trainer trains (after any PEFT wrapping).
        objective: if given, ``ewc.begin_stage(objective)`` runs at the start of training (unless ``ewc`` is
            already in that stage, e.g. restored from a checkpoint or continued by a second ``train()``), so
            one ``Trainer`` run is one stage of Algorithm 1. Without it the stages are the caller's business.
    """

    def __init__(self, ewc, objective: str | None = None):
        for attr in ("apply_", "begin_stage", "state_dict", "load_state_dict", "objectives"):
            if not hasattr(ewc, attr):
                raise TypeError(f"ewc must be a hbat.HybridEWC (it has no {attr!r}), got {type(ewc).__name__}")
        if objective is not None and objective not in ewc.objectives:
            raise ValueError(f"unknown objective {objective!r}; this HybridEWC has objectives {ewc.objectives}")
        self.ewc = ewc
        self.objective = objective
        self.trainer: Trainer | None = None
        self._bound_explicitly = False
        self._originals: dict[str, object] = {}
        self._applied_step: int | None = None
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

    def _check_model(self, trainer: Trainer) -> None:
        if getattr(trainer, "is_deepspeed_enabled", False):
            raise NotImplementedError(
                "HybridEWCCallback does not support DeepSpeed through transformers.Trainer: the engine clips and "
                "steps inside accelerator.backward, before any hook. Use HybridEWC(engine).apply_() in your loop.")
        view = getattr(self.ewc, "view", None)
        if isinstance(view, LocalParamView):
            trained = {id(p) for p in trainer.model.parameters()}
            foreign = [n for n, p in zip(view.fragment_names, view.params()) if id(p) not in trained]
            if foreign:
                raise ValueError(f"the HybridEWC was built on other parameters than the trainer's model "
                                 f"(e.g. {foreign[0]!r}); build it on the model you pass to the trainer")

    # ------------------------------------------------------------------ the penalty
    def _grad_scale(self):
        """The fp16 GradScaler's scale while gradients are still scaled (before accelerate unscales them)."""
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scale = getattr(scaler, "_scale", None)  # the device tensor: no host sync
        return scale if isinstance(scale, torch.Tensor) else scaler.get_scale()

    def _apply_once(self, grad_scale=None) -> None:
        step = self.trainer.state.global_step
        if self._applied_step == step:
            return
        self._applied_step = step
        penalty = self.ewc.apply_(grad_scale=self._grad_scale() if grad_scale is None else grad_scale).detach()
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
        self._reset_window()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _state_file(self) -> str:
        if isinstance(getattr(self.ewc, "view", None), LocalParamView):
            return STATE_FILE
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return f"hbat_ewc-rank{rank}.pt"  # sharded views: each rank saves its own anchor slices

    def save(self, checkpoint_dir: str | os.PathLike) -> str:
        """Write the ewc state into ``checkpoint_dir`` atomically; returns the file's path."""
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(checkpoint_dir, self._state_file())
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(self.ewc.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restore the ewc state saved by ``save()`` / ``on_save`` in ``checkpoint_dir``."""
        path = os.path.join(checkpoint_dir, self._state_file())
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HybridEWC state {path!r}; was the checkpoint saved with HybridEWCCallback?")
        self.ewc.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        trainer, resume = _find_trainer_frame(self)
        if self._bound_explicitly:
            trainer = self.trainer
        if trainer is None:
            raise RuntimeError("HybridEWCCallback could not find its Trainer on the call stack; "
                               "call callback.bind(trainer) before trainer.train()")
        self._check_model(trainer)
        if resume is None and state.global_step > 0:  # resumed, but not through train(resume_from_checkpoint=)
            resume = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if resume is not None:
            if os.path.isfile(os.path.join(resume, self._state_file())):
                self.load(resume)
            else:
                warnings.warn(f"resuming from {resume!s} without a HybridEWC state ({self._state_file()}); "
                              "the ewc keeps its current anchor and importance", stacklevel=2)
        if self.objective is not None and self.ewc.objective != self.objective:
            self._stage_metrics = self.ewc.begin_stage(self.objective)
        self._applied_step = None
        self._reset_window()
        self._install(trainer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer is None or self._applied_step == state.global_step:
            return
        if not self._warned_late:  # a trainer subclass bypassed _clip_grad_norm and _get_grad_norm
            warnings.warn("HybridEWCCallback: the trainer did not call _clip_grad_norm/_get_grad_norm; the penalty "
                          "gradient is added in on_pre_optimizer_step, after gradient clipping", stacklevel=2)
            self._warned_late = True
        self._apply_once(grad_scale=1.0)  # gradients are unscaled by now

    def on_save(self, args, state, control, **kwargs):
        if isinstance(getattr(self.ewc, "view", None), LocalParamView) and not args.should_save:
            return
        self.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()
