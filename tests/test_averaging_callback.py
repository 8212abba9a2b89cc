"""AveragingCallback in a real transformers.Trainer (one process), HybridEWCCallback's forgetting meter, and
prepare_averaging in an accelerate loop."""
import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hbat import AveragingCallback, HybridEWC, ops  # noqa: E402
from hbat.integrations.averaging import STATE_FILE, prepare_averaging  # noqa: E402
from hbat.integrations.transformers import HybridEWCCallback  # noqa: E402
from hbat.trainer.checkpoint import CheckpointError  # noqa: E402
from hf_fixtures import char_tokenizer, tiny_llama  # noqa: E402  (tests/ is on sys.path under pytest)

TEXTS = ["q1: abc", "q2: hello there", "q3: a b c d", "q4: zzz", "q5: the end.", "q6: xyz 123", "q7: ok", "q8: no"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows(tokenizer):
    out = []
    for text in TEXTS:
        ids = tokenizer(text, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        input_ids, mask = ids["input_ids"][0], ids["attention_mask"][0]
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)})
    return out


@pytest.fixture(scope="module")
def heldout(rows):
    return {k: torch.stack([r[k] for r in rows[4:]]) for k in rows[0]}


def args(out, **overrides):
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                  learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(tokenizer, rows, out, callbacks=(), **overrides):
    model = tiny_llama(tokenizer, seed=0)
    trainer = Trainer(model=model, args=args(out, **overrides), train_dataset=rows, callbacks=list(callbacks))
    trainer.train()
    return model, trainer


@pytest.fixture(scope="module")
def plain(tokenizer, rows, tmp_path_factory):
    """The start weights and the weights 4 steps later, without any callback."""
    start = params(tiny_llama(tokenizer, seed=0))
    model, _ = train(tokenizer, rows, tmp_path_factory.mktemp("plain"))
    return start, params(model)


def lerp(start, trained, weight_of):
    out = {n: torch.empty_like(t) for n, t in trained.items()}
    names = list(trained)
    ops.lerp_([out[n] for n in names], [start[n] for n in names], [trained[n] for n in names],
              torch.tensor([weight_of(n) for n in names]))
    return out


@pytest.mark.parametrize("method,alpha,ratios,weight_of", [
    ("uniform", 0.3, None, lambda n: 0.3),
    ("expo", 0.5, None, lambda n: 1.5),
    ("hma", None, [0.2, 0.9], lambda n: 0.9 if ".layers.1." in n or n.startswith(("model.norm", "lm_head")) else 0.2),
])
def test_at_the_end_the_weights_are_the_lerp_of_the_start_and_the_trained_model(tokenizer, rows, tmp_path, plain,
                                                                                method, alpha, ratios, weight_of):
    start, trained = plain
    callback = AveragingCallback(method, alpha, ratios=ratios, blocks=2)
    model, trainer = train(tokenizer, rows, tmp_path, [callback])
    got, want = params(model), lerp(start, trained, weight_of)
    assert all(torch.equal(got[n], want[n]) for n in want), max(float((got[n] - want[n]).abs().max()) for n in want)
    assert callback.prepared.averaged_steps == [4] and "log" not in trainer.__dict__


def test_every_k_and_the_ema_anchor(tokenizer, rows, tmp_path):
    seen = {}

    class Before(TrainerCallback):  # runs before the AveragingCallback at every step end
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = params(model)

    callback = AveragingCallback("ema", 0.5, every=2, ema_every=1)
    model, _ = train(tokenizer, rows, tmp_path, [Before(), callback])
    anchor = params(tiny_llama(tokenizer, seed=0))
    for step in range(1, 5):  # anchor <- (1 - b) anchor + b theta, then at steps 2 and 4 theta <- anchor
        anchor = lerp(anchor, seen[step], lambda n: 0.5)
    assert callback.prepared.averaged_steps == [2, 4] and callback.prepared.ema_updates == 4  # not twice at step 4
    assert all(torch.equal(p, anchor[n]) for n, p in model.named_parameters())


