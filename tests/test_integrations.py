"""HybridEWCCallback in real transformers.Trainer / TRL DPOTrainer runs on a tiny Llama."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import Trainer  # noqa: E402

from hbat import HybridEWC  # noqa: E402
from hbat.integrations.accelerate import prepare_ewc  # noqa: E402
from hbat.integrations.transformers import STATE_FILE, HybridEWCCallback, release_trainer  # noqa: E402
from hbat.param_view import LocalParamView  # noqa: E402
from hf_fixtures import char_tokenizer, tiny_llama  # noqa: E402  (tests/ is on sys.path under pytest)
from hf_trainer_cases import (PenaltyInLossTrainer, lm_dataset, model_after_ifa, params,  # noqa: E402
                              training_args)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: one thread is fastest, and steady when other processes load the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("max_grad_norm", [0.1, 0.0])
def test_callback_matches_penalty_as_loss_term(tokenizer, tmp_path, max_grad_norm):
    data = lm_dataset(tokenizer)

    model, ewc = model_after_ifa(tokenizer)
    callback = HybridEWCCallback(ewc, objective="hpa")
    trainer = Trainer(model=model, args=training_args(tmp_path / "cb", max_grad_norm=max_grad_norm),
                      train_dataset=data, callbacks=[callback])
    trainer.train()
    with_callback = params(model)
    assert ewc.objective == "hpa" and ewc.active
    assert "_clip_grad_norm" not in trainer.__dict__ and "log" not in trainer.__dict__  # wrappers removed

    ref_model, ref_ewc = model_after_ifa(tokenizer)
    ref_ewc.begin_stage("hpa")
    PenaltyInLossTrainer(model=ref_model, args=training_args(tmp_path / "ref", max_grad_norm=max_grad_norm),
                         train_dataset=data, ewc=ref_ewc).train()
    reference = params(ref_model)

    plain_model, _ = model_after_ifa(tokenizer)
    Trainer(model=plain_model, args=training_args(tmp_path / "plain", max_grad_norm=max_grad_norm),
            train_dataset=data).train()
    plain = params(plain_model)

    for name in reference:
        torch.testing.assert_close(with_callback[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = sum(float((plain[n] - reference[n]).abs().max()) for n in reference)
    assert moved > 1e-3  # the penalty matters, so the comparison above can fail

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("ewc/penalty" in entry and "ewc/importance_entropy" in entry for entry in logs)
    assert all(0 < entry["ewc/penalty"] < float("inf") for entry in logs)
    assert 0 < logs[0]["ewc/importance_entropy"] <= 1
    assert "ewc/change_mean" in logs[0] and "ewc/change_mean" not in logs[1]  # stage metrics logged once
    if max_grad_norm:
        assert all(entry["grad_norm"] > max_grad_norm for entry in logs)  # clipping was active


def test_penalty_applied_once_per_optimizer_step(tokenizer, tmp_path):
    model, ewc = model_after_ifa(tokenizer)
    ewc.begin_stage("hpa")
    calls = []
    apply_ = ewc.apply_

    def counting_apply_(*args, **kwargs):
        calls.append(trainer.state.global_step)
        return apply_(*args, **kwargs)

    ewc.apply_ = counting_apply_
    trainer = Trainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=3, max_steps=3),
                      train_dataset=lm_dataset(tokenizer), callbacks=[HybridEWCCallback(ewc)])
    trainer.train()
    assert calls == [0, 1, 2]


def test_checkpoint_save_and_resume(tokenizer, tmp_path):
    data = lm_dataset(tokenizer)
    args = dict(save_strategy="steps", save_steps=2, max_steps=4)
    model, ewc = model_after_ifa(tokenizer)
    Trainer(model=model, args=training_args(tmp_path, **args), train_dataset=data,
            callbacks=[HybridEWCCallback(ewc, objective="hpa")]).train()
    uninterrupted = params(model)
    path = tmp_path / "checkpoint-2" / STATE_FILE
    assert path.is_file() and (tmp_path / "checkpoint-4" / STATE_FILE).is_file()
    assert not [f for f in os.listdir(tmp_path / "checkpoint-2") if ".tmp" in f]
    saved = torch.load(path, weights_only=True)
    assert saved["objective"] == "hpa" and saved["stages_done"] == {"ifa": 1, "hpa": 0}

    # a new process would start from the untouched model and a fresh HybridEWC: the checkpoint restores both
    fresh_model = tiny_llama(tokenizer, seed=0)
    fresh_ewc = HybridEWC(fresh_model, f_max=1000.0, lam=1.0)
    callback = HybridEWCCallback(fresh_ewc, objective="hpa")
    Trainer(model=fresh_model, args=training_args(tmp_path, **args), train_dataset=data,
            callbacks=[callback]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    restored = fresh_ewc.state_dict()
    assert restored["objective"] == "hpa" and restored["stages_done"] == saved["stages_done"]
    for a, b in zip(restored["anchors"], saved["anchors"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(restored["importance"], saved["importance"], rtol=0, atol=0)
    for name, p in uninterrupted.items():
        torch.testing.assert_close(dict(fresh_model.named_parameters())[name].detach(), p, rtol=1e-5, atol=1e-6,
                                   msg=name)

    # by hand
    other = HybridEWC(tiny_llama(tokenizer, seed=1), f_max=1000.0)
    HybridEWCCallback(other).load(tmp_path / "checkpoint-2")
    assert other.objective == "hpa"
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        HybridEWCCallback(other).load(tmp_path)

    # a truncated state file or a planted pickle is refused with its path; the HybridEWC is left as it was
    before = other.state_dict()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / STATE_FILE).write_bytes(path.read_bytes()[:100])
    planted = tmp_path / "planted"
    planted.mkdir()
    torch.save({"anchors": SimpleNamespace()}, planted / STATE_FILE)  # loading it needs the unpickler
    for folder in (broken, planted):
        with pytest.raises(ValueError, match=f"cannot load HybridEWC state .*{folder.name}"):
            HybridEWCCallback(other).load(folder)
    for a, b in zip(other.state_dict()["anchors"], before["anchors"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trl_dpo_trainer_with_callback(tokenizer, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # chosen answers are made of "a", rejected ones of "b": DPO moves the weights quickly
    rows = [{"prompt": f"q{i}:", "chosen": " " + "a" * (1 + i % 3), "rejected": " " + "b" * (1 + i % 4)}
            for i in range(16)]
    distance, logs = {}, {}
    for use_callback in (True, False):
        model, ewc = model_after_ifa(tokenizer)
        ewc.begin_stage("hpa")  # the anchor is where DPO starts, in both runs
        config = DPOConfig(output_dir=str(tmp_path / str(use_callback)), per_device_train_batch_size=4, max_steps=6,
                           learning_rate=3e-3, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                           disable_tqdm=True, max_length=32, beta=0.1, seed=0)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[HybridEWCCallback(ewc, objective="hpa")] if use_callback else None)
        trainer.train()
        distance[use_callback] = sum(float(((p.detach() - a) ** 2).sum())
                                     for p, a in zip(ewc.view.params(), ewc.anchors))
        logs[use_callback] = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs[True]) == 3 and all(entry["ewc/penalty"] > 0 for entry in logs[True])
    assert all("ewc/penalty" not in entry for entry in logs[False])
    assert 0 < distance[True] < 0.5 * distance[False]  # the penalty pulls the weights toward the anchor


def test_bad_input(tokenizer, tmp_path):
    model, ewc = model_after_ifa(tokenizer)
    with pytest.raises(ValueError, match="'sft'"):
        HybridEWCCallback(ewc, objective="sft")
    with pytest.raises(TypeError, match="HybridEWC"):
        HybridEWCCallback(object())
    other_model = tiny_llama(tokenizer, seed=1)
    trainer = Trainer(model=other_model, args=training_args(tmp_path), train_dataset=lm_dataset(tokenizer),
                      callbacks=[HybridEWCCallback(ewc, objective="hpa")])
    with pytest.raises(ValueError, match="other parameters"):
        trainer.train()
    assert ewc.objective == "ifa"  # nothing changed


def test_fp16_grad_scaler_gradients_are_scaled_consistently(tokenizer):
    """Under an fp16 GradScaler the hook runs before accelerate unscales: the penalty is scaled to match."""
    grads = {}
    for use_scaler in (True, False):
        model, ewc = model_after_ifa(tokenizer)
        ewc.begin_stage("hpa")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)  # away from the anchor, so the penalty gradient is not zero
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        callback = HybridEWCCallback(ewc)
        callback.trainer = SimpleNamespace(state=SimpleNamespace(global_step=0))
        callback._prepared = prepare_ewc(SimpleNamespace(scaler=scaler), ewc, model)
        ids = torch.tensor(tokenizer(["q1: abc", "q2: hello"], padding=True)["input_ids"])
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        callback._apply_once()  # what the wrapped _clip_grad_norm does first
        callback._apply_once()  # a second call in the same optimizer step adds nothing
        scaler.unscale_(optimizer)  # what accelerate's clip_grad_norm_ does next
        grads[use_scaler] = [p.grad.clone() for p in model.parameters()]
        assert callback.metrics()["ewc/penalty"] > 0
    for scaled, plain in zip(grads[True], grads[False]):
        torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-6)


def test_integrations_package_imports_without_transformers(monkeypatch):
    for name in ("hbat.integrations", "hbat.integrations.transformers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    import hbat.integrations

    assert hbat.integrations.prepare_ewc  # the accelerate helper needs only torch
    with pytest.raises(ImportError):
        hbat.integrations.HybridEWCCallback


class DeepSpeedEngine(torch.nn.Module):
    """Stands in for deepspeed.DeepSpeedEngine (recognised by class name): only what the refusals read."""

    def __init__(self, module, stage, autotp=1):
        super().__init__()
        self.module, self._stage, self._autotp = module, stage, autotp

    def zero_optimization_stage(self):
        return self._stage

    def autotp_size(self):
        return self._autotp


class FullyShardedDataParallel(torch.nn.Module):
    """Stands in for FSDP1's wrapper (recognised by class name)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap, config, match", [
    (lambda m: DeepSpeedEngine(m, stage=0), None, r"zero_optimization.stage 0"),
    (lambda m: DeepSpeedEngine(m, stage=2, autotp=2), None, r"autotp_size"),
    (lambda m: FullyShardedDataParallel(m), None, r"FSDP1.*fsdp_version: 2"),
    (lambda m: m, SimpleNamespace(tp_enabled=True, cp_enabled=False, sp_enabled=False), r"with tp parallelism"),
    (lambda m: m, SimpleNamespace(tp_enabled=False, cp_enabled=True, sp_enabled=True), r"with cp/sp parallelism"),
])
def test_unsupported_setups_are_refused_before_anything_changes(tokenizer, wrap, config, match):
    model, ewc = model_after_ifa(tokenizer)
    state = ewc.state_dict()
    with pytest.raises(NotImplementedError, match=match):
        prepare_ewc(SimpleNamespace(scaler=None, parallelism_config=config), ewc, wrap(model))
    assert ewc.objective == "ifa" and isinstance(ewc.view, LocalParamView)
    assert all(torch.equal(a, b) for a, b in zip(ewc.anchors, state["anchors"]))


def test_release_trainer_frees_a_finished_trainer(tokenizer, tmp_path):
    model, ewc = model_after_ifa(tokenizer)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=lm_dataset(tokenizer),
                      callbacks=[HybridEWCCallback(ewc, objective="hpa")])
    trainer.train()
    release_trainer(trainer)
    assert trainer.optimizer is None and trainer.model_wrapped is model
    assert ewc.objective == "hpa" and float(ewc.apply_()) >= 0  # one process: the HybridEWC stays bound
