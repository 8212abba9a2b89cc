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

The critic (``Critic``) is initialised from the reward model (its backbone and head, giving one value per
token) and is carried by the caller from one HPA stage to the next, as in the paper. Cold start: the policy
is not updated while the critic has had fewer than ``cold_start_steps`` PPO steps of training over its life
(``cold_start_scope="critic"``, the default: a carried-over critic is already warm) or, with
``cold_start_scope="run"``, during the first ``cold_start_steps`` steps of each ``run_ppo`` call.

Actor update order: ``loss.backward()``; ``ewc.apply_()`` (hbat.HybridEWC adds the EWC gradient of eq. 5);
``clip_grad_norm_``; ``optimizer.step()``. Policy and critic have their own AdamW (lr 1e-5 and 5e-6).
Dropout is off during PPO (all models in eval mode) so the first epoch's ratio is exactly 1.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import collate, encode_prompts, pad_token_id, position_ids_from_mask
from .checks import booleans, choice, fail, integers, numbers
from .guards import check_values, check_weights
from .reward import RewardModel


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
        numbers(self, "clip_range", "value_clip", "temperature", strict=True)
        numbers(self, "top_p", strict=True, maximum=1.0)
        numbers(self, "gamma", "gae_lambda", maximum=1.0)
        numbers(self, "missing_eos_penalty", minimum=-math.inf, optional=True)
        booleans(self, "whiten_advantages")
        choice(self, "cold_start_scope", ("critic", "run"))


# --- the math, on small tensors [B, T] with a 0/1 response mask ---------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var); masked-out entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * kl_t`` plus ``scores`` at each row's last response token.

    ``mask`` must be 1 on a prefix of each row (right padding) with at least one token. Returns
    ``(rewards, kl)``, both [B, T] and zero on padding.
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(-1).long() - 1
    if (last < 0).any():
        raise ValueError("every response needs at least one token (a row of the mask is all zero)")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows; returns ``(advantages, returns)``, 0 on padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate loss; stats: ``clipfrac`` (share of tokens where the clip is active), ``approx_kl``, ``ratio``."""
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask),
                 "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               value_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``1/2 mean max((V-R)^2, (V_clip-R)^2)``; returns ``(loss, clipfrac)``."""
    mask = mask.to(values.dtype)
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).to(mask.dtype), mask)
    return loss, clipfrac


# --- models --------------------------------------------------------------------------------------------------

class Critic(nn.Module):
    """Value model: a backbone and a scalar head giving one value per token ([B, L], float32).

    ``from_reward_model`` copies the reward model's backbone and head, so the first values are the reward
    model's score of each prefix. ``steps_trained`` (a buffer, saved in the state dict) counts the PPO steps
    the critic has been trained, for the cold start.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> "Critic":
        return cls(copy.deepcopy(rm.backbone), copy.deepcopy(rm.head))

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(hidden).squeeze(-1).float()


@dataclass
class Rollout:
    """Token tensors of one sampled batch: left-padded queries, right-padded responses (mask 1 up to EOS)."""

    query_ids: torch.Tensor       # [B, Lq]
    query_mask: torch.Tensor      # [B, Lq]
    response_ids: torch.Tensor    # [B, Lr], pad after the first EOS
    response_mask: torch.Tensor   # [B, Lr], 1 up to and including the first EOS
    has_eos: torch.Tensor         # [B] bool

    @property
    def input_ids(self):
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self):
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def query_len(self) -> int:
        return self.query_ids.shape[1]

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(*(getattr(self, f.name)[index] for f in fields(self)))


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


@torch.no_grad()
def generate(policy: nn.Module, tokenizer, prompts: Sequence[str | dict], cfg: PPOConfig) -> Rollout:
    """Sample one response per prompt with HF ``generate`` (top-p / temperature / max_new_tokens of ``cfg``)."""
    from transformers import GenerationConfig

    pad = pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    queries = collate([{"input_ids": ids} for ids in encode_prompts(tokenizer, prompts, cfg.max_prompt_len)], pad,
                      padding_side="left")
    device = _first_param(policy).device
    query_ids, query_mask = queries["input_ids"].to(device), queries["attention_mask"].to(device)
    generation_config = GenerationConfig(
        do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature, top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
        bos_token_id=getattr(tokenizer, "bos_token_id", None))
    was_training = policy.training
    policy.eval()
    try:
        output = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config)
    finally:
        policy.train(was_training)
    response = output[:, query_ids.shape[1]:]
    if eos is None:
        is_eos = torch.zeros_like(response, dtype=torch.bool)
    else:
        is_eos = response == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    return Rollout(query_ids, query_mask, response.masked_fill(after_eos, pad), response_mask, is_eos.any(1))


def response_logprobs(model: nn.Module, rollout: Rollout, temperature: float, *,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(response token | prefix) [B, Lr] from temperature-scaled logits (and their entropy when asked)."""
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids_from_mask(attention_mask), "use_cache": False}
    response_len = rollout.response_ids.shape[1]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = response_len + 1  # only the positions that predict response tokens
        logits = model(**kwargs).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, rollout.query_len - 1:-1]
    logits = logits.float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logprobs = log_probs.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logprobs, entropy


