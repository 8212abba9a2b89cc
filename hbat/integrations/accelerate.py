"""``prepare_ewc``: the HybridEWC penalty in a loop prepared by accelerate (DDP, DeepSpeed ZeRO-1/2/3, FSDP2).

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ewc_step = prepare_ewc(accelerator, ewc, model)      # ewc = hbat.HybridEWC(model) built before prepare
    for objective, loader in stages:
        ewc.begin_stage(objective)
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model, batch))
                if accelerator.sync_gradients:
                    penalty = ewc_step.apply_()          # before clipping, once per optimizer step
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step(); optimizer.zero_grad()
    ewc_step.close()

Where the penalty gradient goes:

- DDP, one process: ``apply_()`` adds it to ``.grad`` (all-reduced by then: every rank adds the same).
- FSDP2 (``fully_shard``, accelerate's ``fsdp_version: 2``): the HybridEWC is bound to the sharded module and
  ``apply_()`` adds it to this rank's reduce-scattered gradient shard, before ``clip_grad_norm_``.
- DeepSpeed ZeRO-1/2/3: ``accelerator.backward`` runs ``engine.backward`` and then ``engine.step()``, which
  measures the norm, clips and steps, with no room for user code in between. ``prepare_ewc`` therefore binds
  the HybridEWC to the engine and wraps the ZeRO optimizer's ``step`` (an instance attribute, removed by
  ``close()``): the penalty gradient goes into this rank's reduced gradient partition before the norm (with
  optimizer offload, the per-tensor norms DeepSpeed took during backward are refreshed), clipping and the
  step. ``apply_()`` then only returns that step's penalty.

Nothing is gathered: per step one float (the penalty value) is all-reduced on sharded models, at a stage
boundary one float per parameter tensor. Refused with an error naming the setting: DeepSpeed without ZeRO
(stage 0: the engine clips before the optimizer step), pipeline and tensor parallelism, accelerate's tensor /
context / sequence parallelism, FSDP1, and what the sharded views refuse (NVMe offload, BF16_Optimizer, HSDP).
"""
from __future__ import annotations

import torch

from ..distributed import is_deepspeed_engine, is_fsdp2_module
from ..param_view import LocalParamView, UnboundView, unwrap_model

__all__ = ["prepare_ewc", "PreparedEWC"]


def prepare_ewc(accelerator, ewc, model) -> "PreparedEWC":
    """Bind ``ewc`` to ``model`` as ``accelerator.prepare`` returned it (a DeepSpeed engine, an FSDP2 or DDP
    module); see the module docstring. Call ``.apply_()`` on every optimizer step, ``.close()`` at the end."""
    return PreparedEWC(ewc, model, scaler=getattr(accelerator, "scaler", None),
                       parallelism_config=getattr(accelerator, "parallelism_config", None))


def _refuse_unsupported(model, parallelism_config) -> None:
    if parallelism_config is not None:
        used = [kind for kind in ("tp", "cp", "sp") if getattr(parallelism_config, f"{kind}_enabled", False)]
        if used:
            raise NotImplementedError(
                f"HybridEWC under accelerate's parallelism_config with {'/'.join(used)} parallelism: not supported "
                "(the parameters or gradients are split over more than the data-parallel ranks); use data "
                "parallelism only (DDP, DeepSpeed ZeRO, FSDP2 dp_shard)")
    if is_deepspeed_engine(model):
        stage = int(model.zero_optimization_stage())
        if stage == 0:
            raise NotImplementedError(
                "HybridEWC under DeepSpeed without ZeRO (zero_optimization.stage 0): not supported, the engine "
                "clips the gradients inside engine.step() before its optimizer runs, so the penalty would escape "
                "the clipping; use zero_optimization.stage 1, 2 or 3, or plain DDP (no DeepSpeed config)")
        if type(model).__name__ == "PipelineEngine" or int(getattr(model, "autotp_size", lambda: 1)() or 1) > 1:
            raise NotImplementedError("HybridEWC under DeepSpeed pipeline or tensor parallelism (tensor_parallel."
                                      "autotp_size > 1): not supported; use ZeRO data parallelism only")
        return
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in unwrap_model(model).modules()):
        raise NotImplementedError("HybridEWC under FSDP1 (FullyShardedDataParallel, flat parameters): not supported; "
                                  "use FSDP2 (accelerate fsdp_version: 2, or torch.distributed.fsdp.fully_shard)")


