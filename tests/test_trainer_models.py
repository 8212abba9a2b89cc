"""The trainer on Hugging Face models of your own: bf16, fp32 master weights, gradient checkpointing, LoRA,
``model.sft_path`` / ``model.reward_path``, a Qwen2 model, and the memory plan.

Tiny models built from configs and saved with ``save_pretrained`` (tests/hf_fixtures.py), a few steps of each
stage: seconds per test.
"""
import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("peft")

import hf_fixtures as H  # noqa: E402  (tests/ is on sys.path under pytest)
from hbat.trainer import algorithm, memory  # noqa: E402
from hbat.trainer.critic import new_critic  # noqa: E402
from hbat.trainer.checks import ConfigError  # noqa: E402
from hbat.trainer.common import StageConfig, token_logprobs  # noqa: E402
from hbat.trainer.config import load_config  # noqa: E402
from hbat.trainer.metrics import read_metrics  # noqa: E402
from hbat.trainer.models import AdaptersDisabled, base_of, is_checkpointed, load_causal_lm  # noqa: E402
from hbat.trainer.regularizers import hybrid_ewc  # noqa: E402
from hbat.trainer.reward import RetokenizedRewardModel, RewardModel  # noqa: E402
from hbat.trainer.step import TorchStepper  # noqa: E402
from hbat.trainer.workspace import prepare  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return H.train_tokenizer()


@pytest.fixture(scope="module")
def user(tmp_path_factory, tokenizer):
    """A Llama of one's own with JSONL data, an SFT model and two reward models (one with its own tokenizer)."""
    folder = tmp_path_factory.mktemp("user")
    overrides = H.user_run(folder, tokenizer)
    H.save_causal_lm(folder / "sft", tokenizer, seed=1)
    H.save_reward_model(folder / "rm", tokenizer, with_tokenizer=False)
    H.save_reward_model(folder / "rm_own", H.train_tokenizer(vocab_size=280))
    return folder, overrides


def config(user, out, *extra):
    folder, overrides = user
    return load_config(None, overrides + [f"output_dir={out}", *extra])


def batch(tokenizer, rows=4):
    from hbat.data import collate, encode_sft

    return collate(encode_sft(tokenizer, H.task_rows(rows).sft_train, 64), tokenizer.pad_token_id)


# --- precision ------------------------------------------------------------------------------------------------------

def test_bf16_halves_every_model_held_and_runs_end_finite(user, tmp_path):
    held, plans = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(user, tmp_path / dtype, "method=two_stage", "hpa=ppo", f"model.dtype={dtype}")
        ws = prepare(cfg, progress=False)
        held[dtype] = {"policy": H.param_bytes(ws.build()), "sft": H.param_bytes(ws.sft_model),
                       "reward": H.param_bytes(ws.reward_model), "critic": H.param_bytes(new_critic(ws, cfg)),
                       "base": sum(v.numel() * v.element_size() for v in ws.base_state.values())}
        plans[dtype] = {item.name: item.bytes for item in memory.plan_memory(cfg).items}
        if dtype == "bfloat16":
            result = algorithm.run_method(ws, cfg, progress=False)
            assert result["status"] == "ok"
            assert all(math.isfinite(v) for k, v in result.items() if k.startswith("eval/"))
            weights = torch.load(tmp_path / dtype / "two_stage" / "checkpoint.pt", weights_only=True)["model"]
            assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    for name, size in held["float32"].items():
        assert held["bfloat16"][name] * 2 == size, name
    for name in ("policy weights", "SFT model (frozen)", "reward model (frozen)", "PPO critic weights",
                 "PPO reference (copy of the policy)", "base weights (host copy)"):
        assert plans["bfloat16"][name] * 2 == plans["float32"][name], name
    assert plans["bfloat16"]["policy fp32 master weights"] == plans["float32"]["policy weights"]


