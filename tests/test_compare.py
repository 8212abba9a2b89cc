"""`hbat compare`: every requested method gets a row, a reproducible command, the plot and the HMA curve."""
import csv
import subprocess
import sys

import pytest
from faults import NAN_BETA, nan_dpo_env

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

TINY = ["model.size=tiny", "model.pretrain_steps=2", "data.task_n_sft=64", "data.task_n_pref=48",
        "data.task_n_val=8", "sft.batch_size=8", "sft.max_steps=2", "dpo.batch_size=8", "dpo.max_steps=2",
        "reward.batch_size=8", "eval.kl_samples=4", "eval.max_new_tokens=6", "eval.batch_size=8",
        "save_model=false"]


def test_compare_table_plot_and_commands(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("set: [" + ", ".join(TINY) + "]\nruns:\n  - two_stage\n"
                    "  - {name: hbat-uniform, method: hbat, set: [ewc.importance_mode=uniform]}\n"
                    f"  - {{name: two_stage-nan, method: two_stage, set: [dpo.beta={NAN_BETA}]}}\n"
                    "hma: {pre: hbat-uniform, aligned: two_stage, alphas: [0.0, 1.0]}\n")
    out = tmp_path / "out"
    env = nan_dpo_env(tmp_path / "faults")  # the DPO loss of the run with dpo.beta=NAN_BETA is NaN
    proc = subprocess.run([sys.executable, "-m", "hbat.cli", "compare", str(spec), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=900, env=env)
    # a run that diverged is a row saying so; the comparison carries on and exits 3
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "compare.md").read_text()
    for name in ("two_stage", "hbat-uniform", "two_stage-nan"):
        assert f"| {name} |" in table
        assert f"--name {name}" in table  # the row's command
    assert "| two_stage-nan | diverged | diverged |" in table
    assert "win vs SFT" in table and "peak RSS MiB" in table and "averaging of `hbat-uniform` and `two_stage`" in table
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["method"], r["status"]) for r in rows] == \
        [("two_stage", "ok"), ("hbat-uniform", "ok"), ("two_stage-nan", "diverged")]
    assert rows[2]["eval/reward"] == ""
    assert (out / "compare.png").stat().st_size > 1000
    # --reuse keeps finished runs with the same config and redoes only the table, the curve and the plot
    again = subprocess.run([sys.executable, "-m", "hbat.cli", "compare", str(spec), "--out", str(out), "--reuse",
                            "--no-progress"], capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 3, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3
    assert list(csv.DictReader(open(out / "compare.csv"))) == rows


def test_compare_spec_errors(tmp_path):
    from hbat.trainer.compare import load_spec, normalise_runs

    with pytest.raises(ValueError, match="unknown method 'dpo_only'"):
        normalise_runs({"runs": ["dpo_only"]})
    with pytest.raises(ValueError, match="used twice"):
        normalise_runs({"runs": ["hbat", "hbat"]})
    with pytest.raises(ValueError, match="no runs"):
        normalise_runs({"runs": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [hbat]\n")
    with pytest.raises(ValueError, match="unknown key 'methods'"):
        load_spec(str(bad))
    from hbat.trainer.compare import compare

    # the averaging curve's runs are checked before anything runs (not after every run trained)
    with pytest.raises(ValueError, match="hma.aligned 'two_stage' is not one of the runs"):
        compare({"runs": ["hbat"], "hma": {"aligned": "two_stage"}}, [], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
