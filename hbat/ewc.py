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

import numbers
import weakref
from typing import Callable, Iterable

import torch

from . import ops
from ._ewc_state import check_state
from .importance import DEFAULT_IMPORTANCE_MODE, IMPORTANCE_MODES, compute_importance, importance_entropy
from .ops import validate as V
from .param_view import LocalParamView, UnboundView, UnitGroups, make_view, module_of, relayout

__all__ = ["HybridEWC", "L2SP"]

STATE_VERSION = 1
L2SP = "l2sp"  # importance_mode: F_i = 1 for every unit from the first stage on (decay toward the anchor)

UNBOUND = (
    "this HybridEWC is not bound to live parameters: the DeepSpeed engine it followed finished training "
    "(HybridEWCCallback lets go of it at the end of train(), so that it can be freed); call ewc.bind(engine) "
    "with the next engine (the callback does at the next train())"
)


def _check_grad_scale(value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"grad_scale must be a float or a one-element float tensor, got {value.dtype} "
                             f"{tuple(value.shape)}")
        return value  # a GradScaler's on-device scale: used as it is, never read back (no host sync)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"grad_scale must be a real number or a one-element tensor, not {type(value).__name__}")
    scale = V.check_scalar("grad_scale", value)
    if scale <= 0:
        raise ValueError(f"grad_scale must be > 0, got {scale}")
    return scale


