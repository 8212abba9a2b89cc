"""AveragingCallback under DDP, FSDP2 and DeepSpeed ZeRO-1, ZeRO-2 (with and without optimizer offload) and ZeRO-3
(partitioned, and with DeepSpeed's default persistence: every tensor kept gathered) on 2 CPU ranks (gloo), against
one process.

One torchrun launch of ``tests/averaging_worker.py`` runs every setup: a Trainer run whose end-of-training sweep
crashes at its third ratio, direct checks of the in-place averaging on the still-bound callback, and a resume from
the last checkpoint that finishes the sweep. The one-process reference runs the same Trainer uninterrupted.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

HERE = Path(__file__).resolve().parent
import averaging_worker as A  # noqa: E402
import callback_worker as W  # noqa: E402
from torchrun_launch import torchrun  # noqa: E402

SETUPS = list(A.SETUPS)
HELD = {"fsdp2": "fsdp2", "zero3": "zero3", "zero3-persist": "zero3"}  # how the trained weights are held
KIND = {"ddp": "ddp", "fsdp2": "fsdp2", "zero1": "zero1", "zero2": "zero2", "zero2-offload": "zero2",
        "zero3": "zero3", "zero3-persist": "zero3"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("averaging")
    W.save_base(str(folder / "base"))
    proc = torchrun(HERE / "averaging_worker.py", ["--out", str(folder), *SETUPS], nproc=A.WORLD, timeout=480)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}"
    return folder


@pytest.fixture(scope="module")
def reference(out):
    """One process, the same Trainer and callback, uninterrupted (no crash, no resume)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {setup: A.run(setup, str(out), world=1) for setup in SETUPS}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(out):
    return {n: p.detach() for n, p in W.load_model(str(out / "base")).named_parameters()}


def result(out, setup):
    return torch.load(out / f"{setup}.pt", weights_only=False)


def close(got: dict, want: dict, atol: float, what: str):
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("setup", SETUPS)
def test_averaging_and_restores_on_each_ranks_shard_are_exact(out, base, setup):
    got = result(out, setup)
    assert got["shards"] == HELD.get(setup, "full") and got["kind"] == KIND[setup]  # really sharded / replicated
    # the start copy swapped in is the base model bit for bit (method "ema": the anchor, compared below)
    if A.SETUPS[setup][0]["method"] != "ema":
        close(got["start"], base, 0, "start")
    for check in got["checks"]:  # uniform, ExPO and per-block ratios against one process's lerp_ on full tensors
        assert check["exact"], f"ratio {check['ratio']}: max error {check['max_error']}"
        assert check["restored"], f"ratio {check['ratio']}: weights not restored bit for bit"
    assert got["restored_after_swap"] and got["restored_after_crash"]  # also when evaluate raised mid-sweep


@pytest.mark.parametrize("setup", SETUPS)
def test_writes_gather_nothing_and_the_start_copy_is_each_ranks_share(out, base, setup):
    got = result(out, setup)
    names = {name for name, _ in got["comm"]}
    assert {"blend_", "restore_", "swap_", "snapshot"} <= names
    assert ("ema_" in names) == (A.SETUPS[setup][0]["method"] == "ema")
    assert all(log == [] for _, log in got["comm"]), [c for c in got["comm"] if c[1]]  # no collective at all
    total = 4 * sum(p.numel() for p in base.values())  # fp32 bytes of the whole model
    # FSDP2 / ZeRO-3: every element once over the ranks; DDP and ZeRO-1/2 replicate the weights: once per rank
    assert got["start_bytes_total"] == (total if setup in HELD else A.WORLD * total)
    per_rank = ["hbat_average.pt", "hbat_average.pt.sha256"] if setup == "ddp" else \
        [f"hbat_average-rank{r}.pt{s}" for r in range(A.WORLD) for s in ("", ".sha256")]
    assert got["files"] == sorted(per_rank)


@pytest.mark.parametrize("setup", SETUPS)
def test_training_with_averaging_matches_one_process(out, reference, setup):
    got, ref = result(out, setup), reference[setup]
    close(got["params"], ref["params"], 1e-4, "final weights")
    close(got["start"], ref["start"], 1e-4, "start / anchor")
    kl_keys = ("ewc/kl_to_anchor", "ewc/kl_to_anchor_reverse") if A.SETUPS[setup][0]["method"] == "ema" else \
        ("ewc/kl_to_start", "ewc/kl_to_start_reverse")
    measured = [i for i, e in enumerate(ref["logs"]) if kl_keys[0] in e and "loss" in e]  # in the training logs
    assert measured == [A.KL_EVERY * k - 1 for k in range(1, A.STEPS // A.KL_EVERY + 1)]  # every KL_EVERY steps
    assert ref["logs"][-1] == ref["final_logs"]  # after the final averaging, appended to the log history
    for key in kl_keys:
        torch.testing.assert_close(torch.tensor([got["logs"][i][key] for i in measured]),
                                   torch.tensor([ref["logs"][i][key] for i in measured]), rtol=1e-3, atol=1e-7)
        assert all(ref["logs"][i][key] > 0 for i in measured)
        torch.testing.assert_close(got["final_logs"][key], ref["final_logs"][key], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("setup", SETUPS)
def test_sweep_resumed_through_a_checkpoint_matches_the_uninterrupted_one(out, reference, setup):
    got, ref = result(out, setup), reference[setup]
    assert got["crashed"] == "planned crash in the middle of the sweep" and ref["crashed"] is None
    assert got["reused"] == A.CRASH_AT and got["calls"] == len(A.SWEEP) - A.CRASH_AT  # finished rows not rerun
    assert ref["calls"] == len(A.SWEEP)
    assert [row["ratio"] for row in got["table"]] == A.SWEEP
    for row, ref_row in zip(got["table"], ref["table"]):
        for key in ("loss_new", "loss_old"):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-4), (row["ratio"], key)
    assert got["front"] == ref["front"]


def test_an_unsupported_setting_fails_at_train_start(out):
    refused = torch.load(out / "refused.pt", weights_only=False)
    assert "zero_optimization.stage 0" in refused["message"] and "stage 1, 2 or 3" in refused["message"]
    assert refused["steps"] == 0 and refused["unchanged"] and not refused["prepared"]
