"""hbat.optim.HybridAdamW: torch's AdamW with the HBAT penalty gradient fused into its step.

    ewc = hbat.HybridEWC(model, f_max=100, lam=1)
    optimizer = hbat.optim.HybridAdamW(model, ewc, lr=1e-5)
    for objective, loader in stages:
        ewc.begin_stage(objective)
        for batch in loader:
            loss_fn(model, batch).backward()       # no ewc.apply_(): the step adds the penalty gradient
            optimizer.step(); optimizer.zero_grad()

One ``hbat.ops.adamw_ewc_step_`` per step (per device and betas / eps, usually one) reads each parameter, its
gradient, both moments and its anchor once and writes the parameter and the moments once: 32 bytes per fp32
element instead of AdamW's 28 plus the separate penalty pass's 16.
"""
from __future__ import annotations

import math
from itertools import chain

import torch

from . import ops
from .ewc import HybridEWC

__all__ = ["HybridAdamW"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def _check_group(group: dict) -> None:
    """torch.optim.AdamW's checks and messages, when a group is added (the whole config, before any step)."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        raise TypeError("HybridAdamW takes lr as a float (a tensor lr is not supported)")
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(f"HybridAdamW does not implement {flag}=True")


class _Call:
    """The lists of one adamw_ewc_step_ call (one device and betas / eps)."""

    def __init__(self):
        self.params, self.grads, self.exp_avg, self.exp_avg_sq, self.anchors = [], [], [], [], []
        self.importance, self.lr, self.weight_decay, self.steps = [], [], [], []


class HybridAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` whose gradient carries the penalty of a ``HybridEWC``, in one fused pass per step.

    Each step is AdamW as torch computes it (decoupled weight decay, bias correction; no amsgrad, no maximize) on
    the gradient ``p.grad + lam * F_i * (p - anchor_i)``: the EWC gradient is added before the moments, exactly as
    if the penalty were a loss term (coupled). The anchors and the importance are the ewc's, read at every step
    (``ewc.begin_stage`` changes them; the first stage, before any importance, is not penalised). A parameter the
    ewc does not hold (excluded by include / exclude, frozen when it was built) gets plain AdamW. The moments are
    float32 for float32, bfloat16 and float16 parameters; the state keys are torch's (``step``, ``exp_avg``,
    ``exp_avg_sq``), so a torch AdamW state loads (and is kept in float32).

    Where it differs from ``ewc.apply_()`` before the optimizer step:

    - **Gradient clipping does not see the penalty gradient**: it is never in ``.grad``, so ``clip_grad_norm_``
      (and a logged gradient norm) covers the loss gradient only. ``apply_()`` before clipping clips the penalty
      gradient like a loss term; without clipping the two give the same steps.
    - A parameter whose ``.grad`` is None is skipped, as torch's AdamW skips it; ``apply_()`` creates that
      gradient (zeros plus the penalty gradient), so after it AdamW moves the parameter too.
    - Single process (DDP included) only: under DeepSpeed ZeRO or FSDP2 the optimizer is the engine's; use
      ``apply_()`` (``HybridEWCCallback``, ``hbat.integrations.accelerate.prepare_ewc``) there. Refused.

    Use either HybridAdamW or ``ewc.apply_()``, never both: the penalty gradient would be counted twice, so a
    step after any ``ewc.apply_()`` since the previous step (or since the optimizer was built) raises, having
    changed nothing. ``HybridEWCCallback`` recognises a HybridAdamW as its trainer's optimizer and then calls no
    ``apply_()`` (it keeps the stage boundaries, checkpoints and the logged ``ewc/penalty``).

    Args:
        params_or_model: an ``nn.Module`` (its parameters) or what ``torch.optim.AdamW`` takes: an iterable of
            parameters or of param-group dicts (each may set ``lr``, ``betas``, ``eps``, ``weight_decay``).
        ewc: the ``hbat.HybridEWC`` whose penalty the steps add, built on the same parameters.
        lr, betas, eps, weight_decay: AdamW's, with torch's defaults and checks.

    Attributes:
        ewc: the HybridEWC.
        last_penalty: the penalty before the last step, ``sum_i lam/2 F_i ||p_i - anchor_i||^2`` over the
            parameters that step moved (a 0-dim float32 tensor on their device, never read back: no host sync).
    """

    def __init__(self, params_or_model, ewc, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not isinstance(ewc, HybridEWC):
            raise TypeError(f"ewc must be a hbat.HybridEWC, got {type(ewc).__name__}")
        ewc.fused_terms()  # refuses a sharded or unbound HybridEWC now, not at the first step
        self.ewc = ewc
        params = params_or_model.parameters() if isinstance(params_or_model, torch.nn.Module) else params_or_model
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.last_penalty = torch.zeros((), dtype=torch.float32, device=ewc.device)
        self._applies_seen = ewc.apply_count

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(float(b) for b in group["betas"])
        _check_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        """One fused AdamW + EWC step of every parameter with a gradient; returns ``closure()``'s loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.ewc.apply_count != self._applies_seen:
            raise RuntimeError(
                "ewc.apply_() was called since HybridAdamW's last step: the penalty gradient would be counted twice "
                "(HybridAdamW adds it inside its step). Use HybridAdamW without apply_() (and without "
                "HybridEWCCallback, which calls it), or apply_() with another optimizer")
        total = torch.zeros((), dtype=torch.float32, device=self.ewc.device)
        for (_, beta1, beta2, eps), call in self._calls().items():
            per_tensor = ops.adamw_ewc_step_(
                call.params, call.grads, call.exp_avg, call.exp_avg_sq, call.anchors, call.importance, self.ewc.lam,
                lr=call.lr, weight_decay=call.weight_decay, step=torch.stack(call.steps) + 1, betas=(beta1, beta2),
                eps=eps, backend=self.ewc.backend)
            torch._foreach_add_(call.steps, 1)  # only once the op accepted its inputs and stepped
            total = total + per_tensor.sum().to(total.device)
        self.last_penalty = total
        return loss

    def _calls(self) -> dict:
        """The parameters with a gradient, their states, anchors and per-tensor values, by device and betas / eps."""
        ewc_params, anchors, importance = self.ewc.fused_terms()
        penalised = {} if anchors is None else {id(p): i for i, p in enumerate(ewc_params)}
        importance = importance.tolist()
        calls: dict[tuple, _Call] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HybridAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for name in MOMENTS:
                        state[name] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                call = calls.setdefault((p.device, *group["betas"], group["eps"]), _Call())
                i = penalised.get(id(p))
                call.grads.append(p.grad)
                p = p.detach()  # the same storage and version counter; the ops refuse to write a leaf requiring grad
                call.params.append(p)
                call.exp_avg.append(state["exp_avg"])
                call.exp_avg_sq.append(state["exp_avg_sq"])
                call.anchors.append(p if i is None else anchors[i])  # p itself: p - p = 0, with importance 0
                call.importance.append(0.0 if i is None else importance[i])
                call.lr.append(group["lr"])
                call.weight_decay.append(group["weight_decay"])
                call.steps.append(state["step"])
        return calls

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict`` (a torch AdamW's state loads too), after checking every
        group and parameter state, changing nothing if one is wrong; the moments are then kept in float32 (torch
        would cast them to the parameter's dtype) and ``step`` on the host."""
        saved_groups, saved_state = state_dict.get("param_groups", []), state_dict.get("state", {})
        for k, group in enumerate(saved_groups):
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"param_groups[{k}] has {flag}=True, which HybridAdamW does not implement")
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        saved_ids = list(chain.from_iterable(g.get("params", []) for g in saved_groups))
        by_id = dict(zip(saved_ids, params)) if len(saved_ids) == len(params) else {}
        for key, state in saved_state.items():
            shape = tuple(by_id[key].shape) if key in by_id else None
            for name in MOMENTS:
                value = state.get(name)
                if not isinstance(value, torch.Tensor) or (shape is not None and tuple(value.shape) != shape):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"state of parameter {key}: {name} must be a tensor of the parameter's shape "
                                     f"{shape}, got {got}")
            step = state.get("step")
            step = float(step) if isinstance(step, (int, float, torch.Tensor)) and not isinstance(step, bool) \
                and (not isinstance(step, torch.Tensor) or step.numel() == 1) else -1.0
            if not (0 <= step < math.inf and step == math.floor(step)):
                raise ValueError(f"state of parameter {key}: step must be a whole number >= 0, got "
                                 f"{state.get('step')!r}")
        super().load_state_dict(state_dict)
        for key, p in by_id.items():
            if key in saved_state:
                state = self.state[p]
                for name in MOMENTS:  # from the saved values, not torch's cast to the parameter's dtype
                    state[name] = torch.empty_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                    state[name].copy_(saved_state[key][name])
                state["step"] = torch.tensor(float(saved_state[key]["step"]), dtype=torch.float32)
