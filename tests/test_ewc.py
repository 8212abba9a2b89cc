"""hbat.HybridEWC: stage logic of Algorithm 1, apply_ == penalty as a loss term, checkpoints, bad input."""
import copy
import math

import pytest
import torch

from hbat import HybridEWC, ops
from hbat.importance import IMPORTANCE_MODES, compute_importance, importance_entropy


class TinyNet(torch.nn.Module):
    """Two 'layers' with odd sizes, a norm and a frozen buffer-like parameter."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(11, 5, generator=g))
        self.layers = torch.nn.ModuleList([torch.nn.Linear(5, 5) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(5)
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, idx):
        h = self.embed[idx]
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.norm(h).sum(-1)


def loss_fn(model, batch):
    idx, target = batch
    return ((model(idx) - target) ** 2).mean()


def batches(n, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (size,), generator=g), torch.randn(size, generator=g)) for _ in range(n)]


def perturb(model, scales):
    """Move each parameter by a known amount so that importance differs between tensors."""
    with torch.no_grad():
        for (name, p), s in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], scales):
            p.add_(s)


# ---------------------------------------------------------------------------- importance modes
def test_importance_modes():
    acc = torch.tensor([1e-8, 2e-8, 4e-8, 1e-8], dtype=torch.float64)
    paper = compute_importance(acc, 100, "paper")
    torch.testing.assert_close(paper, torch.full((4,), 25.0), rtol=1e-6, atol=1e-6)  # literal: ~uniform
    released = compute_importance(acc, 100, "released")
    assert released.argmax() == 2 and released.max() == pytest.approx(100.0)  # one-hot
    normalized = compute_importance(acc, 100, "normalized")
    torch.testing.assert_close(normalized, compute_importance(acc * 1e6, 100, "normalized"))  # scale-invariant
    assert normalized.argsort().tolist() == [0, 3, 1, 2][:1] + normalized.argsort().tolist()[1:]
    assert normalized[2] > normalized[1] > normalized[0]
    proportional = compute_importance(acc, 100, "proportional")
    torch.testing.assert_close(proportional, torch.tensor([12.5, 25.0, 50.0, 12.5]))
    torch.testing.assert_close(compute_importance(acc, 100, "uniform"), torch.full((4,), 25.0))
    for mode in IMPORTANCE_MODES:
        F = compute_importance(acc, 7.0, mode)
        assert F.dtype == torch.float32 and F.sum().item() == pytest.approx(7.0, rel=1e-5)
        assert compute_importance(torch.zeros(0), 7.0, mode).numel() == 0
    assert importance_entropy(torch.full((5,), 2.0)) == pytest.approx(1.0)
    assert importance_entropy(torch.tensor([0.0, 3.0, 0.0])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="importance_mode"):
        compute_importance(acc, 1.0, "softmax")
    with pytest.raises(ValueError, match=r"\[1\]"):
        compute_importance(torch.tensor([0.0, -1.0]), 1.0)


# ---------------------------------------------------------------------------- Algorithm 1 stage logic
def test_stage_logic_follows_algorithm_1():
    model = TinyNet()
    ewc = HybridEWC(model, f_max=10.0, importance_mode="paper", importance_scale=1e3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert ewc.unit_names == names and "frozen" not in names
    n = len(names)

    def params():
        return [p.detach().clone() for n_, p in model.named_parameters() if p.requires_grad]

    start = params()
    ewc.begin_stage("ifa")
    assert not ewc.active and torch.all(ewc.importance == 0)  # first stage: no penalty
    perturb(model, [0.1 * (i + 1) for i in range(n)])
    c_ifa1 = ops.squared_change(params(), start, backend="reference").double()
    mid = params()
    ewc.begin_stage("hpa")  # F for HPA from AC^IFA
    torch.testing.assert_close(ewc.accumulated["ifa"], c_ifa1, rtol=1e-6, atol=0)
    torch.testing.assert_close(ewc.importance, ops.importance(c_ifa1, 10.0, scale=1e3))
    assert ewc.active and ewc.objective == "hpa"
    perturb(model, [0.05 * (n - i) for i in range(n)])
    c_hpa1 = ops.squared_change(params(), mid, backend="reference").double()
    mid = params()
    ewc.begin_stage("ifa")  # F for IFA2 from AC^HPA only
    torch.testing.assert_close(ewc.accumulated["hpa"], c_hpa1, rtol=1e-6, atol=0)
    torch.testing.assert_close(ewc.importance, ops.importance(c_hpa1, 10.0, scale=1e3))
    torch.testing.assert_close(ewc.accumulated["ifa"], c_ifa1, rtol=1e-6, atol=0)  # untouched
    perturb(model, [0.02] * n)
    c_ifa2 = ops.squared_change(params(), mid, backend="reference").double()
    ewc.begin_stage("hpa")  # AC^IFA = C1 + C2
    torch.testing.assert_close(ewc.accumulated["ifa"], c_ifa1 + c_ifa2, rtol=1e-6, atol=0)
    torch.testing.assert_close(ewc.importance, ops.importance(c_ifa1 + c_ifa2, 10.0, scale=1e3))
    assert ewc.stages_done == {"ifa": 2, "hpa": 1}
    # the anchor is the weights at the start of the current stage
    for a, p in zip(ewc.anchors, params()):
        torch.testing.assert_close(a, p, rtol=0, atol=0)
    ewc.end_stage()
    assert not ewc.active and ewc.stages_done["hpa"] == 2


def test_group_by_layer_and_selection():
    model = TinyNet()
    ewc = HybridEWC(model, group_by="layer")
    assert ewc.unit_names == ["embed", "layers.0", "layers.1", "norm.weight", "norm.bias"]
    assert ewc.groups.numel[1] == 5 * 5 + 5
    only_layers = HybridEWC(model, include="layers.*", exclude="*.bias")
    assert only_layers.unit_names == ["layers.0.weight", "layers.1.weight"]
    with pytest.raises(ValueError, match="no trainable parameter"):
        HybridEWC(model, include="nothing*")
    with pytest.raises(ValueError, match="unknown objective 'sft'"):
        ewc.begin_stage("sft")
    with pytest.raises(ValueError, match="objectives"):
        HybridEWC(model, objectives=("ifa",))
    with pytest.raises(TypeError, match="nn.Module"):
        HybridEWC(torch.zeros(3))
    # a user's own objective names
    custom = HybridEWC(model, objectives=("chat", "code", "safety"))
    custom.begin_stage("chat")
    perturb(model, [0.1] * 7)
    custom.begin_stage("code")
    assert custom.active


def test_compiled_and_lora_like_models():
    model = TinyNet()
    compiled = torch.compile(model, backend="eager")
    assert HybridEWC(compiled).unit_names == HybridEWC(model).unit_names  # no "_orig_mod." prefix
    for p in model.parameters():
        p.requires_grad_(False)
    model.layers[0].weight.requires_grad_(True)  # the "adapter": only trainable tensors are penalised
    assert HybridEWC(model).unit_names == ["layers.0.weight"]


# ---------------------------------------------------------------------------- apply_ == penalty as a loss
def _train(model, ewc, data, *, use_apply, accum=1, clip=None, steps_per_stage=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    penalties = []
    it = iter(data)
    for objective in ("ifa", "hpa", "ifa"):
        ewc.begin_stage(objective)
        for _ in range(steps_per_stage):
            opt.zero_grad(set_to_none=True)
            for _ in range(accum):
                loss = loss_fn(model, next(it)) / accum
                if not use_apply:
                    loss = loss + ewc.penalty() / accum
                loss.backward()
            if use_apply:
                penalties.append(ewc.apply_())
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return penalties


@pytest.mark.parametrize("accum, clip", [(1, None), (2, None), (1, 0.05), (3, 0.05)])
def test_apply_matches_penalty_as_loss_term(accum, clip):
    data = batches(9 * accum)
    a, b = TinyNet(), TinyNet()
    ewc_a = HybridEWC(a, f_max=50.0, lam=2.0, importance_mode="proportional")
    ewc_b = HybridEWC(b, f_max=50.0, lam=2.0, importance_mode="proportional")
    penalties = _train(a, ewc_a, data, use_apply=True, accum=accum, clip=clip)
    _train(b, ewc_b, data, use_apply=False, accum=accum, clip=clip)
    assert all(p.dim() == 0 and p.dtype == torch.float32 for p in penalties)
    assert float(penalties[-1]) > 0 and float(penalties[0]) == 0  # first stage unpenalised
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_apply_gradients_and_grad_scale():
    model = TinyNet()
    ewc = HybridEWC(model, f_max=5.0, lam=0.5)
    ewc.begin_stage("hpa")
    perturb(model, [0.1 * (i + 1) for i in range(7)])
    ewc.begin_stage("ifa")
    perturb(model, [0.03] * 7)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    ewc.penalty().backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None  # apply_ creates missing gradients
    value = ewc.apply_()
    for g, p in zip(expected, params):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    assert model.frozen.grad is None
    torch.testing.assert_close(value, ewc.penalty().detach(), rtol=1e-6, atol=1e-7)
    # before GradScaler.unscale_: pass the scale, the result after unscaling is the same
    for p in params:
        p.grad = torch.full_like(p, 3.0) * 1024.0
    ewc.apply_(grad_scale=1024.0)
    for g, p in zip(expected, params):
        torch.testing.assert_close(p.grad / 1024.0, g + 3.0, rtol=1e-6, atol=1e-6)


def test_bf16_anchor_and_reference_backend():
    model = TinyNet()
    ewc = HybridEWC(model, anchor_dtype=torch.bfloat16, backend="reference")
    assert all(a.dtype == torch.bfloat16 for a in ewc.anchors)
    ewc.begin_stage("ifa")
    perturb(model, [0.1] * 7)
    ewc.begin_stage("hpa")
    perturb(model, [0.1] * 7)
    assert float(ewc.apply_()) > 0
    with pytest.raises(ValueError, match="anchor_dtype"):
        HybridEWC(model, anchor_dtype=torch.int8)


# ---------------------------------------------------------------------------- checkpoints
def test_save_load_mid_run_reproduces_uninterrupted_run(tmp_path):
    data = batches(12)

    def run(stop_after=None, resume_from=None):
        model = TinyNet()
        ewc = HybridEWC(model, f_max=20.0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        plan = ["ifa", "hpa", "ifa", "hpa"]
        start = 0
        if resume_from is not None:
            state = torch.load(resume_from, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            ewc.load_state_dict(state["ewc"])
            start = state["stage"]
        for i in range(start, len(plan)):
            ewc.begin_stage(plan[i])
            for batch in data[3 * i: 3 * i + 3]:
                opt.zero_grad()
                loss_fn(model, batch).backward()
                ewc.apply_()
                opt.step()
            if stop_after == i:
                path = tmp_path / "ckpt.pt"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ewc": ewc.state_dict(),
                            "stage": i + 1}, path)
                return path
        return model, ewc

    full_model, full_ewc = run()
    resumed_model, resumed_ewc = run(resume_from=run(stop_after=1))
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(full_ewc.importance, resumed_ewc.importance)
    for o in ("ifa", "hpa"):
        assert torch.equal(full_ewc.accumulated[o], resumed_ewc.accumulated[o])


def test_load_state_dict_says_what_differs():
    model = TinyNet()
    ewc = HybridEWC(model)
    ewc.begin_stage("ifa")
    state = ewc.state_dict()
    other = HybridEWC(model, exclude="norm.*")
    with pytest.raises(ValueError, match=r"missing in the state.*|not in this model.*norm.weight"):
        other.load_state_dict(state)
    bad = copy.deepcopy(state)
    bad["anchors"][0] = torch.zeros(3, 3)
    before = [a.clone() for a in ewc.anchors]
    with pytest.raises(ValueError, match="anchor of 'embed' has shape"):
        ewc.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(ewc.anchors, before))  # nothing modified
    bad = copy.deepcopy(state)
    del bad["accumulated"]
    with pytest.raises(KeyError, match="accumulated"):
        ewc.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["objectives"] = ["sft", "dpo"]
    with pytest.raises(ValueError, match="objectives"):
        ewc.load_state_dict(bad)


def test_penalty_pulls_toward_anchor():
    torch.manual_seed(0)
    data = batches(30)
    finals = {}
    for lam in (0.0, 1.0):
        model = TinyNet()
        ewc = HybridEWC(model, f_max=100.0, lam=lam, importance_mode="uniform")
        ewc.begin_stage("ifa")
        ewc.begin_stage("hpa")  # treat the start as the end of an (empty) IFA stage: uniform F is active
        ewc.stages_done["ifa"] = 1
        ewc.begin_stage("ifa")
        ewc.begin_stage("hpa")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for batch in data:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            ewc.apply_()
            opt.step()
        drift = ops.squared_change([p.detach() for p in model.parameters() if p.requires_grad], ewc.anchors,
                                   reduction="sum").sum()
        finals[lam] = float(drift)
    assert finals[1.0] < finals[0.0]
    assert math.isfinite(finals[1.0])
