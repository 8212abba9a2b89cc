"""The "original EWC" baseline of the HBAT paper (eq. 13-14): a per-element diagonal empirical Fisher.

    F_ij = mean over samples n of ( d log p(y_n | x_n) / d theta_ij )^2      (response tokens only)
    penalty = sum_ij (lam / 2) * F_ij * (theta_ij - anchor_ij)^2,   gradient lam * F_ij * (theta_ij - anchor_ij)

The square is taken PER SAMPLE (the released code sums raw gradients over a batch before anything is squared,
which is not a Fisher). ``method="loop"`` runs one size-1 forward/backward per sample (exact, any model);
``method="vmap"`` computes a chunk of per-sample gradients at once with ``torch.func`` (right-padded inputs and
no attention mask: valid for causal LMs, whose real tokens never attend to the padding after them).

It stores two parameter-sized fp32 buffers (Fisher and anchor) and costs one backward per sample at every
stage boundary: this is the cost that HybridEWC's one scalar per tensor avoids (paper, Table 7).
``FisherEWC`` follows ``hbat.HybridEWC``'s calling convention: ``begin_stage`` at a stage boundary,
``apply_()`` after backward and before clipping, or ``penalty()`` as a loss term.
"""
from __future__ import annotations

import time
import warnings
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["sequence_logprob", "empirical_fisher", "FisherEWC"]

METHODS = ("loop", "vmap")


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(y | x)`` per sequence: the sum over positions with ``labels != -100`` of the next-token log-prob.

    logits: [B, T, V] from input_ids [B, T]; labels: [B, T] aligned with input_ids (HF convention: the model
    predicts labels[t + 1] at position t); returns [B] in float32.
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=-1)


