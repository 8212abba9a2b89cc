"""pytest-benchmark versions of the op benchmarks (small sizes), and smoke tests of the three scripts.

    pytest benchmarks/ --benchmark-only                 # time every op x provider x layout (about 10 s)
    pytest benchmarks/                                  # quick: each case runs once, plus the script smoke tests

`pytest tests` (and `make test`) never collect this folder: pytest.ini's testpaths is `tests`.
"""
from __future__ import annotations

import csv
import math
import os

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

from benchlib import layouts, op_providers, report  # noqa: E402

from hbat.ops import table  # noqa: E402

SIZE = 1_000_000
CASES = [(op, layout, provider) for op in op_providers.OPS for layout in layouts.LAYOUTS
         for provider in op_providers.providers_for(op, SIZE, "cpu")]


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


@pytest.mark.parametrize("op,layout,provider", CASES, ids=["-".join(c) for c in CASES])
def test_op(benchmark, request, inputs_cache, op, layout, provider):
    key = (op, layout)
    if key not in inputs_cache:
        inputs_cache.clear()  # one op's inputs alive at a time
        inputs_cache[key] = op_providers.build_inputs(op, layouts.layout_shapes(layout, SIZE), "cpu",
                                                      with_fisher=op in op_providers.PENALTY_OPS)
    x = inputs_cache[key]
    benchmark.group = f"{op} {layout} {report.fmt_size(x.numel)}"
    benchmark.extra_info.update(elements=x.numel, tensors=len(x.params), min_bytes_per_element=op_providers.MIN_BYTES[op])
    fn = op_providers.make_provider(op, provider, x)
    if request.config.getoption("benchmark_only", False):
        benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, rounds=1, iterations=1)  # a smoke run: the providers work


# ------------------------------------------------------------------ the providers compute the same thing
CROSS_SIZE = 40_000
CROSS = [(op, provider) for op in op_providers.OPS for provider in op_providers.providers_for(op, CROSS_SIZE, "cpu")
         if provider not in ("hbat-reference", "fisher")]  # fisher: another penalty (per-element importance)


def _assert_same(got, want, what, rtol, atol):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, what
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{what}[{i}]", rtol, atol)
    else:
        assert got is None and want is None, what


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("op,provider", CROSS, ids=["-".join(c) for c in CROSS])
def test_providers_compute_what_the_reference_does(op, provider, layout):
    """Each provider on fresh inputs (the same seed) against hbat-reference (float64): what it returns (the
    per-tensor sums, the new tensors, the penalty) and every list afterwards (what it wrote, what it did not)."""
    shapes = layouts.layout_shapes(layout, CROSS_SIZE)
    want_inputs = op_providers.build_inputs(op, shapes, "cpu", seed=3)
    got_inputs = op_providers.build_inputs(op, shapes, "cpu", seed=3)
    want = op_providers.make_provider(op, "hbat-reference", want_inputs)()
    got = op_providers.make_provider(op, provider, got_inputs)()
    _assert_same(got, want, f"{provider} {op} result", rtol=1e-4, atol=1e-10)
    for name, tensors in want_inputs.lists.items():
        _assert_same(got_inputs.lists[name], tensors, f"{provider} {op} {name}", rtol=1e-5, atol=1e-9)


def test_every_provider_of_an_op_changes_what_the_op_writes():
    """The cross-check above can fail: the inputs are not a fixed point of any op (every written list changes)."""
    shapes = layouts.layout_shapes("small", CROSS_SIZE)
    for op in op_providers.OPS:
        x = op_providers.build_inputs(op, shapes, "cpu", seed=3)
        before = {name: [t.clone() for t in ts] for name, ts in x.lists.items()}
        op_providers.make_provider(op, "hbat-reference", x)()
        written = [t.name for t in table.op(op).arguments if t.written_in_place] if op in table.BY_NAME else ["grads"]
        for name in written:
            assert not all(torch.equal(a, b) for a, b in zip(x.lists[name], before[name])), (op, name)


def test_layouts_scale_to_the_size():
    for total in (1e6, 1e8):
        llama = layouts.layout_shapes("llama", int(total))
        assert len(llama) == 9 * layouts.LLAMA_LAYERS + 3
        assert 0.8 * total < sum(torch.Size(s).numel() for s in llama) < 1.2 * total
    assert len(layouts.layout_shapes("small", 4096 * 10)) == 10
    with pytest.raises(ValueError, match="layout"):
        layouts.layout_shapes("wide", 10)
    with pytest.raises(ValueError, match="--sizes"):
        report.parse_sizes("1e6,lots")


