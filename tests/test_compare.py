"""`hbat compare`: every requested method gets a row, a reproducible command, the plot and the HMA curve; seeds
with intervals and paired differences, sweeps, the trade-off and curves plots, reuse, and the spec's metrics
checked against the data before anything runs."""
import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from faults import NAN_BETA, nan_dpo_env

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from hbat.trainer import compare as cmp  # noqa: E402
from hbat.trainer import plots  # noqa: E402

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
    with pytest.raises(ValueError, match=r"hma.alphas must be finite and >= 0"):
        compare({"runs": ["sft_only", "two_stage"], "hma": {"pre": "sft_only", "alphas": [0.5, -0.25]}}, [],
                str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    from hbat.trainer.compare import make_plan

    plan = make_plan({"runs": ["sft_only", "two_stage"], "hma": {"pre": "sft_only", "alphas": [1.0, 1.25]}}, [],
                     str(tmp_path / "out"))  # above 1: ExPO, past the aligned model
    assert plan.hma["alphas"] == [1.0, 1.25]


def test_seeds_and_sweep_in_the_spec(tmp_path):
    runs = cmp.normalise_runs({"runs": ["two_stage", {"name": "hbat-u", "method": "hbat", "set": ["n_parts=3"]}],
                               "sweep": {"key": "ewc.lam", "values": [0.1, 10], "runs": ["hbat-u"]}})
    assert [r["name"] for r in runs] == ["two_stage", "hbat-u", "hbat-u@ewc.lam=0.1", "hbat-u@ewc.lam=10"]
    assert runs[3] == {"name": "hbat-u@ewc.lam=10", "method": "hbat", "set": ["n_parts=3", "ewc.lam=10"],
                       "sweep": {"key": "ewc.lam", "value": 10, "of": "hbat-u"}}
    both = cmp.normalise_runs({"runs": ["two_stage", "hbat"], "sweep": [{"key": "dpo.lr", "values": [1e-5]}]})
    assert [r["name"] for r in both][2:] == ["two_stage@dpo.lr=1e-05", "hbat@dpo.lr=1e-05"]  # default: every run
    for bad, message in [({"sweep": {"key": "seed", "values": [1]}}, "not output_dir or seed"),
                         ({"sweep": {"key": "ewc.lam", "values": []}}, "values must be a non-empty list"),
                         ({"sweep": {"key": "ewc.lam", "values": [1], "runs": ["fisher"]}}, "'fisher' is not one of"),
                         ({"sweep": {"key": "ewc.lam", "valeus": [1]}}, "must be a mapping with key, values"),
                         ({"runs": [{"method": "hbat", "set": ["seed=3"]}]}, "set by hbat compare"),
                         ({"runs": [{"name": "a/b", "method": "hbat"}]}, "names a folder")]:
        with pytest.raises(ValueError, match=message):
            cmp.normalise_runs({"runs": ["hbat"], **bad})
    assert cmp.resolve_seeds({}, None, 0) == [0]
    assert cmp.resolve_seeds({"seeds": 3}, None, 2) == [2, 3, 4]       # the config's seed and the ones after it
    assert cmp.resolve_seeds({"seeds": 3}, 5, 0) == [0, 1, 2, 3, 4]    # --seeds wins over the spec
    assert cmp.resolve_seeds({"seeds": [7, 1]}, None, 0) == [7, 1]
    for bad in (0, [1, 1], [-1], "5", True):
        with pytest.raises(ValueError, match="seeds must be"):
            cmp.resolve_seeds({"seeds": bad}, None, 0)
    path = tmp_path / "spec.yaml"
    path.write_text("runs: [hbat]\nseed: 3\n")
    with pytest.raises(ValueError, match="unknown key 'seed'; valid keys: set, runs, seeds, baseline, sweep, hma, "
                                         "plot"):
        cmp.load_spec(str(path))


def test_plotted_metrics_are_those_the_data_has():
    """User data has no exact-match check: the plane defaults to SFT loss vs reward, and a spec asking for exact
    match is refused, naming what the runs report (issue #23, item 8)."""
    embedded = SimpleNamespace(exact_match=len, preference_score=len)
    user = SimpleNamespace(exact_match=None, preference_score=None)
    cfg = SimpleNamespace(eval=SimpleNamespace(kl_samples=4))
    have = cmp.evaluated_metrics(cfg, embedded)
    assert have == ["eval/exact_match", "eval/sft_loss", "eval/preference", "eval/reward", "eval/win_rate",
                    "eval/kl_to_sft"]
    assert cmp.plot_axes({}, have) == ("eval/reward", "eval/exact_match")
    mine = cmp.evaluated_metrics(SimpleNamespace(eval=SimpleNamespace(kl_samples=0)), user)
    assert mine == ["eval/sft_loss", "eval/reward", "eval/win_rate"]
    assert cmp.plot_axes({}, mine) == ("eval/reward", "eval/sft_loss")
    assert cmp.plot_axes({"plot": {"x": "eval/win_rate"}}, mine) == ("eval/win_rate", "eval/sft_loss")
    with pytest.raises(ValueError, match="plot.y = eval/exact_match, but the runs on this data do not report it "
                                         r"\(exact match and preference need the embedded task's checks\); they "
                                         "report: eval/sft_loss, eval/reward, eval/win_rate"):
        cmp.plot_axes({"plot": {"y": "eval/exact_match"}}, mine)
    with pytest.raises(ValueError, match="needs eval.kl_samples"):
        cmp.plot_axes({"plot": {"x": "eval/kl_to_sft"}}, mine)
    with pytest.raises(ValueError, match="'eval/accuracy' is not a metric"):
        cmp.plot_axes({"plot": {"x": "eval/accuracy"}}, have)


def _synthetic(seeds=(0, 1, 2, 3, 4)):
    """A finished comparison's plan and rows, made up: hbat gains 0.05 exact match on every seed, its lam=10
    point gains nothing, the seeds themselves differ a lot."""
    base = {0: 0.50, 1: 0.70, 2: 0.90, 3: 0.60, 4: 0.80}
    runs = [{"name": "two_stage", "method": "two_stage", "set": []},
            {"name": "hbat", "method": "hbat", "set": [], "sweep_value": {"key": "ewc.lam", "value": 1.0}},
            {"name": "hbat@ewc.lam=10", "method": "hbat", "set": ["ewc.lam=10"],
             "sweep": {"key": "ewc.lam", "value": 10, "of": "hbat"}}]
    noise = {0: 0.01, 1: -0.01, 2: 0.0, 3: 0.02, 4: -0.02}
    rows = []
    for s in seeds:
        for name, em, reward in (("two_stage", base[s], -10.0 + s), ("hbat", base[s] + 0.05 + noise[s], -10.0 + s),
                                 ("hbat@ewc.lam=10", base[s] + noise[s], -10.5 + s)):
            rows.append({"seed": s, "method": name, "status": "ok", "eval/exact_match": em, "eval/reward": reward,
                         "wall_seconds": 40, "peak_rss_mib": 500, "command": f"hbat train --name {name}"})
    curves = {s: [{"alpha": a, "eval/exact_match": base[s] + 0.2 * (1 - a), "eval/reward": -10.2 + s - a}
                  for a in (0.0, 1.0)] for s in seeds}
    plan = cmp.Plan(out="x", seeds=list(seeds), runs=runs, jobs=[], seed_overrides={},
                    metrics=["eval/exact_match", "eval/reward"], axes=("eval/reward", "eval/exact_match"),
                    baseline="two_stage", hma={"pre": None, "aligned": "two_stage", "alphas": [0.0, 1.0]}, threads=1,
                    code="abc")
    return plan, rows, curves


def test_report_intervals_marks_and_tables():
    plan, rows, curves = _synthetic()
    report = cmp.build_report(plan, rows, curves)
    hbat = next(r for r in report["runs"] if r["name"] == "hbat")
    em = hbat["mean"]["eval/exact_match"]
    assert em["n"] == 5 and em["mean"] == pytest.approx(0.75) and em["low"] < 0.70  # wide: the seeds differ
    diff = hbat["diff"]["eval/exact_match"]
    assert diff["mean"] == pytest.approx(0.05) and 0 < diff["low"] < diff["high"] < 0.1 and diff["p"] < 0.01
    table = cmp.main_table(report)
    assert "| two_stage (baseline) | 5 | 0.700 ± 0.196 |" in table
    assert "| hbat | 5 | 0.750 ± " in table and " ▲ |" in table      # significant, paired by seed
    assert "| hbat@ewc.lam=10 | 5 | 0.700 ± " in table
    lam10 = next(r for r in report["runs"] if r["name"] == "hbat@ewc.lam=10")
    assert lam10["diff"]["eval/reward"]["mean"] == pytest.approx(-0.5)  # the same shift on every seed
    assert cmp.diff_table(report).count("▼") == 1
    assert "| hbat | +0.050 ± " in cmp.diff_table(report)
    assert report["curve"][0]["eval/exact_match"]["mean"] == pytest.approx(0.9)
    assert "| 1.00 | 0.700 ± 0.196 |" in cmp.curve_table(report)
    text = cmp.markdown(report, 12.0)
    assert "95% Student t-interval over seeds (t with 4 degrees of freedom" in text and "paired" in text
    assert "<!-- compare:table -->" in text and "<!-- compare:diff -->" in text and "<!-- compare:curve -->" in text
    one = cmp.build_report(*_synthetic(seeds=(0,)))
    assert "| hbat | 0.5600 | -10.0000 | 40 | 500 |" in cmp.main_table(one)  # one seed: values, no intervals
    # a run diverged on one seed: the others count, and the pairing drops that seed
    rows[4]["status"] = "diverged"
    report = cmp.build_report(plan, rows, curves)
    hbat = next(r for r in report["runs"] if r["name"] == "hbat")
    assert hbat["ok_seeds"] == [0, 2, 3, 4] and hbat["diff"]["eval/exact_match"]["n"] == 4
    assert "| hbat | 4 (1 diverged) |" in cmp.main_table(report)


def test_tradeoff_plot_series_and_pareto_front(tmp_path):
    plan, rows, curves = _synthetic()
    report = cmp.build_report(plan, rows, curves)
    series = cmp.tradeoff_series(report)
    assert [(s.name, s.kind, len(s.points)) for s in series] == [
        ("two_stage", "run", 1), ("hbat (ewc.lam)", "run", 2), ("averaging SFT/two_stage", "average", 2)]
    hbat = series[1].points
    assert [p.label for p in hbat] == ["lam=1.0", "lam=10"]               # in sweep order, the run itself first
    assert hbat[0].y == pytest.approx(0.75) and hbat[0].yerr > 0 and hbat[0].xerr > 0
    front = plots.tradeoff_plot(series, str(tmp_path / "t.png"), x="eval/reward", y="eval/exact_match")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    # hbat (lam 1) has two_stage's reward and more exact match; the alpha=0 average has the most exact match
    assert front == ["averaging SFT/two_stage α=0", "hbat (ewc.lam) lam=1.0"] or \
        set(front) == {"averaging SFT/two_stage α=0", "hbat (ewc.lam) lam=1.0"}
    assert plots.pareto_front([(0, 1), (1, 0), (0.5, 0.5), (0.4, 0.4)], "eval/reward", "eval/exact_match") == [0, 2, 1]
    # lower is better for the SFT loss: (1, 0.2) beats (1, 0.5)
    assert plots.pareto_front([(1, 0.5), (1, 0.2)], "eval/reward", "eval/sft_loss") == [1]


def test_training_curves_from_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "stage": 0, "objective": "ifa", "sft/loss": 2.0, "train/grad_norm": 1.0},
               {"step": 2, "stage": 0, "objective": "ifa", "sft/loss": 1.0, "train/grad_norm": 0.5},
               {"step": 3, "stage": 1, "objective": "hpa", "dpo/loss": 0.7, "ewc/penalty": 0.01},
               {"step": 4, "stage": 1, "objective": "hpa", "eval/exact_match": 0.8, "eval/reward": -3.0}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{\"step\": 5, \"sft/lo")  # a cut last line
    panels = plots.training_curves([("hbat", str(path))], str(tmp_path / "curves.png"))
    assert panels == ["loss", "ewc/penalty", "train/grad_norm", "eval/exact_match", "eval/reward"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    data = dict(plots.curve_panels({"hbat": plots.read_records(str(path))}))
    assert data["loss"]["hbat"] == {"sft/loss": [(1, 2.0), (2, 1.0)], "dpo/loss": [(3, 0.7)]}
    assert data["eval/exact_match"]["hbat"] == {"eval/exact_match": [(4, 0.8)]}
    # what hbat train calls: never fails a finished run
    assert plots.write_training_curves([{"method": "x", "folder": str(tmp_path / "none")}], "p.png") is None


TINY_SPEC = "set: [" + ", ".join(TINY) + "]\n"


def test_compare_seeds_sweep_reuse_and_determinism(tmp_path):
    """Two seeds, a sweep point that is the run itself (not run twice) and one that is not, the averaging curve;
    a rerun reuses every run and the curve; a run trained again gives the same numbers."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC + "runs: [two_stage, hbat]\nseeds: 2\n"
                    "sweep: {key: ewc.lam, values: [1, 10], runs: [hbat]}\n"
                    "hma: {aligned: two_stage, alphas: [0.0, 1.0]}\n")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "hbat.cli", "compare", str(spec), "--out", str(out), "--no-progress"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 runs x 2 seeds (0, 1)" in proc.stdout and "6 to train, 0 reused" in proc.stdout
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["seed"], r["method"]) for r in rows] == [(s, m) for s in "01" for m in ("two_stage", "hbat",
                                                                                        "hbat@ewc.lam=10")]
    assert all((out / f"seed-{s}" / m / "result.json").exists() for s in "01" for m in ("hbat", "hbat@ewc.lam=10"))
    assert not (out / "seed-0" / "hbat@ewc.lam=1").exists()  # lam=1 is hbat's own config
    assert all("OMP_NUM_THREADS=1 hbat train" in r["command"] and f"seed={r['seed']}" in r["command"] for r in rows)
    text = (out / "compare.md").read_text()
    assert "Mean over 2 seeds (0, 1) ± the half-width of the 95% Student t-interval" in text
    assert "| two_stage (baseline) | 2 |" in text and "| hbat@ewc.lam=10 | 2 |" in text
    assert "Paired differences from `two_stage`" in text and "Uniform averaging of `the shared SFT model`" in text
    report = json.loads((out / "compare.json").read_text())
    assert [p["alpha"] for p in report["curve"]] == [0.0, 1.0] and report["curve"][0]["seeds"] == [0, 1]
    assert (out / "compare.png").stat().st_size > 10_000 and (out / "curves.png").stat().st_size > 10_000
    assert (out / "seed-0" / "curves-hbat.png").exists()  # each hbat train writes its own curves
    curve_file = out / "seed-1" / "averaging.json"
    stamp = curve_file.stat().st_mtime_ns
    # a rerun reuses everything: same table
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 to train, 6 reused" in again.stdout and again.stdout.count("reusing") == 6
    assert curve_file.stat().st_mtime_ns == stamp
    assert [{k: v for k, v in r.items() if k != "wall_seconds"} for r in csv.DictReader(open(out / "compare.csv"))] \
        == [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]
    # one run trained again (its reuse record gone): the very same numbers
    (out / "seed-1" / "hbat" / "compare-run.json").unlink()
    third = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0 and "1 to train, 5 reused" in third.stdout, third.stdout[-3000:]
    machine = {"wall_seconds": "", "peak_rss_mib": ""}  # facts of the machine, not results (RSS varies by a MiB)
    assert list(csv.DictReader(open(out / "compare.csv")))[4] | machine == rows[4] | machine


def test_compare_on_user_data(tmp_path):
    """Users' data has no exact match: the table and the averaging curve show the metrics the runs have and the
    plot is SFT loss against reward (it failed with "missing key 'eval/exact_match'" after training before);
    a spec asking to plot exact match is refused before anything runs (issue #23, item 8)."""
    from hf_fixtures import train_tokenizer, user_run

    overrides = [o for o in user_run(tmp_path, train_tokenizer()) if not o.startswith("output_dir=")]
    spec = tmp_path / "spec.yaml"
    body = "set: [" + ", ".join(overrides) + "]\nruns: [two_stage]\nhma: {aligned: two_stage, alphas: [0, 1]}\n"
    spec.write_text(body + "plot: {y: eval/exact_match}\n")
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "hbat.cli", "compare", str(spec), "--out", str(out), "--no-progress"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("hbat compare: plot.y = eval/exact_match, but the runs on this data do not "
                                  "report it")
    assert not out.exists()  # nothing ran
    spec.write_text(body)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "compare.md").read_text()
    assert "| method | SFT loss (val) | reward | win vs SFT | KL to SFT | wall s | peak RSS MiB |" in text
    assert "exact match" not in text and "| 1.00 |" in text  # the averaging curve, with the same metrics
    report = json.loads((out / "compare.json").read_text())
    assert report["axes"] == ["eval/reward", "eval/sft_loss"]
    assert (out / "compare.png").stat().st_size > 10_000


def _make_results():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "results" / "make_results.py"
    spec = importlib.util.spec_from_file_location("make_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_results_fills_the_readme_blocks():
    mr = _make_results()
    source = "x\n<!-- compare:table -->\n| a | 1 |\n<!-- /compare:table -->\n<!-- compare:diff -->\nd\n<!-- /compare:diff -->\n"
    readme = "intro\n<!-- compare:table -->\nold\n<!-- /compare:table -->\nmiddle\n"
    filled, names = mr.fill(readme, source)
    assert filled == "intro\n<!-- compare:table -->\n| a | 1 |\n<!-- /compare:table -->\nmiddle\n" and names == ["table"]
    with pytest.raises(SystemExit, match="no block 'curve'"):
        mr.fill(readme + "<!-- compare:curve -->\n<!-- /compare:curve -->\n", source)


def test_make_results_fills_the_readme_and_every_docs_page_with_blocks():
    """README.md has the table and claims blocks, docs/compare.md the paired differences and the curve; a source
    with all four fills every one of them, and a page's block that the source lacks is named in the error."""
    from pathlib import Path

    mr = _make_results()
    assert mr.targets()[0] == "README.md" and "docs/compare.md" in mr.targets()
    source = "".join(f"<!-- compare:{name} -->\n{name} cells\n<!-- /compare:{name} -->\n"
                     for name in ("table", "claims", "diff", "curve"))
    root = Path(mr.ROOT)
    wanted = {"README.md": ["table", "claims"], "docs/compare.md": ["diff", "curve"]}
    for rel in mr.targets():
        text = (root / rel).read_text(encoding="utf-8")
        filled, names = mr.fill(text, source, rel)
        assert names == wanted.get(rel, names) and all(f"{name} cells" in filled for name in names)
    with pytest.raises(SystemExit, match="no block 'curve' that docs/compare.md has"):
        mr.fill((root / "docs" / "compare.md").read_text(encoding="utf-8"), source.split("<!-- compare:curve")[0],
                "docs/compare.md")


def test_readme_tables_are_the_committed_results():
    """The result tables of the README and of docs/*.md are, cell by cell, those of
    docs/results/compare-run/compare.md."""
    assert _make_results().check() == 0


def test_run_graph_order_dependencies_and_failure():
    """The pool starts the first ready task: a run waits for its seed's shared pieces only, so a seed's runs start
    while another seed is still being prepared; a failure stops new starts and is raised."""
    import threading
    import time

    log, lock = [], threading.Lock()

    def task(name, seconds=0.0):
        def run():
            with lock:
                log.append(("start", name))
            time.sleep(seconds)
            with lock:
                log.append(("end", name))
        return run

    tasks = [cmp.Task(task("prep0", 0.05)), cmp.Task(task("prep1", 0.3)),
             cmp.Task(task("run0a"), (0,)), cmp.Task(task("run1a"), (1,)), cmp.Task(task("run0b"), (0,))]
    cmp.run_graph(tasks, 2)
    assert log.index(("start", "run0a")) > log.index(("end", "prep0"))
    assert log.index(("start", "run0a")) < log.index(("end", "prep1"))  # seed 0 runs while seed 1 prepares
    assert log.index(("start", "run1a")) > log.index(("end", "prep1"))
    assert sorted(name for kind, name in log if kind == "end") == ["prep0", "prep1", "run0a", "run0b", "run1a"]

    def fail():
        raise RuntimeError("run 'x' failed")

    log.clear()
    with pytest.raises(RuntimeError, match="run 'x' failed"):
        cmp.run_graph([cmp.Task(fail), cmp.Task(task("after"), (0,)), cmp.Task(task("other", 0.1))], 1)
    assert ("start", "after") not in log and ("start", "other") not in log


@pytest.mark.parametrize("spec_path", [None, "docs/results/ablations.yaml"], ids=["default", "ablations"])
def test_committed_specs_are_valid_at_five_seeds(spec_path, tmp_path):
    """The default comparison and the ablations spec docs/compare.md names pass every check (nothing runs)."""
    from pathlib import Path

    path = str(Path(__file__).resolve().parent.parent / spec_path) if spec_path else None
    plan = cmp.make_plan(cmp.load_spec(path), [], str(tmp_path), seeds=5)
    names = {job.run["name"] for job in plan.jobs}
    assert {"two_stage", "hbat"} <= names and len({job.seed for job in plan.jobs}) == 5
