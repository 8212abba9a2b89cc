"""hbat.HybridEWC: the anchor, the accumulated change of each objective, the importance and the penalty.

    ewc = hbat.HybridEWC(model, f_max=100, lam=1)
    for objective, loader in stages:           # e.g. ("ifa", sft_part_1), ("hpa", dpo_part_1), ...
        ewc.begin_stage(objective)             # eq. (7)/(10) for the stage that ended; F for this one
        for batch in loader:
            loss = compute_loss(model, batch)  # divide by the accumulation steps as usual
            loss.backward()
            ewc.apply_()                       # once per optimizer step, before clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(); optimizer.zero_grad()

``apply_()`` adds ``lam * F_i * (p - anchor)`` to every selected gradient in one fused pass, exactly the
gradient of eq. (5)/(8) as a loss term; ``penalty()`` is the same penalty as a differentiable scalar.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import ops
from ._ewc_state import check_state
from .importance import DEFAULT_IMPORTANCE_MODE, check_mode, compute_importance, importance_entropy
from .ops import _validate as V
from .ops._dispatch import resolve
from .param_view import LocalParamView, UnitGroups, unwrap_model

__all__ = ["HybridEWC"]

STATE_VERSION = 1


def _make_view(model_or_named_params, include, exclude):
    from .distributed import is_deepspeed_engine, param_view

    target = model_or_named_params
    if isinstance(target, torch.nn.Module) or is_deepspeed_engine(target):
        view = param_view(target, include=include, exclude=exclude)  # ZeRO-1/2/3 or FSDP2: sharded
        if view is not None:
            return view
        if is_deepspeed_engine(target):
            target = target.module  # no ZeRO: every rank holds all parameters and reduced gradients
    if isinstance(target, torch.nn.Module):
        return LocalParamView(unwrap_model(target).named_parameters(), include=include, exclude=exclude)
    if isinstance(target, (str, bytes, torch.Tensor)) or not isinstance(target, Iterable):
        raise TypeError("HybridEWC needs an nn.Module, a DeepSpeed engine or an iterable of (name, parameter) pairs, "
                        f"not {type(target).__name__}")
    pairs = list(target)
    for i, item in enumerate(pairs):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"named parameters entry {i} is {type(item).__name__}; expected a (name, tensor) pair")
    return LocalParamView(pairs, include=include, exclude=exclude)


class HybridEWC:
    """Alternating-objective EWC of HBAT over the selected parameters of a model.

    Args:
        model_or_named_params: an ``nn.Module`` (torch.compile / DDP wrappers are unwrapped), an iterable of
            ``(name, parameter)`` pairs, or a DeepSpeed engine (ZeRO-1/2/3: sharded, see hbat.distributed).
        f_max: F_max of eq. (6)/(9); the importance of all units sums to it. Paper: 50 or 100.
        lam: lambda of eq. (5)/(8); penalty = sum_i lam/2 * F_i * ||p_i - anchor_i||^2.
        importance_mode: "normalized" (default), "paper", "released", "proportional" or "uniform"; see
            ``hbat.importance``. The default is scale-invariant, unlike the paper's literal formula (nearly
            uniform) and the released code (one-hot).
        importance_scale: temperature of the mode (larger = more peaked).
        anchor_dtype: float32 (default) or bfloat16 (half the memory; the anchor rounding then counts as change).
        include, exclude: fnmatch globs (or compiled regexes) on parameter names. Only parameters with
            ``requires_grad`` are seen, so a PEFT / LoRA model penalises its trainable adapters by default.
        group_by: None (one unit per tensor, as the paper), "layer" (one per transformer block) or a callable
            name -> group name.
        objectives: names of the objectives; Algorithm 1 alternates "ifa" and "hpa".
        backend: hbat.ops backend ("auto" picks the fastest for the parameters' device).
    """

    def __init__(self, model_or_named_params, f_max: float = 100.0, lam: float = 1.0, *,
                 importance_mode: str = DEFAULT_IMPORTANCE_MODE, importance_scale: float = 1.0,
                 anchor_dtype: torch.dtype = torch.float32, include=None, exclude=None,
                 group_by: None | str | Callable[[str], str] = None, objectives: Iterable[str] = ("ifa", "hpa"),
                 backend: str = "auto"):
        self.f_max = V.check_scalar("f_max", f_max)
        self.lam = V.check_scalar("lam", lam)
        if self.f_max < 0 or self.lam < 0:
            raise ValueError(f"f_max and lam must be >= 0, got f_max={self.f_max}, lam={self.lam}")
        self.importance_mode = check_mode(importance_mode)
        self.importance_scale = V.check_scalar("importance_scale", importance_scale)
        if anchor_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"anchor_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {anchor_dtype}")
        self.objectives = tuple(objectives)
        if len(self.objectives) < 2 or len(set(self.objectives)) != len(self.objectives) \
                or not all(isinstance(o, str) and o for o in self.objectives):
            raise ValueError(f"objectives must be at least two distinct non-empty names, got {self.objectives!r}")
        self.backend = backend
        self.view = _make_view(model_or_named_params, include, exclude)
        self.groups = UnitGroups(self.view.unit_names, self.view.unit_numel, group_by)
        params = self.view.params()
        self.device = params[0].device if params else torch.device("cpu")
        self._backend_module = resolve(backend, self.device)[1]
        with torch.no_grad():
            self.anchors = [p.detach().to(anchor_dtype, copy=True, memory_format=torch.contiguous_format)
                            for p in params]
        n = len(self.groups)
        self.accumulated = {o: torch.zeros(n, dtype=torch.float64) for o in self.objectives}
        self.stages_done = {o: 0 for o in self.objectives}
        self.objective: str | None = None
        self.history: list[dict] = []
        self.last_change = torch.zeros(n, dtype=torch.float64)
        self._set_importance(torch.zeros(n, dtype=torch.float32))

    # ------------------------------------------------------------------ names and state of the stage
    @property
    def unit_names(self) -> list[str]:
        """One name per importance unit (a tensor, or a group of tensors with ``group_by``)."""
        return self.groups.names

    @property
    def active(self) -> bool:
        """Whether the current stage is penalised (False in the first stage and before any stage)."""
        return self._active

    def _set_importance(self, F: torch.Tensor) -> None:
        self.importance = F.to(torch.float32).cpu()
        self._active = bool((self.importance != 0).any()) and self.lam != 0
        fragment_group = [self.groups.unit_group[u] for u in self.view.fragment_unit]
        per_fragment = self.importance[torch.tensor(fragment_group, dtype=torch.long)] if fragment_group \
            else torch.zeros(0)
        # lam * F_i per fragment, on the parameters' device once per stage: apply_() then never syncs
        self._coef = (self.lam * per_fragment.double()).to(torch.float32).to(self.device)

    def _change_since_anchor(self, refresh: bool) -> torch.Tensor:
        """Per-group mean squared change since the anchor (eq. 7), float64; optionally anchor <- params."""
        params = self.view.params()
        with torch.no_grad():
            if refresh:
                sums = ops.snapshot_(params, self.anchors, reduction="sum", backend=self.backend)
            else:
                sums = ops.squared_change(params, self.anchors, reduction="sum", backend=self.backend)
        unit = self.view.all_reduce_(self.view.unit_sums(sums))  # every rank calls it: no rank may skip
        numel = torch.tensor([max(n, 1) for n in self.groups.numel], dtype=torch.float64)
        return self.groups.group_sums(unit) / numel

    @torch.no_grad()
    def begin_stage(self, objective: str) -> dict[str, float]:
        """Stage boundary of Algorithm 1: returns metrics of the stage that ended and of the importance.

        Measures the change C of the stage that just ended (one fused pass that also refreshes the
        anchor), adds it to that objective's accumulated change, and sets F for ``objective`` from the
        accumulated change of the OTHER objectives (no penalty until one of them has completed a stage).
        """
        if objective not in self.objectives:
            raise ValueError(f"unknown objective {objective!r}; this HybridEWC has objectives {self.objectives}")
        change = self._change_since_anchor(refresh=True)
        ended = self.objective
        if ended is not None:
            self.accumulated[ended] += change
            self.stages_done[ended] += 1
            self.last_change = change
        others = [o for o in self.objectives if o != objective and self.stages_done[o] > 0]
        if others:
            acc = sum(self.accumulated[o] for o in others)
            F = compute_importance(acc, self.f_max, self.importance_mode, self.importance_scale)
        else:
            F = torch.zeros(len(self.groups), dtype=torch.float32)
        self._set_importance(F)
        self.objective = objective
        metrics = {
            "ewc/change_mean": float(change.mean()) if change.numel() else 0.0,
            "ewc/change_max": float(change.max()) if change.numel() else 0.0,
            "ewc/importance_entropy": importance_entropy(F),
            "ewc/importance_max": float(F.max()) if F.numel() else 0.0,
            "ewc/active": float(self._active),
        }
        self.history.append({"ended": ended, "began": objective, **metrics})
        return metrics

    @torch.no_grad()
    def end_stage(self) -> dict[str, float]:
        """Close the current stage without starting another (its change still counts); F becomes 0."""
        if self.objective is None:
            return {}
        change = self._change_since_anchor(refresh=True)
        self.accumulated[self.objective] += change
        self.stages_done[self.objective] += 1
        self.last_change = change
        self.history.append({"ended": self.objective, "began": None, "ewc/change_mean": float(change.mean())})
        self.objective = None
        self._set_importance(torch.zeros(len(self.groups), dtype=torch.float32))
        return {"ewc/change_mean": float(change.mean()) if change.numel() else 0.0}

    # ------------------------------------------------------------------ the penalty
    @torch.no_grad()
    def apply_(self, grad_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Add the penalty gradient to ``.grad`` of every selected parameter; return the penalty (0-dim tensor).

        Call once per optimizer step, after the last micro-batch's backward and before gradient clipping.
        With a loss averaged over micro-batches (the usual ``loss / accumulation_steps``) this is exactly
        adding the penalty to the averaged loss. With an fp16 ``GradScaler`` call it after
        ``scaler.unscale_(optimizer)``, or pass ``grad_scale=scaler.get_scale()`` to call it before. No host
        synchronisation; under DeepSpeed ZeRO it adds to this rank's gradient partition (a no-op inside a
        gradient-accumulation window) and all-reduces the one-float penalty value.
        """
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        ready = getattr(self.view, "grads_ready", None)
        if ready is not None and not ready():
            return zero
        if not self._active:
            return zero
        # ZeRO's fp16 loss scale (view.grad_scale) and a user's GradScaler scale both multiply the gradient
        scale = grad_scale * float(getattr(self.view, "grad_scale", 1.0))
        params, grads = self.view.params(), self.view.grads()
        (params, anchors, grads), _ = V.check_lists(
            {"params": params, "anchors": self.anchors, "grads": grads},
            dtypes=V.REFERENCE_DTYPES if self._backend_module.__name__.endswith("reference") else V.NATIVE_DTYPES,
            need_contiguous=not self._backend_module.__name__.endswith("reference"), writable=("grads",))
        coef = self._coef if (not isinstance(scale, torch.Tensor) and scale == 1.0) else \
            (self._coef * scale).to(torch.float32)
        sums = self._backend_module.penalty_grad_(params, anchors, grads, coef)
        if hasattr(self.view, "grads_done_"):
            self.view.grads_done_()
        total = (0.5 * self._coef.to(sums.dtype) * sums).sum().to(torch.float32).reshape(1)
        if not isinstance(self.view, LocalParamView):
            self.view.all_reduce_(total)
        return total[0]

    def penalty(self) -> torch.Tensor:
        """The penalty of eq. (5)/(8) as a differentiable scalar (add it to the loss instead of ``apply_``)."""
        if not isinstance(self.view, LocalParamView):
            raise NotImplementedError("penalty() needs the full parameters; on sharded models use apply_()")
        if not self._active:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        coef = self._coef / self.lam  # = F per fragment
        return ops.ewc_penalty(self.view.params(), self.anchors, coef, self.lam, backend=self.backend)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume: anchors, accumulated changes, stage position, history, settings."""
        return {
            "version": STATE_VERSION,
            "unit_names": list(self.groups.names),
            "unit_numel": list(self.groups.numel),
            "fragment_names": list(self.view.fragment_names),
            "objectives": list(self.objectives),
            "objective": self.objective,
            "accumulated": {o: v.clone() for o, v in self.accumulated.items()},
            "stages_done": dict(self.stages_done),
            "importance": self.importance.clone(),
            "last_change": self.last_change.clone(),
            "history": [dict(h) for h in self.history],
            "anchors": [a.detach().clone() for a in self.anchors],
            "settings": {"f_max": self.f_max, "lam": self.lam, "importance_mode": self.importance_mode,
                         "importance_scale": self.importance_scale},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``. Checks everything first and says what differs; modifies nothing on error."""
        check_state(state, STATE_VERSION, names=self.groups.names, numel=self.groups.numel,
                    fragment_names=self.view.fragment_names, anchors=self.anchors, objectives=self.objectives)
        for anchor, saved in zip(self.anchors, state["anchors"]):
            anchor.copy_(saved.to(anchor.device))
        self.accumulated = {o: state["accumulated"][o].to(torch.float64).clone() for o in self.objectives}
        self.stages_done = {o: int(state["stages_done"][o]) for o in self.objectives}
        self.objective = state["objective"]
        self.history = [dict(h) for h in state["history"]]
        self.last_change = state["last_change"].to(torch.float64).clone()
        self._set_importance(state["importance"])

    def __repr__(self) -> str:
        return (f"HybridEWC(units={len(self.groups)}, fragments={len(self.anchors)}, f_max={self.f_max}, "
                f"lam={self.lam}, importance_mode={self.importance_mode!r}, objective={self.objective!r}, "
                f"active={self._active})")
