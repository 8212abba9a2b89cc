"""The cost of getting the importance at a stage boundary: hbat's one pass over two weight copies against the
empirical Fisher of the original EWC (squared per-sample gradients of log p(y|x) over a data set).

    python benchmarks/bench_importance.py                 # CPU: Llama models of ~5M and ~20M parameters

Providers, on a real ``transformers`` LlamaForCausalLM built from a config:
  hbat-<backend>  ``ops.squared_change(weights, anchors)`` + ``compute_importance``: one float per tensor (eq. 6-7)
  fisher-loop     ``hbat.baselines.fisher.empirical_fisher(method="loop")``: one forward/backward per sample
  fisher-vmap     the same with torch.func per-sample gradients, ``--chunk`` samples at a time
Reports the median time (interleaved repeats), the peak memory above the model and its anchor copy, and the
state kept until the next boundary. Writes ``<out>/<device>-importance.{csv,md}``.
"""
from __future__ import annotations

import statistics

import torch

from benchlib import memory, report, timing
import benchmodels as M
from hbat import ops
from hbat.baselines.fisher import empirical_fisher
from hbat.importance import compute_importance

DEFAULT_SIZES = "5e6,2e7"


def providers(device) -> list[str]:
    return [f"hbat-{b}" for b in ops.available_backends(device) if b != "reference"] + ["fisher-loop", "fisher-vmap"]


def setup(size: float, device, samples: int, seq_len: int):
    model = M.build_model(size, device)
    params = [p for p in model.parameters()]
    with torch.no_grad():
        anchors = [p.detach() + 1e-3 * torch.randn_like(p) for p in params]  # the weights at the stage start
    return model, params, anchors, M.sft_samples(samples, seq_len)


def make_runner(provider: str, model, params, anchors, data, chunk: int):
    if provider.startswith("hbat-"):
        backend = provider[len("hbat-"):]

        def run():
            with torch.no_grad():
                change = ops.squared_change([p.detach() for p in params], anchors, backend=backend)
                return compute_importance(change, 100.0)  # what HybridEWC runs at a stage boundary
        return run
    method = provider.split("-", 1)[1]
    return lambda: empirical_fisher(model, data, method=method, chunk_size=chunk)


def child_memory(provider: str, size: float, device: str, samples: int, seq_len: int, chunk: int) -> float:
    # warm-up on a tiny model: loads kernels, starts threads (keeps one-time costs out of the peak)
    make_runner(provider, *setup(1e5, device, 2, seq_len), chunk)()
    model, params, anchors, data = setup(size, device, samples, seq_len)
    with memory.PeakMemory(device) as peak:
        result = make_runner(provider, model, params, anchors, data, chunk)()
    del result
    return float(peak.bytes)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    names = providers(device)
    bar = report.progress(len(args.sizes) * (1 + len(names)), "bench_importance")
    for size in args.sizes:
        model, params, anchors, data = setup(size, device, args.samples, args.seq_len)
        n_params, n_tensors = M.param_count(model), len(params)
        fns = {name: make_runner(name, model, params, anchors, data, args.chunk) for name in names}
        samples = timing.interleaved_medians(fns, device, args.repeats, warmup=1)
        bar.update()
        del model, params, anchors, data, fns
        for name in names:
            peak = (memory.peak_memory_of(child_memory, device, name, size, str(device), args.samples, args.seq_len, args.chunk)
                    if not args.no_memory else float("nan"))
            bar.update()
            per_element = name.startswith("fisher")
            rows.append({
                "params": n_params, "tensors": n_tensors, "provider": name, "samples": args.samples,
                "seq_len": args.seq_len, "median_s": statistics.median(samples[name]),
                "peak_mb": peak / 1e6, "peak_vs_param_copy": peak / (4 * n_params),
                "state_kept": "fp32 Fisher per element + anchor copy" if per_element else "1 float per tensor + anchor copy",
                "state_mb": (8 if per_element else 4) * n_params / 1e6 + (0 if per_element else 4 * n_tensors / 1e6),
            })
    bar.close()
    for row in rows:
        hbat = [r for r in rows if r["params"] == row["params"] and r["provider"].startswith("hbat-")]
        row["x_hbat_time"] = row["median_s"] / hbat[0]["median_s"] if hbat else float("nan")
    return rows


def markdown(rows, args) -> str:
    out = [
        f"# Importance at a stage boundary ({report.device_tag(args.device)})", "",
        report.command_line(__file__, args),
        f"{report.machine_line(args.device)}; transformers LlamaForCausalLM from a config; Fisher over {args.samples} samples "
        f"of {args.seq_len} tokens (response = second half); median of {args.repeats} interleaved repeats.  ",
        "Peak MB: above the model and its anchor copy (CPU: peak RSS of a fresh child process; GPU: "
        "max_memory_allocated); `xcopy` = that / one fp32 parameter copy. The Fisher cost grows with the number of "
        "samples (one backward each); hbat's does not depend on the data.",
    ]
    if args.note:
        out += ["", f"> {args.note}"]
    out += ["", report.md_table(
        ["params", "tensors", "provider", "median s", "x hbat", "peak MB", "xcopy", "state kept", "state MB"],
        [[report.fmt_size(r["params"]), r["tensors"], r["provider"], r["median_s"], r["x_hbat_time"], r["peak_mb"],
          r["peak_vs_param_copy"], r["state_kept"], r["state_mb"]] for r in rows])]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    parser = report.make_parser(__doc__)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="model parameter counts (default %(default)s)")
    parser.add_argument("--samples", type=int, default=16, help="data set size for the Fisher estimate")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4, help="samples per vmap chunk (fisher-vmap)")
    parser.add_argument("--repeats", type=int, default=3)
    report.add_output_flags(parser)
    args = report.parse(parser, argv)
    try:
        args.sizes = report.parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    if min(args.samples, args.seq_len, args.chunk, args.repeats) < 1 or args.seq_len < 4:
        parser.error("--samples, --chunk, --repeats must be >= 1 and --seq-len >= 4")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    report.run_and_write(args, "importance", run, markdown)


if __name__ == "__main__":
    main()