def test_the_forgetting_meter_is_logged_at_its_steps_by_both_callbacks(tokenizer, rows, heldout, tmp_path):
    seen = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = params(model)

    model = tiny_llama(tokenizer, seed=0)
    start = copy.deepcopy(model)
    ewc = HybridEWC(model, lam=1.0)
    ewc_callback = HybridEWCCallback(ewc, objective="ifa", kl_batch=heldout, kl_every=2)
    callback = AveragingCallback("uniform", 0.5, at_end=True, kl_batch=heldout, kl_every=2)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=rows, callbacks=[Record(), ewc_callback, callback])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [("ewc/kl_to_start" in e) for e in logs] == [False, True, False, True]
    probe = copy.deepcopy(start)
    for entry, step in zip([logs[1], logs[3]], (2, 4)):
        probe.load_state_dict(seen[step])
        with torch.no_grad():
            cur = torch.log_softmax(probe(**{k: heldout[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1], -1)
            ref = torch.log_softmax(start(**{k: heldout[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1], -1)
        mask = heldout["labels"][:, 1:] != -100
        want = float((ref.exp() * (ref - cur)).sum(-1)[mask].mean())
        assert entry["ewc/kl_to_start"] == pytest.approx(want, rel=1e-5) and want > 0
        assert entry["ewc/kl_to_start_reverse"] > 0
    assert "log" not in trainer.__dict__ and "_clip_grad_norm" not in trainer.__dict__  # both wrappers removed
    assert trainer.state.log_history[-1] == {"step": 4, **callback.final_metrics}  # after the final averaging
    assert callback.final_metrics["ewc/kl_to_start"] < logs[3]["ewc/kl_to_start"]  # averaging moved back toward start


def test_checkpoint_resume_matches_the_uninterrupted_run(tokenizer, rows, tmp_path):
    save = dict(save_strategy="steps", save_steps=2)
    uninterrupted = AveragingCallback("ema", 0.3, every=3)
    model, _ = train(tokenizer, rows, tmp_path / "a", [uninterrupted], **save)
    path = tmp_path / "a" / "checkpoint-2" / STATE_FILE
    assert path.is_file() and (tmp_path / "a" / "checkpoint-2" / f"{STATE_FILE}.sha256").is_file()

    resumed_model = tiny_llama(tokenizer, seed=5)  # other weights: the checkpoint must bring them and the anchor
    resumed = AveragingCallback("ema", 0.3, every=3)
    trainer = Trainer(model=resumed_model, args=args(tmp_path / "a", **save), train_dataset=rows, callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(resumed_model.named_parameters())[name], p, rtol=0, atol=1e-6, msg=name)
    assert resumed.prepared.averaged_steps == uninterrupted.prepared.averaged_steps == [3, 4]

    with open(path, "r+b") as fh:  # a damaged state file is refused, naming it, before any step
        fh.seek(40)
        fh.write(b"\0\0\0\0")
    broken = Trainer(model=tiny_llama(tokenizer), args=args(tmp_path / "a", **save), train_dataset=rows,
                     callbacks=[AveragingCallback("ema", 0.3, every=3)])
    with pytest.raises(CheckpointError, match=f"{path}: the checksum does not match"):
        broken.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    other = Trainer(model=tiny_llama(tokenizer), args=args(tmp_path / "a", **save), train_dataset=rows,
                    callbacks=[AveragingCallback("uniform", 0.3, every=3)])
    with pytest.raises(ValueError, match="other averaging settings"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))


def test_unsupported_settings_are_refused_at_train_start(tokenizer, rows, tmp_path):
    for callback, match in ((AveragingCallback("hma", ratios=[0.1, 0.5, 0.9], blocks=2), "ratios has 3 entries"),
                            (AveragingCallback(sweep=dict(ratios=[0.5, [0.1, 0.2]], evaluate=len)),
                             r"sweep ratios\[1\] is a vector of 2 ratios but this averager has one block")):
        model = tiny_llama(tokenizer)
        before = params(model)
        trainer = Trainer(model=model, args=args(tmp_path), train_dataset=rows, callbacks=[callback])
        with pytest.raises(ValueError, match=match):
            trainer.train()
        assert trainer.state.global_step == 0 and callback.prepared is None and "log" not in trainer.__dict__
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for kwargs, error, match in ((dict(method="soup"), ValueError, "method must be one of"),
                                 (dict(alpha=1.5), ValueError, r"alpha of method='uniform' must be in \[0, 1\]"),
                                 (dict(method="expo"), ValueError, "needs alpha"),
                                 (dict(ratios=[0.1]), ValueError, "ratios are for method='hma'"),
                                 (dict(kl_every=5), ValueError, "kl_batch"),
                                 (dict(every=0), ValueError, "every must be a positive int"),
                                 (dict(sweep={"ratios": [0.5]}), ValueError, "ratios and evaluate")):
        with pytest.raises(error, match=match):
            AveragingCallback(**kwargs)


def test_a_sweep_at_the_end_of_training(tokenizer, rows, heldout, tmp_path, plain):
    def evaluate(model, share):
        return {"heldout_loss": float(model(**share).loss)}

    callback = AveragingCallback("uniform", 0.5, sweep=dict(ratios=[0.0, 0.5, 1.0, 1.25], evaluate=evaluate,
                                                            data=heldout, minimize=["heldout_loss"],
                                                            plot=str(tmp_path / "sweep.png")))
    model, _ = train(tokenizer, rows, tmp_path, [callback])
    result = callback.sweep_result
    assert [r["ratio"] for r in result.rows] == [0.0, 0.5, 1.0, 1.25] and len(result.front) == 1
    assert (tmp_path / "sweep.png").is_file()
    start, trained = plain
    want = lerp(start, trained, lambda n: 0.5)  # the sweep restored the weights before the final averaging
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())
    first = tiny_llama(tokenizer, seed=0)
    first.load_state_dict(start)
    with torch.no_grad():
        assert result.rows[0]["heldout_loss"] == pytest.approx(float(first(**heldout).loss), rel=1e-6)


def test_prepare_averaging_in_an_accelerate_loop(tokenizer, rows, heldout, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_llama(tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    avg = prepare_averaging(accelerator, model, method="expo", alpha=0.25, every=2, at_end=False,
                            kl_batch=heldout, kl_every=1)
    before = params(model)
    metrics = []
    for step in range(1, 3):
        batch = {k: torch.stack([r[k] for r in rows[:2]]) for k in rows[0]}
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if step == 2:
            trained = params(model)
        metrics.append(avg.step(step))
    assert avg.finish(2) is False and avg.averaged_steps == [2]
    want = lerp(before, trained, lambda n: 1.25)
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())
    assert all(m["ewc/kl_to_start"] > 0 for m in metrics) and set(metrics[0]) == {"ewc/kl_to_start",
                                                                                 "ewc/kl_to_start_reverse"}
    assert avg.save(tmp_path) == os.path.join(tmp_path, STATE_FILE)
    assert avg.load(tmp_path) and avg.averaged_steps == [2]
    avg.close()


def test_trl_dpo_trainer_with_the_callback(tokenizer, tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": f"q{i}:", "chosen": " " + "a" * (1 + i % 3), "rejected": " " + "b" * (1 + i % 4)}
            for i in range(16)]
    heldout = tokenizer(["q1: aa", "q2: a"], padding="max_length", max_length=8, return_tensors="pt")
    final = {}
    for callbacks in ([AveragingCallback("uniform", 0.5, kl_batch=dict(heldout), kl_every=2)], []):
        model = tiny_llama(tokenizer, seed=0)
        start = params(model)
        config = DPOConfig(output_dir=str(tmp_path / str(len(callbacks))), per_device_train_batch_size=4, max_steps=4,
                           learning_rate=3e-3, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                           disable_tqdm=True, max_length=32, beta=0.1, seed=0)
        trainer = DPOTrainer(model=model, ref_model=tiny_llama(tokenizer, seed=0), args=config,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=callbacks)
        trainer.train()
        final[len(callbacks)] = params(model)
        if callbacks:
            logs = [e for e in trainer.state.log_history if "loss" in e]
            assert len(logs) == 2 and all(e["ewc/kl_to_start"] > 0 for e in logs)
    want = lerp(start, final[0], lambda n: 0.5)
    assert all(torch.equal(final[1][n], want[n]) for n in want)
