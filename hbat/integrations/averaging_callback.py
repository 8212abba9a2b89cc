"""``hbat.AveragingCallback``: in-place model averaging in ``transformers.Trainer`` and TRL's trainers.

    callback = hbat.AveragingCallback("uniform", alpha=0.5, kl_batch=heldout, kl_every=20,
                                      sweep=dict(ratios=[0, .25, .5, .75, 1, 1.25], evaluate=reward_of,
                                                 data=prompts, maximize=["reward"], table="out/sweep.json"))
    DPOTrainer(model, ..., callbacks=[callback]).train()   # theta <- 0.5 theta_start + 0.5 theta at the end
    callback.sweep_result.front                            # the ratios on the Pareto front

The start model is the weights when ``train()`` starts (or, when resuming, the start copy saved in the
checkpoint). The methods, the schedule (``every``, ``at_end``, ``ema_every``), the memory and what is refused
are those of ``hbat.integrations.averaging``; the same code runs in one process, under DDP, DeepSpeed
ZeRO-1/2/3 and FSDP2, on each rank's own shard, nothing gathered.

When. ``on_train_begin``: the run's prepared model (engine, FSDP2 or DDP module) exists; unsupported settings
and ratios that do not fit the model's layers are refused here, with one line, before any step. After every
optimizer step (``on_step_end``, before the Trainer logs and saves): the EMA anchor, every-K averaging and
the forgetting meter, whose ``ewc/kl_to_start`` / ``ewc/kl_to_start_reverse`` go into the next training log
(added inside ``Trainer.log``, as ``HybridEWCCallback`` does, so that the reporters see them).
``on_train_end``: the sweep (``sweep=``), then the final averaging (``at_end``), then a last meter reading in
``callback.final_metrics`` (also appended to ``trainer.state.log_history``).

Checkpoints. ``on_save`` writes ``checkpoint-<step>/hbat_average.pt`` (one process, DDP: rank 0) or
``hbat_average-rank<r>.pt`` on every rank of a sharded model, atomically, each with its sha256 beside it;
``train(resume_from_checkpoint=...)`` restores it (checksum, ``weights_only=True``). The final averaging
happens after the last checkpoint, so a run resumed from it averages again at its end; a sweep interrupted
in ``on_train_end`` resumes from its table (``table=``), reusing the rows it finished.

After ``train()`` the callback stays bound to the run's model: ``callback.prepared.sweep(...)``,
``.kl(...)``, ``.average_()`` still work, until ``callback.close()``, the next ``train()`` or
``release_trainer(trainer)``.
"""
from __future__ import annotations

import os

from transformers import Trainer, TrainerCallback

from .averaging import AveragingSpec, PreparedAveraging
from .transformers import _find_trainer_frame

__all__ = ["AveragingCallback"]

_SWEEP_KEYS = ("ratios", "evaluate", "data", "maximize", "minimize", "table", "plot")


