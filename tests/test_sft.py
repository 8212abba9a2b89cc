"""SFT stage on a tiny Llama: loss decreases, prompt masking, exact grad accumulation, EWC hook order, packing."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hbat.data import collate, encode_sft  # noqa: E402
from hbat.trainer.common import StageConfig, token_logprobs  # noqa: E402
from hbat.trainer.sft import SFTConfig, collate_sft, pack_rows, run_sft, sft_loss  # noqa: E402
from hf_fixtures import RecordingEWC, char_tokenizer, tiny_llama  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def sft_rows(count):
    # responses of different lengths, so a per-token mean differs from a mean of per-row means
    return [{"prompt": f"q{i}:", "response": "ab" * (1 + i % 4)} for i in range(count)]


def test_sft_loss_decreases_and_logs(tokenizer):
    model = tiny_llama(tokenizer)
    rows = sft_rows(16)
    before = sft_loss(model, tokenizer, rows)
    logged = []
    result = run_sft(model, tokenizer, rows, SFTConfig(lr=3e-3, batch_size=8, epochs=3), log=logged.append,
                     progress=False)
    assert result["train/steps"] == 6 and len(logged) == 6
    assert sft_loss(model, tokenizer, rows) < before - 0.5
    assert logged[-1]["sft/loss"] < logged[0]["sft/loss"]
    assert {"sft/loss", "train/lr", "train/grad_norm", "train/step", "train/epoch"} <= set(logged[0])
    assert logged[-1]["train/epoch"] == 3.0 and logged[0]["train/lr"] == pytest.approx(3e-3)
    assert model.training  # mode restored (tiny_llama starts in train mode)


def test_only_response_tokens_count(tokenizer):
    model = tiny_llama(tokenizer)
    rows = [{"prompt": "long prompt here:", "response": "ab"}]
    encoded = encode_sft(tokenizer, rows, 64)
    logps, mask = token_logprobs(model, collate(encoded, 0))
    assert mask.sum().item() == 3  # "a", "b", EOS
    # changing the prompt text changes nothing but the conditioning: still 3 targets
    assert sft_loss(model, tokenizer, rows) == pytest.approx(-logps.sum().item() / 3, rel=1e-5)


def test_grad_accumulation_equals_one_big_batch(tokenizer):
    rows = sft_rows(8)
    grads = []
    for accum in (1, 2):
        model = tiny_llama(tokenizer, seed=1)
        ewc = RecordingEWC(model)
        run_sft(model, tokenizer, rows, SFTConfig(lr=1e-3, batch_size=8, max_steps=1, grad_accum_steps=accum),
                penalty=ewc, progress=False)
        grads.append(ewc.calls[0]["grads"])
    for one, two in zip(*grads):
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)


def test_ewc_hook_runs_once_per_step_after_backward_and_before_clipping(tokenizer):
    model = tiny_llama(tokenizer)
    ewc = RecordingEWC(model, add=10.0)
    logged = []
    run_sft(model, tokenizer, sft_rows(12), SFTConfig(lr=1e-3, batch_size=4, max_steps=3, grad_accum_steps=2,
                                                      max_grad_norm=1.0), penalty=ewc, log=logged.append,
            progress=False)
    assert len(ewc.calls) == 3
    for call, metrics in zip(ewc.calls, logged):
        assert all(g.abs().sum() > 0 for g in call["grads"][1:])  # gradients of the micro-batches are there
        # the norm clipping saw includes the penalty gradient (10 on every element of one tensor)
        assert metrics["train/grad_norm"] == pytest.approx(call["norm_after"], rel=1e-5)
        assert metrics["ewc/penalty"] == 0.5


def test_mix_loss_is_added_once_per_step(tokenizer):
    model = tiny_llama(tokenizer)
    steps = []

    def mix(step):
        steps.append(step)
        return 0.1 * next(model.parameters()).square().sum()

    logged = []
    run_sft(model, tokenizer, sft_rows(8), SFTConfig(lr=1e-3, batch_size=4, epochs=1, grad_accum_steps=2),
            mix_loss=mix, log=logged.append, progress=False)
    assert steps == [0, 1] and all("sft/mix_loss" in m for m in logged)


def test_packing_gives_the_same_token_log_probs(tokenizer):
    model = tiny_llama(tokenizer).eval()
    encoded = encode_sft(tokenizer, sft_rows(5), 64)
    packed = pack_rows(encoded, 32)
    assert len(packed) < len(encoded) and all(len(r["input_ids"]) <= 32 for r in packed)
    with torch.no_grad():
        plain, plain_mask = token_logprobs(model, collate(encoded, 0))
        pack, pack_mask = token_logprobs(model, collate_sft(packed, 0))
    assert plain_mask.sum() == pack_mask.sum()
    torch.testing.assert_close(pack.sum(), plain.sum(), rtol=1e-5, atol=1e-5)
    result = run_sft(copy.deepcopy(model), tokenizer, sft_rows(8), SFTConfig(lr=1e-3, batch_size=2, max_steps=2,
                                                                              packing=True, max_len=32), progress=False)
    assert result["train/steps"] == 2


def test_bad_config_and_rows_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="SFTConfig.batch_size"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        SFTConfig(batch_size=2, grad_accum_steps=3)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        StageConfig(lr_scheduler_type="step")
    model = tiny_llama(tokenizer)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="row 1 has no field 'response'"):
        run_sft(model, tokenizer, [{"prompt": "a", "response": "b"}, {"prompt": "a"}], SFTConfig(), progress=False)
    with pytest.raises(ValueError, match="at least one"):
        run_sft(model, tokenizer, [], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
