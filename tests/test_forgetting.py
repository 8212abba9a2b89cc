"""The forgetting meter of hbat train (eval.kl_to_start_every): the exact KL to the stage's start weights on held-out
rows of the stage's task, logged every N steps, with training unchanged bit for bit."""
import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from hbat.averaging import token_kl  # noqa: E402
from hbat.trainer import algorithm  # noqa: E402
from hbat.trainer.config import load_config  # noqa: E402
from hbat.trainer.ds_config import check_supported  # noqa: E402
from hbat.trainer.forgetting import with_forgetting_meter  # noqa: E402
from hbat.trainer.memory import plan_memory  # noqa: E402
from hbat.trainer.metrics import read_metrics  # noqa: E402
from hbat.trainer.sft import collate_sft, encode_for_sft  # noqa: E402

from hf_fixtures import TINY  # noqa: E402  (tests/ is on sys.path under pytest)
from trainer_ds_worker import tiny_workspace  # noqa: E402


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", "method=hbat", "n_parts=2", "eval.kl_samples=0",
                                     *extra])


def test_the_meter_logs_the_kl_and_leaves_training_unchanged(tmp_path):
    ws = tiny_workspace()
    algorithm.run_method(ws, _cfg(tmp_path / "off"), progress=False)
    algorithm.run_method(ws, _cfg(tmp_path / "on", "eval.kl_to_start_every=2", "sft.max_steps=3",
                                  "dpo.max_steps=3"), progress=False)
    algorithm.run_method(ws, _cfg(tmp_path / "off3", "sft.max_steps=3", "dpo.max_steps=3"), progress=False)
    on = torch.load(tmp_path / "on" / "hbat" / "checkpoint.pt", weights_only=True)["model"]
    off = torch.load(tmp_path / "off3" / "hbat" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(on[k], off[k]) for k in off)  # the swaps are exact: the same weights
    records = read_metrics(os.path.join(tmp_path, "on", "hbat", "metrics.jsonl"))
    measured = [(r["stage"], r["train/step"]) for r in records if "ewc/kl_to_start" in r]
    assert measured == [(stage, 2) for stage in range(4)]  # every 2nd step of each of the 4 stages (3 steps each)
    values = [r["ewc/kl_to_start"] for r in records if "ewc/kl_to_start" in r]
    assert all(v > 0 for v in values)  # two steps moved every stage away from its start
    assert all(r["ewc/kl_to_start_reverse"] > 0 for r in records if "ewc/kl_to_start" in r)
    off_records = read_metrics(os.path.join(tmp_path, "off", "hbat", "metrics.jsonl"))
    assert not any("ewc/kl_to_start" in r for r in off_records)


def test_the_logged_kl_is_the_kl_between_the_start_and_current_models(tmp_path):
    ws = tiny_workspace()
    cfg = _cfg(tmp_path, "eval.kl_to_start_every=1", "eval.kl_to_start_rows=3", "eval.batch_size=2")  # 2 forwards
    model = ws.build()
    logged = []
    log = with_forgetting_meter(model, ws.tokenizer, ws.sft_val, cfg, logged.append, max_len=cfg.sft.max_len)
    start = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    log({"train/step": 1, "sft/loss": 1.0})
    batch = collate_sft(encode_for_sft(ws.tokenizer, ws.sft_val[:3], cfg.sft.max_len), 0)
    positions = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        log_start, log_now = (torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                                .logits[:, :-1][positions].float(), -1) for m in (start, model))
    assert logged[0]["sft/loss"] == 1.0
    assert logged[0]["ewc/kl_to_start"] == pytest.approx(float(token_kl(log_start, log_now).mean()), rel=1e-5)
    assert logged[0]["ewc/kl_to_start_reverse"] == pytest.approx(float(token_kl(log_now, log_start).mean()), rel=1e-5)
    for p, q in zip(model.parameters(), start.parameters()):
        assert not torch.equal(p, q)  # the current weights are back after the start forward


def test_off_by_default_and_checked(tmp_path):
    ws = tiny_workspace()
    cfg = _cfg(tmp_path)
    sink = []
    assert with_forgetting_meter(ws.build(), ws.tokenizer, ws.sft_val, cfg, sink.append, max_len=64) == sink.append
    with pytest.raises(ValueError, match="eval.kl_to_start_every"):
        _cfg(tmp_path, "eval.kl_to_start_every=-1")
    with pytest.raises(ValueError, match="eval.kl_to_start_rows"):
        _cfg(tmp_path, "eval.kl_to_start_rows=0")
    with pytest.raises(NotImplementedError, match="eval.kl_to_start_every"):
        check_supported(_cfg(tmp_path, "eval.kl_to_start_every=5"), "hbat")


def test_the_memory_plan_counts_the_start_copy(tmp_path):
    names = [item.name for item in plan_memory(_cfg(tmp_path, "eval.kl_to_start_every=5")).items]
    assert any(name.startswith("forgetting meter") for name in names)
    assert not any(name.startswith("forgetting meter") for name in (i.name for i in plan_memory(_cfg(tmp_path)).items))
