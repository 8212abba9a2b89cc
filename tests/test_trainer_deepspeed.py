"""The trainer under DeepSpeed ZeRO on 2 CPU ranks (gloo, torchrun) against the same run in one process.

``tests/trainer_ds_worker.py`` runs HBAT (N = 2: IFA1, HPA1, IFA2, HPA2 with SFT and DPO) on the tiny
workspace; the single-process reference runs the same config with the same global batches. The final
weights must agree to fp32 tolerance (only the summation order of the gradient differs: per rank, then
reduced), the penalty must be active in the penalised stages, and only rank 0 writes.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("yaml")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import trainer_ds_worker as W  # noqa: E402
from torchrun_launch import torchrun  # noqa: E402

from hbat.trainer import engine  # noqa: E402
from hbat.trainer.dpo import DPOConfig  # noqa: E402
from hbat.trainer.metrics import read_metrics  # noqa: E402
from hbat.trainer.sft import SFTConfig  # noqa: E402


def _launch(out: Path, ds_json: Path, *flags: str, crash: bool = False) -> str:
    proc = torchrun(HERE / "trainer_ds_worker.py", ["--out", str(out), "--deepspeed", str(ds_json), *flags],
                    timeout=300)
    if not crash:
        assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    else:  # failed, and because of the simulated crash (not some other error)
        assert proc.returncode != 0 and W.SIMULATED_CRASH in proc.stdout, \
            f"the simulated crash did not happen:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from hbat.trainer.algorithm import run_method

    out = tmp_path_factory.mktemp("single")
    run_method(W.tiny_workspace(), W.make_config(str(out)), progress=False)
    return out / "hbat"


def _steps(records, key):
    return [(r["stage"], r[key]) for r in records if key in r]


def _write_ds_json(tmp_path: Path, zero: int) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(W.ds_config(zero)))
    return path


@pytest.mark.parametrize("zero, crash", [pytest.param(2, False, id="zero2"), pytest.param(3, False, id="zero3"),
                                         pytest.param(1, True, id="zero1-crash-resume", marks=pytest.mark.slow)])
def test_hbat_under_zero_matches_single_process(zero, crash, reference, tmp_path):
    """ZeRO-2 and ZeRO-3 (every parameter partitioned; evaluation and checkpoints gather the weights at each
    stage end) uninterrupted; ZeRO-1 crashes (every rank) at the start of HPA2 and is resumed with --resume:
    all end with the weights of the single-process run. (ZeRO-0 works too; left out to keep this short.)"""
    pytest.importorskip("deepspeed")
    ds_json = _write_ds_json(tmp_path, zero)
    folder = tmp_path / "hbat"
    if crash:
        _launch(tmp_path, ds_json, "--crash-in-hpa", "2", crash=True)
        assert torch.load(folder / "checkpoint.pt", weights_only=False)["position"] == 3
        stdout = _launch(tmp_path, ds_json, "--resume")
        assert "resuming after stage 3/4" in stdout
    else:  # ZeRO-3 also saves the final model (a plain copy of the kept weights, read from best.pt)
        stdout = _launch(tmp_path, ds_json, *(["--set", "save_model=true"] if zero == 3 else []))
        printed = [line for line in stdout.splitlines() if line.startswith("[hbat] part")]
        assert len(printed) == 2, stdout  # rank 0 prints, the other rank does not

    ds_ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    ref_ckpt = torch.load(reference / "checkpoint.pt", weights_only=False)
    assert ds_ckpt["position"] == ref_ckpt["position"] == 4
    base = W.tiny_workspace().base_state
    moved = max(float((ref_ckpt["model"][k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-3  # the comparison below is not trivially true
    ds_log, ref_log = read_metrics(folder / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    # one writer (a resumed run drops what it logged after its checkpoint: the boundary of the crashed stage)
    assert [r["step"] for r in ds_log] == [r["step"] for r in ref_log]
    penalties = _steps(ds_log, "ewc/penalty")
    assert max(p for s, p in penalties if s == 0) == 0.0  # IFA1 is not penalised
    for stage in (1, 2, 3):
        assert max(p for s, p in penalties if s == stage) > 0.0, f"no penalty logged in stage {stage}"
    for key in ("ewc/penalty", "sft/loss", "dpo/loss", "train/grad_norm", "train/lr"):
        got, want = _steps(ds_log, key), _steps(ref_log, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]),
                                   rtol=1e-3, atol=1e-5, msg=lambda m: f"{key}: {m}")
    for key in ("ewc/change_mean", "ewc/importance_max"):  # per stage boundary (the last record of a stage)
        got, want = list(dict(_steps(ds_log, key)).items()), list(dict(_steps(ref_log, key)).items())
        torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]),
                                   rtol=1e-3, atol=1e-9, msg=lambda m: f"{key}: {m}")

    # the weights (after the per-step metrics above, which say where a difference began)
    for name, value in ref_ckpt["model"].items():
        torch.testing.assert_close(ds_ckpt["model"][name], value, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")

    if zero == 3:  # keep=last: the saved model is the last stage's weights
        from safetensors.torch import load_file

        saved = load_file(folder / "model" / "model.safetensors")
        assert saved and all(torch.equal(v, ds_ckpt["model"][k]) for k, v in saved.items())

    # each rank keeps its own anchor partition next to the checkpoint; superseded ones are removed
    assert ds_ckpt["regularizer"] is None
    assert sorted(p.name for p in folder.glob("checkpoint-rank*")) == \
        ["checkpoint-rank0-stage4.pt", "checkpoint-rank0-stage4.pt.sha256", "checkpoint-rank1-stage4.pt",
         "checkpoint-rank1-stage4.pt.sha256"]
    anchors = [torch.load(folder / f"checkpoint-rank{r}-stage4.pt", weights_only=False)["ewc"]["anchors"]
               for r in (0, 1)]
    total = sum(p.numel() for p in base.values() if p.dtype.is_floating_point)
    owned = [sum(a.numel() for a in rank) for rank in anchors]
    # every element anchored exactly once over the ranks (ZeRO-3: each rank's slice of every tensor, the last
    # rank's padding left out by the view)
    assert sum(owned) == total and min(owned) > 0
    if zero == 3:  # every tensor is split over both ranks
        assert all(len(rank) == len(anchors[0]) for rank in anchors) and len(anchors[0]) > 0


def test_bf16_under_zero2_matches_single_process_bf16(tmp_path):
    """model.dtype=bfloat16 with the JSON's bf16 (DeepSpeed's fp32 master partitions) against one process in bf16
    (the stepper's fp32 masters): the run ends finite with bf16 weights that agree to bf16 precision."""
    pytest.importorskip("deepspeed")
    from hbat.trainer.algorithm import run_method

    extra = ["model.dtype=bfloat16"]
    run_method(W.tiny_workspace(torch.bfloat16), W.make_config(str(tmp_path / "single"), extra), progress=False)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(W.ds_config(2, bf16=True)))
    _launch(tmp_path, ds_json, *[a for o in extra for a in ("--set", o)])
    got = torch.load(tmp_path / "hbat" / "checkpoint.pt", weights_only=True)
    want = torch.load(tmp_path / "single" / "hbat" / "checkpoint.pt", weights_only=True)
    assert got["position"] == want["position"] == 4
    base = W.tiny_workspace(torch.bfloat16).base_state
    floats = [k for k, v in base.items() if v.is_floating_point()]
    assert all(got["model"][k].dtype == want["model"][k].dtype == torch.bfloat16 for k in floats)
    assert all(torch.isfinite(got["model"][k]).all() for k in floats)
    change = torch.cat([(want["model"][k].float() - base[k].float()).flatten() for k in floats])
    diff = torch.cat([(got["model"][k].float() - want["model"][k].float()).flatten() for k in floats])
    # the two runs differ by bf16 roundings of the same training, a small part of what training changed
    assert float(diff.norm()) < 0.1 * float(change.norm()), (float(diff.norm()), float(change.norm()))
    for key in ("sft/loss", "dpo/loss", "ewc/penalty"):
        got_log = [r[key] for r in read_metrics(tmp_path / "hbat" / "metrics.jsonl") if key in r]
        want_log = [r[key] for r in read_metrics(tmp_path / "single" / "hbat" / "metrics.jsonl") if key in r]
        torch.testing.assert_close(torch.tensor(got_log), torch.tensor(want_log), rtol=1e-2, atol=1e-3,
                                   msg=lambda m: f"{key}: {m}")


