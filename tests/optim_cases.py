"""What the HybridAdamW tests share (tests/test_optim.py, tests/test_cuda_emulated.py): a tiny model, its batches,
torch AdamW + ``HybridEWC.apply_()`` beside ``HybridAdamW`` from the same init, and a run of both over stages that
compares them after every step."""
from __future__ import annotations

import copy

import torch

from hbat import HybridAdamW, HybridEWC

STAGES = ("ifa", "hpa", "ifa", "hpa")


def tiny_model(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.LayerNorm(3))
    return model.to(device=device, dtype=dtype)


def loss_of(model, step):
    """A fixed batch per step number."""
    gen = torch.Generator().manual_seed(1000 + step)
    p = next(model.parameters())
    x = torch.randn(8, 5, generator=gen).to(p)
    y = torch.randn(8, 3, generator=gen).to(p)
    return (model(x) - y).float().square().mean()


def apply_then_adamw(model, ewc, optimizer):
    """The reference step: the penalty gradient added to .grad by apply_(), then the optimizer."""
    def step(k):
        loss_of(model, k).backward()
        ewc.apply_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def hybrid(model, ewc, optimizer):
    def step(k):
        loss_of(model, k).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_stages(pairs, stages=STAGES, steps=3, schedulers=()):
    """Each (model, ewc, step) pair through the same stages and batches; asserts after every step that the
    params agree (fp32 tolerance)."""
    k = 0
    for objective in stages:
        for _, ewc, _ in pairs:
            ewc.begin_stage(objective)
        for _ in range(steps):
            for _, _, step in pairs:
                step(k)
            for scheduler in schedulers:
                scheduler.step()
            (want, *_), *others = pairs
            for model, _, _ in others:
                for (name, p), q in zip(model.named_parameters(), want.parameters()):
                    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {k}, {name}: {m}")
            k += 1
    assert pairs[0][1].active  # the later stages were penalised


def two_setups(backend, device, *, lr=1e-2, weight_decay=0.05, groups=None, f_max=100.0):
    """(model, ewc, step) with torch AdamW + apply_(), and the same with HybridAdamW, from the same init."""
    ref_model = tiny_model(device=device)
    model = copy.deepcopy(ref_model)
    ref_ewc = HybridEWC(ref_model, f_max=f_max, lam=1.0, backend=backend)
    ewc = HybridEWC(model, f_max=f_max, lam=1.0, backend=backend)
    ref_params = groups(ref_model) if groups else ref_model.parameters()
    params = groups(model) if groups else model.parameters()
    ref_opt = torch.optim.AdamW(ref_params, lr=lr, weight_decay=weight_decay, foreach=False)
    opt = HybridAdamW(params, ewc, lr=lr, weight_decay=weight_decay)
    return (ref_model, ref_ewc, apply_then_adamw(ref_model, ref_ewc, ref_opt), ref_opt), \
        (model, ewc, hybrid(model, ewc, opt), opt)
