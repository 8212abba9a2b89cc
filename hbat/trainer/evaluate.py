"""Policy evaluation after each part of Algorithm 1: instruction following, preference, reward, KL to SFT.

    eval/sft_loss     mean per-token loss of the held-out SFT responses (teacher forcing)
    eval/exact_match  fraction of prompts whose GREEDY response passes ``exact_match(prompt, response)``
    eval/preference   mean ``preference_score(prompt, response)`` of the greedy responses
    eval/reward       mean reward-model score of the greedy responses (hbat.trainer.reward.score_responses)
    eval/kl_to_sft    mean over prompts of  sum_t [(r_t - 1) - log r_t],  r_t = p_ref(y_t|x,y_<t) / p_model(y_t|x,y_<t),
                      y ~ p_model SAMPLED at temperature 1 (no top-p / top-k), up to ``max_new_tokens`` tokens

The KL estimator: KL(p_model || p_ref) of the (length-limited) response distribution, the direction that
measures how far the model moved from the reference on the model's own answers, estimated per token with
"k3" = (r - 1) - log r on tokens sampled from the model. Since E_{y_t ~ p_model}[r_t] = 1, each token's term has
expectation KL(p_model(. | x, y_<t) || p_ref(. | x, y_<t)), so the sum over the response is an unbiased estimate
of the sequence-level KL (chain rule); unlike the plain log-ratio ("k1"), every term is >= 0, so every sample,
and the mean, is non-negative, and it is exactly 0 when the two models are equal. Sampling at temperature 1 is
what makes it a KL of the models themselves rather than of their tempered sampling distributions.

Deterministic: sampling runs under a forked RNG seeded with ``seed`` (the caller's RNG state is untouched);
everything runs under ``torch.no_grad`` with the models in eval mode, their previous modes restored after.
Prompts are rows ``{prompt}`` or strings; the callables receive the prompt text and the decoded response.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..data import collate, encode_prompts, pad_token_id
from .common import eval_mode, model_device
from .config import TrainConfig
from .ppo import PPOConfig
from .rollout import Rollout, generate, response_logprobs
from .reward import score_responses
from .sft import sft_loss
from .workspace import Workspace

EVAL_PROMPT_LEN = 128  # prompts are cut from the left to this many tokens for generation


def _prompt_text(prompt) -> str:
    return prompt["prompt"] if isinstance(prompt, dict) else prompt


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence, *, max_new_tokens: int = 32,
                    max_prompt_len: int = EVAL_PROMPT_LEN) -> Rollout:
    """One greedy response per prompt, as a ``Rollout`` (left-padded queries, response masked after EOS)."""
    from transformers import GenerationConfig  # heavy, optional (hbat[train])

    pad, eos = pad_token_id(tokenizer), getattr(tokenizer, "eos_token_id", None)
    queries = collate([{"input_ids": ids} for ids in encode_prompts(tokenizer, prompts, max_prompt_len)], pad,
                      padding_side="left")
    device = model_device(model)
    query_ids, query_mask = queries["input_ids"].to(device), queries["attention_mask"].to(device)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                              bos_token_id=getattr(tokenizer, "bos_token_id", None))
    with eval_mode(model):
        output = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    response = output[:, query_ids.shape[1]:]
    is_eos = torch.zeros_like(response, dtype=torch.bool) if eos is None else response == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return Rollout(query_ids, query_mask, response.masked_fill(after_eos, pad), (~after_eos).long(), is_eos.any(1))


def kl_to_reference(model: nn.Module, ref_model: nn.Module, tokenizer, prompts: Sequence, *,
                    max_new_tokens: int = 32, max_prompt_len: int = EVAL_PROMPT_LEN,
                    batch_size: int = 32) -> torch.Tensor:
    """Per-prompt estimate of KL(model || ref), >= 0, on responses sampled from ``model`` at temperature 1: the sum
    over response tokens of k3 = (r - 1) - log r, r = p_ref / p_model (module docstring) ([N] float32, CPU)."""
    cfg = PPOConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                    max_prompt_len=max_prompt_len)
    values = []
    with torch.no_grad(), eval_mode(model, ref_model):
        for start in range(0, len(prompts), batch_size):
            rollout = generate(model, tokenizer, prompts[start:start + batch_size], cfg)
            logps, _ = response_logprobs(model, rollout, 1.0)
            ref_logps, _ = response_logprobs(ref_model, rollout, 1.0)
            log_r = (ref_logps - logps).double()  # float64: exp of a large log-ratio stays finite
            k3 = (torch.expm1(log_r) - log_r).clamp_min(0.0) * rollout.response_mask
            values.append(k3.sum(1).float().cpu())
    return torch.cat(values) if values else torch.zeros(0)


def evaluate_policy(model: nn.Module, tokenizer, *, sft_rows: Sequence[dict] | None = None,
                    prompts: Sequence | None = None, reward_model: nn.Module | None = None,
                    ref_model: nn.Module | None = None, exact_match: Callable[[str, str], bool] | None = None,
                    preference_score: Callable[[str, str], float] | None = None, max_new_tokens: int = 32,
                    batch_size: int = 32, max_len: int = 256, max_prompt_len: int = EVAL_PROMPT_LEN,
                    seed: int = 0) -> dict:
    """The metrics of the module docstring; each one whose inputs are None is skipped.

    ``sft_rows`` -> eval/sft_loss; ``prompts`` with ``exact_match`` / ``preference_score`` / ``reward_model`` ->
    eval/exact_match / eval/preference / eval/reward (one shared greedy decoding); ``prompts`` with
    ``ref_model`` -> eval/kl_to_sft.
    """
    wants_greedy = any(x is not None for x in (exact_match, preference_score, reward_model))
    if (wants_greedy or ref_model is not None) and not prompts:
        raise ValueError("evaluate_policy: exact_match, preference_score, reward_model and ref_model need prompts")
    results: dict[str, float] = {}
    devices = [model_device(model)] if model_device(model).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model, ref_model, reward_model):
        torch.manual_seed(seed)
        if sft_rows:
            results["eval/sft_loss"] = sft_loss(model, tokenizer, sft_rows, batch_size=batch_size, max_len=max_len)
        if wants_greedy:
            responses = []
            for start in range(0, len(prompts), batch_size):
                rollout = greedy_generate(model, tokenizer, prompts[start:start + batch_size],
                                          max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len)
                responses += tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
            texts = [_prompt_text(p) for p in prompts]
            if exact_match is not None:
                hits = [bool(exact_match(p, r)) for p, r in zip(texts, responses)]
                results["eval/exact_match"] = sum(hits) / len(hits)
            if preference_score is not None:
                scores = [float(preference_score(p, r)) for p, r in zip(texts, responses)]
                results["eval/preference"] = sum(scores) / len(scores)
            if reward_model is not None:
                results["eval/reward"] = score_responses(reward_model, tokenizer, texts, responses,
                                                         batch_size=batch_size, max_len=max_len).mean().item()
        if ref_model is not None:
            results["eval/kl_to_sft"] = kl_to_reference(model, ref_model, tokenizer, prompts, batch_size=batch_size,
                                                        max_new_tokens=max_new_tokens,
                                                        max_prompt_len=max_prompt_len).mean().item()
    return results


# --- in a run: the workspace's validation sets ------------------------------------------------------------------------

def evaluate_run(ws: Workspace, model, cfg: TrainConfig) -> dict:
    """Validation metrics of ``model`` after a part of Algorithm 1 (hbat.trainer.algorithm): held-out SFT loss,
    exact match, preference, reward, win rate against SFT, KL to SFT."""
    e = cfg.eval
    metrics = evaluate_policy(model, ws.tokenizer, sft_rows=ws.sft_val, prompts=ws.prompts_val,
                              reward_model=ws.reward_model, exact_match=ws.exact_match,
                              preference_score=ws.preference_score, max_new_tokens=e.max_new_tokens,
                              max_prompt_len=e.max_prompt_len, batch_size=e.batch_size, max_len=cfg.sft.max_len,
                              seed=cfg.seed)
    if ws.sft_model is not None and ws.reward_model is not None:
        metrics["eval/win_rate"] = win_rate_vs_sft(ws, model, cfg)
    if e.kl_samples:
        kl = evaluate_policy(model, ws.tokenizer, prompts=ws.prompts_val[: e.kl_samples], ref_model=ws.sft_model,
                             max_new_tokens=e.max_new_tokens, max_prompt_len=e.max_prompt_len,
                             batch_size=e.batch_size, seed=cfg.seed)
        metrics.update(kl)
    return metrics


@torch.no_grad()
def _greedy_scores(ws: Workspace, model, cfg: TrainConfig) -> torch.Tensor:
    prompts = [p["prompt"] for p in ws.prompts_val]
    responses = []
    with eval_mode(model):
        for start in range(0, len(prompts), cfg.eval.batch_size):
            rollout = greedy_generate(model, ws.tokenizer, prompts[start:start + cfg.eval.batch_size],
                                      max_new_tokens=cfg.eval.max_new_tokens, max_prompt_len=cfg.eval.max_prompt_len)
            responses += ws.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    return score_responses(ws.reward_model, ws.tokenizer, prompts, responses, batch_size=cfg.eval.batch_size,
                           max_len=cfg.sft.max_len)


def win_rate_vs_sft(ws: Workspace, model, cfg: TrainConfig) -> float:
    """Share of validation prompts where the reward model prefers the model's greedy answer to the SFT
    model's (ties count one half), as the paper's win rate against SFT."""
    cache = ws.__dict__.setdefault("_sft_scores", {})
    key = (cfg.eval.max_new_tokens, cfg.eval.max_prompt_len, cfg.eval.batch_size)
    if key not in cache:
        cache[key] = _greedy_scores(ws, ws.sft_model, cfg)
    mine, theirs = _greedy_scores(ws, model, cfg), cache[key]
    if not len(mine):
        return float("nan")
    return float(((mine > theirs).float() + 0.5 * (mine == theirs).float()).mean())