def test_a_bf16_model_needs_bf16_in_the_deepspeed_config(tmp_path):
    from hbat.trainer.checks import ConfigError
    from hbat.trainer.ds_config import run_ds_config

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(W.ds_config(2)))
    with pytest.raises(ConfigError, match=r"config.model.dtype = bfloat16 needs bf16 in the DeepSpeed config"):
        run_ds_config(W.make_config(str(tmp_path), ["model.dtype=bfloat16"], str(ds_json)))
    ds_json.write_text(json.dumps(W.ds_config(2, bf16=True)))
    assert run_ds_config(W.make_config(str(tmp_path), ["model.dtype=auto"], str(ds_json)))["bf16"] == {"enabled": True}
    from hbat.trainer.models import resolve_dtype

    assert resolve_dtype(W.make_config(str(tmp_path), ["model.dtype=auto"], str(ds_json))) == torch.bfloat16


def test_ds_config_is_derived_from_the_stages():
    sft, dpo = SFTConfig(batch_size=8, grad_accum_steps=2, max_grad_norm=1.0), DPOConfig(batch_size=8)
    config = engine.resolve_ds_config({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"},
                                      {"sft": sft, "dpo": dpo}, 2)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"], config["gradient_clipping"]) == (8, 2, 2, 1.0)
    assert config["zero_optimization"] == {"stage": 2}
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 disagrees with sft"):
        engine.resolve_ds_config({"gradient_accumulation_steps": 4}, {"sft": sft, "dpo": dpo}, 2)
    with pytest.raises(ValueError, match="train_batch_size=16 disagrees with sft"):
        engine.resolve_ds_config({"train_batch_size": 16}, {"sft": sft}, 2)
    with pytest.raises(ValueError, match="gradient_clipping=0.5 disagrees with dpo"):
        engine.resolve_ds_config({"gradient_clipping": 0.5}, {"sft": SFTConfig(max_grad_norm=0.5), "dpo": dpo}, 2)
    with pytest.raises(ValueError, match="'scheduler'"):
        engine.resolve_ds_config({"scheduler": {"type": "WarmupLR"}}, {"sft": sft}, 2)
    zero3 = engine.resolve_ds_config({"zero_optimization": {"stage": 3}}, {"sft": sft, "dpo": dpo}, 2)
    assert zero3["zero_optimization"] == {"stage": 3} and zero3["train_batch_size"] == 8
    with pytest.raises(ValueError, match="zero_optimization.stage=4"):
        engine.resolve_ds_config({"zero_optimization": {"stage": 4}}, {"sft": sft}, 2)
    with pytest.raises(NotImplementedError, match="bf16"):
        engine.resolve_ds_config({"fp16": {"enabled": True}}, {"sft": sft}, 2)
    with pytest.warns(UserWarning, match="not a multiple"):
        engine.resolve_ds_config({}, {"sft": SFTConfig(batch_size=6, grad_accum_steps=2)}, 2)


def test_unsupported_methods_are_refused_before_any_work(tmp_path):
    with pytest.raises(NotImplementedError, match="PPO"):
        engine.check_supported(W.make_config(str(tmp_path), ["hpa=ppo"], "ds.json"), "hbat")
    with pytest.raises(NotImplementedError, match="freeze"):
        engine.check_supported(W.make_config(str(tmp_path), ["method=freeze"], "ds.json"), "freeze")
    engine.check_supported(W.make_config(str(tmp_path), ["method=two_stage"], "ds.json"), "none")


def test_rank_micro_batches_cover_the_global_batch_once():
    for rows, parts in ((8, 2), (6, 2), (3, 2), (1, 1), (5, 1)):
        batch = list(range(100, 100 + rows))
        shares = [engine.DeepSpeedStepper.micro_batches(types.SimpleNamespace(rank=r, world_size=2), batch, parts)
                  for r in (0, 1)]
        assert all(len(share) == parts for share in shares)  # every rank joins every micro-step
        assert sorted(i for share in shares for micro in share for i in micro) == batch


def test_shutdown_leaves_a_process_group_the_caller_made(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        engine.init_distributed()  # already joined: nothing to do, and not ours to end
        engine.shutdown_distributed()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_cli_train_under_torchrun(tmp_path):
    """docs/distributed.md: `torchrun --nproc_per_node 2 -m hbat.cli train run.yaml --set deepspeed=ds.json`
    on user JSONL data and a local model; every rank exits 0 and rank 0 writes the summary."""
    from hf_fixtures import TINY, write_user_run

    config = write_user_run(tmp_path, n_rows=32, val_size=0.25)
    overrides = [o for o in TINY if not o.startswith("model.")] + [f"deepspeed={_write_ds_json(tmp_path, 2)}"]
    proc = torchrun("-m hbat.cli", ["train", str(config), "--no-progress",
                                    *[a for o in overrides for a in ("--set", o)]], timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    assert proc.stdout.count("| hbat |") == 1  # the summary table, printed by rank 0 only
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["method"] == "hbat" and "eval/reward" in summary[0]