def _iter_samples(samples: Iterable[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One (input_ids [T], labels [T]) per sample, padding removed. Accepts per-sample dicts (1-D tensors or
    lists) and batch dicts (2-D, with an attention_mask where padded)."""
    for index, item in enumerate(samples):
        if not isinstance(item, dict) or "input_ids" not in item or "labels" not in item:
            raise ValueError(f"sample {index} must be a dict with 'input_ids' and 'labels' (-100 outside the response)")
        ids, labels = torch.as_tensor(item["input_ids"]), torch.as_tensor(item["labels"])
        mask = item.get("attention_mask")
        if ids.shape != labels.shape:
            raise ValueError(f"sample {index}: input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} differ")
        if ids.dim() == 1:
            ids, labels = ids[None], labels[None]
            mask = None if mask is None else torch.as_tensor(mask)[None]
        elif ids.dim() != 2:
            raise ValueError(f"sample {index}: input_ids must be 1-D (one sample) or 2-D (a batch)")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        for row in range(ids.shape[0]):
            keep = mask[row]
            yield ids[row][keep], labels[row][keep]


def _selected(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    if names is None:
        return params
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"model has no trainable floating parameter {missing[0]!r}")
    return {n: params[n] for n in names}


def _progress(iterable, total, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def empirical_fisher(
    model: nn.Module,
    samples: Iterable[dict],
    *,
    names: Sequence[str] | None = None,
    method: str = "loop",
    chunk_size: int = 8,
    max_samples: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` at its current weights: {name: float32 tensor like the param}.

    samples: dicts with ``input_ids`` and ``labels`` (-100 on prompt tokens), one sample or a padded batch each.
    names: the parameters to estimate (default: every trainable floating parameter).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = _selected(model, names)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    rows = list(_iter_samples(samples))
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise ValueError("empirical_fisher needs at least one sample")
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    try:
        if method == "loop":
            _fisher_loop(model, params, fisher, rows, device, progress)
        else:
            _fisher_vmap(model, params, fisher, rows, device, chunk_size, progress)
    finally:
        model.train(was_training)
    for f in fisher.values():
        f.div_(len(rows))
    return fisher


def _fisher_loop(model, params, fisher, rows, device, progress):
    tensors = list(params.values())
    for ids, labels in _progress(rows, len(rows), progress, "fisher"):
        logits = _logits(model(ids[None].to(device)))
        logp = sequence_logprob(logits, labels[None].to(device)).sum()
        grads = torch.autograd.grad(logp, tensors, allow_unused=True)
        for f, g in zip(fisher.values(), grads):
            if g is not None:
                f.addcmul_(g.float(), g.float())


def _fisher_vmap(model, params, fisher, rows, device, chunk_size, progress):
    from torch.func import functional_call, grad, vmap

    constants = {n: t.detach() for n, t in model.named_parameters() if n not in params}
    constants.update(dict(model.named_buffers()))
    trainable = {n: p.detach() for n, p in params.items()}

    def logp(weights, ids, labels):
        logits = _logits(functional_call(model, {**constants, **weights}, (ids[None],)))
        return sequence_logprob(logits, labels[None]).sum()

    per_sample_grad = vmap(grad(logp), in_dims=(None, 0, 0))
    chunks = [rows[i : i + chunk_size] for i in range(0, len(rows), chunk_size)]
    for chunk in _progress(chunks, len(chunks), progress, "fisher"):
        width = max(len(ids) for ids, _ in chunk)
        # right padding, labels -100 on the pad: a causal model's real positions never see it
        ids = torch.stack([torch.cat([i, i.new_zeros(width - len(i))]) for i, _ in chunk]).to(device)
        labels = torch.stack([torch.cat([l, l.new_full((width - len(l),), -100)]) for _, l in chunk]).to(device)
        with warnings.catch_warnings():
            # functorch falls back to a loop for some fused attention kernels: slower, still exact
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = per_sample_grad(trainable, ids, labels)
        for n, f in fisher.items():
            g = grads[n].float()
            f.add_((g * g).sum(dim=0))


class FisherEWC:
    """Per-element EWC with the empirical Fisher of the previous stage's data (the HBAT paper's baseline).

        fewc = FisherEWC(model, lam=1.0)
        fewc.begin_stage("ifa")                       # first stage: no penalty
        ... train ...
        fewc.begin_stage("hpa", samples=ifa_samples)  # Fisher of the stage that ended, at the current weights;
                                                      # anchor <- current weights
        loss.backward(); fewc.apply_(); clip; optimizer.step()

    ``scale`` multiplies the Fisher (raw empirical Fisher values are tiny; the paper uses lam = 1, scale = 1).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float = 1.0,
        scale: float = 1.0,
        names: Sequence[str] | None = None,
        method: str = "loop",
        chunk_size: int = 8,
        max_samples: int | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model, self.lam, self.scale = model, float(lam), float(scale)
        self.method, self.chunk_size, self.max_samples = method, chunk_size, max_samples
        self.params = _selected(model, names)
        self.names = list(self.params)
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchors: dict[str, torch.Tensor] | None = None
        self.objective: str | None = None
        self.history: list[dict] = []

    @property
    def active(self) -> bool:
        return self.fisher is not None

    def begin_stage(self, objective: str, samples: Iterable[dict] | None = None) -> dict:
        """Stage boundary. With ``samples`` (data of the stage that just ended), estimate the Fisher at the
        current weights and anchor to them; without, the new stage has no penalty."""
        self.objective = objective
        if samples is None:
            self.fisher = self.anchors = None
            record = {"fisher/active": 0.0}
        else:
            start = time.perf_counter()
            record = self.consolidate_(samples)
            record["fisher/seconds"] = time.perf_counter() - start
        self.history.append({"objective": objective, **record})
        return record

    def consolidate_(self, samples: Iterable[dict]) -> dict:
        """Fisher <- empirical Fisher on ``samples`` (times ``scale``); anchors <- current weights."""
        fisher = empirical_fisher(self.model, samples, names=self.names, method=self.method,
                                  chunk_size=self.chunk_size, max_samples=self.max_samples)
        if self.scale != 1.0:
            for f in fisher.values():
                f.mul_(self.scale)
        self.fisher = fisher
        self.anchors = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}
        flat = torch.cat([f.reshape(-1) for f in fisher.values()])
        return {"fisher/active": 1.0, "fisher/mean": float(flat.mean()), "fisher/max": float(flat.max())}

    def penalty(self) -> torch.Tensor:
        """``sum (lam/2) F (theta - anchor)^2`` as a differentiable 0-dim float32 tensor (0 when inactive)."""
        device = next(iter(self.params.values())).device
        total = torch.zeros((), dtype=torch.float32, device=device)
        if not self.active:
            return total
        for n, p in self.params.items():
            diff = p.float() - self.anchors[n]
            total = total + (self.fisher[n] * diff * diff).sum()
        return (0.5 * self.lam) * total

    @torch.no_grad()
    def apply_(self) -> torch.Tensor:
        """``grad += lam * F * (theta - anchor)`` (created where missing); returns the penalty, no host sync.
        Call after backward, before gradient clipping and the optimizer step. Frozen parameters are skipped."""
        device = next(iter(self.params.values())).device
        total = torch.zeros((), dtype=torch.float32, device=device)
        if not self.active:
            return total
        for n, p in self.params.items():
            if not p.requires_grad:
                continue
            diff = p.float() - self.anchors[n]  # one tensor-sized temporary at a time
            weighted = self.fisher[n] * diff
            total += (weighted * diff).sum()
            if p.grad is None:
                p.grad = (self.lam * weighted).to(p.dtype)
            else:
                p.grad.add_((self.lam * weighted).to(p.grad.dtype))
        return (0.5 * self.lam) * total

    def state_dict(self) -> dict:
        return {"names": self.names, "lam": self.lam, "scale": self.scale, "objective": self.objective,
                "fisher": self.fisher, "anchors": self.anchors, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("FisherEWC state was saved for other parameters (names differ)")
        for key in ("fisher", "anchors"):
            values = state[key]
            if values is None:
                continue
            for n, p in self.params.items():
                if n not in values or values[n].shape != p.shape:
                    raise ValueError(f"FisherEWC state: {key}[{n!r}] is missing or has the wrong shape")
        device = next(iter(self.params.values())).device
        move = lambda d: None if d is None else {n: t.to(device, torch.float32) for n, t in d.items()}  # noqa: E731
        self.fisher, self.anchors = move(state["fisher"]), move(state["anchors"])
        self.lam, self.scale, self.objective = float(state["lam"]), float(state["scale"]), state["objective"]
        self.history = list(state["history"])
