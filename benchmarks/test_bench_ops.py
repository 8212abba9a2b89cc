"""pytest-benchmark versions of the op benchmarks (small sizes), and smoke tests of the three scripts.

    pytest benchmarks/ --benchmark-only                 # time every op x provider x layout (about 10 s)
    pytest benchmarks/                                  # quick: each case runs once, plus the script smoke tests

`pytest tests` (and `make test`) never collect this folder: pytest.ini's testpaths is `tests`.
"""
from __future__ import annotations

import csv
import math
import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

SIZE = 1_000_000
CASES = [(op, layout, provider) for op in B.OPS for layout in B.LAYOUTS for provider in B.providers_for(op, SIZE, "cpu")]


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


@pytest.mark.parametrize("op,layout,provider", CASES, ids=["-".join(c) for c in CASES])
def test_op(benchmark, request, inputs_cache, op, layout, provider):
    key = (op, layout)
    if key not in inputs_cache:
        inputs_cache.clear()  # one op's inputs alive at a time
        inputs_cache[key] = B.build_inputs(op, B.layout_shapes(layout, SIZE), "cpu", with_fisher=op in B.PENALTY_OPS)
    x = inputs_cache[key]
    benchmark.group = f"{op} {layout} {B.fmt_size(x.numel)}"
    benchmark.extra_info.update(elements=x.numel, tensors=len(x.params), min_bytes_per_element=B.MIN_BYTES[op])
    fn = B.make_provider(op, provider, x)
    if request.config.getoption("benchmark_only", False):
        benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, rounds=1, iterations=1)  # a smoke run: the providers work


# ------------------------------------------------------------------ the providers compute the same thing
def _fresh(op, shapes):
    return B.build_inputs(op, shapes, "cpu", seed=3)


@pytest.mark.parametrize("layout", B.LAYOUTS)
@pytest.mark.parametrize("provider", ["naive", "foreach"])
def test_penalty_providers_give_hbat_gradient(layout, provider):
    shapes = B.layout_shapes(layout, 40_000)
    want, got = _fresh("ewc_penalty_grad_", shapes), _fresh("ewc_penalty_grad_", shapes)
    B.make_provider("ewc_penalty_grad_", "hbat-cpu", want)()
    B.make_provider("ewc_penalty_grad_", provider, got)()
    for g_want, g_got in zip(want.grads, got.grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-9)
    assert any(bool(g.abs().sum() > 0) for g in want.grads)


@pytest.mark.parametrize("op", ["squared_change", "snapshot_"])
@pytest.mark.parametrize("provider", ["naive", "foreach"])
def test_change_providers_match_hbat(op, provider):
    shapes = B.layout_shapes("llama", 40_000)
    want, got = _fresh(op, shapes), _fresh(op, shapes)
    c_want = B.make_provider(op, "hbat-cpu", want)()
    c_got = B.make_provider(op, provider, got)()
    torch.testing.assert_close(c_got.float(), c_want.float(), rtol=1e-4, atol=1e-12)
    if op == "snapshot_":
        for a, p in zip(got.anchors, got.params):
            assert torch.equal(a, p)


def test_lerp_providers_match_hbat():
    shapes = B.layout_shapes("small", 20_000)
    outs = {}
    for provider in ("hbat-cpu", "naive", "foreach"):
        x = _fresh("lerp_", shapes)
        B.make_provider("lerp_", provider, x)()
        outs[provider] = x.dst
    for provider in ("naive", "foreach"):
        for d_got, d_want in zip(outs[provider], outs["hbat-cpu"]):
            torch.testing.assert_close(d_got, d_want, rtol=1e-5, atol=1e-7)


def test_layouts_scale_to_the_size():
    for total in (1e6, 1e8):
        llama = B.layout_shapes("llama", int(total))
        assert len(llama) == 9 * B.LLAMA_LAYERS + 3
        assert 0.8 * total < sum(torch.Size(s).numel() for s in llama) < 1.2 * total
    assert len(B.layout_shapes("small", 4096 * 10)) == 10
    with pytest.raises(ValueError, match="layout"):
        B.layout_shapes("wide", 10)
    with pytest.raises(ValueError, match="--sizes"):
        B.parse_sizes("1e6,lots")


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
