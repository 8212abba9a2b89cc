"""evaluate_policy on a tiny Llama: keys and ranges, KL of a model to itself, determinism, modes restored."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hbat.trainer.evaluate import evaluate_policy, greedy_generate, kl_to_reference  # noqa: E402
from hbat.trainer.reward import RewardModel  # noqa: E402
from hbat.trainer.sft import sft_loss  # noqa: E402
from hf_fixtures import char_tokenizer, tiny_llama  # noqa: E402

KEYS = {"eval/sft_loss", "eval/exact_match", "eval/preference", "eval/reward", "eval/kl_to_sft"}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def rows(count):
    return [{"prompt": f"q{i}:", "response": "ab" * (1 + i % 3)} for i in range(count)]


def test_keys_ranges_determinism_and_modes(tokenizer):
    model, ref = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    reward_model = RewardModel.from_causal_lm(ref)
    seen = []

    def exact_match(prompt, response):
        seen.append((prompt, response))
        return len(response) % 2 == 0

    kwargs = dict(sft_rows=rows(4), prompts=rows(4), reward_model=reward_model, ref_model=ref,
                  exact_match=exact_match, preference_score=lambda p, r: float(len(r)), max_new_tokens=6)
    model.train()
    ref.eval()
    reward_model.train()
    rng = torch.get_rng_state()
    first = evaluate_policy(model, tokenizer, **kwargs)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert model.training and not ref.training and reward_model.training  # modes restored as they were
    assert set(first) == KEYS
    assert first["eval/sft_loss"] == pytest.approx(sft_loss(model, tokenizer, rows(4)))
    assert 0.0 <= first["eval/exact_match"] <= 1.0 and 0.0 <= first["eval/preference"] <= 6.0
    assert first["eval/kl_to_sft"] > 0.0  # two different models
    assert [p for p, _ in seen] == [f"q{i}:" for i in range(4)]
    greedy = tokenizer.batch_decode(greedy_generate(model, tokenizer, rows(4), max_new_tokens=6).response_ids,
                                    skip_special_tokens=True)
    assert [r for _, r in seen] == greedy
    assert evaluate_policy(model, tokenizer, **kwargs) == first  # deterministic


def test_kl_of_a_model_to_itself_is_zero(tokenizer):
    model = tiny_llama(tokenizer)
    kl = kl_to_reference(model, copy.deepcopy(model), tokenizer, rows(4), max_new_tokens=6, batch_size=3)
    assert kl.shape == (4,)
    torch.testing.assert_close(kl, torch.zeros(4), atol=1e-5, rtol=0)
    assert evaluate_policy(model, tokenizer, prompts=["q1:", "q2:"], ref_model=model, max_new_tokens=4) == {
        "eval/kl_to_sft": 0.0}


def test_kl_is_the_k3_estimate_and_never_negative(tokenizer):
    """Per prompt: the sum over sampled response tokens of (r - 1) - log r, r = p_ref / p_model, which is >= 0 for
    every sample, where the plain log-ratio (k1) of the same samples is negative for some prompts."""
    from hbat.trainer.ppo import PPOConfig
    from hbat.trainer.rollout import generate, response_logprobs

    model, ref = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    prompts = rows(12)
    kl = kl_to_reference(model, ref, tokenizer, prompts, max_new_tokens=6, batch_size=12)
    assert kl.shape == (12,) and kl.dtype == torch.float32
    assert (kl >= 0).all() and (kl > 0).any()
    # the same samples by hand: kl_to_reference samples under the caller's RNG, like generate
    cfg = PPOConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)
    with torch.no_grad():
        torch.manual_seed(0)
        kl = kl_to_reference(model, ref, tokenizer, prompts, max_new_tokens=6, batch_size=12)
        torch.manual_seed(0)
        rollout = generate(model, tokenizer, prompts, cfg)
        logps, _ = response_logprobs(model, rollout, 1.0)
        ref_logps, _ = response_logprobs(ref, rollout, 1.0)
    log_r = (ref_logps - logps).double()
    k3 = ((log_r.exp() - 1 - log_r) * rollout.response_mask).sum(1)
    k1 = (-log_r * rollout.response_mask).sum(1)
    torch.testing.assert_close(kl, k3.float(), rtol=1e-5, atol=1e-6)
    assert (k1 < 0).any()  # what eval/kl_to_sft printed before: a negative "KL" on some prompts


def test_skipped_metrics_and_missing_prompts(tokenizer):
    model = tiny_llama(tokenizer)
    assert evaluate_policy(model, tokenizer) == {}
    assert set(evaluate_policy(model, tokenizer, sft_rows=rows(2))) == {"eval/sft_loss"}
    with pytest.raises(ValueError, match="need prompts"):
        evaluate_policy(model, tokenizer, exact_match=lambda p, r: True)
