"""In-place averaging in one process: InPlaceAverager (uniform, ExPO, per-block, EMA anchor), exact restores, the
ratio sweep (table, Pareto front, plot, resumable table), the forgetting meter, and L2-SP in HybridEWC."""
import copy
import json

import pytest
import torch
from torch import nn

from hbat import HybridAdamW, HybridEWC
from hbat.averaging import InPlaceAverager, WeightShards, kl_to_start, pareto_front, run_sweep, token_kl


class TinyLM(nn.Module):
    """Embedding, numbered layers, final norm, lm_head (HF naming); returns logits."""

    def __init__(self, vocab=13, dim=8, num_layers=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(dim, dim), "norm": nn.LayerNorm(dim)})
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.tanh(layer["proj"](layer["norm"](h)))
        return self.lm_head(self.norm(h))


def trained(seed=0, scale=0.1):
    """A model and a copy of its start, after a seeded 'training' step on every tensor."""
    torch.manual_seed(seed)
    model = TinyLM()
    start = copy.deepcopy(model)
    averager = InPlaceAverager(model, blocks=2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model, start, averager


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def lerp64(a, b, w):
    return ((1 - w) * a.double() + w * b.double()).float()


BLOCK = {"embed.weight": 0, "layers.0": 0, "layers.1": 0, "layers.2": 1, "layers.3": 1, "norm": 1, "lm_head": 1}


def block_of(name):
    return next(b for prefix, b in BLOCK.items() if name.startswith(prefix))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0, 1.5, [0.2, 0.9]])
def test_apply_is_the_lerp_with_the_start_for_every_ratio(ratio):
    model, start, averager = trained()
    current, begin = params(model), params(start)
    averager.apply_(ratio)
    for name, p in model.named_parameters():
        w = ratio[block_of(name)] if isinstance(ratio, list) else ratio
        if w in (0.0, 1.0):  # both endpoints exact
            assert torch.equal(p, (begin if w == 0.0 else current)[name]), name
        else:
            torch.testing.assert_close(p.detach(), lerp64(begin[name], current[name], w), rtol=0, atol=1e-6, msg=name)


def test_expo_extrapolates_past_the_trained_model():
    model, start, averager = trained()
    current, begin = params(model), params(start)
    averager.apply_(1.0 + 0.5)  # theta + 0.5 (theta - theta_start)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), current[name] + 0.5 * (current[name] - begin[name]), rtol=0, atol=1e-6)


def test_copied_and_mean_tensors_follow_the_plan():
    torch.manual_seed(0)
    model = TinyLM()
    begin = params(model)
    averager = InPlaceAverager(model, scope="linear", blocks=2, non_layer="mean")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    current = params(model)
    averager.apply_([0.25, 0.75])
    got = params(model)
    assert torch.equal(got["layers.0.norm.weight"], begin["layers.0.norm.weight"])  # not Linear: the start
    torch.testing.assert_close(got["layers.3.proj.weight"], lerp64(begin["layers.3.proj.weight"],
                                                                  current["layers.3.proj.weight"], 0.75))
    torch.testing.assert_close(got["lm_head.weight"], lerp64(begin["lm_head.weight"], current["lm_head.weight"], 0.5))


def test_averaged_and_start_weights_restore_bit_for_bit_also_on_errors():
    model, start, averager = trained()
    current, begin = params(model), params(start)
    with averager.averaged([0.1, 1.7]) as inside:
        assert inside is model and not torch.equal(model.layers[3].proj.weight, current["layers.3.proj.weight"])
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with averager.start_weights():
            assert all(torch.equal(p, begin[n]) for n, p in model.named_parameters())
            raise RuntimeError("boom")
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())
    assert all(torch.equal(s, begin[n]) for n, s in zip(averager.shards.unit_names, averager.shards.start))


def test_ema_anchor_then_replace_the_weights_by_it():
    model, start, averager = trained()
    begin = params(start)
    for step in range(2):
        current = params(model)
        averager.ema_(0.25)
        begin = {n: lerp64(begin[n], current[n], 0.25) for n in begin}
        with torch.no_grad():
            model.lm_head.weight.add_(0.5)
    for name, anchor in zip(averager.shards.unit_names, averager.shards.start):
        torch.testing.assert_close(anchor, begin[name], rtol=0, atol=1e-6)
    averager.apply_(0.0)  # the weights <- the anchor, exactly
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), averager.shards.start))