# ------------------------------------------------------------------ the scripts run and write their files
@pytest.fixture
def one_thread():
    """The smoke runs check that the scripts work, not how fast: one thread keeps them quick on a busy CPU."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def test_bench_ops_script_writes_csv_markdown_plot(tmp_path, one_thread):
    import bench_ops

    bench_ops.main(["--sizes", "2e4", "--small-max", "2e4", "--repeats", "1", "--ops", "ewc_penalty_grad_,squared_change",
                    "--threads", "1", "--out", str(tmp_path)])
    with open(tmp_path / "cpu-ops.csv") as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows if r["op"] == "ewc_penalty_grad_"}
    assert {"hbat-cpu", "naive", "foreach", "fisher", "copy_"} <= providers
    assert all(r["peak_mb"] != "" for r in rows if r["provider"] != "copy_")
    text = (tmp_path / "cpu-ops.md").read_text()
    assert "## Targets of issue 4" in text and "bench_ops.py --sizes 2e4" in text
    assert (tmp_path / "cpu-ops.png").stat().st_size > 0


def test_bench_importance_script(tmp_path, one_thread):
    pytest.importorskip("transformers")
    import bench_importance

    bench_importance.main(["--sizes", "1e5", "--samples", "2", "--seq-len", "8", "--repeats", "1", "--no-memory",
                           "--out", str(tmp_path)])
    text = (tmp_path / "cpu-importance.md").read_text()
    assert "hbat-cpu" in text and "fisher-loop" in text and "fisher-vmap" in text


def test_bench_step_penalties_agree_and_script_runs(tmp_path, one_thread):
    pytest.importorskip("transformers")
    import bench_step

    trainer = bench_step.Trainer(1e5, "cpu", 1, 8, bench_step.VARIANTS)
    grads = {}
    for variant in ("dpo", "dpo+hbat", "dpo+naive"):
        trainer.backward(variant)
        grads[variant] = [p.grad.clone() for p in trainer.params]
        trainer.optimizer.zero_grad(set_to_none=True)
    for g_hbat, g_naive in zip(grads["dpo+hbat"], grads["dpo+naive"]):
        torch.testing.assert_close(g_hbat, g_naive, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(h, d) for h, d in zip(grads["dpo+hbat"], grads["dpo"]))  # the penalty is there

    bench_step.main(["--sizes", "1e5", "--pairs", "1", "--seq-len", "8", "--repeats", "1", "--no-memory",
                     "--out", str(tmp_path)])
    text = (tmp_path / "cpu-step.md").read_text()
    assert "dpo+fisher" in text and "1.26x" in text and "61.13 GB" in text  # the paper's row beside ours
    with open(tmp_path / "cpu-step.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(bench_step.VARIANTS)
    assert all(math.isfinite(float(r["median_s"])) and float(r["median_s"]) > 0 for r in rows.values())
    assert float(rows["dpo+hbat"]["penalty_call_ms"]) > 0  # the fused call was timed
    assert float(rows["dpo+hybridadamw"]["optimizer_step_ms"]) > 0 and float(rows["dpo"]["optimizer_step_ms"]) > 0
    assert "**dpo+hybridadamw**" in text and "fp32 parameter copies" in text


def test_bench_step_precision_part_measures_the_trainer_against_its_plan(tmp_path, one_thread):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import bench_step

    bench_step.main(["--sizes", "2e5", "--pairs", "1", "--seq-len", "8", "--repeats", "1", "--variants", "dpo",
                     "--precisions", "fp32,bf16+lora", "--out", str(tmp_path)])
    with open(tmp_path / "cpu-step.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f) if r["part"] == "precision"}
    assert set(rows) == {"fp32", "bf16+lora"}
    for row in rows.values():
        assert float(row["peak_mb"]) > 0 and float(row["plan_mb"]) > 0
        assert float(row["plan_vs_peak"]) == pytest.approx(float(row["plan_mb"]) / float(row["peak_mb"]), rel=1e-6)
    # LoRA trains adapters only: its planned training state is a small part of full fine-tuning's
    assert float(rows["bf16+lora"]["plan_training_state_mb"]) < 0.1 * float(rows["fp32"]["plan_training_state_mb"])
    assert "## The trainer's memory: fp32, bf16, bf16 + LoRA" in (tmp_path / "cpu-step.md").read_text()


def test_bench_optim_script(tmp_path, one_thread):
    import bench_optim

    bench_optim.main(["--sizes", "2e4", "--repeats", "1", "--threads", "1", "--clock", "cpu", "--out", str(tmp_path)])
    with open(tmp_path / "cpu-optim.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == set(bench_optim.BYTES)
    assert all(math.isfinite(float(r["median_ms"])) and float(r["median_ms"]) > 0 for r in rows)
    text = (tmp_path / "cpu-optim.md").read_text()
    assert "## Targets of issues 16 and 24" in text and "bench_optim.py --sizes 2e4" in text
    assert "times are the thread's CPU time" in text and "HybridAdamW.step() / torch-fused" in text
    assert (tmp_path / "cpu-optim.png").stat().st_size > 0