class HybridEWC:
    """Alternating-objective EWC of HBAT over the selected parameters of a model.

    Args:
        model_or_named_params: an ``nn.Module`` (torch.compile / DDP wrappers are unwrapped), an iterable of
            ``(name, parameter)`` pairs, a DeepSpeed engine (ZeRO-1/2/3) or an FSDP2 module (sharded, see
            hbat.distributed). A module that ZeRO-3 has partitioned already (``zero.Init``) gives names and
            sizes only, until ``bind(engine)``. The anchors are taken at the first ``begin_stage``.
        f_max: F_max of eq. (6)/(9); the importance of all units sums to it. Paper: 50 or 100.
        lam: lambda of eq. (5)/(8); penalty = sum_i lam/2 * F_i * ||p_i - anchor_i||^2.
        importance_mode: "normalized" (default), "paper", "released", "proportional" or "uniform"; see
            ``hbat.importance``. The default is scale-invariant, unlike the paper's literal formula (nearly
            uniform) and the released code (one-hot). "l2sp": F_i = 1 for every unit in every stage, the first
            included, so the penalty is ``lam/2 * ||theta - anchor||^2`` and its gradient ``lam * (theta -
            anchor)``: L2-SP (decay toward the start model) when the anchor is the start, i.e. in one stage.
            ``f_max`` is not used. ("uniform" differs: f_max / n per unit, and no penalty in the first stage.)
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
        if importance_mode != L2SP and importance_mode not in IMPORTANCE_MODES:
            raise ValueError(f"importance_mode must be one of {IMPORTANCE_MODES + (L2SP,)}, got {importance_mode!r}")
        self.importance_mode = importance_mode
        self.importance_scale = V.check_scalar("importance_scale", importance_scale)
        if anchor_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"anchor_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {anchor_dtype}")
        self.objectives = tuple(objectives)
        if len(self.objectives) < 2 or len(set(self.objectives)) != len(self.objectives) \
                or not all(isinstance(o, str) and o for o in self.objectives):
            raise ValueError(f"objectives must be at least two distinct non-empty names, got {self.objectives!r}")
        self.backend = backend
        self.anchor_dtype = anchor_dtype
        self._selection = (include, exclude)
        self.view = make_view(model_or_named_params, include, exclude)
        module = module_of(model_or_named_params)
        self._module = weakref.ref(module) if module is not None else None
        self.groups = UnitGroups(self.view.unit_names, self.view.unit_numel, group_by)
        self._anchors: list[torch.Tensor] | None = None  # taken at the first stage boundary (or loaded)
        n = len(self.groups)
        self.accumulated = {o: torch.zeros(n, dtype=torch.float64) for o in self.objectives}
        self.stages_done = {o: 0 for o in self.objectives}
        self.objective: str | None = None
        self.history: list[dict] = []
        self.last_change = torch.zeros(n, dtype=torch.float64)
        self.apply_count = 0  # apply_() calls so far (hbat.optim.HybridAdamW refuses a step after one)
        # counts the changes of what fused_terms() returns (anchor tensors, importance): HybridAdamW keeps its
        # lists while it stays the same
        self.terms_version = 0
        self._on_new_view()
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

    @property
    def anchors(self) -> list[torch.Tensor]:
        """The weights at the start of the current stage, one tensor per fragment of the view (this rank's
        elements only on sharded models). Taken at the first ``begin_stage`` (or on first use), not before."""
        return self._anchors if self._anchors is not None else self._take_anchors()

    @torch.no_grad()
    def _take_anchors(self) -> list[torch.Tensor]:
        # the parameter's layout (preserve_format): the ops need a parameter and its anchor laid out alike
        self._anchors = [p.detach().to(self.anchor_dtype, copy=True) for p in self.view.params()]
        self.terms_version += 1
        return self._anchors

    def _on_new_view(self) -> None:
        params = [] if isinstance(self.view, UnboundView) else self.view.params()
        self.device = params[0].device if params else torch.device("cpu")
        if params and self.backend != "auto":
            ok, why = ops.backend_status(self.backend, self.device)
            if not ok:  # refused now, not at the first stage boundary
                raise RuntimeError(f"backend {self.backend!r} is not available for {self.device} tensors: {why}. "
                                   f"Available here: {', '.join(ops.available_backends(self.device)) or 'none'}")

    def _set_importance(self, F: torch.Tensor) -> None:
        self.terms_version += 1
        self.importance = F.to(torch.float32).cpu()
        self._active = bool((self.importance != 0).any()) and self.lam != 0
        fragment_group = [self.groups.unit_group[u] for u in self.view.fragment_unit]
        self._fragment_importance = self.importance[torch.tensor(fragment_group, dtype=torch.long)] \
            if fragment_group else torch.zeros(0)
        # lam * F_i per fragment, checked and put on the parameters' device once per stage: apply_() never syncs
        self._penalty = ops.EWCPenaltyGrad(self._fragment_importance, self.lam, device=self.device)
        self._penalty_subset: tuple[tuple[int, ...], ops.EWCPenaltyGrad] | None = None

    # ------------------------------------------------------------------ the parameters followed
    def bind(self, target) -> "HybridEWC":
        """Follow the parameters of ``target`` from now on: a DeepSpeed engine (ZeRO-1/2/3) or FSDP2 module built
        on the model this HybridEWC was made for (or the model itself). The importance, accumulated changes and
        stage position are kept; the anchors are cut to this rank's share of ``target`` locally (nothing is
        communicated; the partitioning must cover what this rank held). Checks everything before changing
        anything. ``HybridEWCCallback`` calls this when ``train()`` starts, since the engine of a
        ``transformers.Trainer`` exists only then (and each Trainer builds a new one)."""
        view = make_view(target, *self._selection)
        if isinstance(view, UnboundView):
            raise ValueError("bind() needs live parameters; " + view.reason)
        built_on = self._module() if self._module is not None else None
        if built_on is not None and module_of(target) is not built_on:
            raise ValueError(f"bind(): {type(target).__name__} does not train the model this HybridEWC was built on; "
                             "build the HybridEWC on the model you hand to the trainer or engine")
        if view.unit_names != self.view.unit_names or list(view.unit_numel) != list(self.view.unit_numel):
            differ = next(((a, b) for a, b in zip(self.view.unit_names, view.unit_names) if a != b), None)
            raise ValueError(f"bind(): {type(target).__name__} has other trainable parameters than this HybridEWC "
                             f"({len(view.unit_names)} vs {len(self.view.unit_names)} tensors"
                             + (f"; {differ[1]!r} where {differ[0]!r} was" if differ else "; sizes differ") + ")")
        anchors = None if self._anchors is None else relayout(self._anchors, self.view, view, self.anchor_dtype)
        self.view, self._anchors = view, anchors
        self._on_new_view()
        self._set_importance(self.importance)
        return self

    def unbind(self) -> None:
        """Let go of the current view's tensors (e.g. a finished DeepSpeed engine, so that it can be freed). The
        anchors, importance and stage position stay; ``state_dict()`` still works; ``bind()`` continues."""
        self.view = UnboundView.of(self.view, UNBOUND)

    def _change_since_anchor(self) -> torch.Tensor:
        """Per-group mean squared change since the anchor (eq. 7), float64, and anchor <- params, in one pass."""
        if self._anchors is None:  # the first boundary: nothing was anchored, nothing changed
            self._take_anchors()
            return torch.zeros(len(self.groups), dtype=torch.float64)
        with torch.no_grad():
            sums = ops.snapshot_(self.view.params(), self._anchors, reduction="sum", backend=self.backend)
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
        change = self._change_since_anchor()
        ended = self.objective
        if ended is not None:
            self.accumulated[ended] += change
            self.stages_done[ended] += 1
            self.last_change = change
        others = [o for o in self.objectives if o != objective and self.stages_done[o] > 0]
        if self.importance_mode == L2SP:  # no importance: the same decay toward the anchor for every element
            F = torch.ones(len(self.groups), dtype=torch.float32)
        elif others:
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
        change = self._change_since_anchor()
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
        ``scaler.unscale_(optimizer)``, or pass ``grad_scale=scaler.get_scale()`` to call it before (a float
        must be finite and > 0; a one-element tensor is used as it is, without a host sync). Parameters whose
        ``requires_grad`` is False now are skipped (their ``.grad`` is never created; their term is left out of
        the returned value). No host synchronisation; under DeepSpeed ZeRO it adds to this rank's gradient
        partition (a no-op inside a gradient-accumulation window) and all-reduces the one-float penalty value.
        """
        grad_scale = _check_grad_scale(grad_scale)
        self.apply_count += 1
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        ready = getattr(self.view, "grads_ready", None)
        if ready is not None and not ready():
            return zero
        if not self._active:
            return zero
        # ZeRO's fp16 loss scale (view.grad_scale) and a user's GradScaler scale both multiply the gradient
        scale = grad_scale * float(self.view.grad_scale)
        keep = self.view.trainable()
        params, anchors, penalty = self.view.params(), self.anchors, self._penalty
        if keep is None:
            grads = self.view.grads()
        else:  # frozen since the view was built
            params, anchors, penalty = [params[i] for i in keep], [anchors[i] for i in keep], self._penalty_of(keep)
            grads = self.view.grads(keep)
        per_tensor = penalty(params, anchors, grads, scale=scale, backend=self.backend)
        if hasattr(self.view, "grads_done_"):
            self.view.grads_done_()
        total = per_tensor.sum().to(torch.float32).reshape(1)
        if not isinstance(self.view, LocalParamView):
            self.view.all_reduce_(total)
        return total[0]

    def _penalty_of(self, keep: list[int]) -> ops.EWCPenaltyGrad:
        """The penalty of the fragments ``keep``, cached until the set or the importance changes."""
        key = tuple(keep)
        if self._penalty_subset is None or self._penalty_subset[0] != key:
            subset = ops.EWCPenaltyGrad(self._fragment_importance[list(keep)], self.lam, device=self.device)
            self._penalty_subset = (key, subset)
        return self._penalty_subset[1]

    def fused_terms(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
        """What an optimizer that adds the penalty gradient inside its step needs (``hbat.optim.HybridAdamW``):
        the parameters, their anchors (None while the stage is not penalised: no term) and F per parameter
        (float32, on the host; the gradient coefficient is ``lam * F_i``). Single process only."""
        if not isinstance(self.view, LocalParamView):
            raise ValueError("fused_terms() needs a single-process HybridEWC (its parameters, not a sharded "
                             f"view: {type(self.view).__name__})")
        return self.view.params(), self.anchors if self._active else None, self._fragment_importance

    def penalty(self) -> torch.Tensor:
        """The penalty of eq. (5)/(8) as a differentiable scalar (add it to the loss instead of ``apply_``)."""
        if not isinstance(self.view, LocalParamView):
            raise NotImplementedError("penalty() needs the full parameters; on sharded models use apply_()")
        if not self._active:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return ops.ewc_penalty(self.view.params(), self.anchors, self._fragment_importance, self.lam,
                               backend=self.backend)

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
            "settings": self._settings(),
        }

    def _settings(self) -> dict:
        return {"f_max": self.f_max, "lam": self.lam, "importance_mode": self.importance_mode,
                "importance_scale": self.importance_scale}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``. Validates every field first and says what is wrong; changes nothing on error.

        Refused: another model's units or fragments, bad types or ranges (a negative ``stages_done``, NaN
        importance, a negative or non-finite accumulated change, non-finite anchors, malformed history), and a
        state saved with other ``f_max`` / ``lam`` / ``importance_mode`` / ``importance_scale`` (its importance
        and anchors belong to those settings; to change them on purpose, edit ``state["settings"]`` first).
        """
        if isinstance(self.view, UnboundView) and self.view.pending:
            raise RuntimeError("load_state_dict(): " + self.view.reason)
        check_state(state, STATE_VERSION, names=self.groups.names, numel=self.groups.numel,
                    fragment_names=self.view.fragment_names, fragment_shapes=self.view.fragment_shapes,
                    objectives=self.objectives, settings=self._settings())
        if self._anchors is None and not isinstance(self.view, UnboundView):  # laid out like the parameters
            self._anchors = [torch.empty_like(p, dtype=self.anchor_dtype).copy_(saved)
                             for p, saved in zip(self.view.params(), state["anchors"])]
        elif self._anchors is None:
            self._anchors = [saved.to(device=self.device, dtype=self.anchor_dtype, copy=True)
                             for saved in state["anchors"]]
        else:
            for anchor, saved in zip(self._anchors, state["anchors"]):
                anchor.copy_(saved.to(anchor.device))
        self.accumulated = {o: state["accumulated"][o].to(torch.float64).clone() for o in self.objectives}
        self.stages_done = {o: int(state["stages_done"][o]) for o in self.objectives}
        self.objective = state["objective"]
        self.history = [dict(h) for h in state["history"]]
        self.last_change = state["last_change"].to(torch.float64).clone()
        self._set_importance(state["importance"])

    def __repr__(self) -> str:
        return (f"HybridEWC(units={len(self.groups)}, fragments={len(self.view.fragment_unit)}, f_max={self.f_max}, "
                f"lam={self.lam}, importance_mode={self.importance_mode!r}, objective={self.objective!r}, "
                f"active={self._active})")