def response_values(critic: Critic, rollout: Rollout) -> torch.Tensor:
    """V(prefix before response token t) [B, Lr]."""
    values = critic(rollout.input_ids, rollout.attention_mask)
    return values[:, rollout.query_len - 1:-1]


@torch.no_grad()
def score_rollout(reward_model: RewardModel, rollout: Rollout) -> torch.Tensor:
    """Reward-model score of query + response (the last non-pad token is the EOS when there is one)."""
    return reward_model(rollout.input_ids, rollout.attention_mask).float()


# --- the stage -------------------------------------------------------------------------------------------------

def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def _clip(module: nn.Module, max_norm) -> None:
    if max_norm:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)


def run_ppo(policy: nn.Module, ref_model: nn.Module | None, reward_model: RewardModel, critic: Critic, tokenizer,
            prompts: Sequence[str | dict], cfg: PPOConfig | None = None, *, ewc=None,
            log: Callable[[dict], None] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """PPO on ``prompts`` (rows ``{prompt}`` or strings); updates ``policy`` and ``critic`` in place.

    ``ref_model`` None: a frozen copy of ``policy`` as it is now (the start of this HPA stage). The reference
    and the reward model are never updated. All models must be on the policy's device. ``seed`` seeds
    torch's global RNG (HF sampling uses it) and the prompt / mini-batch order.

    ``log`` gets one dict per PPO step: ``ppo/step``, ``ppo/reward`` (mean reward-model score),
    ``ppo/kl`` (mean over responses of the summed per-token KL to the reference), ``ppo/non_score_reward``,
    ``ppo/rlhf_reward`` (score - kl_coef * kl), ``ppo/entropy``, ``ppo/response_length``, ``ppo/eos_fraction``,
    ``ppo/value_loss``, ``ppo/value_clipfrac``, ``ppo/cold_start`` (1 while the policy is frozen) and, when the
    policy was updated, ``ppo/policy_loss``, ``ppo/clipfrac``, ``ppo/approx_kl``, ``ppo/ratio`` and (with ewc)
    ``ewc/penalty``. Returns the means of these over the run, ``ppo/steps``, ``ppo/policy_updates`` and
    ``ppo/reward_last`` (mean score of the last step). A non-finite loss, penalty or weight after a PPO step
    raises hbat.trainer.guards.TrainingDiverged.
    """
    from tqdm.auto import tqdm

    cfg = cfg or PPOConfig()
    if not prompts:
        raise ValueError("run_ppo needs at least one prompt")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    ref_model = _frozen_copy(policy) if ref_model is None else ref_model
    steps_per_epoch = math.ceil(len(prompts) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps

    policy_params = [p for p in policy.parameters() if p.requires_grad]
    policy_optimizer = torch.optim.AdamW(policy_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    critic_optimizer = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=cfg.critic_lr,
                                         weight_decay=cfg.weight_decay)
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
                metrics = _ppo_step(policy, ref_model, reward_model, critic, tokenizer, batch_prompts, cfg,
                                    policy_optimizer, critic_optimizer, generator, ewc, update_policy=not cold)
                step += 1
                # PPO reads its metrics every step anyway; NaN weights would break the next rollout's sampling
                where = f"ppo step {step}"
                check_values(metrics, ("ppo/policy_loss", "ppo/value_loss", "ewc/penalty"), where,
                             " (a smaller ppo.lr or ppo.critic_lr may help)")
                check_weights(policy.named_parameters(), where)
                check_weights(critic.named_parameters(), f"{where}, critic")
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
        for module, mode in modes.items():
            module.train(mode)

    summary = {}
    for key in {k for m in history for k in m if k != "ppo/step"}:
        values = [m[key] for m in history if key in m]
        summary[key] = sum(values) / len(values)
    summary.update({"ppo/steps": len(history), "ppo/policy_updates": policy_updates,
                    "ppo/reward_last": history[-1]["ppo/reward"] if history else float("nan")})
    return summary


def _ppo_step(policy, ref_model, reward_model, critic, tokenizer, prompts, cfg: PPOConfig, policy_optimizer,
              critic_optimizer, generator, ewc, *, update_policy: bool) -> dict:
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

    sums: dict[str, float] = {}

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    updates = 0
    batch_size = rollout.query_ids.shape[0]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator).to(mask.device)
        for start in range(0, batch_size, cfg.mini_batch_size):
            index = order[start:start + cfg.mini_batch_size]
            mini, mini_mask = rollout.select(index), mask[index]
            updates += 1

            values = response_values(critic, mini)
            loss_v, v_clipfrac = value_loss(values, old_values[index], returns[index], mini_mask, cfg.value_clip)
            critic_optimizer.zero_grad(set_to_none=True)
            loss_v.backward()
            _clip(critic, cfg.max_grad_norm)
            critic_optimizer.step()
            add("ppo/value_loss", loss_v.item())
            add("ppo/value_clipfrac", v_clipfrac.item())

            if update_policy:
                logprobs, _ = response_logprobs(policy, mini, cfg.temperature)
                loss_p, stats = policy_loss(logprobs, old_logprobs[index], advantages[index], mini_mask, cfg.clip_range)
                policy_optimizer.zero_grad(set_to_none=True)
                loss_p.backward()
                if ewc is not None:
                    add("ewc/penalty", ewc.apply_().item())
                _clip(policy, cfg.max_grad_norm)
                policy_optimizer.step()
                add("ppo/policy_loss", loss_p.item())
                for key, value in stats.items():
                    add(f"ppo/{key}", value.item())
    policy_optimizer.zero_grad(set_to_none=True)
    critic_optimizer.zero_grad(set_to_none=True)
    critic.steps_trained += 1

    kl_per_response = kl.sum(1)
    metrics = {key: value / updates for key, value in sums.items()}
    metrics.update({
        "ppo/reward": scores.mean().item(),
        "ppo/kl": kl_per_response.mean().item(),
        "ppo/non_score_reward": (-cfg.kl_coef * kl_per_response).mean().item(),
        "ppo/rlhf_reward": (scores - cfg.kl_coef * kl_per_response).mean().item(),
        "ppo/entropy": masked_mean(entropy, mask).item(),
        "ppo/response_length": mask.sum(1).mean().item(),
        "ppo/eos_fraction": rollout.has_eos.float().mean().item(),
        "ppo/advantage_mean": masked_mean(advantages, mask).item(),
        "ppo/return_mean": masked_mean(returns, mask).item(),
        "ppo/value_mean": masked_mean(old_values, mask).item(),
        "ppo/cold_start": 0.0 if update_policy else 1.0,
    })
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
