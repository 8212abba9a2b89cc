"""DPO stage on a tiny Llama: loss against hand values, loss decreases, reference handling, accumulation, RLHF+pt."""
import copy
import math

import pytest
import torch

from hbat.trainer.dpo import DPOConfig, dpo_loss


def test_dpo_loss_matches_hand_values():
    # pair 0: r_w = 0.1 * (-1 - -2) = 0.1, r_l = 0.1 * (-3 - -2) = -0.1 -> -log sigmoid(0.2)
    # pair 1: policy == reference -> rewards 0 -> log 2
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0]),
                                      torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -4.0]), beta=0.1)
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.0]))
    expected = (math.log1p(math.exp(-0.2)) + math.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the gradient pushes chosen up and rejected down, scaled by beta * sigmoid(-margin) / B
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(policy_chosen, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)[0].backward()
    assert policy_chosen.grad.item() == pytest.approx(-0.5 * torch.sigmoid(torch.tensor(-1.0)).item(), rel=1e-6)


def test_dpo_config_is_checked():
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="DPOConfig.epochs"):
        DPOConfig(epochs=0)
    assert DPOConfig().lr == 1e-6 and DPOConfig().batch_size == 64 and DPOConfig().epochs == 2


# --- runs on a tiny model ----------------------------------------------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hbat.trainer.dpo import dpo_mix_loss, evaluate_dpo, preference_accuracy, run_dpo  # noqa: E402
from hbat.trainer.sft import SFTConfig, run_sft  # noqa: E402
from hf_fixtures import RecordingEWC, char_tokenizer, tiny_llama  # noqa: E402

TRL_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "dpo/loss", "train/lr", "train/grad_norm"}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def pairs(count):
    return [{"prompt": f"q{i}:", "chosen": "a" * (1 + i % 3), "rejected": "b" * (1 + i % 4)} for i in range(count)]


def test_dpo_loss_decreases_and_logs_trl_metrics(tokenizer):
    policy = tiny_llama(tokenizer)
    ref = copy.deepcopy(policy)
    assert preference_accuracy(policy, ref, tokenizer, pairs(8)) == 0.0  # identical models: all ties
    logged = []
    result = run_dpo(policy, None, tokenizer, pairs(16), DPOConfig(lr=3e-3, batch_size=8, epochs=3),
                     log=logged.append, progress=False)
    assert result["train/steps"] == 6 and TRL_KEYS <= set(logged[0])
    assert logged[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the starting policy
    assert logged[-1]["dpo/loss"] < 0.6 and logged[-1]["rewards/margins"] > 0
    held_out = evaluate_dpo(policy, ref, tokenizer, pairs(24)[16:])
    assert held_out["rewards/accuracies"] >= 0.75 and held_out["dpo/loss"] < math.log(2)


def test_reference_per_batch_equals_precomputed(tokenizer):
    base = tiny_llama(tokenizer, seed=2)
    sft_model = tiny_llama(tokenizer, seed=3)  # an explicit reference other than the policy
    runs = []
    for precompute in (True, False):
        for ref in (None, sft_model):
            logged = []
            run_dpo(copy.deepcopy(base), ref, tokenizer, pairs(8),
                    DPOConfig(lr=1e-3, batch_size=4, max_steps=2, precompute_ref_logprobs=precompute),
                    log=logged.append, progress=False)
            runs.append([m["dpo/loss"] for m in logged])
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[2]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[3]), rtol=1e-4, atol=1e-5)
    assert runs[0][0] == pytest.approx(math.log(2), abs=1e-5) and runs[1][0] != pytest.approx(math.log(2), abs=1e-3)


def test_dpo_grad_accumulation_and_ewc_hook(tokenizer):
    grads = []
    for accum in (1, 2):
        policy = tiny_llama(tokenizer, seed=4)
        ewc = RecordingEWC(policy)
        logged = []
        run_dpo(policy, tiny_llama(tokenizer, seed=5), tokenizer, pairs(8),
                DPOConfig(lr=1e-3, batch_size=8, max_steps=1, grad_accum_steps=accum), penalty=ewc, log=logged.append,
                progress=False)
        assert len(ewc.calls) == 1 and logged[0]["ewc/penalty"] == 0.5
        grads.append(ewc.calls[0]["grads"])
    for one, two in zip(*grads):
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)


def test_rlhf_pt_mixes_the_sft_loss_and_sft_ppo_mixes_dpo(tokenizer):
    policy = tiny_llama(tokenizer)
    sft_rows = [{"prompt": f"q{i}:", "response": "ab"} for i in range(4)]
    with pytest.raises(ValueError, match="sft_rows"):
        run_dpo(policy, None, tokenizer, pairs(4), DPOConfig(sft_coef=0.5), progress=False)
    with pytest.raises(ValueError, match="row 0 has no field 'chosen'"):
        run_dpo(policy, None, tokenizer, [{"prompt": "a", "rejected": "b"}], DPOConfig(), progress=False)
    logged = []
    run_dpo(policy, None, tokenizer, pairs(4), DPOConfig(lr=1e-3, batch_size=4, max_steps=2, sft_coef=0.5),
            sft_rows=sft_rows, log=logged.append, progress=False)
    assert all(m["dpo/sft_loss"] > 0 for m in logged)
    mix = dpo_mix_loss(policy, None, tokenizer, pairs(4), coef=0.5, batch_size=2)
    assert mix(0).item() == pytest.approx(0.5 * math.log(2), abs=1e-5)
    logged = []
    run_sft(policy, tokenizer, sft_rows, SFTConfig(lr=1e-3, batch_size=4, max_steps=2), mix_loss=mix,
            log=logged.append, progress=False)
    assert all("sft/mix_loss" in m for m in logged)
