"""PPO stage of HPA (eq. 3): actor, critic, frozen reference, reward model.

One PPO *step* = sample responses for ``batch_size`` prompts (top-p 0.95, temperature 0.75 by default),
score them, then ``ppo_epochs`` passes of mini-batch updates over that batch:

    kl_t      = log pi(y_t | .) - log pi_ref(y_t | .)                        (per token, "k1" estimator)
    r_t       = -kl_coef * kl_t  (+ reward-model score at the last response token)
    delta_t   = r_t + gamma * V_{t+1} - V_t          (V beyond the last token = 0)
    A_t       = delta_t + gamma * lambda * A_{t+1};  returns R_t = A_t + V_t   (GAE, gamma 1, lambda 0.95)
    A         <- (A - mean) / sqrt(var + 1e-8) over response tokens          (whitening, unbiased var)
    L_policy  = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = exp(logp - logp_old)
    L_value   = 1/2 mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

Means are over all response tokens of the mini-batch. Log-probabilities use the temperature-scaled logits
(logits / temperature, as TRL), the distribution the responses were sampled from before top-p.

The critic (``Critic``, hbat.trainer.critic) is initialised from the reward model (its backbone and head, giving one value per
token) and is carried by the caller from one HPA stage to the next, as in the paper. Cold start: the policy
is not updated while the critic has had fewer than ``cold_start_steps`` PPO steps of training over its life
(``cold_start_scope="critic"``, the default: a carried-over critic is already warm) or, with
``cold_start_scope="run"``, during the first ``cold_start_steps`` steps of each ``run_ppo`` call.

Each mini-batch steps the critic, then the policy, through the stepper of every stage
(hbat.trainer.step): ``loss.backward()``; for the policy ``penalty.apply_()`` (hbat.HybridEWC adds the EWC
gradient of eq. 5); ``clip_grad_norm_``; AdamW (its own for each model, lr 1e-5 and 5e-6, constant; fp32
masters for bf16 weights). Dropout is off throughout (sampling and scoring in eval mode, updates in train
mode with every dropout at 0, so transformers' gradient checkpointing recomputes), so the first epoch's ratio is
exactly 1. The metrics of a PPO step are read once, at its end.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .checks import booleans, choice, fail, integers, learning_rates, numbers
from .common import StageConfig, stepper_settings
from .critic import Critic, response_values
from .guards import check_values, check_weights
from .models import base_of, frozen_copy, no_dropout
from .ppo_math import gae, kl_rewards, masked_mean, policy_loss, value_loss, whiten
from .reward import RewardModel
from .rollout import generate, response_logprobs, score_rollout
from .step import TorchStepper, read_scalars


@dataclass
class PPOConfig:
    """PPO settings; paper values where the paper gives them (lrs, 4 PPO epochs, top-p, temperature, cold start)."""

    lr: float = 1e-5                  # policy (actor) AdamW learning rate
    critic_lr: float = 5e-6           # value model (critic) AdamW learning rate
    batch_size: int = 8               # prompts per PPO step (rollout batch; paper: 64)
    mini_batch_size: int = 4          # rows per gradient step inside a PPO epoch
    ppo_epochs: int = 4               # passes over each rollout batch
    epochs: int = 1                   # passes over the prompts (paper: 1)
    max_steps: int | None = None      # stop after this many PPO steps (None: ``epochs`` passes)
    clip_range: float = 0.2           # policy ratio clip epsilon
    value_clip: float = 0.2           # value clip range around the rollout values
    kl_coef: float = 0.05             # per-token KL penalty coefficient in the reward
    gamma: float = 1.0                # discount
    gae_lambda: float = 0.95          # GAE lambda
    whiten_advantages: bool = True    # normalise advantages over the batch's response tokens
    top_p: float = 0.95               # nucleus sampling
    temperature: float = 0.75         # sampling temperature (also scales the logits of the log-probs)
    top_k: int = 0                    # 0: off
    max_new_tokens: int = 32          # response length limit
    max_prompt_len: int = 128         # prompts are cut from the left to this many tokens
    cold_start_steps: int = 50        # critic-only steps before the policy is updated (paper: 50)
    cold_start_scope: str = "critic"  # "critic": first steps of the critic's life; "run": of each run_ppo call
    missing_eos_penalty: float | None = None  # subtracted from the score of responses that never emit EOS
    max_grad_norm: float = 1.0        # clipping of each model's gradient (0 or None: off)
    weight_decay: float = 0.0

    def __post_init__(self):
        integers(self, 1, "batch_size", "mini_batch_size", "ppo_epochs", "epochs", "max_new_tokens")
        integers(self, 1, "max_steps", optional=True)
        integers(self, 2, "max_prompt_len")  # prompts are cut like a (prompt, empty response) pair
        integers(self, 0, "top_k", "cold_start_steps")
        if self.mini_batch_size > self.batch_size:
            fail(self, "mini_batch_size", f"must be <= batch_size ({self.batch_size}), got {self.mini_batch_size}")
        numbers(self, "lr", "critic_lr", "kl_coef", "max_grad_norm", "weight_decay")
        learning_rates(self, "lr", "critic_lr")
        numbers(self, "clip_range", "value_clip", "temperature", strict=True)
        numbers(self, "top_p", strict=True, maximum=1.0)
        numbers(self, "gamma", "gae_lambda", maximum=1.0)
        numbers(self, "missing_eos_penalty", minimum=-math.inf, optional=True)
        booleans(self, "whiten_advantages")
        choice(self, "cold_start_scope", ("critic", "run"))


# --- the stage -------------------------------------------------------------------------------------------------

def _step_settings(lr: float, cfg: PPOConfig) -> StageConfig:
    """The optimizer settings of one PPO model for the shared stepper: constant lr, PPO's clipping."""
    return stepper_settings(cfg, lr=lr, lr_scheduler_type="constant")