def test_bad_input_raises_before_anything_changes():
    model, _, averager = trained()
    current = params(model)
    for ratio, error, match in ((float("nan"), ValueError, "finite"), ([0.1, 0.2, 0.3], ValueError, "2 blocks"),
                                ("0.5", TypeError, "number"), ([0.1, float("inf")], ValueError, r"ratio\[1\]")):
        with pytest.raises(error, match=match):
            averager.apply_(ratio)
    with pytest.raises(ValueError, match="ema rate"):
        averager.ema_(0.0)
    one_block = InPlaceAverager(model)
    with pytest.raises(ValueError, match="one block"):
        one_block.apply_([0.2, 0.8])
    with pytest.raises(ValueError, match=r"'embed.weight': start_from has \(13, 4\)"):
        InPlaceAverager(model, start_from=TinyLM(dim=4))
    with pytest.raises(ValueError, match="no parameter 'layers.3.proj.weight'"):
        InPlaceAverager(model, start_from=TinyLM(num_layers=3))
    with pytest.raises(TypeError, match="nn.Module"):
        InPlaceAverager([torch.zeros(2)])
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())


def test_start_from_another_model_is_taken_over_without_a_copy():
    torch.manual_seed(0)
    pre, post = TinyLM(), TinyLM()
    averager = InPlaceAverager(post, start_from=pre)
    assert all(s.data_ptr() == p.data_ptr() for s, p in zip(averager.shards.start, pre.parameters()))
    assert averager.shards.kind == "local" and averager.shards.start_bytes == 4 * sum(p.numel() for p in pre.parameters())


def test_state_dict_round_trip_and_refusals():
    model, _, averager = trained()
    state = averager.shards.state_dict()
    other = WeightShards(model)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.start, averager.shards.start))
    broken = {**state, "start": [t.clone() for t in state["start"]]}
    broken["start"][1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.0.proj.weight holds NaN"):
        other.load_state_dict(broken, "x.pt")
    with pytest.raises(ValueError, match="other weights"):
        WeightShards(TinyLM(num_layers=2)).load_state_dict(state)


# ------------------------------------------------------------------ the sweep


def held_out_loss(model, share):
    logits = model(share["ids"])
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), share["ids"][:, 1:].reshape(-1))
    return {"loss": float(loss), "distance": float(sum(p.detach().abs().sum() for p in model.parameters()))}


DATA = {"ids": torch.randint(0, 13, (6, 7), generator=torch.Generator().manual_seed(5))}


def test_pareto_front():
    rows = [{"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 0.5}, {"a": 0.5, "b": 0.5}, {"a": 2.0, "b": 0.5},
            {"a": float("nan"), "b": 9.0}, {"a": 0.9, "b": 3.0}]
    assert pareto_front(rows, {"a": "max", "b": "max"}) == [0, 1, 3, 5]  # 2 dominated; 4 has a NaN
    assert pareto_front(rows, {"a": "max", "b": "min"}) == [1, 3]
    assert pareto_front(rows, {}) == []


def test_sweep_evaluates_in_memory_and_restores_exactly(tmp_path):
    model, _, averager = trained()
    current = params(model)
    ratios = [0.0, 0.5, 1.0, 1.5, [0.2, 0.8]]
    expect = []
    for ratio in ratios:
        with averager.averaged(ratio), torch.no_grad():
            expect.append(held_out_loss(model, DATA))
    result = run_sweep(averager, ratios, held_out_loss, data=DATA, minimize=["loss", "distance"],
                       table=str(tmp_path / "t.json"), plot=str(tmp_path / "p.png"))
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())
    assert [r["ratio"] for r in result.rows] == ratios and result.reused == 0
    for row, want in zip(result.rows, expect):
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert result.front == pareto_front(result.rows, {"loss": "min", "distance": "min"}) and result.front
    assert (tmp_path / "p.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [r["index"] for r in saved["rows"]] == list(range(len(ratios)))


def test_an_interrupted_sweep_reuses_its_table(tmp_path):
    model, _, averager = trained()
    current = params(model)
    calls = []

    def crashing(model, share):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return held_out_loss(model, share)

    ratios, table = [0.0, 0.25, 0.5, 0.75], str(tmp_path / "t.json")
    with pytest.raises(RuntimeError, match="interrupted"):
        run_sweep(averager, ratios, crashing, data=DATA, minimize=["loss"], table=table)
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())  # restored despite the error
    calls.clear()
    resumed = run_sweep(averager, ratios, crashing, data=DATA, minimize=["loss"], table=table)
    assert resumed.reused == 2 and len(calls) == 2
    fresh = run_sweep(averager, ratios, held_out_loss, data=DATA, minimize=["loss"])
    assert resumed.rows == fresh.rows
    with pytest.raises(ValueError, match=r"another sweep \(its ratios differ"):
        run_sweep(averager, [0.0, 0.3], held_out_loss, data=DATA, minimize=["loss"], table=table)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # other weights: the table no longer applies
    with pytest.raises(ValueError, match="its weights differ"):
        run_sweep(averager, ratios, held_out_loss, data=DATA, minimize=["loss"], table=table)