def test_bf16_weights_keep_updates_smaller_than_bf16_resolution():
    """lr 1e-6 on weights of 1e-2: each AdamW update is below half a bf16 ulp (6e-5), so a plain bf16 AdamW
    changes nothing; the stepper's fp32 master accumulates them and the weight moves."""
    settings = StageConfig(lr=1e-6, lr_scheduler_type="constant", max_grad_norm=None)
    models = [torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16) for _ in range(2)]
    for model in models:
        torch.nn.init.constant_(model.weight, 1e-2)
    stepper, plain = TorchStepper(models[0], settings, 300), torch.optim.AdamW(models[1].parameters(), lr=1e-6,
                                                                               weight_decay=0.0)
    start = models[0].weight.detach().clone()
    for _ in range(300):
        for model in models:
            model.weight.grad = torch.ones_like(model.weight)
        stepper.step()
        plain.step()
    assert torch.equal(models[1].weight, start)  # a plain bf16 AdamW lost every update
    assert stepper.masters[0].dtype == torch.float32
    torch.testing.assert_close(start.float() - stepper.masters[0], torch.full((8, 8), 3e-4), rtol=0.02, atol=0)
    assert torch.equal(models[0].weight, stepper.masters[0].to(torch.bfloat16))  # the master, rounded
    assert (models[0].weight < start).all()


