"""hbat.trainer.step.TorchStepper with the hbat regulariser: HybridAdamW (the penalty inside the step) against
the apply_() path (the penalty added to .grad, then torch's AdamW), the path it keeps for any other penalty.

Without clipping the two give the same weights to fp32 rounding (not bit for bit: the fused kernel rounds the
AdamW update in torch's _single_tensor_adam order, torch's CPU AdamW vectorises it differently), over several
stages, in fp32 and through the fp32 masters of a bf16 model. With clipping the trainer keeps apply_(), so the
penalty is clipped like a loss term, as under DeepSpeed."""
from __future__ import annotations

import copy

import pytest
import torch

from hbat import HybridAdamW, HybridEWC
from hbat.trainer.common import StageConfig
from hbat.trainer.optimizer import master_named_parameters
from hbat.trainer.step import TorchStepper

STAGES = ("ifa", "hpa", "ifa", "hpa")


class ApplyOnly:
    """The penalty as any other regulariser's hook offers it: apply_() only (so the stepper keeps torch's AdamW)."""

    def __init__(self, ewc):
        self.apply_ = ewc.apply_


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.LayerNorm(3))
    return model.to(dtype)


def loss_of(model, k):
    gen = torch.Generator().manual_seed(100 + k)
    p = next(model.parameters())
    x, y = torch.randn(16, 6, generator=gen).to(p), torch.randn(16, 3, generator=gen).to(p)
    return (model(x) - y).float().square().mean()


def run(model, ewc, hook, cfg, steps=4):
    """Stages of ``steps`` steps, each with a fresh stepper (as the trainer builds one per stage)."""
    stats, k = [], 0
    for objective in STAGES:
        ewc.begin_stage(objective)
        stepper = TorchStepper(model, cfg, steps)
        for _ in range(steps):
            loss_of(model, k).backward()
            stats.append(stepper.step(hook))
            k += 1
        assert isinstance(stepper.optimizer, HybridAdamW) == (hook is ewc)  # no hook: torch's AdamW
    return stats


def two_runs(cfg, dtype=torch.float32):
    """(model, stats) of the fused path and of the apply_() path, from the same weights and batches."""
    out = []
    for fused in (True, False):
        model = tiny_model(dtype)
        target = master_named_parameters(model) if dtype != torch.float32 else model
        ewc = HybridEWC(target, f_max=100.0, lam=1.0)
        out.append((model, run(model, ewc, ewc if fused else ApplyOnly(ewc), cfg)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_adamw_and_apply_give_the_same_weights_without_clipping(dtype):
    cfg = StageConfig(lr=3e-2, weight_decay=0.05, max_grad_norm=None, warmup_ratio=0.25, lr_scheduler_type="linear")
    (fused, fused_stats), (applied, applied_stats) = two_runs(cfg, dtype)
    for (name, p), q in zip(fused.named_parameters(), applied.parameters()):
        if dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:  # bf16 weights: the fp32 masters agree to fp32 rounding, so the weights to within one bf16 rounding
            torch.testing.assert_close(p.float(), q.float(), rtol=8e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    penalties = [(float(a["ewc/penalty"]), float(b["ewc/penalty"])) for a, b in zip(fused_stats, applied_stats)]
    assert penalties[0] == (0.0, 0.0) and max(a for a, _ in penalties) > 1e-3  # the later stages are penalised
    for a, b in penalties:
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7)
    plain = tiny_model(dtype)  # and the penalty mattered: without it the weights end elsewhere
    run(plain, HybridEWC(master_named_parameters(plain) if dtype != torch.float32 else plain), None, cfg)
    with torch.no_grad():
        assert max(float((p.float() - q.float()).abs().max()) for p, q in zip(fused.parameters(),
                                                                              plain.parameters())) > 1e-2


def test_with_clipping_the_penalty_is_clipped_like_a_loss_term():
    """Clipping covers the penalty gradient in one process as under DeepSpeed: torch's AdamW after apply_(),
    and train/grad_norm is the norm of the loss and penalty gradients together."""
    cfg = StageConfig(lr=3e-2, weight_decay=0.0, max_grad_norm=1e-3, lr_scheduler_type="constant")
    model = tiny_model()
    ewc = HybridEWC(model, f_max=100.0, lam=1.0)
    for objective in STAGES[:2]:
        ewc.begin_stage(objective)
    stepper = TorchStepper(model, cfg, 2)
    loss_of(model, 0).backward()
    stepper.step(ewc)  # moves the weights off the anchor
    reference = copy.deepcopy(model)
    loss_of(model, 1).backward()
    loss_of(reference, 1).backward()
    loss_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), float("inf"))
    stats = stepper.step(ewc)
    assert type(stepper.optimizer) is torch.optim.AdamW and ewc.apply_count == 2 and float(stats["ewc/penalty"]) > 0
    assert float(stats["train/grad_norm"]) > float(loss_norm) * (1 + 1e-4)  # the penalty gradient is in .grad


def test_other_penalties_and_other_models_keep_torch_adamw_and_apply():
    cfg = StageConfig(lr=1e-2, max_grad_norm=1.0)
    model, other = tiny_model(), tiny_model()
    ewc = HybridEWC(other)  # another model's HybridEWC: its parameters are not this stepper's
    ewc.begin_stage("ifa")
    stepper = TorchStepper(model, cfg, 2)
    loss_of(model, 0).backward()
    stepper.step(ewc)
    assert type(stepper.optimizer) is torch.optim.AdamW and ewc.apply_count == 1