def test_sweep_bad_input_raises_before_any_write(tmp_path):
    model, _, averager = trained()
    current = params(model)
    with pytest.raises(ValueError, match="ratios"):
        run_sweep(averager, [], held_out_loss)
    with pytest.raises(ValueError, match=r"ratios\[1\]"):
        run_sweep(averager, [0.5, [0.1, 0.2, 0.3]], held_out_loss)
    with pytest.raises(TypeError, match="callable"):
        run_sweep(averager, [0.5], "loss")
    with pytest.raises(ValueError, match="no 'reward'"):
        run_sweep(averager, [0.5], held_out_loss, data=DATA, maximize=["reward"])
    with pytest.raises(TypeError, match="'bad'"):
        run_sweep(averager, [0.5], lambda m, s: {"bad": "x"}, data=DATA)
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ValueError, match="t.json: cannot be read"):
        run_sweep(averager, [0.5], held_out_loss, table=str(tmp_path / "t.json"))
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------ the forgetting meter


def test_kl_meter_is_the_exact_token_kl_to_a_separate_start_model():
    model, start, averager = trained(scale=0.05)
    current = params(model)
    ids = torch.randint(0, 13, (3, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens are not measured
    got = kl_to_start(averager.shards, {"input_ids": ids, "labels": labels}, forward=lambda m, b: m(b["input_ids"]))
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())  # swapped back exactly
    with torch.no_grad():
        cur = torch.log_softmax(model(ids)[:, 3:-1], -1).reshape(-1, 13)
        ref = torch.log_softmax(start(ids)[:, 3:-1], -1).reshape(-1, 13)
    forward = float((ref.exp() * (ref - cur)).sum(-1).mean())
    reverse = float((cur.exp() * (cur - ref)).sum(-1).mean())
    assert got["kl_tokens"] == 3 * 5
    assert got["kl_to_start"] == pytest.approx(forward, rel=1e-5) and got["kl_to_start_reverse"] == pytest.approx(reverse, rel=1e-5)
    assert got["kl_to_start"] > 1e-4 and got["kl_to_start"] != pytest.approx(got["kl_to_start_reverse"], rel=1e-3)
    averager.apply_(0.0)  # at the start: zero
    at_start = kl_to_start(averager.shards, {"input_ids": ids}, forward=lambda m, b: m(b["input_ids"]))
    assert at_start["kl_to_start"] == 0.0 and at_start["kl_tokens"] == 3 * 8


def test_token_kl_is_never_negative():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(50, 7, generator=g), -1)
    assert bool((token_kl(p, p) == 0).all()) and bool((token_kl(p, p.flip(0)) >= 0).all())


# ------------------------------------------------------------------ L2-SP


def test_l2sp_is_hybrid_ewc_with_uniform_decay_from_the_first_stage():
    torch.manual_seed(0)
    model = TinyLM()
    lam = 0.3
    ewc = HybridEWC(model, lam=lam, importance_mode="l2sp")
    ewc.begin_stage("ifa")  # the anchor theta_0: the start
    theta0 = params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    penalty = ewc.apply_()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, lam * (p.detach() - theta0[name]), rtol=1e-6, atol=0, msg=name)
    want = sum(0.5 * lam * float(((p.detach() - theta0[n]) ** 2).sum()) for n, p in model.named_parameters())
    assert float(penalty) == pytest.approx(want, rel=1e-5)
    uniform = HybridEWC(TinyLM(), importance_mode="uniform")
    uniform.begin_stage("ifa")
    assert not uniform.active  # "uniform" has no penalty in the first stage, unlike L2-SP
    with pytest.raises(ValueError, match="l2sp"):
        HybridEWC(model, importance_mode="l2-sp")


def test_l2sp_inside_hybrid_adamw_is_adamw_on_the_decayed_gradient():
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    ewc = HybridEWC(model, lam=0.5, importance_mode="l2sp")
    ewc.begin_stage("ifa")
    theta0 = params(model)
    optimizer = HybridAdamW(model, ewc, lr=1e-2, weight_decay=0.0)
    reference = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(3))
    for _ in range(3):  # from the second step on theta != theta_0: the decay term matters
        for net, opt in ((model, optimizer), (ref, reference)):
            net(ids).logsumexp(-1).mean().backward()
        with torch.no_grad():
            for (name, p) in ref.named_parameters():
                p.grad.add_(0.5 * (p - theta0[name]))
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert max(float((p.detach() - theta0[n]).abs().max()) for n, p in model.named_parameters()) > 1e-3