class AveragingCallback(TrainerCallback):
    """Averages the trained weights with the start model in place (see the module docstring).

    Args:
        method: "uniform", "hma", "expo" or "ema" (``hbat.integrations.averaging``).
        alpha: uniform: the trained model's weight in [0, 1] (default 0.5); expo: a > 0; ema: the rate b.
        ratios / blocks / scope / non_layer: per-block ratios (method "hma") and the merge plan.
        every / at_end / ema_every: when to average (every K optimizer steps, at the end) and update the EMA.
        start_device: where the start copy lives (None: beside the weights; "cpu").
        kl_batch / kl_every: the forgetting meter's fixed held-out batch of the task's data, and its period.
        sweep: a dict of ``hbat.averaging.run_sweep`` arguments (ratios, evaluate, data, maximize, minimize,
            table, plot), run at the end of training before the final averaging.
        include / exclude / backend: parameter selection and ``hbat.ops`` backend.
    """

    _hbat_releases_with_trainer = True  # release_trainer() closes it

    def __init__(self, method: str = "uniform", alpha: float | None = None, *, ratios=None, blocks=None,
                 scope: str = "all", non_layer: str = "attach", every: int | None = None, at_end: bool = True,
                 ema_every: int = 1, start_device=None, kl_batch=None, kl_every: int | None = None,
                 sweep: dict | None = None, include=None, exclude=None, backend: str = "auto"):
        self.spec = AveragingSpec(method, alpha, ratios, blocks, scope, non_layer, every, at_end, ema_every)
        if (kl_batch is None) != (kl_every is None):
            raise ValueError("the forgetting meter needs both kl_batch (a dict of tensors) and kl_every (steps)")
        if sweep is not None:
            if not isinstance(sweep, dict) or "ratios" not in sweep or "evaluate" not in sweep \
                    or set(sweep) - set(_SWEEP_KEYS):
                raise ValueError(f"sweep must be a dict with ratios and evaluate (keys among {_SWEEP_KEYS}), got "
                                 f"{sorted(sweep) if isinstance(sweep, dict) else type(sweep).__name__}")
            if not callable(sweep["evaluate"]):
                raise TypeError("sweep['evaluate'] must be callable (model, share) -> dict of numbers")
        self._options = dict(start_device=start_device, kl_batch=kl_batch, kl_every=kl_every, include=include,
                             exclude=exclude, backend=backend)
        self._sweep = sweep
        self.prepared: PreparedAveraging | None = None
        self.trainer: Trainer | None = None
        self._bound_explicitly = False
        self.sweep_result = None
        self.final_metrics: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        self._log_wrapper = None

    def bind(self, trainer: Trainer) -> "AveragingCallback":
        """Use ``trainer`` instead of finding it on the call stack in ``on_train_begin``."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind() needs a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer, self._bound_explicitly = trainer, True
        return self

    # ------------------------------------------------------------------ logs
    def _install_log(self, trainer: Trainer) -> None:
        original = trainer.log
        if getattr(original, "_hbat_averaging_of", None) is self:  # left by an interrupted run: unwrap it
            original = original.__wrapped__

        def log_with_metrics(logs, *args, **kwargs):
            if log_with_metrics.active and "loss" in logs and self._pending:
                logs.update(self._pending)
                self._pending = {}
            return original(logs, *args, **kwargs)

        log_with_metrics.active, log_with_metrics.__wrapped__ = True, original
        log_with_metrics._hbat_averaging_of = self
        trainer.log, self._log_wrapper = log_with_metrics, log_with_metrics

    def _uninstall_log(self) -> None:
        wrapper, trainer = self._log_wrapper, self.trainer
        if wrapper is None:
            return
        wrapper.active = False  # a pass-through if another wrapper still holds it
        if trainer is not None and trainer.__dict__.get("log") is wrapper:
            original = wrapper.__wrapped__
            if getattr(original, "__self__", None) is trainer and original.__func__ is type(trainer).log:
                trainer.__dict__.pop("log")  # the class's method again, as before train()
            else:
                trainer.log = original
        self._log_wrapper = None

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        trainer, resume = _find_trainer_frame(self)
        if self._bound_explicitly:
            trainer = self.trainer
        if trainer is None:
            raise RuntimeError("AveragingCallback could not find its Trainer on the call stack; call "
                               "callback.bind(trainer) before trainer.train()")
        self.close()
        # the run's engine / sharded model exists from here on; unsupported settings are refused here
        prepared = PreparedAveraging(trainer.model_wrapped, self.spec,
                                     parallelism_config=getattr(trainer.accelerator, "parallelism_config", None),
                                     **self._options)
        try:
            if self._sweep is not None:
                for i, ratio in enumerate(self._sweep["ratios"]):
                    prepared.averager.check(ratio, what=f"sweep ratios[{i}]")
            if resume is None and state.global_step > 0:  # resumed, not through train(resume_from_checkpoint=)
                resume = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if resume is not None:
                prepared.load(resume, missing_ok=True)
        except BaseException:
            prepared.close()
            raise
        self.trainer, self.prepared, self.sweep_result, self.final_metrics = trainer, prepared, None, {}
        self._pending = {}
        self._install_log(trainer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.prepared is not None:
            self._pending.update(self.prepared.step(state.global_step))

    def on_save(self, args, state, control, **kwargs):
        if self.prepared is None or (self.prepared.shards.kind == "local" and not args.should_save):
            return
        self.prepared.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall_log()
        if self.prepared is None:
            return
        if self._sweep is not None:
            self.sweep_result = self.prepared.sweep(**self._sweep)
        self.prepared.finish(state.global_step)
        if self.prepared.kl_every is not None:
            self.final_metrics = self.prepared.kl()
            state.log_history.append({"step": state.global_step, **self.final_metrics})

    def close(self) -> None:
        """Let go of the run's model and the start copy (``release_trainer`` calls it)."""
        self._uninstall_log()
        if self.prepared is not None:
            self.prepared.close()
            self.prepared = None
