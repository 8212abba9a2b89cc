"""Fused hbat ops against what users write themselves: naive autograd, torch._foreach_*, per-element Fisher EWC.

    python benchmarks/bench_ops.py                                   # CPU sweep, a few minutes
    python benchmarks/bench_ops.py --sizes 1e8 --layouts llama --ops ewc_penalty_grad_   # the headline number
    python benchmarks/bench_ops.py --device cuda --sizes 1e6,1e7,1e8,5e8                   # a GPU (adds hbat-triton)

For every op, layout (``llama``: 300 Llama-shaped tensors scaled to the size; ``small``: 64x64 tensors, up to
``--small-max``) and size: the median time of each provider (interleaved rounds after a warm-up), the effective
bandwidth (the op's minimum bytes per element, ../shared/HBAT.md section 7, divided by the time), its fraction
of the bandwidth of a streaming ``copy_`` of the same size timed in the same rounds, and the peak memory above
the inputs. Writes ``<out>/<device>-ops.csv``, ``.md`` and ``.png``; the markdown checks issue 4's targets.
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import torch

from benchlib import layouts, memory, op_providers, report, timing

DEFAULT_SIZES = "1e6,1e7,1e8"
HEADLINE_OP = "ewc_penalty_grad_"


def jobs_of(args) -> list[tuple[str, int, str]]:
    """(layout, size, op) in the order they run; the ``small`` layout stops at ``--small-max``."""
    return [(layout, size, op) for layout in args.layouts for size in args.sizes
            if layout != "small" or size <= args.small_max for op in args.ops]


def run_sweep(args) -> list[dict]:
    device = torch.device(args.device)
    rows: list[dict] = []
    jobs = jobs_of(args)
    bar = report.progress(len(jobs), "bench_ops")
    copier, copier_key = None, None
    for layout, size, op in jobs:
        providers = op_providers.providers_for(op, size, device, args.providers)
        bar.set_postfix_str(f"{op} {layout} {report.fmt_size(size)}")
        x = op_providers.build_inputs(op, layouts.layout_shapes(layout, size), device,
                                      with_fisher="fisher" in providers)
        numel, n_tensors = x.numel, len(x.params)
        if copier_key != numel:  # the yardstick: a streaming copy_ of the same total size
            copier = None
            copier, copier_key = timing.StreamingCopy(numel, device), numel
        fns = {name: op_providers.make_provider(op, name, x) for name in providers}
        # timed in the same interleaved rounds as the providers: the same machine noise
        fns["copy_"] = copier
        samples = timing.interleaved_medians(fns, device, args.repeats, warmup=1)
        del x, fns
        copy_bw = 8 * numel / statistics.median(samples["copy_"])
        job_rows = []
        for name in providers + ["copy_"]:
            median = statistics.median(samples[name])
            job_rows.append({
                "op": op, "layout": layout, "size": numel, "tensors": n_tensors, "provider": name,
                "median_ms": median * 1e3, "min_ms": min(samples[name]) * 1e3, "repeats": args.repeats,
                # copy_ moves 8 B per element (read + write); the ops their minimum of HBAT.md section 7
                "gbps": (8 if name == "copy_" else op_providers.MIN_BYTES[op]) * numel / median / 1e9,
                "copy_gbps": copy_bw / 1e9,
            })
        if not args.no_memory:
            for row in job_rows[:-1]:
                peak = memory.op_peak_memory(op, row["provider"], layout, size, device)
                row["peak_mb"] = peak / 1e6
                row["peak_vs_param_copy"] = peak / (4 * numel)
        base = {r["provider"]: r["median_ms"] for r in job_rows}
        for row in job_rows:
            row["frac_copy_bw"] = row["gbps"] * 1e9 / copy_bw
            row["speedup_vs_naive"] = base["naive"] / row["median_ms"] if "naive" in base else math.nan
            row["speedup_vs_foreach"] = base["foreach"] / row["median_ms"] if "foreach" in base else math.nan
        rows += job_rows
        bar.update()
    bar.close()
    return rows


def best_hbat(rows: list[dict]) -> str | None:
    """The fastest non-reference hbat provider over all rows (what ``backend="auto"`` would pick)."""
    names = {r["provider"] for r in rows if r["provider"].startswith("hbat-") and r["provider"] != "hbat-reference"}
    if not names:
        return None
    return min(names, key=lambda n: sum(r["median_ms"] for r in rows if r["provider"] == n))


def headline(rows: list[dict]) -> list[dict]:
    """The hbat rows of the largest size, llama layout first: the numbers docs/benchmarks.md quotes."""
    hbat = [r for r in rows if r["provider"].startswith("hbat-") and r["provider"] != "hbat-reference"]
    if not hbat:
        return []
    largest = {layout: max(r["size"] for r in hbat if r["layout"] == layout) for layout in {r["layout"] for r in hbat}}
    picked = [r for r in hbat if r["size"] == largest[r["layout"]]]
    return sorted(picked, key=lambda r: (r["layout"] != "llama", op_providers.OPS.index(r["op"])))


def target_checks(rows: list[dict]) -> list[list]:
    """Issue 4's op targets (stated for the CPU at 1e8 elements), measured at the largest llama size."""
    provider = best_hbat(rows)
    sub = [r for r in rows if r["op"] == HEADLINE_OP and r["layout"] == "llama"]
    if provider is None or not sub:
        return []
    size = max(r["size"] for r in sub)
    at = {r["provider"]: r for r in sub if r["size"] == size}
    if provider not in at:
        return []
    h, naive = at[provider], at.get("naive", {})

    def check(what, value, goal, ok):
        return [what, value, goal, "met" if ok else ("not met" if ok is not None else "-")]

    xcopy, naive_xcopy = h.get("peak_vs_param_copy", math.nan), naive.get("peak_vs_param_copy", math.nan)
    return [
        check(f"{provider} vs naive ({report.fmt_size(size)} elements)", f"{h['speedup_vs_naive']:.1f}x", ">= 5x",
              h["speedup_vs_naive"] >= 5),
        check(f"{provider} vs foreach", f"{h['speedup_vs_foreach']:.1f}x", ">= 3x", h["speedup_vs_foreach"] >= 3),
        check(f"{provider} fraction of copy bandwidth ({h['copy_gbps']:.1f} GB/s)", f"{h['frac_copy_bw']:.0%}",
              ">= 60% (aim 85%)", h["frac_copy_bw"] >= 0.6),
        check(f"{provider} peak memory above inputs / one parameter copy", f"{xcopy:.4f}", "< 0.05",
              None if math.isnan(xcopy) else xcopy < 0.05),
        check("naive peak memory above inputs / one parameter copy", f"{naive_xcopy:.2f}",
              "shows a parameter-sized temporary (>= 1)", None if math.isnan(naive_xcopy) else naive_xcopy >= 1),
    ]


