"""Model averaging (hbat.averaging): uniform averaging, the sweep, the block plan and learned HMA ratios."""
import json
import os

import pytest
import torch
from torch import nn

from hbat.averaging import (
    HMAConfig,
    ModelAverager,
    _hma_step,
    average,
    hma_ratios,
    layer_index,
    learn_hma,
    plan_merge,
    sweep,
)
from hbat.ops import available_backends


class TinyLM(nn.Module):
    """Embedding, numbered layers (Linear + norm), final norm, lm_head: the naming of HF decoder models."""

    def __init__(self, vocab=11, dim=8, num_layers=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(dim, dim), "norm": nn.LayerNorm(dim)}) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.tanh(layer["proj"](layer["norm"](h)))
        return self.lm_head(self.norm(h))


def _pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    pre = TinyLM(**kw).to(dtype)
    post = TinyLM(**kw).to(dtype)
    return pre, post


def _tiny_llama_pair():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    pre = transformers.LlamaForCausalLM(cfg)
    post = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # an "RLHF" model near the SFT model: a small perturbation of it
        for p, q in zip(pre.parameters(), post.parameters()):
            q.copy_(p + 0.05 * torch.randn_like(p))
    return pre, post


def _batches(vocab=40, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 10), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100  # prompt tokens
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_zero_and_one_return_the_two_models_exactly(dtype, backend):
    pre, post = _pair(dtype)
    averager = ModelAverager(pre, post, backend=backend)
    for alpha, source in ((0.0, pre), (1.0, post)):
        merged = averager.average_(alpha)
        for (name, m), s in zip(merged.named_parameters(), source.parameters()):
            assert torch.equal(m, s), f"alpha={alpha}: {name} differs"


def test_intermediate_alpha_matches_reference():
    pre, post = _pair()
    merged = average(pre, post, 0.3)
    for (name, m), a, b in zip(merged.named_parameters(), pre.parameters(), post.parameters()):
        ref = 0.7 * a.double() + 0.3 * b.double()
        torch.testing.assert_close(m.double(), ref, rtol=0, atol=1e-6, msg=name)
    # the inputs are untouched
    pre2, post2 = _pair()
    for p, q in zip(pre.parameters(), pre2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(post.parameters(), post2.parameters()):
        assert torch.equal(p, q)


def test_linear_scope_copies_everything_else_from_pre():
    pre, post = _pair()
    merged = average(pre, post, 0.5, scope="linear")
    for (name, m), a, b in zip(merged.named_parameters(), pre.parameters(), post.parameters()):
        if name.endswith("proj.weight") or name == "lm_head.weight":
            torch.testing.assert_close(m, 0.5 * a + 0.5 * b)
        else:
            assert torch.equal(m, a), name


def test_sweep_reuses_one_output_model():
    pre, post = _pair()
    alphas = [0.0, 0.25, 0.5, 1.0]
    seen = []
    for alpha, model in sweep(pre, post, alphas):
        seen.append((id(model), [p.data_ptr() for p in model.parameters()]))
        for m, a, b in zip(model.parameters(), pre.parameters(), post.parameters()):
            torch.testing.assert_close(m, (1 - alpha) * a + alpha * b)
    assert len({s[0] for s in seen}) == 1
    assert all(s[1] == seen[0][1] for s in seen)


def test_extrapolation_past_the_aligned_model_is_expo():
    pre, post = _pair()
    expo = average(pre, post, 1.5, extrapolate=True)  # post + 0.5 (post - pre)
    for m, a, b in zip(expo.parameters(), pre.parameters(), post.parameters()):
        torch.testing.assert_close(m, b + 0.5 * (b - a))
    for bad in (-0.5, float("inf")):
        with pytest.raises(ValueError, match="alpha must be finite"):
            average(pre, post, bad, extrapolate=True)


def test_bad_inputs_raise_before_anything_changes():
    pre, post = _pair()
    with pytest.raises(ValueError, match="alpha"):
        average(pre, post, 1.5)
    other = TinyLM(dim=4)
    with pytest.raises(ValueError, match="shape"):
        ModelAverager(pre, other)
    with pytest.raises(ValueError, match="scope"):
        ModelAverager(pre, post, scope="attention")
    averager = ModelAverager(pre, post)
    with pytest.raises(ValueError, match=r"alpha"):
        list(averager.sweep([0.5, -0.1]))  # checked before the first merge
    assert all(torch.equal(o, p) for o, p in zip(averager.out.parameters(), pre.parameters()))


def test_block_plan():
    model = TinyLM(num_layers=6)
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12 and layer_index("lm_head.weight") is None
    plan = plan_merge(model, blocks=3)
    assert plan.block_names == ["layers 0-1", "layers 2-3", "layers 4-5"]
    block = dict(zip(plan.names, plan.blocks))
    assert block["embed.weight"] == 0 and block["layers.1.proj.weight"] == 0
    assert block["layers.2.norm.bias"] == 1 and block["layers.5.proj.bias"] == 2
    assert block["norm.weight"] == 2 and block["lm_head.weight"] == 2  # attached to the top block
    assert plan_merge(model, blocks="layer").num_blocks == 6
    mean_plan = plan_merge(model, blocks=3, non_layer="mean")
    assert dict(zip(mean_plan.names, mean_plan.blocks))["embed.weight"] == -1
    pre_plan = plan_merge(model, blocks=3, non_layer="pre")
    assert {"embed.weight", "norm.weight", "norm.bias", "lm_head.weight"} <= set(pre_plan.copied)
    with pytest.raises(ValueError, match="layers"):
        plan_merge(model, blocks=7)


def test_block_weights_and_mean_tensors():
    pre, post = _pair(num_layers=6)
    averager = ModelAverager(pre, post, blocks=3, non_layer="mean")
    merged = averager.average_blocks_([0.1, 0.5, 0.9])
    named_pre, named_post = dict(pre.named_parameters()), dict(post.named_parameters())
    expect = {"layers.0.proj.weight": 0.1, "layers.3.norm.weight": 0.5, "layers.5.proj.weight": 0.9,
              "embed.weight": 0.5, "lm_head.weight": 0.5}
    for name, w in expect.items():
        m = dict(merged.named_parameters())[name]
        torch.testing.assert_close(m, (1 - w) * named_pre[name] + w * named_post[name], msg=name)


def test_hma_ratios_keep_their_mean_for_any_logits():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.1, 0.5, 0.9):
        for scale in (0.01, 1.0, 30.0):
            logits = scale * torch.randn(7, generator=g, dtype=torch.float64)
            ratios = hma_ratios(logits, alpha)
            assert abs(float(ratios.mean()) - alpha) < 1e-12
            assert bool((ratios > 0).all())


