"""PPO pieces against hand-computed values, and short PPO runs on a tiny Llama (cold start, EWC hook, reward up)."""
import math

import pytest
import torch

from hbat.trainer.ppo import PPOConfig, gae, kl_rewards, policy_loss, value_loss, whiten


# --- the math on small tensors -----------------------------------------------------------------------------------

def test_kl_rewards_put_the_score_on_the_last_response_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_rewards(logprobs, ref_logprobs, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, -0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.0, -0.95, 0.0]]))
    with pytest.raises(ValueError, match="at least one token"):
        kl_rewards(logprobs, ref_logprobs, torch.zeros(2), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_gae_matches_hand_computed_values():
    # gamma 1, lambda 0.5: deltas 1.5, 0.5, 0.5 -> A2 = 0.5, A1 = 0.5 + 0.5 * 0.5, A0 = 1.5 + 0.5 * 0.75
    advantages, returns = gae(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]]),
                              torch.ones(1, 3), gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.875, 0.75, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[2.375, 1.75, 2.0]]))
    # gamma 0.5, lambda 1, padding after two tokens: nothing beyond the mask leaks in (value 9, reward 7)
    advantages, returns = gae(torch.tensor([[0.0, 3.0, 7.0]]), torch.tensor([[1.0, 2.0, 9.0]]),
                              torch.tensor([[1, 1, 0]]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.5, 3.0, 0.0]]))


def test_gae_paper_setting_is_reward_to_go_minus_value_when_lambda_is_one():
    rewards, values = torch.tensor([[0.1, -0.2, 0.3, 1.0]]), torch.tensor([[0.4, 0.1, -0.3, 0.2]])
    advantages, returns = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns, reward_to_go)
    torch.testing.assert_close(advantages, reward_to_go - values)


def test_whiten_uses_only_masked_entries_with_unbiased_variance():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    std = math.sqrt(5.0 / 3.0 + 1e-8)  # values 1, 2, 3, 4: mean 2.5, unbiased variance 5/3
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    torch.testing.assert_close(whiten(x, mask), expected)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), (expected + 2.5) * mask)


def test_policy_loss_clipping_value_and_gradient():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5]])
    logprobs = ratio.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = policy_loss(logprobs, torch.zeros(1, 4), advantages, torch.ones(1, 4), clip_range=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor(0.05))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    torch.testing.assert_close(stats["ratio"], torch.tensor(0.9))
    loss.backward()
    # clipped tokens get no gradient; the others d(-A r)/d log r / 4 = -A r / 4
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125, 0.275, 0.0]]))


def test_policy_loss_ignores_masked_tokens():
    loss, stats = policy_loss(torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), torch.tensor([[2.0, 9.0]]),
                              torch.tensor([[1, 0]]), clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor(-2.0))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.0))


def test_value_loss_clipping_value_and_gradient():
    values = torch.tensor([[0.5, -0.1, 0.3]], requires_grad=True)
    loss, clipfrac = value_loss(values, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3),
                                value_clip=0.2)
    # token 0: clipped prediction 0.2 -> (0.2 - 1)^2 = 0.64 beats 0.25; token 1: 1.21; token 2: 1.69 beats 1.44
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 1.21 + 1.69) / 3))
    torch.testing.assert_close(clipfrac, torch.tensor(1.0 / 3.0))
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.1 / 3, 1.3 / 3]]))


def test_ppo_config_defaults_follow_the_paper_and_are_checked():
    cfg = PPOConfig()
    assert (cfg.lr, cfg.critic_lr, cfg.ppo_epochs, cfg.top_p, cfg.temperature, cfg.cold_start_steps) == \
        (1e-5, 5e-6, 4, 0.95, 0.75, 50)
    assert (cfg.gamma, cfg.gae_lambda, cfg.whiten_advantages) == (1.0, 0.95, True)
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(batch_size=2, mini_batch_size=4)
    with pytest.raises(ValueError, match="cold_start_scope"):
        PPOConfig(cold_start_scope="never")


# --- runs on a tiny model ------------------------------------------------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hbat.trainer.ppo import Critic, generate, run_ppo, sample_rewards  # noqa: E402
from hbat.trainer.reward import RewardModel  # noqa: E402
from hf_fixtures import char_tokenizer, tiny_llama  # noqa: E402  (tests/ is on sys.path under pytest)


class CountToken(torch.nn.Module):
    """A trivial reward: how often one token occurs in the attended sequence."""

    def __init__(self, token_id):
        super().__init__()
        self.token_id = token_id
        self.unused = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return ((input_ids == self.token_id) & attention_mask.bool()).float().sum(-1)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def small_config(**overrides):
    settings = dict(batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, cold_start_steps=0, lr=1e-3,
                    critic_lr=1e-3)
    settings.update(overrides)
    return PPOConfig(**settings)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_generate_masks_everything_after_the_first_eos(tokenizer):
    lm = tiny_llama(tokenizer)
    torch.manual_seed(0)
    rollout = generate(lm, tokenizer, ["q1:", {"prompt": "a longer prompt:"}], small_config(max_new_tokens=12))
    assert rollout.query_ids.shape[0] == 2 and rollout.query_mask[0, 0] == 0  # left padded
    assert rollout.response_mask[:, 0].all()
    for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)
        assert tokenizer.eos_token_id not in ids[:length - 1]
        assert all(t == tokenizer.pad_token_id for t in ids[length:])


