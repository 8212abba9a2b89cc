"""Reward model stage on a tiny Llama: head on the last non-pad token, ranking loss decreases, accuracy."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hbat.data import collate, encode_sft  # noqa: E402
from hf_fixtures import char_tokenizer, tiny_llama  # noqa: E402  (tests/ is on sys.path under pytest)
from hbat.trainer.reward import (RewardConfig, RewardModel, evaluate_reward_model, ranking_loss,  # noqa: E402
                                 score_responses, train_reward_model)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def pairs(count):
    # chosen answers are made of "a", rejected ones of "b": a pattern the head can learn from the last token
    return [{"prompt": f"q{i}:", "chosen": "a" * (1 + i % 3), "rejected": "b" * (1 + i % 4)} for i in range(count)]


def test_ranking_loss_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (torch.log1p(torch.exp(torch.tensor(-1.0))) + torch.log(torch.tensor(2.0))) / 2
    torch.testing.assert_close(ranking_loss(chosen, rejected), expected)


def test_from_causal_lm_deep_copies_the_backbone(tokenizer):
    lm = tiny_llama(tokenizer)
    rm = RewardModel.from_causal_lm(lm)
    assert type(rm.backbone).__name__ == "LlamaModel"
    with torch.no_grad():
        next(rm.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(rm.backbone.parameters()), next(lm.model.parameters()))
    with pytest.raises(TypeError, match="base model"):
        RewardModel.from_causal_lm(torch.nn.Linear(2, 2))


def test_score_is_taken_at_the_last_non_pad_token_for_either_padding(tokenizer):
    rm = RewardModel.from_causal_lm(tiny_llama(tokenizer)).eval()
    rows = encode_sft(tokenizer, [{"prompt": "q:", "response": "abc"}, {"prompt": "longer q:", "response": "x"}], 64)
    with torch.no_grad():
        right = collate(rows, 0)
        left = collate(rows, 0, padding_side="left")
        alone = [rm(torch.tensor([r["input_ids"]])) for r in rows]
        scores_right = rm(right["input_ids"], right["attention_mask"])
        scores_left = rm(left["input_ids"], left["attention_mask"])
    assert scores_right.shape == (2,) and scores_right.dtype == torch.float32
    torch.testing.assert_close(scores_right, torch.cat(alone), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores_left, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_reward_model_loss_decreases_and_ranks_held_out_pairs(tokenizer):
    rm = RewardModel.from_causal_lm(tiny_llama(tokenizer))
    train, held_out = pairs(16), pairs(20)[16:]
    before = evaluate_reward_model(rm, tokenizer, train, batch_size=8)
    logged = []
    result = train_reward_model(rm, tokenizer, train, RewardConfig(lr=3e-3, epochs=4, batch_size=8),
                                log=logged.append, eval_pairs=held_out, progress=False)
    after = evaluate_reward_model(rm, tokenizer, train, batch_size=8)
    assert result["train/steps"] == 8
    assert after["rm/loss"] < before["rm/loss"] * 0.5
    assert result["rm/eval_accuracy"] == 1.0 and result["rm/eval_margin"] > 0
    losses = [m["rm/loss"] for m in logged if "rm/loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0]
    scores = score_responses(rm, tokenizer, ["q1:", {"prompt": "q1:"}], ["aa", "bb"])
    assert scores.shape == (2,) and scores[0] > scores[1]


def test_reward_config_and_inputs_are_checked(tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        RewardConfig(batch_size=0)
    rm = RewardModel.from_causal_lm(tiny_llama(tokenizer))
    with pytest.raises(ValueError, match="at least one"):
        train_reward_model(rm, tokenizer, [], RewardConfig(), progress=False)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_responses(rm, tokenizer, ["a", "b"], ["c"])
