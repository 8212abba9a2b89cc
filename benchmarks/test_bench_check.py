"""Smoke tests of the benchmark gate (benchmarks/bench_check.py) on a tiny size: it writes a baseline, passes
against a baseline it meets, fails (exit 1) against one it cannot meet or cannot read, and the committed
baseline holds a figure for every op of the op table."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import bench_check as C  # noqa: E402

from hbat import ops  # noqa: E402
from hbat.ops import table  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.backend_status("cpu", "cpu")[0], reason="the C++ extension is not built")
TINY = ["--elements", "200000", "--rounds", "1"]


def test_writes_a_baseline_then_passes_and_fails_against_baselines(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert C.main(TINY + ["--baseline", str(baseline), "--write-baseline"]) == 0
    written = json.loads(baseline.read_text())
    assert list(written)[0] == "regenerate" and written["regenerate"] == C.REGENERATE
    assert set(written["figures"]) == {f"{op.name} of copy bw" for op in table.OPS} | {C.FUSED}
    assert all(value > 0 for value in written["figures"].values())

    assert C.main(TINY + ["--baseline", str(baseline), "--margin", "1.0"]) == 0  # any positive figure passes
    out = capsys.readouterr().out
    assert out.count(" ok") == len(written["figures"]) and "bench_check: passed" in out

    unreachable = dict(written, figures={name: 1e9 for name in written["figures"]})
    baseline.write_text(json.dumps(unreachable))
    assert C.main(TINY + ["--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert out.count("  FAIL\n") == len(written["figures"]) and "bench_check: FAILED: " in out

    assert C.main(TINY + ["--baseline", str(tmp_path / "missing.json")]) == 1
    assert "--write-baseline" in capsys.readouterr().err


def test_the_committed_baseline_covers_every_op_and_says_how_to_regenerate_it():
    committed = json.loads(C.BASELINE.read_text())
    assert committed["regenerate"] == "python benchmarks/bench_check.py --write-baseline"
    assert set(committed["figures"]) == {f"{op.name} of copy bw" for op in table.OPS} | {C.FUSED}


def test_a_figure_fails_only_if_it_fails_every_confirmation(tmp_path, monkeypatch, capsys):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"regenerate": C.REGENERATE, "figures": {"a": 1.0, "b": 1.0}}))
    noisy = iter([{"a": 0.5, "b": 1.0}, {"a": 0.6, "b": 0.1}, {"a": 0.99, "b": 0.1}])  # a recovers at the 3rd
    monkeypatch.setattr(C, "measure", lambda elements, rounds: (next(noisy), {}))
    assert C.main(TINY + ["--baseline", str(baseline)]) == 0  # b keeps its best (1.0); a's best is 0.99
    assert "measuring again: a" in capsys.readouterr().out
    slow = iter([{"a": 0.5, "b": 1.0}] * (1 + C.CONFIRMATIONS))
    monkeypatch.setattr(C, "measure", lambda elements, rounds: (next(slow), {}))
    assert C.main(TINY + ["--baseline", str(baseline)]) == 1
    assert "FAILED: a" in capsys.readouterr().out