# --- gradient checkpointing -----------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients(user, tmp_path, tokenizer):
    cfg = config(user, tmp_path, "method=sft_only", "model.gradient_checkpointing=true")
    checkpointed, plain = prepare(cfg, progress=False).build(), load_causal_lm(cfg.model.path, torch.float32)
    assert is_checkpointed(checkpointed) and not is_checkpointed(plain)
    calls, grads = [], []
    for model in (checkpointed, plain):
        # transformers checkpoints the layer's forward: its modules start again in backward (the recompute stops
        # early, once it has what backward needs, so a pre-hook counts it)
        handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        model.train()
        calls.clear()
        logps, mask = token_logprobs(model, batch(tokenizer))
        (-logps.sum() / mask.sum()).backward()
        handle.remove()
        grads.append((len(calls), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (recomputed, with_ckpt), (once, without) = grads
    assert (recomputed, once) == (2, 1)  # the checkpointed layer ran again in backward
    for name, grad in without.items():
        torch.testing.assert_close(with_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# --- LoRA ---------------------------------------------------------------------------------------------------------

def test_lora_trains_only_adapters_against_the_base_and_saves_for_peft(user, tmp_path, tokenizer):
    from peft import PeftModel

    cfg = config(user, tmp_path, "method=two_stage", "model.lora_r=4", "save_model=true", "keep=last")
    ws = prepare(cfg, progress=False)
    policy = ws.build()
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert hybrid_ewc(policy, cfg.ewc).unit_names == trained  # the EWC units are the adapters
    result = algorithm.run_method(ws, cfg, progress=False)
    assert result["status"] == "ok"

    folder = tmp_path / "two_stage"
    weights = torch.load(folder / "checkpoint.pt", weights_only=True)["model"]
    policy.load_state_dict(weights)
    base = load_causal_lm(cfg.model.path, torch.float32).eval()
    unloaded = copy.deepcopy(policy).unload().state_dict()  # the trained model without its adapters
    assert all(torch.equal(value, unloaded[name]) for name, value in base.state_dict().items())  # the base did not move
    # the DPO reference is the base: the first DPO step already sees the SFT stage's change of the adapters
    first_dpo = next(r for r in read_metrics(folder / "metrics.jsonl") if "rewards/chosen" in r)
    assert abs(first_dpo["rewards/chosen"]) > 1e-6
    ids = batch(tokenizer)
    with torch.no_grad():
        reference = base_of(policy.eval())
        assert isinstance(reference, AdaptersDisabled)
        torch.testing.assert_close(reference(input_ids=ids["input_ids"]).logits, base(input_ids=ids["input_ids"]).logits)
        loaded = PeftModel.from_pretrained(load_causal_lm(cfg.model.path, torch.float32), folder / "model").eval()
        torch.testing.assert_close(loaded(input_ids=ids["input_ids"]).logits, policy(input_ids=ids["input_ids"]).logits)
        assert not torch.allclose(loaded(input_ids=ids["input_ids"]).logits, base(input_ids=ids["input_ids"]).logits)


def test_lora_ppo_with_bf16_gradient_checkpointing_on_qwen2(tmp_path, tokenizer):
    """Qwen2 (tied embeddings), bf16, LoRA and gradient checkpointing together, PPO against the base: the run ends
    finite, the PPO reference is the base (no copy), and the saved adapter loads with peft."""
    from peft import PeftModel

    overrides = H.user_run(tmp_path, tokenizer, kind="qwen2", extra=["method=two_stage", "hpa=ppo",
                           "model.lora_r=4", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
                           "save_model=true"])
    cfg = load_config(None, overrides)
    plan = {item.name for item in memory.plan_memory(cfg).items}
    assert "policy LoRA adapters" in plan and "PPO reference (copy of the policy)" not in plan
    result = algorithm.run_method(prepare(cfg, progress=False), cfg, progress=False)
    assert result["status"] == "ok" and math.isfinite(result["eval/reward"])
    records = read_metrics(tmp_path / "out" / "two_stage" / "metrics.jsonl")
    assert any(math.isfinite(r.get("ppo/policy_loss", math.nan)) for r in records)
    loaded = PeftModel.from_pretrained(load_causal_lm(cfg.model.path, torch.bfloat16), tmp_path / "out" / "two_stage"
                                       / "model")
    assert any("lora_" in n for n, _ in loaded.named_parameters())


# --- your own SFT and reward models ---------------------------------------------------------------------------------

def cached_models(output_dir: Path) -> list[str]:
    """The model files cached under ``output_dir/shared/`` (not the data's token cache, shared/tokens/)."""
    return sorted(p.name for p in (output_dir / "shared").glob("*/*.pt") if p.parent.name != "tokens")


def test_sft_path_and_reward_path_skip_their_training(user, tmp_path):
    folder, _ = user
    logged = []
    cfg = config(user, tmp_path, "method=sft_only", f"model.sft_path={folder / 'sft'}",
                 f"model.reward_path={folder / 'rm'}")
    ws = prepare(cfg, progress=False, log=logged.append)
    assert not [r for r in logged if "sft/loss" in r or "rm/loss" in r]  # nothing trained
    assert not cached_models(tmp_path)  # and nothing cached
    sft = load_causal_lm(str(folder / "sft"), torch.float32)
    assert all(torch.equal(v, ws.sft_model.state_dict()[k]) for k, v in sft.state_dict().items())
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(folder / "rm").eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ws.reward_model(ids, torch.ones_like(ids)), classifier(input_ids=ids).logits[:, 0])
    assert isinstance(ws.reward_model, RewardModel)  # same tokenizer: scored on the policy's ids
    # without them, both are trained and cached
    prepare(config(user, tmp_path / "trained", "method=sft_only"), progress=False, log=logged.append)
    assert [r for r in logged if "sft/loss" in r] and [r for r in logged if "rm/loss" in r]
    assert cached_models(tmp_path / "trained") == ["reward_model.pt", "sft.pt"]


def test_a_reward_model_with_its_own_tokenizer_scores_retokenized_text(user, tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, _ = user
    cfg = config(user, tmp_path, "method=two_stage", "hpa=ppo", f"model.reward_path={folder / 'rm_own'}")
    ws = prepare(cfg, progress=False)
    assert isinstance(ws.reward_model, RetokenizedRewardModel)
    own = AutoTokenizer.from_pretrained(folder / "rm_own")
    classifier = AutoModelForSequenceClassification.from_pretrained(folder / "rm_own").eval()
    text = "reverse: cabd\ndbac"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    expected = torch.tensor([own(text)["input_ids"] + [own.eos_token_id]])
    assert ids.shape != expected.shape or not torch.equal(ids, expected)  # the vocabularies differ
    with torch.no_grad():
        torch.testing.assert_close(ws.reward_model(ids), classifier(input_ids=expected).logits[:, 0])
    # PPO runs: its critic starts from the SFT model (the reward model's ids are not the policy's)
    result = algorithm.run_method(ws, cfg, progress=False)
    assert result["status"] == "ok" and math.isfinite(result["eval/reward"])


def test_bad_model_settings_are_refused_when_the_config_is_loaded(user, tmp_path):
    folder, _ = user
    with pytest.raises(ConfigError, match=r"config.model.sft_path needs model.path"):
        load_config(None, [f"model.sft_path={folder / 'sft'}"])
    with pytest.raises(ConfigError, match=r"config.model.reward_path must be an AutoModelForSequenceClassification"):
        config(user, tmp_path, f"model.reward_path={folder / 'sft'}")
    with pytest.raises(ConfigError, match=r"config.model.sft_path is not a folder"):
        config(user, tmp_path, f"model.sft_path={folder / 'missing'}")
    with pytest.raises(ConfigError, match=r"config.model.lora_target_modules"):
        config(user, tmp_path, "model.lora_r=4", "model.lora_target_modules=[no_such_proj]")
    with pytest.raises(ConfigError, match=r"config.model.dtype must be one of"):
        config(user, tmp_path, "model.dtype=float16")
    with pytest.raises(ConfigError, match=r"config.model.lora_dropout must be in \[0, 1\)"):
        config(user, tmp_path, "model.lora_dropout=1.0")


def test_the_evaluation_prompt_limit_is_a_setting_checked_against_the_context(tmp_path, tokenizer, monkeypatch):
    """A model with a 128-token context: the default limit (128 prompt tokens + the new ones) does not fit and
    the error names the keys to lower; a lower eval.max_prompt_len fits, and the evaluation cuts prompts to it."""
    from transformers import AutoModelForCausalLM

    from hbat.trainer import evaluate, rollout

    short = tmp_path / "short"
    AutoModelForCausalLM.from_config(H.tiny_config("llama", tokenizer, max_position_embeddings=128)).save_pretrained(short)
    tokenizer.save_pretrained(short)
    sft, pref = H.write_user_data(tmp_path, 24)
    overrides = H.TINY_USER + [f"model.path={short}", f"data.sft={sft}", f"data.preference={pref}",
                               f"output_dir={tmp_path / 'out'}", "method=sft_only"]
    with pytest.raises(ConfigError, match=re.escape(
            "config.eval.max_prompt_len + eval.max_new_tokens = 131 tokens exceeds the model's context of 128 "
            f"(max_position_embeddings in {short / 'config.json'}); lower one of them")):
        load_config(None, overrides)
    cfg = load_config(None, overrides + ["eval.max_prompt_len=64"])
    limits = []
    for module in (evaluate, rollout):  # greedy decoding (exact match, reward, win rate) and the KL's sampling
        monkeypatch.setattr(module, "encode_prompts", lambda tok, prompts, max_len, real=module.encode_prompts:
                            limits.append(max_len) or real(tok, prompts, max_len))
    result = algorithm.run_method(prepare(cfg, progress=False), cfg, progress=False)
    assert result["status"] == "ok" and math.isfinite(result["eval/reward"])
    assert limits and set(limits) == {64}


# --- the memory plan --------------------------------------------------------------------------------------------------

SMALL_TASK = H.TINY + ["data.task_n_sft=32", "data.task_n_pref=16", "data.task_n_val=4", "reward.max_steps=1"]


def test_memory_plan_is_printed_saved_and_shrinks_with_the_settings(capsys, tmp_path):
    from hbat.trainer.run import main

    argv = ["--no-progress"] + [a for o in SMALL_TASK + ["method=sft_only", f"output_dir={tmp_path}"]
                                for a in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[sft_only] memory plan per device (cpu;" in out and "policy AdamW state" in out
    saved = json.loads((tmp_path / "sft_only" / "result.json").read_text())["memory_plan"]
    assert saved["total_bytes"] == sum(item["bytes"] for item in saved["items"]) > 0

    def total(*extra):
        plan = memory.plan_memory(load_config(None, H.TINY + list(extra)))
        return plan.total, {item.name: item.bytes for item in plan.items}

    full, items = total()
    sft_only = total("method=sft_only")[1]["activations (largest micro-batch)"]
    assert total("method=sft_only", "model.gradient_checkpointing=true")[1]["activations (largest micro-batch)"] < \
        sft_only
    lora, lora_items = total("model.lora_r=2")
    assert lora < full and lora_items["policy AdamW state (2 x fp32)"] < items["policy AdamW state (2 x fp32)"] / 10
    assert total("ewc.anchor_dtype=bfloat16")[1]["EWC anchor"] * 2 == items["EWC anchor"]
    ppo = total("hpa=ppo")[1]
    assert {"PPO critic weights", "PPO reference (copy of the policy)"} <= set(ppo)


def test_a_run_that_cannot_fit_stops_before_any_model_is_loaded(capsys, tmp_path, monkeypatch):
    from hbat.trainer.run import EXIT_ERROR, main

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    argv = ["--no-progress"] + [a for o in SMALL_TASK + ["method=sft_only", f"output_dir={tmp_path}"]
                                for a in ("--set", o)]
    assert main(argv) == EXIT_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("hbat train: memory plan: the run needs ")
    assert "1.00 MiB free" in err[0] and "activations (largest micro-batch)" in err[0]
    assert "model.gradient_checkpointing: true" in err[0]  # what would shrink the biggest item
    assert not Path(tmp_path, "shared").exists() and not Path(tmp_path, "sft_only").exists()