def run_ppo(policy: nn.Module, ref_model: nn.Module | None, reward_model: RewardModel, critic: Critic, tokenizer,
            prompts: Sequence[str | dict], cfg: PPOConfig | None = None, *, penalty=None,
            log: Callable[[dict], None] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """PPO on ``prompts`` (rows ``{prompt}`` or strings); updates ``policy`` and ``critic`` in place.

    ``ref_model`` None: a frozen copy of ``policy`` as it is now (the start of this HPA stage); for a LoRA
    policy, its base with the adapters disabled (hbat.trainer.models.base_of, no copy). The reference and the
    reward model are never updated. All models must be on the policy's device. ``seed`` seeds torch's global
    RNG (HF sampling uses it) and the prompt / mini-batch order.

    ``log`` gets one dict per PPO step: ``ppo/step``, ``ppo/reward`` (mean reward-model score),
    ``ppo/kl`` (mean over responses of the summed per-token KL to the reference), ``ppo/non_score_reward``,
    ``ppo/rlhf_reward`` (score - kl_coef * kl), ``ppo/entropy``, ``ppo/response_length``, ``ppo/eos_fraction``,
    ``ppo/value_loss``, ``ppo/value_clipfrac``, ``ppo/cold_start`` (1 while the policy is frozen) and, when the
    policy was updated, ``ppo/policy_loss``, ``ppo/clipfrac``, ``ppo/approx_kl``, ``ppo/ratio`` and (with a penalty)
    ``ewc/penalty``. Returns the means of these over the run, ``ppo/steps``, ``ppo/policy_updates`` and
    ``ppo/reward_last`` (mean score of the last step). A non-finite loss, penalty or weight after a PPO step
    raises hbat.trainer.guards.TrainingDiverged.
    """
    from tqdm.auto import tqdm  # optional: hbat[train]

    cfg = cfg or PPOConfig()
    if not prompts:
        raise ValueError("run_ppo needs at least one prompt")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if ref_model is None:
        ref_model = base_of(policy) or frozen_copy(policy)
    steps_per_epoch = math.ceil(len(prompts) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps

    # the policy and the critic step through the stepper every stage uses (penalty, clipping, AdamW)
    steppers = (TorchStepper(policy, _step_settings(cfg.lr, cfg), total_steps),
                TorchStepper(critic, _step_settings(cfg.critic_lr, cfg), total_steps))
    modes = {module: module.training for module in (policy, ref_model, reward_model, critic)}
    for module in modes:
        module.eval()

    history: list[dict] = []
    policy_updates = 0
    bar = tqdm(total=total_steps, desc="ppo", disable=not progress, leave=False)
    try:
        step = 0
        while step < total_steps:
            order = torch.randperm(len(prompts), generator=generator).tolist()
            for start in range(0, len(order), cfg.batch_size):
                if step >= total_steps:
                    break
                batch_prompts = [prompts[i] for i in order[start:start + cfg.batch_size]]
                cold = (int(critic.steps_trained) if cfg.cold_start_scope == "critic" else step) < cfg.cold_start_steps
                metrics = _ppo_step(policy, ref_model, reward_model, critic, tokenizer, batch_prompts, cfg, steppers,
                                    generator, penalty, update_policy=not cold)
                step += 1
                # PPO reads its metrics every step anyway; NaN weights would break the next rollout's sampling
                where = f"ppo step {step}"
                check_values(metrics, ("ppo/policy_loss", "ppo/value_loss", "ewc/penalty"), where,
                             " (a smaller ppo.lr or ppo.critic_lr may help)")
                check_weights(_trained(policy), where)
                check_weights(_trained(critic), f"{where}, critic")
                policy_updates += 0 if cold else 1
                metrics["ppo/step"] = step
                history.append(metrics)
                if log is not None:
                    log(dict(metrics))
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['ppo/reward']:.3f}", kl=f"{metrics['ppo/kl']:.3f}",
                                vf=f"{metrics['ppo/value_loss']:.3f}",
                                pg=f"{metrics['ppo/policy_loss']:.3f}" if "ppo/policy_loss" in metrics else "cold")
    finally:
        bar.close()
        for stepper in steppers:
            stepper.close()
        for module, mode in modes.items():
            module.train(mode)

    summary = {}
    for key in {k for m in history for k in m if k != "ppo/step"}:
        values = [m[key] for m in history if key in m]
        summary[key] = sum(values) / len(values)
    summary.update({"ppo/steps": len(history), "ppo/policy_updates": policy_updates,
                    "ppo/reward_last": history[-1]["ppo/reward"] if history else float("nan")})
    return summary


