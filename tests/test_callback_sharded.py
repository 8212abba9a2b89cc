"""HybridEWCCallback under DDP, DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (2 and 3 with and without optimizer offload),
FSDP2, and prepare_ewc in an accelerate loop, on 2 CPU ranks (gloo) against one process.

Two torchrun launches of ``tests/callback_worker.py`` run every setup: ``run`` trains Algorithm 1 with one
``transformers.Trainer`` (or TRL ``DPOTrainer``) per stage and saves a checkpoint in the middle of the second
stage; ``resume`` continues from that checkpoint in fresh processes. Each is compared with one process running
the same trainers with the callback: the weights, the logged ``ewc/penalty`` and ``grad_norm`` of every step;
the HybridEWC calls may only all-reduce per-unit float vectors (a gather raises inside the guard). The run
launch also runs the accelerate loop of docs/drop-in.md with ``prepare_ewc`` under ZeRO-2.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("trl")
pytest.importorskip("datasets")

HERE = Path(__file__).resolve().parent
import callback_worker as W  # noqa: E402
from torchrun_launch import torchrun  # noqa: E402

SETUPS = list(W.SETUPS)
SHARDING = {"fsdp2": "fsdp2", "zero3": "zero3", "zero3-offload": "zero3", "dpo-zero3": "zero3"}  # how the trained parameters are held
VIEW = {"ddp": None, "fsdp2": "FSDPParamView"}  # the view the callback binds (ZeroParamView for the others)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("callback")
    W.save_base(str(folder / "base"))
    for phase, setups in (("run", SETUPS + ["accelerate-zero2"]), ("resume", SETUPS)):
        proc = torchrun(HERE / "callback_worker.py", ["--out", str(folder), "--phase", phase, *setups],
                        nproc=W.WORLD, timeout=480)
        assert proc.returncode == 0, f"torchrun {phase} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}"
    return folder


def result(out, setup, phase="run"):
    return torch.load(out / f"{setup}-{phase}.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(out):
    """One process, the same trainers with the callback (tests/test_integrations.py checks these against the
    penalty as a loss term)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {kind: W.run_plan(kind, str(out), world=1) for kind in ("lm", "dpo")}
        runs["accelerate"] = W.accelerate_loop(str(out), world=1)
        return runs
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("setup", SETUPS)
def test_callback_under_sharding_matches_one_process(out, reference, setup):
    got = result(out, setup)
    ref = reference[W.SETUPS[setup][0]]
    assert got["shards"] == [SHARDING.get(setup, "full")] * len(W.PLAN)  # really sharded / partitioned
    view = VIEW.get(setup, "ZeroParamView")
    assert got["views"] == ([view] * len(W.PLAN) if view else [])  # bound to each stage's new engine
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for stage, (steps, ref_steps) in enumerate(zip(got["logs"], ref["logs"])):
        assert len(steps) == len(ref_steps) == W.STEPS
        for key in ("ewc/penalty", "grad_norm"):
            torch.testing.assert_close(torch.tensor([s[key] for s in steps]), torch.tensor([s[key] for s in ref_steps]),
                                       rtol=1e-4, atol=1e-6, msg=lambda m: f"stage {stage} {key}: {m}")
        assert all(s["grad_norm"] > W.CLIP for s in steps)  # clipping bites
        if stage > 0:  # penalised from the second step of every later stage (the first starts at the anchor)
            assert all(s["ewc/penalty"] > 0 for s in steps[1:])
    total = sum(p.numel() for p in ref["params"].values())
    # every element is anchored on exactly one rank (each rank only its own partition); DDP: on every rank
    assert got["anchor_numel_total"] == (W.WORLD * total if setup == "ddp" else total)


@pytest.mark.parametrize("setup", SETUPS)
def test_hybrid_ewc_calls_gather_nothing(out, setup):
    calls = result(out, setup)["comm"]
    units = len(result(out, setup)["unit_names"])
    sharded = setup != "ddp"
    assert {name for name, _ in calls} >= {"apply_", "begin_stage"} | ({"bind"} if sharded else set())
    for name, log in calls:
        if name in ("bind", "load_state_dict") or not sharded:
            assert log == [], f"{name} communicated {log}"
        elif name == "apply_":  # the penalty value, for logging (nothing while the first stage is unpenalised)
            assert log in ([], [("all_reduce", 1)])
    penalised = [log for name, log in calls if name == "apply_"][W.STEPS:]
    assert penalised == [[("all_reduce", 1)] if sharded else []] * (len(W.PLAN) - 1) * W.STEPS
    boundaries = [log for name, log in calls if name == "begin_stage"]
    # the first stage boundary only takes the anchors; later ones all-reduce one float per tensor
    assert boundaries == [[]] + [[("all_reduce", units)] if sharded else []] * (len(W.PLAN) - 1)


@pytest.mark.parametrize("setup", SETUPS)
def test_resume_in_fresh_processes_matches_uninterrupted(out, setup):
    uninterrupted, resumed = result(out, setup), result(out, setup, "resume")
    for name, p in uninterrupted["params"].items():
        torch.testing.assert_close(resumed["params"][name], p, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert resumed["logs"] == uninterrupted["logs"][W.SAVE_STAGE:]  # the same penalties and norms, step by step
    loads = [name for name, _ in resumed["comm"] if name == "load_state_dict"]
    assert loads == ["load_state_dict"] * (2 if setup == "zero2" else 1)  # zero2: also the stage handoff


def test_an_unsupported_setting_fails_at_train_start(out):
    refused = torch.load(out / "refused.pt", weights_only=False)
    assert "zero_optimization.stage 0" in refused["message"]  # names the setting and what to use instead
    assert refused["steps"] == 0 and refused["unchanged"] and refused["objective"] is None


def test_accelerate_loop_with_prepare_ewc_under_zero2_matches_one_process(out, reference):
    got, ref = result(out, "accelerate-zero2"), reference["accelerate"]
    assert got["views"] == ["ZeroParamView"] and got["anchor_numel_total"] == sum(p.numel() for p in ref["params"].values())
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for key in ("ewc/penalty", "grad_norm"):
        torch.testing.assert_close(torch.tensor([s[key] for s in got["logs"]]), torch.tensor([s[key] for s in ref["logs"]]),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert sum(s["ewc/penalty"] > 0 for s in got["logs"]) == (len(W.PLAN) - 1) * (W.STEPS - 1)
    assert all(log in ([], [("all_reduce", 1)]) for name, log in got["comm"] if name == "apply_")
