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


# ---------------------------------------------------------------------------- parameters frozen later, grad_scale
def _penalised(model, **kwargs):
    """A HybridEWC past one IFA stage, in a penalised HPA stage, with the weights away from the anchor."""
    ewc = HybridEWC(model, f_max=5.0, lam=0.5, **kwargs)
    ewc.begin_stage("ifa")
    perturb(model, [0.1 * (i + 1) for i in range(7)])
    ewc.begin_stage("hpa")
    perturb(model, [0.03 * (i + 1) for i in range(7)])
    return ewc


def test_apply_skips_parameters_frozen_after_construction():
    model = TinyNet()
    ewc = _penalised(model)
    frozen = model.layers[0].weight
    frozen.requires_grad_(False)  # e.g. a freezing schedule, after the HybridEWC was built
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.grad = None
    value = ewc.apply_()
    assert frozen.grad is None  # never created, so an optimizer cannot move the frozen weight
    expected = sum(0.5 * 0.5 * float(F) * float(((p.detach() - a) ** 2).sum()) for p, a, F in
                   zip(ewc.view.params(), ewc.anchors, ewc.importance) if p.requires_grad)
    assert float(value) == pytest.approx(expected, rel=1e-5)  # the frozen tensor's term is left out
    for p, a, F in zip(ewc.view.params(), ewc.anchors, ewc.importance):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 0.5 * float(F) * (p.detach() - a), rtol=1e-5, atol=1e-7)
    before = frozen.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=0.1).step()
    assert torch.equal(frozen, before)
    frozen.requires_grad_(True)  # trainable again: penalised again
    assert len(trainable) + 1 == len(ewc.view.params())
    ewc.apply_()
    assert frozen.grad is not None and float(frozen.grad.abs().sum()) > 0


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -2.0, "2", None])
def test_apply_refuses_a_bad_grad_scale_before_touching_gradients(scale):
    model = TinyNet()
    ewc = _penalised(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    with pytest.raises((ValueError, TypeError), match="grad_scale"):
        ewc.apply_(grad_scale=scale)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="grad_scale"):
        ewc.apply_(grad_scale=torch.ones(2))