class PreparedEWC:
    """A HybridEWC bound to a prepared model; ``apply_()`` once per optimizer step (see the module docstring).

    Args:
        ewc: a ``hbat.HybridEWC`` built on the model before ``prepare`` (or on the prepared model).
        model: the prepared model: a DeepSpeed engine, an FSDP2 module, a DDP wrapper or a plain module.
        scaler: accelerate's fp16 ``GradScaler`` (``accelerator.scaler``), or None.
        parallelism_config: ``accelerator.parallelism_config`` (refused when it splits more than the data).
    """

    def __init__(self, ewc, model, *, scaler=None, parallelism_config=None):
        _refuse_unsupported(model, parallelism_config)
        self.ewc, self.scaler = ewc, scaler
        self.engine = model if is_deepspeed_engine(model) else None
        module = unwrap_model(model) if isinstance(model, torch.nn.Module) else model
        if self.engine is not None:
            ewc.bind(self.engine)  # ZeRO-1/2/3: this rank's partition of this engine
        elif is_fsdp2_module(module):
            ewc.bind(module)
        else:
            self._check_same_parameters(module)
        self._optimizer = self._original_step = None
        self._last: torch.Tensor | None = None
        if self.engine is not None:
            self._wrap_step(self.engine.optimizer)

    def _check_same_parameters(self, module) -> None:
        view = self.ewc.view
        if isinstance(view, UnboundView):
            raise ValueError(f"{type(module).__name__} is neither a DeepSpeed engine nor an FSDP2 module; " + view.reason)
        if isinstance(view, LocalParamView):
            trained = {id(p) for p in module.parameters()}
            foreign = [n for n, p in zip(view.fragment_names, view.params()) if id(p) not in trained]
            if foreign:
                raise ValueError(f"the HybridEWC was built on other parameters than the trainer's model (e.g. "
                                 f"{foreign[0]!r}); build it on the model you pass to the trainer")

    def _wrap_step(self, optimizer) -> None:
        original = optimizer.step

        def step_with_penalty(*args, **kwargs):
            self._last = self.ewc.apply_()  # after the boundary backward's reduction, before norm, clip, step
            return original(*args, **kwargs)

        self._optimizer, self._original_step = optimizer, vars(optimizer).get("step")
        optimizer.step = step_with_penalty

    def _grad_scale(self):
        """The fp16 GradScaler's scale while gradients are still scaled (accelerate unscales in clip_grad_norm_)."""
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0
        scale = getattr(self.scaler, "_scale", None)  # the device tensor: no host sync
        return scale if isinstance(scale, torch.Tensor) else self.scaler.get_scale()

    def apply_(self, grad_scale=None) -> torch.Tensor:
        """Add the penalty gradient (DeepSpeed: it was added inside ``engine.step``); return the penalty value.

        Call once per optimizer step after the last micro-batch's backward, before clipping. ``grad_scale``
        overrides the scale the gradients carry (default: the GradScaler's while it is enabled, else 1).
        """
        if self.engine is not None:
            last, self._last = self._last, None
            return last if last is not None else torch.zeros((), dtype=torch.float32, device=self.ewc.device)
        return self.ewc.apply_(grad_scale=self._grad_scale() if grad_scale is None else grad_scale)

    def close(self) -> None:
        """Remove the step wrapper and, under DeepSpeed, let go of the engine (``ewc.bind`` binds the next)."""
        if self._optimizer is not None:
            if self._original_step is None:
                vars(self._optimizer).pop("step", None)
            else:
                self._optimizer.step = self._original_step
            self._optimizer = self._original_step = None
        if self.engine is not None:
            self.ewc.unbind()
            self.engine = None
