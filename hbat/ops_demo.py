"""`hbat ops-demo` (`python -m hbat.ops_demo`): the fused EWC ops on a Llama-shaped list of tensors.

One HBAT stage boundary (snapshot_ -> importance) and the per-step penalty, timed against the naive
per-tensor autograd penalty that the released code and most users write. Interleaved repeats, medians
reported. (``make demo`` runs the trainer: ``hbat.demo``.)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hbat import ops


def llama_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    inter = int(hidden * 8 / 3) // 64 * 64 or 64
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def naive_penalty(params, anchors, F, lam):
    """What the released code does: a Python loop, autograd, a parameter-sized temporary per tensor."""
    total = 0.0
    for p, a, f in zip(params, anchors, F):
        total = total + (lam / 2) * f * ((p - a) ** 2).sum()
    total.backward()
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    shapes = llama_shapes(args.hidden, args.layers, args.vocab)
    params = [torch.randn(s) * 0.02 for s in shapes]
    anchors = [p + 0.001 * torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    backend = args.backend if args.backend != "auto" else ops.available_backends("cpu")[0]
    print(f"{len(params)} Llama-shaped tensors, {numel / 1e6:.1f}M fp32 elements, backend={backend}")

    # a stage boundary: measure the change, refresh the anchor copy, derive the importance
    anchor_copy = [a.clone() for a in anchors]
    change = ops.snapshot_(params, anchor_copy, backend=backend)
    F = ops.importance(change, f_max=100.0, scale=1.0 / change.mean().item())
    print(f"stage boundary: mean C_i = {change.mean().item():.3e}; importance max/min = "
          f"{F.max().item():.2f}/{F.min().item():.2f} (sums to {F.sum().item():.1f})")

    grads = [torch.zeros_like(p) for p in params]
    leaves = [p.clone().requires_grad_(True) for p in params]
    flat_src, flat_dst = torch.randn(numel), torch.empty(numel)
    fused_times, naive_times, copy_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        t0 = time.perf_counter()
        flat_dst.copy_(flat_src)
        copy_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fused = ops.ewc_penalty_grad_(params, anchors, grads, F, 1.0, backend=backend).sum()
        fused_times.append(time.perf_counter() - t0)
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        naive = naive_penalty(leaves, anchors, F.tolist(), 1.0)
        naive_times.append(time.perf_counter() - t0)
    fused_s, naive_s = statistics.median(fused_times), statistics.median(naive_times)
    copy_bw = 8 * numel / 1e9 / statistics.median(copy_times)  # bytes read + written per second
    gb = 16 * numel / 1e9  # read p, a, g; write g
    print(f"{'provider':<24}{'median ms':>12}{'GB/s':>10}{'of copy bw':>12}")
    print(f"{'hbat ewc_penalty_grad_':<24}{fused_s * 1e3:>12.2f}{gb / fused_s:>10.1f}{gb / fused_s / copy_bw:>12.0%}")
    print(f"{'naive autograd':<24}{naive_s * 1e3:>12.2f}{gb / naive_s:>10.1f}{gb / naive_s / copy_bw:>12.0%}")
    print(f"{'tensor copy_':<24}{'':>12}{copy_bw:>10.1f}{1:>12.0%}")
    print(f"penalty: fused {fused.item():.6e}, naive {naive.item():.6e}; speed-up {naive_s / fused_s:.1f}x")


if __name__ == "__main__":
    main()