def test_cold_start_updates_only_the_critic_then_the_policy(tokenizer):
    lm = tiny_llama(tokenizer)
    rm = RewardModel.from_causal_lm(lm)
    critic = Critic.from_reward_model(rm)
    prompts = [f"q{i}:" for i in range(8)]
    policy_before, critic_before = params(lm), params(critic)
    logged = []
    cfg = small_config(cold_start_steps=2, max_steps=2)
    run_ppo(lm, None, rm, critic, tokenizer, prompts, cfg, log=logged.append, progress=False)
    assert [m["ppo/cold_start"] for m in logged] == [1.0, 1.0]
    assert all("ppo/policy_loss" not in m and math.isfinite(m["ppo/value_loss"]) for m in logged)
    assert same(params(lm), policy_before) and not same(params(critic), critic_before)
    assert int(critic.steps_trained) == 2
    # scope "critic" (default): the carried-over critic is warm, the next run updates the policy at once
    summary = run_ppo(lm, None, rm, critic, tokenizer, prompts, small_config(cold_start_steps=2, max_steps=1),
                      progress=False)
    assert summary["ppo/policy_updates"] == 1 and not same(params(lm), policy_before)
    # scope "run": every run_ppo call starts cold
    policy_now = params(lm)
    summary = run_ppo(lm, None, rm, critic, tokenizer, prompts,
                      small_config(cold_start_steps=1, max_steps=1, cold_start_scope="run"), progress=False)
    assert summary["ppo/policy_updates"] == 0 and same(params(lm), policy_now)


class RecordingEWC:
    """Stands in for hbat.HybridEWC: records that apply_ runs after backward and before clipping."""

    def __init__(self, model):
        self.model, self.grad_norms = model, []

    def apply_(self):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.grad_norms.append(torch.norm(torch.stack([g.norm() for g in grads])).item())
        return torch.tensor(0.5)


def test_actor_update_calls_ewc_apply_before_clipping(tokenizer):
    lm = tiny_llama(tokenizer)
    rm = RewardModel.from_causal_lm(lm)
    ewc, logged = RecordingEWC(lm), []
    cfg = small_config(max_steps=1, max_grad_norm=1e-6)
    run_ppo(lm, None, rm, Critic.from_reward_model(rm), tokenizer, ["q1:", "q2:", "q3:", "q4:"], cfg, penalty=ewc,
            log=logged.append, progress=False)
    assert len(ewc.grad_norms) == 2  # one per mini-batch update
    assert all(norm > 1e-6 for norm in ewc.grad_norms)  # gradients were not clipped yet
    assert logged[0]["ewc/penalty"] == 0.5


def test_policy_and_critic_step_through_the_shared_stepper(tokenizer, monkeypatch):
    """Every PPO update is a TorchStepper.step, the one every stage takes: per mini-batch the critic's (no
    penalty), then the policy's with the EWC hook."""
    from hbat.trainer import step

    lm = tiny_llama(tokenizer)
    rm = RewardModel.from_causal_lm(lm)
    critic, ewc, steps = Critic.from_reward_model(rm), RecordingEWC(lm), []
    real_step = step.TorchStepper.step

    def recording_step(self, penalty=None):
        steps.append(("critic" if self.params[0] is next(critic.parameters()) else "policy", penalty))
        return real_step(self, penalty)

    monkeypatch.setattr(step.TorchStepper, "step", recording_step)
    run_ppo(lm, None, rm, critic, tokenizer, ["q1:", "q2:", "q3:", "q4:"], small_config(max_steps=1), penalty=ewc,
            progress=False)
    assert steps == [("critic", None), ("policy", ewc)] * 2  # 4 prompts, mini-batches of 2, one PPO epoch
    assert len(ewc.grad_norms) == 2


def test_ppo_raises_a_trivial_reward_with_finite_metrics(tokenizer):
    lm = tiny_llama(tokenizer)
    rule = CountToken(tokenizer.convert_tokens_to_ids("a"))
    critic = Critic.from_reward_model(RewardModel.from_causal_lm(lm))
    prompts = [f"q{i}:" for i in range(32)]
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, max_new_tokens=8, cold_start_steps=0, lr=1e-2, critic_lr=1e-3,
                    kl_coef=0.0, temperature=1.0, top_p=1.0, max_steps=6)
    torch.manual_seed(1)
    before, _ = sample_rewards(lm, rule, tokenizer, prompts, cfg)
    logged = []
    summary = run_ppo(lm, None, rule, critic, tokenizer, prompts, cfg, log=logged.append, progress=False, seed=0)
    torch.manual_seed(1)
    after, texts = sample_rewards(lm, rule, tokenizer, prompts, cfg)
    assert len(texts) == 32
    assert after.mean() > before.mean() + 1.0
    assert summary["ppo/steps"] == 6 and len(logged) == 6
    for metrics in logged:
        for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/entropy"):
            assert math.isfinite(metrics[key]), key


def test_run_ppo_is_deterministic_given_the_seed(tokenizer):
    import copy

    lm = tiny_llama(tokenizer)
    rm = RewardModel.from_causal_lm(lm)
    critic = Critic.from_reward_model(rm)
    twins = [(copy.deepcopy(lm), copy.deepcopy(critic)) for _ in range(2)]
    for policy, value_model in twins:
        run_ppo(policy, None, rm, value_model, tokenizer, ["q1:", "q2:", "q3:", "q4:"], small_config(max_steps=1),
                seed=7, progress=False)
    (policy_a, critic_a), (policy_b, critic_b) = twins
    assert same(params(policy_a), params(policy_b)) and same(params(critic_a), params(critic_b))
    assert not same(params(policy_a), params(lm))