def test_apply_with_a_tensor_grad_scale_matches_a_float():
    grads = []
    for scale in (1024.0, torch.tensor(1024.0)):
        model = TinyNet()
        ewc = _penalised(model)
        for p in model.parameters():
            p.grad = None
        ewc.apply_(grad_scale=scale)
        grads.append([p.grad.clone() for p in ewc.view.params()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- load_state_dict checks every field first
def _bad(state, path, value):
    bad = copy.deepcopy(state)
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return bad


@pytest.mark.parametrize("path, value, error, match", [
    (("stages_done", "ifa"), -1, ValueError, r"stages_done.*'ifa'.*>= 0"),
    (("stages_done", "ifa"), 1.5, ValueError, r"stages_done"),
    (("stages_done", "hpa"), "2", ValueError, r"stages_done"),
    (("stages_done", "hpa"), True, ValueError, r"stages_done"),
    (("history",), {"ended": None}, ValueError, r"history"),
    (("history",), [{"ended": "sft", "began": "ifa"}], ValueError, r"history.*\[0\].*'ended'"),
    (("history",), ["ifa"], ValueError, r"history.*\[0\]"),
    (("history",), [{"ended": None, "began": "ifa", "ewc/change_mean": float("nan")}], ValueError, "change_mean"),
    (("objective",), "sft", ValueError, "current objective"),
    (("importance",), torch.full((7,), float("nan")), ValueError, r"importance.*NaN"),
    (("importance",), -torch.ones(7), ValueError, r"importance.*negative"),
    (("accumulated", "ifa"), -torch.ones(7, dtype=torch.float64), ValueError, r"accumulated.*'ifa'.*negative"),
    (("accumulated", "hpa"), torch.full((7,), float("inf"), dtype=torch.float64), ValueError, r"accumulated.*inf"),
    (("accumulated", "hpa"), torch.zeros(7, dtype=torch.long), ValueError, r"accumulated.*floating"),
    (("last_change",), torch.zeros(6), ValueError, r"last_change.*shape"),
    (("settings", "f_max"), 50.0, ValueError, r"other settings: f_max=50.0 \(here 5.0\)"),
    (("settings", "lam"), 2.0, ValueError, r"lam=2.0 \(here 0.5\)"),
    (("settings", "importance_mode"), "uniform", ValueError, r"importance_mode='uniform'"),
    (("anchors",), None, ValueError, "anchors"),
])
def test_load_state_dict_validates_every_field_before_changing_anything(path, value, error, match):
    model = TinyNet()
    ewc = _penalised(model)
    state = ewc.state_dict()
    # the state of another moment of the run: loading it would change the anchors, importance and position
    perturb(model, [0.2] * 7)
    ewc.begin_stage("ifa")
    before = copy.deepcopy(ewc.state_dict())
    with pytest.raises(error, match=match):
        ewc.load_state_dict(_bad(state, path, value))
    after = ewc.state_dict()
    for a, b in zip(after["anchors"], before["anchors"]):
        assert torch.equal(a, b)  # nothing modified
    assert after["objective"] == before["objective"] == "ifa" and after["stages_done"] == before["stages_done"]
    assert torch.equal(after["importance"], before["importance"]) and after["history"] == before["history"]
    ewc.load_state_dict(state)  # the good state still loads
    assert ewc.objective == "hpa"


# ---------------------------------------------------------------------------- bind / unbind / partitioned models
def test_anchors_are_taken_at_the_first_stage_boundary_not_at_construction():
    model = TinyNet()
    ewc = HybridEWC(model)
    assert ewc._anchors is None  # nothing allocated until a stage starts (the engine may not exist yet)
    perturb(model, [0.5] * 7)
    ewc.begin_stage("ifa")
    for a, p in zip(ewc.anchors, ewc.view.params()):
        assert torch.equal(a, p)


def test_unbind_keeps_the_state_and_bind_continues():
    model = TinyNet()
    ewc = _penalised(model)
    state = ewc.state_dict()
    ewc.unbind()
    assert ewc.state_dict()["fragment_names"] == state["fragment_names"]  # still saves
    with pytest.raises(RuntimeError, match="not bound"):
        ewc.apply_()
    with pytest.raises(RuntimeError, match="not bound"):
        ewc.begin_stage("ifa")
    assert ewc.objective == "hpa"
    ewc.bind(model)
    assert float(ewc.apply_()) > 0
    with pytest.raises(ValueError, match="does not train the model"):
        ewc.bind(TinyNet(seed=1))
    with pytest.raises(ValueError, match="needs live parameters"):
        ewc.bind(_zero3_like(TinyNet()))


def _zero3_like(model):
    """What DeepSpeed's zero.Init leaves: empty parameters that know their full size (``ds_numel``)."""
    for i, p in enumerate(model.parameters()):
        p.ds_id, p.ds_numel = i, p.numel()
        p.data = torch.empty(0)
    return model


def test_a_zero3_partitioned_model_waits_for_its_engine():
    model = _zero3_like(TinyNet())
    ewc = HybridEWC(model)
    assert ewc.unit_names == [n for n, p in TinyNet().named_parameters() if p.requires_grad]
    assert ewc.groups.numel == [p.numel() for p in TinyNet().parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="ZeRO-3.*bind"):
        ewc.begin_stage("ifa")
    with pytest.raises(RuntimeError, match="ZeRO-3.*bind"):
        ewc.load_state_dict(_penalised(TinyNet()).state_dict())
    assert ewc.objective is None


class _ShardedLayout:
    """Half of each tensor, as a sharded view lays out its fragments (for relayout)."""

    def __init__(self, model, rank):
        params = [p for p in model.parameters() if p.requires_grad]
        self.fragment_unit, self.fragment_offsets, self.fragment_shapes, self.fragment_names = [], [], [], []
        self._params = []
        for unit, p in enumerate(params):
            half = (p.numel() + 1) // 2
            start, stop = rank * half, min(p.numel(), (rank + 1) * half)
            if start < stop:
                self.fragment_unit.append(unit)
                self.fragment_offsets.append(start)
                self.fragment_shapes.append((stop - start,))
                self.fragment_names.append(f"{unit}[{start}:{stop}]")
                self._params.append(p.detach().reshape(-1)[start:stop])

    def params(self):
        return self._params


def test_relayout_cuts_full_anchors_to_a_shard_and_refuses_what_this_rank_lacks():
    from hbat.param_view import relayout

    model = TinyNet()
    ewc = _penalised(model)
    for rank in (0, 1):
        shard = _ShardedLayout(model, rank)
        cut = relayout(ewc.anchors, ewc.view, shard, torch.float32)
        for piece, unit, start in zip(cut, shard.fragment_unit, shard.fragment_offsets):
            full = ewc.anchors[unit].reshape(-1)
            assert torch.equal(piece, full[start:start + piece.numel()])
            assert piece.data_ptr() != full.data_ptr() + 4 * start  # a copy: the full anchor can be freed
        assert relayout(cut, shard, shard, torch.float32)[0] is not None  # the same sharding covers itself
    rank0, rank1 = _ShardedLayout(model, 0), _ShardedLayout(model, 1)
    with pytest.raises(ValueError, match="holds no anchor.*partitioned differently"):
        relayout(relayout(ewc.anchors, ewc.view, rank0, torch.float32), rank0, rank1, torch.float32)


def test_wrapper_prefixes_are_stripped_as_whole_name_components():
    from hbat.param_view import clean_name

    assert clean_name("module._orig_mod.layers.0._checkpoint_wrapped_module.w") == "layers.0.w"
    assert clean_name("_fsdp_wrapped_module.embed") == "embed"
    assert clean_name("encoder.submodule.weight") == "encoder.submodule.weight"  # not "encoder.subweight"
