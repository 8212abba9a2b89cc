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

The lists of each call and its per-tensor values (``lam * F_i``, lr, weight decay) are built once and kept until
something they depend on changes: a stage boundary or any other change of the ewc's anchors or importance
(``HybridEWC.terms_version``), ``add_param_group``, ``load_state_dict``, a group's ``betas`` / ``eps``, or which
parameters have a gradient. A step gathers the gradients, re-reads a group's ``lr`` / ``weight_decay`` when
they changed (a scheduler's), and adds one to the step counts: no per-tensor Python work beyond that, and
nothing read back from a device.
"""
from __future__ import annotations

import math
import numbers
from itertools import chain

import torch

from . import ops
from .ewc import HybridEWC

__all__ = ["HybridAdamW"]

MOMENTS = ("exp_avg", "exp_avg_sq")
SETTINGS = ("lr", "betas", "eps", "weight_decay")


def _real(where: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{where}HybridAdamW takes {name} as a float (a tensor {name} is not supported)")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{where}{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _checked_settings(group: dict, where: str = "") -> dict:
    """torch.optim.AdamW's checks and messages on a group's settings (``where`` prefixes the message, e.g. the
    index of a saved group): the settings as floats, or the error. Reads the group, changes nothing."""
    missing = [key for key in SETTINGS if key not in group]
    if missing:
        raise ValueError(f"{where}the group has no {', '.join(missing)}")
    lr = _real(where, "lr", group["lr"])
    betas = group["betas"]
    if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair of floats, got {betas!r}")
    beta1, beta2 = (_real(where, f"betas[{k}]", b) for k, b in enumerate(betas))
    eps, weight_decay = _real(where, "eps", group["eps"]), _real(where, "weight_decay", group["weight_decay"])
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"{where}Invalid learning rate: {lr}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"{where}Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"{where}Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"{where}Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"{where}Invalid weight_decay value: {weight_decay}")
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(f"{where}HybridAdamW does not implement {flag}=True")
    return dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


class _Call:
    """One adamw_ewc_step_ call (one device, betas and eps), kept between steps.

    ``host`` holds its per-tensor values in float64 on the host, one row each: lam * F_i, lr, weight_decay,
    and the bias corrections 1 - beta1**step, 1 - beta2**step (rewritten every step); ``steps`` the step counts
    as float32, of which each parameter's ``state["step"]`` is a 0-dim view (one add steps them all)."""

    def __init__(self, key, device):
        self.key, self.device = key, device
        self.index: list[int] = []  # positions in HybridAdamW._params
        self.params, self.exp_avg, self.exp_avg_sq, self.anchors = [], [], [], []
        self.groups: list[tuple[dict, int, int]] = []  # (group, first, end) of this call's tensors
        self.hyper: list[tuple] | None = None  # the (lr, weight_decay) of each group the rows were filled from
        self.host = self.steps = None

    def finish(self, coef: list[float], steps: list[float]) -> None:
        self.host = torch.zeros(5, len(self.params), dtype=torch.float64)
        self.host[0] = torch.tensor(coef, dtype=torch.float64)
        self.steps = torch.tensor(steps, dtype=torch.float32)

    def refill(self) -> None:
        """Rows lr and weight_decay from the groups (a scheduler changes lr between steps)."""
        hyper = [(group["lr"], group["weight_decay"]) for group, _, _ in self.groups]
        if hyper != self.hyper:
            for (group, first, end), (lr, weight_decay) in zip(self.groups, hyper):
                settings = _checked_settings(group)  # a scheduler may set anything: checked before use
                self.host[1, first:end] = settings["lr"]
                self.host[2, first:end] = settings["weight_decay"]
            self.hyper = hyper

    def vectors(self) -> list[torch.Tensor]:
        """The five per-tensor vectors of the next step, on the device (steps counted already)."""
        (beta1, beta2), steps = self.key[1], self.steps.double()
        torch.sub(1.0, torch.pow(beta1, steps), out=self.host[3])
        torch.sub(1.0, torch.pow(beta2, steps), out=self.host[4])
        packed = self.host.to(torch.float32)
        if self.device.type == "cuda":
            packed = packed.pin_memory()  # the copy below is then asynchronous
        return list(packed.to(self.device, non_blocking=True).unbind(0))


class HybridAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` whose gradient carries the penalty of a ``HybridEWC``, in one fused pass per step.

    Each step is AdamW as torch computes it (decoupled weight decay, bias correction; no amsgrad, no maximize) on
    the gradient ``p.grad + lam * F_i * (p - anchor_i)``: the EWC gradient is added before the moments, exactly as
    if the penalty were a loss term (coupled). The anchors and the importance are the ewc's (``ewc.begin_stage``
    changes them; the first stage, before any importance, is not penalised). A parameter the ewc does not hold
    (excluded by include / exclude, frozen when it was built) gets plain AdamW. The moments are float32 for
    float32, bfloat16 and float16 parameters, in the parameter's memory layout (channels_last and transposed
    parameters are stepped like contiguous ones); the state keys are torch's (``step``, ``exp_avg``,
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

    Bad settings are refused with torch's messages before anything changes: by the constructor, by
    ``add_param_group`` (the group is not added) and by ``load_state_dict`` (every saved group and state).

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
        self._calls: list[_Call] | None = None
        params = params_or_model.parameters() if isinstance(params_or_model, torch.nn.Module) else params_or_model
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.last_penalty = torch.zeros((), dtype=torch.float32, device=ewc.device)
        self._applies_seen = ewc.apply_count

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, after checking the group's settings (with the defaults it would get):
        a bad one raises and the group is not added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        settings = _checked_settings({**self.defaults, **param_group})
        super().add_param_group(param_group)
        self.param_groups[-1]["betas"] = settings["betas"]
        self._calls = None

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
        if getattr(self, "_calls", None) is None:  # (an unpickled optimizer has none of these attributes)
            self._params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        grads = [p.grad for p in self._params]
        key = (self.ewc.terms_version, tuple(g is not None for g in grads),
               tuple((group["betas"], group["eps"]) for group in self.param_groups))
        if self._calls is None or key != self._key:
            self._calls, self._key = self._build_calls(grads), key
        total = torch.zeros((), dtype=torch.float32, device=self.ewc.device)
        for call in self._calls:
            call.refill()
            call_grads = [grads[i] for i in call.index]
            call.steps += 1  # state["step"] of every tensor (views); undone if the op refuses its inputs
            try:
                per_tensor = ops._adamw_ewc_step_vectors(
                    call.params, call_grads, call.exp_avg, call.exp_avg_sq, call.anchors, call.vectors(),
                    betas=call.key[1], eps=call.key[2], backend=self.ewc.backend)
            except BaseException:
                call.steps -= 1
                raise
            total = total + per_tensor.sum().to(total.device)
        self.last_penalty = total
        return loss

    def _build_calls(self, grads: list) -> list[_Call]:
        """The calls of the parameters with a gradient (by device, betas and eps), their states created as needed,
        and their anchors and per-tensor values."""
        ewc_params, anchors, importance = self.ewc.fused_terms()
        penalised = {} if anchors is None else {id(p): i for i, p in enumerate(ewc_params)}
        coefficients = (ops._coefficients(importance, self.ewc.lam, len(ewc_params)).double().tolist()
                        if anchors is not None else [])
        calls: dict[tuple, _Call] = {}
        coef: dict[tuple, list] = {}
        states: dict[tuple, list] = {}
        position = 0
        for group in self.param_groups:
            settings = _checked_settings(group)
            for p in group["params"]:
                k, position = position, position + 1
                if grads[k] is None:
                    continue
                if grads[k].is_sparse:
                    raise RuntimeError("HybridAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for name in MOMENTS:  # the parameter's layout (preserve_format), as torch's AdamW
                        state[name] = torch.zeros_like(p, dtype=torch.float32)
                key = (p.device, settings["betas"], settings["eps"])
                call = calls.get(key)
                if call is None:
                    call = calls[key] = _Call(key, p.device)
                    coef[key], states[key] = [], []
                if not call.groups or call.groups[-1][0] is not group:
                    call.groups.append((group, len(call.params), len(call.params)))
                call.groups[-1] = (group, call.groups[-1][1], len(call.params) + 1)
                i = penalised.get(id(p))
                call.index.append(k)
                p = p.detach()  # the same storage and version counter; the ops refuse to write a leaf requiring grad
                call.params.append(p)
                call.exp_avg.append(state["exp_avg"])
                call.exp_avg_sq.append(state["exp_avg_sq"])
                call.anchors.append(p if i is None else anchors[i])  # p itself: p - p = 0, with importance 0
                coef[key].append(0.0 if i is None else coefficients[i])
                states[key].append(state)
        for key, call in calls.items():
            call.finish(coef[key], [float(state["step"]) for state in states[key]])
            for state, step in zip(states[key], call.steps):
                state["step"] = step  # a 0-dim view of call.steps: one add steps every tensor of the call
        return list(calls.values())

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict`` (a torch AdamW's state loads too), after checking every
        group's settings as the constructor does and every parameter state, changing nothing if one is wrong;
        the moments are then kept in float32 and the parameter's layout (torch would cast them to the
        parameter's dtype) and ``step`` on the host."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError("state_dict must be a dict with a list of param_groups, as state_dict() returns")
        saved_groups, saved_state = state_dict["param_groups"], state_dict.get("state", {})
        for k, group in enumerate(saved_groups):
            if not isinstance(group, dict):
                raise ValueError(f"param_groups[{k}] must be a dict, got {type(group).__name__}")
            _checked_settings(group, where=f"param_groups[{k}]: ")
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
        self._calls = None
        for group in self.param_groups:
            group["betas"] = _checked_settings(group)["betas"]
        for key, p in by_id.items():
            if key in saved_state:
                state = self.state[p]
                for name in MOMENTS:  # from the saved values, not torch's cast to the parameter's dtype
                    state[name] = torch.empty_like(p, dtype=torch.float32)
                    state[name].copy_(saved_state[key][name])
                state["step"] = torch.tensor(float(saved_state[key]["step"]), dtype=torch.float32)
