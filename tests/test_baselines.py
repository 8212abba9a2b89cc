"""Baselines: the per-element Fisher EWC of the HBAT paper and HBAT-Freeze."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hbat.baselines import FisherEWC, TensorFreezer, empirical_fisher, select_top


class TinyMLPLM(nn.Module):
    """A causal LM without attention: position t sees tokens t and t-1 only (an MLP over a bigram window)."""

    def __init__(self, vocab=13, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 16), nn.Tanh(), nn.Linear(16, dim))
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return self.lm_head(self.mlp(torch.cat([h, prev], dim=-1)))


def _samples(vocab, lengths=(6, 9, 4, 7, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100  # prompt: not part of log p(y|x)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _direct_fisher(model, samples, forward):
    """Mean over samples of the squared gradient of log p(y|x), one sample at a time, written independently."""
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in samples:
        ids, labels = s["input_ids"], s["labels"]
        logits = forward(model, ids[None])[0]
        response = labels[1:] != -100
        logp = -F.cross_entropy(logits[:-1][response], labels[1:][response], reduction="sum")
        grads = torch.autograd.grad(logp, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n] += g * g
    return {n: f / len(samples) for n, f in fisher.items()}


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_fisher_equals_direct_per_sample_computation_mlp(method):
    torch.manual_seed(0)
    model = TinyMLPLM()
    samples = _samples(13)
    expected = _direct_fisher(model, samples, lambda m, ids: m(ids))
    got = empirical_fisher(model, samples, method=method, chunk_size=2)
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7, msg=n)
    # the square is per sample: squaring the summed gradient gives something else
    assert any(float(f.abs().max()) > 0 for f in got.values())


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_fisher_equals_direct_per_sample_computation_llama(method):
    model = _tiny_llama()
    samples = _samples(32, lengths=(5, 8, 6))
    expected = _direct_fisher(model, samples, lambda m, ids: m(input_ids=ids).logits)
    got = empirical_fisher(model, samples, method=method)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7, msg=n)


def test_fisher_accepts_padded_batches():
    torch.manual_seed(0)
    model = TinyMLPLM()
    samples = _samples(13, lengths=(4, 7))
    width = 7
    batch = {
        "input_ids": torch.stack([torch.cat([s["input_ids"], torch.zeros(width - len(s["input_ids"]), dtype=torch.long)])
                                  for s in samples]),
        "labels": torch.stack([torch.cat([s["labels"], torch.full((width - len(s["labels"]),), -100)]) for s in samples]),
        "attention_mask": torch.tensor([[1] * 4 + [0] * 3, [1] * 7]),
    }
    per_sample = empirical_fisher(model, samples)
    batched = empirical_fisher(model, [batch])
    for n in per_sample:
        torch.testing.assert_close(batched[n], per_sample[n])
    with pytest.raises(ValueError, match="labels"):
        empirical_fisher(model, [{"input_ids": torch.ones(3, dtype=torch.long)}])


def test_fisher_ewc_penalty_and_grad():
    torch.manual_seed(0)
    model = TinyMLPLM()
    fewc = FisherEWC(model, lam=2.0, scale=10.0)
    assert fewc.begin_stage("ifa")["fisher/active"] == 0.0 and not fewc.active
    assert float(fewc.apply_()) == 0.0 and all(p.grad is None for p in model.parameters())

    samples = _samples(13)
    record = fewc.begin_stage("hpa", samples=samples)
    assert fewc.active and record["fisher/max"] > 0
    fisher = {n: 10.0 * f for n, f in empirical_fisher(model, samples).items()}
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # move away from the anchor
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))

    expected = sum(1.0 * (fisher[n] * (p - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    penalty = fewc.penalty()
    torch.testing.assert_close(penalty, expected.detach(), rtol=1e-5, atol=1e-8)
    penalty.backward()
    autograd = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(fewc.apply_(), expected.detach(), rtol=1e-5, atol=1e-8)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, autograd[n], msg=n)
        torch.testing.assert_close(p.grad, 2.0 * fisher[n] * (p.detach() - anchors[n]), msg=n)

    restored = FisherEWC(model, lam=2.0)
    restored.load_state_dict(fewc.state_dict())
    torch.testing.assert_close(restored.penalty(), penalty.detach())


def _model_with_sizes(sizes):
    model = nn.Module()
    model.weights = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in sizes)
    return model


def test_freeze_by_tensor_count():
    model = _model_with_sizes([10] * 10)
    importance = torch.tensor([0.1, 5.0, 0.3, 0.2, 9.0, 0.0, 0.4, 0.5, 0.6, 0.7])
    freezer = TensorFreezer(model, fraction=0.2, by="tensors")
    record = freezer.freeze_(importance)
    assert record.names == ["weights.4", "weights.1"]  # the two most important, most important first
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert [n for n, trainable in flags.items() if not trainable] == ["weights.1", "weights.4"]
    assert record.tensor_fraction == 0.2 and record.metrics()["freeze/tensors"] == 2.0
    assert freezer.unfreeze_() == ["weights.4", "weights.1"]
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_by_parameter_count():
    sizes = [50, 10, 10, 20, 5, 5]  # 100 elements: the budget at 20% is 20 elements
    model = _model_with_sizes(sizes)
    importance = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    record = TensorFreezer(model, fraction=0.2, by="params").freeze_(importance)
    assert record.names == []  # the most important tensor alone (50) exceeds the budget: the prefix is empty
    importance = [1.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    freezer = TensorFreezer(model, fraction=0.2, by="params")
    record = freezer.freeze_(importance)
    assert record.names == ["weights.1", "weights.2"] and record.frozen_numel == 20 and record.param_fraction == 0.2
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["weights.1", "weights.2"]
    # a new stage: the previous set is released first, then the new top tensors are frozen
    record = freezer.freeze_({"weights.4": 1.0, "weights.5": 0.5})
    assert record.names == ["weights.4", "weights.5"]
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == ["weights.4", "weights.5"]


def test_freeze_edge_cases_and_bad_input():
    model = _model_with_sizes([3, 3, 3, 3, 3])
    freezer = TensorFreezer(model, fraction=0.4)
    assert freezer.freeze_(torch.zeros(5)).names == []  # first stage: no importance yet
    model.weights[0].grad = torch.ones(3)
    freezer.freeze_([1.0, 1.0, 1.0, 0.0, 0.0])  # ties keep model order
    assert freezer.frozen == ["weights.0", "weights.1"] and model.weights[0].grad is None
    with pytest.raises(ValueError, match="entries"):
        freezer.freeze_([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        freezer.freeze_([1.0, float("nan"), 0.0, 0.0, 0.0])
    assert freezer.frozen == ["weights.0", "weights.1"]  # bad input changed nothing
    with pytest.raises(ValueError, match="does not train"):
        freezer.freeze_({"nope": 1.0})
    with pytest.raises(ValueError, match="fraction"):
        TensorFreezer(model, fraction=1.5)
    assert select_top([3.0, 2.0, 1.0], [1, 1, 1], 1.0, "tensors") == [0, 1, 2]
    assert select_top([0.0, 0.0, 7.0, 0.0, 0.0], [1] * 5, 0.4, "tensors") == [2]  # one-hot: zeros stay trainable
    assert select_top([3.0, 2.0, 1.0], [1, 1, 1], 0.0, "params") == []