def _trained(module: nn.Module) -> list:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def _update_mode(module: nn.Module):
    """Train mode with every dropout at 0 for a PPO update: computes as eval mode (the first epoch's ratio is
    exactly 1) while transformers' gradient checkpointing, which only runs in train mode, recomputes."""
    module.train()
    try:
        with no_dropout(module):
            yield
    finally:
        module.eval()


def _ppo_step(policy, ref_model, reward_model, critic, tokenizer, prompts, cfg: PPOConfig, steppers, generator, penalty,
              *, update_policy: bool) -> dict:
    policy_stepper, critic_stepper = steppers
    rollout = generate(policy, tokenizer, prompts, cfg)
    mask = rollout.response_mask.float()
    with torch.no_grad():
        old_logprobs, entropy = response_logprobs(policy, rollout, cfg.temperature, with_entropy=True)
        ref_logprobs, _ = response_logprobs(ref_model, rollout, cfg.temperature)
        old_values = response_values(critic, rollout) * mask
        scores = score_rollout(reward_model, rollout)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~rollout.has_eos).float()
        rewards, kl = kl_rewards(old_logprobs, ref_logprobs, scores, mask, cfg.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

    sums: dict[str, torch.Tensor] = {}  # read once, at the end of the PPO step (one host sync)

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + value.detach().float()

    updates = 0
    batch_size = rollout.query_ids.shape[0]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator).to(mask.device)
        for start in range(0, batch_size, cfg.mini_batch_size):
            index = order[start:start + cfg.mini_batch_size]
            mini, mini_mask = rollout.select(index), mask[index]
            updates += 1

            with _update_mode(critic):
                values = response_values(critic, mini)
                loss_v, v_clipfrac = value_loss(values, old_values[index], returns[index], mini_mask,
                                                cfg.value_clip)
                critic_stepper.backward(loss_v)
            critic_stepper.step()
            add("ppo/value_loss", loss_v)
            add("ppo/value_clipfrac", v_clipfrac)

            if update_policy:
                with _update_mode(policy):
                    logprobs, _ = response_logprobs(policy, mini, cfg.temperature)
                    loss_p, stats = policy_loss(logprobs, old_logprobs[index], advantages[index], mini_mask,
                                                cfg.clip_range)
                    policy_stepper.backward(loss_p)
                step_stats = policy_stepper.step(penalty)  # the EWC gradient of eq. (5), clipping, AdamW
                if penalty is not None:
                    add("ewc/penalty", step_stats["ewc/penalty"])
                add("ppo/policy_loss", loss_p)
                for key, value in stats.items():
                    add(f"ppo/{key}", value)
    critic.steps_trained += 1

    kl_per_response = kl.sum(1)
    values = {key: value / updates for key, value in sums.items()}
    values.update({
        "ppo/reward": scores.mean(),
        "ppo/kl": kl_per_response.mean(),
        "ppo/non_score_reward": (-cfg.kl_coef * kl_per_response).mean(),
        "ppo/rlhf_reward": (scores - cfg.kl_coef * kl_per_response).mean(),
        "ppo/entropy": masked_mean(entropy, mask),
        "ppo/response_length": mask.sum(1).mean(),
        "ppo/eos_fraction": rollout.has_eos.float().mean(),
        "ppo/advantage_mean": masked_mean(advantages, mask),
        "ppo/return_mean": masked_mean(returns, mask),
        "ppo/value_mean": masked_mean(old_values, mask),
    })
    metrics = read_scalars(values)
    metrics["ppo/cold_start"] = 0.0 if update_policy else 1.0
    return metrics


@torch.no_grad()
def sample_rewards(policy: nn.Module, reward_model: RewardModel, tokenizer, prompts: Sequence[str | dict],
                   cfg: PPOConfig | None = None, *, batch_size: int = 16) -> tuple[torch.Tensor, list[str]]:
    """Sample one response per prompt (cfg's sampling settings) and score it: ``(scores [N] CPU, texts)``.

    For validation reward (keep the best part by reward, as the paper does); call ``torch.manual_seed``
    first for a reproducible sample.
    """
    cfg = cfg or PPOConfig()
    scores, texts = [], []
    was_training = reward_model.training
    reward_model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rollout = generate(policy, tokenizer, prompts[start:start + batch_size], cfg)
            scores.append(score_rollout(reward_model, rollout).cpu())
            texts.extend(tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True))
    finally:
        reward_model.train(was_training)
    return (torch.cat(scores) if scores else torch.zeros(0)), texts