def test_hma_ratio_gradient_equals_autograd_through_the_merge():
    from torch.func import functional_call

    pre, post = _tiny_llama_pair()
    batch = _batches()[0]
    alpha, eps, l1 = 0.4, 1e-3, 0.05
    logits0 = torch.tensor([0.3, -1.0, 0.7])

    averager = ModelAverager(pre, post, blocks=3)
    named = dict(averager.out.named_parameters())
    merged_params = [named[n] for n in averager.names]
    logits = logits0.clone().requires_grad_(True)
    loss = _hma_step(averager, merged_params, logits, batch, lambda m, b: m(**b).loss, alpha, eps, l1)

    # reference: the merge inside the autograd graph, through functional_call
    ref_logits = logits0.clone().requires_grad_(True)
    ratios = hma_ratios(ref_logits, alpha, eps)
    pre_p, post_p = dict(pre.named_parameters()), dict(post.named_parameters())
    weights = {n: (1 - ratios[b]) * pre_p[n].detach() + ratios[b] * post_p[n].detach()
               for n, b in zip(averager.names, averager.plan.blocks)}
    ref_loss = functional_call(post, weights, args=(), kwargs=batch).loss
    (ref_loss + l1 * (ratios - alpha).abs().mean()).backward()

    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-7)


def test_learned_hma_ratios_keep_their_mean_and_move():
    pre, post = _tiny_llama_pair()
    cfg = HMAConfig(alpha=0.5, blocks=3, steps=12, lr=0.3, l1=0.01)
    logged = []
    result = learn_hma(pre, post, _batches(), cfg, log=logged.append, progress=False)
    ratios = torch.tensor(result.ratios, dtype=torch.float64)
    assert len(ratios) == 3 and result.block_names == ["layer 0", "layer 1", "layer 2"]
    assert abs(float(ratios.mean()) - 0.5) < 1e-6
    assert float((ratios - 0.5).abs().max()) > 1e-2, f"ratios did not move: {result.ratios}"
    assert len(result.losses) == 12 and len(logged) == 12 and "hma/ratio_0" in logged[0]
    # the returned model is the merge with the learned ratios; inputs untouched, flags restored
    expected = ModelAverager(pre, post, blocks=3).average_blocks_(result.ratios)
    for (name, m), e in zip(result.model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(m, e, msg=name)
        assert m.requires_grad and m.grad is None


def _save_tiny_pair(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    texts = ["the cat sat on the mat", "a dog ran in the park", "summarize : the cat sat", "reply : yes the dog"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, tokenizers.trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<s>", eos_token="</s>")
    pre, post = _tiny_llama_pair()
    for name, model in (("pre", pre), ("post", post)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    return pre, post


def test_cli_uniform_and_sweep(tmp_path):
    from transformers import AutoModelForCausalLM

    from hbat.averaging import main

    pre, post = _save_tiny_pair(tmp_path)
    out = tmp_path / "avg"
    assert main(["--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--alpha", "0.25",
                 "--out", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for m, a, b in zip(loaded.parameters(), pre.parameters(), post.parameters()):
        torch.testing.assert_close(m, 0.75 * a + 0.25 * b)
    assert json.loads((out / "hbat_average.json").read_text())["alpha"] == 0.25
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder as mkdir makes it, not mkdtemp's 0700
    with pytest.raises(FileExistsError):
        main(["--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--alpha", "0.5", "--out", str(out)])
    assert main(["--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--alpha", "0,1",
                 "--out", str(tmp_path / "sweep")]) == 0
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "sweep" / "alpha_1")
    assert all(torch.equal(m, b) for m, b in zip(one.parameters(), post.parameters()))


def test_cli_refuses_models_whose_weights_do_not_match_their_config(tmp_path, capsys):
    """Both config.json files say 4 layers, the weights hold 3: transformers would average a random layer."""
    from hbat.cli import main

    _save_tiny_pair(tmp_path)
    for name in ("pre", "post"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    capsys.readouterr()
    code = main(["average", "--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--alpha", "0.5",
                 "--out", str(tmp_path / "avg")])
    err = capsys.readouterr().err  # (after transformers' loading bar)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "avg").exists()
    assert err.splitlines()[-1].startswith(f"hbat average: --pre = {tmp_path / 'pre'}: the weights do not match its "
                                           "config.json; missing from the weights: model.layers.3.")


def test_cli_hma(tmp_path):
    from hbat.averaging import main

    _save_tiny_pair(tmp_path)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "summarize : the cat sat", "response": "the cat sat on the mat"},
        {"text": "a dog ran in the park"},
        {"prompt": "reply : yes the dog", "response": "yes the dog ran"},
        {"prompt": "summarize : a dog"},  # no response: sampled from the aligned model
    ]) + "\n")
    out = tmp_path / "hma"
    assert main(["--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--alpha", "0.5", "--hma",
                 "--blocks", "3", "--samples", str(samples), "--steps", "3", "--max-new-tokens", "4", "--out", str(out)]) == 0
    info = json.loads((out / "hbat_average.json").read_text())
    assert info["method"] == "hma" and len(info["ratios"]) == 3
    assert abs(sum(info["ratios"]) / 3 - 0.5) < 1e-6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n{"answer": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        main(["--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--alpha", "0.5", "--hma",
              "--samples", str(bad), "--out", str(tmp_path / "x")])


def test_hma_with_a_custom_loss_on_a_plain_torch_model():
    pre, post = _pair(num_layers=4)

    def loss_fn(model, batch):
        logits = model(batch["input_ids"])
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))

    batches = [{"input_ids": torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    cfg = HMAConfig(alpha=0.3, blocks="layer", non_layer="pre", steps=8, lr=0.5)
    result = learn_hma(pre, post, batches, cfg, loss_fn=loss_fn, progress=False)
    assert len(result.ratios) == 4 and abs(sum(result.ratios) / 4 - 0.3) < 1e-6
    assert max(abs(r - 0.3) for r in result.ratios) > 1e-2
    assert torch.equal(result.model.embed.weight, pre.embed.weight)  # non_layer="pre": copied, not merged


def test_cli_sweep_on_saved_models_evaluates_in_memory_and_resumes(tmp_path, capsys):
    from hbat.averaging import ModelAverager, main

    pre, post = _save_tiny_pair(tmp_path)
    new = tmp_path / "new.jsonl"
    new.write_text("\n".join(json.dumps(r) for r in [{"prompt": "reply : yes", "response": "the dog ran"},
                                                       {"text": "a dog ran in the park"}]) + "\n")
    old = tmp_path / "old.txt"
    old.write_text("the cat sat on the mat\nsummarize : the cat sat\n")
    out = tmp_path / "sweep"
    argv = ["--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--sweep", "--alpha", "0,0.5,1,1.5",
            "--ratios", "0.2:0.5:0.8", "--eval-data", f"new={new}", "--eval-data", f"old={old}", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "sweep_result.json").read_text())
    assert [r["ratio"] for r in result["rows"]] == [0.0, 0.5, 1.0, 1.5, [0.2, 0.5, 0.8]]
    assert result["objectives"] == {"new/loss": "min", "old/loss": "min"} and result["front"]
    assert (out / "sweep.png").stat().st_size > 1000 and not any(out.glob("alpha_*"))  # no model written
    # ratio 0 is the SFT model, 1 the aligned one: their losses computed directly
    from transformers import AutoTokenizer

    from hbat.averaging import encode_samples, load_samples

    batches = encode_samples(AutoTokenizer.from_pretrained(tmp_path / "post"), load_samples(str(old)))
    with torch.no_grad():
        for alpha, row in ((0.0, result["rows"][0]), (1.0, result["rows"][2]), (0.5, result["rows"][1])):
            model = ModelAverager(pre, post).average_(alpha)
            want = sum(float(model(**b).loss) for b in batches) / len(batches)
            assert row["old/loss"] == pytest.approx(want, rel=1e-5), alpha
    # run again: every row comes from the table (an interrupted sweep would finish the missing ones)
    capsys.readouterr()
    assert main(argv) == 0
    assert "reused 5 rows" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="outside"):
        main(["--pre", str(tmp_path / "pre"), "--post", str(tmp_path / "post"), "--alpha", "1.5", "--out",
              str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="what to evaluate"):
        main(argv[:-6] + ["--out", str(out)])