def _bytes_note() -> str:
    """'squared_change 8, ..., ewc_penalty 24 = forward 8 + backward 16, ...' from op_providers.MIN_BYTES."""
    forward, backward = op_providers.MIN_BYTES["squared_change"], op_providers.MIN_BYTES["ewc_penalty_grad_"]
    return ", ".join(f"{op} {n}" + (f" = forward {forward} + backward {backward}" if op == "ewc_penalty" else "")
                     for op, n in op_providers.MIN_BYTES.items())


def markdown(rows: list[dict], args) -> str:
    mem_note = ("torch.cuda.max_memory_allocated above the inputs" if torch.device(args.device).type == "cuda"
                else "peak RSS above the inputs, one fresh child process per provider")
    out = [
        f"# hbat ops benchmark ({report.device_tag(args.device)})", "",
        report.command_line(__file__, args),
        f"{report.machine_line(args.device)}; median of {args.repeats} interleaved rounds after 1 warm-up round.  ",
        f"GB/s = the op's minimum bytes per fp32 element ({_bytes_note()}; ../shared/HBAT.md section 7) / median "
        "time, for every provider. `of copy bw` = that / the bandwidth of a streaming `copy_` of the same total size (8 B per "
        "element, read + write), timed in the same interleaved rounds (row `copy_`). "
        f"Memory: {mem_note}; `xcopy` = that peak / one fp32 parameter copy.",
    ]
    if args.note:
        out += ["", f"> {args.note}"]
    if torch.device(args.device).type == "cpu":
        out += ["", "On the CPU a fraction above 100% is possible: `copy_` writes into memory it did not read, which "
                "costs a hidden extra read (write-allocate), while in-place ops write only lines they have read."]
    checks = target_checks(rows)
    if checks:
        out += ["", f"## Targets of issue 4 ({HEADLINE_OP}, llama layout; stated for the CPU at 1e8 elements)", ""]
        out.append(report.md_table(["what", "measured", "target", ""], checks))
    top = headline(rows)
    if top:
        out += ["", "## Headline: hbat at the largest size of each layout", ""]
        out.append(report.md_table(
            ["op", "layout", "elements", "tensors", "provider", "ms", "GB/s", "of copy bw", "x naive", "x foreach",
             "peak MB", "xcopy"],
            [[r["op"], r["layout"], report.fmt_size(r["size"]), r["tensors"], r["provider"], r["median_ms"], r["gbps"],
              f"{r['frac_copy_bw']:.0%}", r["speedup_vs_naive"], r["speedup_vs_foreach"], r.get("peak_mb", math.nan),
              r.get("peak_vs_param_copy", math.nan)] for r in top]))
    for op in args.ops:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        out += ["", f"## {op}", ""]
        out.append(report.md_table(
            ["layout", "elements", "tensors", "provider", "ms", "GB/s", "of copy bw", "x naive", "x foreach", "peak MB", "xcopy"],
            [[r["layout"], report.fmt_size(r["size"]), r["tensors"], r["provider"], r["median_ms"], r["gbps"],
              f"{r['frac_copy_bw']:.0%}", r["speedup_vs_naive"], r["speedup_vs_foreach"], r.get("peak_mb", math.nan),
              r.get("peak_vs_param_copy", math.nan)] for r in op_rows]))
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str, args) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {name: f"C{k}" for k, name in enumerate(n for n in providers if n != "copy_")}
    colors["copy_"] = "0.4"  # the bandwidth yardstick: grey, dashed
    styles = {name: ("--" if name == "copy_" else "-") for name in providers}
    columns = [(layout, metric) for layout in args.layouts for metric in ("median_ms", "peak_mb")]
    fig, axes = plt.subplots(len(args.ops), len(columns), figsize=(4.2 * len(columns), 3.0 * len(args.ops)), squeeze=False)
    for i, op in enumerate(args.ops):
        for j, (layout, metric) in enumerate(columns):
            ax = axes[i][j]
            sub = [r for r in rows if r["op"] == op and r["layout"] == layout]
            for provider in dict.fromkeys(r["provider"] for r in sub):
                pts = sorted((r["size"], r.get(metric, math.nan)) for r in sub if r["provider"] == provider)
                pts = [(s, max(v, 1e-3)) for s, v in pts if not math.isnan(v)]  # log axis: 0 MB shows at the floor
                if pts:
                    ax.plot(*zip(*pts), styles[provider], marker="o", color=colors[provider], label=provider)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{op} ({layout})", fontsize=9)
            ax.set_xlabel("elements", fontsize=8)
            ax.set_ylabel("median ms" if metric == "median_ms" else "peak MB above inputs", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[name], linestyle=styles[name], marker="o", label=name)
               for name in providers]
    fig.legend(handles=handles, loc="upper center", ncol=len(providers), fontsize=8, bbox_to_anchor=(0.5, 0.985))
    fig.suptitle(f"hbat ops, {report.machine_line(args.device, short=True)}", fontsize=9, y=0.998)
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def parse_args(argv=None):
    parser = report.make_parser(__doc__)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="total elements, comma-separated (default %(default)s)")
    parser.add_argument("--ops", default=",".join(op_providers.OPS), help="comma-separated subset of %(default)s")
    parser.add_argument("--layouts", default=",".join(layouts.LAYOUTS), help="llama and/or small")
    parser.add_argument("--providers", default=None, help="subset, e.g. hbat,naive,foreach (default: all)")
    parser.add_argument("--small-max", default="1e7", help="largest size of the small layout (default %(default)s: "
                        "beyond it the naive loop over 1e4+ tensors takes seconds per call and shows nothing new)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tag", default="ops", help="output name: <out>/<device>-<tag>.{csv,md,png}")
    report.add_output_flags(parser)
    args = report.parse(parser, argv)
    try:
        args.sizes = report.parse_sizes(args.sizes)
        args.small_max = report.parse_sizes(args.small_max)[0]
        args.ops = report.parse_choices(args.ops, op_providers.OPS, "--ops")
        args.layouts = report.parse_choices(args.layouts, layouts.LAYOUTS, "--layouts")
        args.providers = None if args.providers is None else [s.strip() for s in args.providers.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    report.run_and_write(args, args.tag, run_sweep, markdown, plot)


if __name__ == "__main__":
    main()
