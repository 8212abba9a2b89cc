"""Tensor layouts of the benchmarks: a Llama-shaped list of tensors, or many small tensors, scaled to a size."""
from __future__ import annotations

import math

LAYOUTS = ("llama", "small")
SMALL_TENSOR_SHAPE = (64, 64)
LLAMA_LAYERS = 33  # 33 * 9 + 3 = 300 tensors, the issue-2 layout


def llama_shapes_for(hidden: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama model: embed, per layer q/k/v/o, gate/up/down and 2 norms, norm, lm_head."""
    inter = max(8, int(hidden * 8 / 3) // 8 * 8)
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def llama_shapes(total: int, layers: int = LLAMA_LAYERS) -> list[tuple[int, ...]]:
    """A Llama-shaped list of ``9 * layers + 3`` tensors with about ``total`` elements (vocab = 16 * hidden)."""
    # elements ~= layers * (4 + 3 * 8/3) * h^2 + 2 * 16 h^2 = (12 * layers + 32) h^2
    hidden = max(8, round(math.sqrt(total / (12 * layers + 32)) / 8) * 8)
    return llama_shapes_for(hidden, layers, 16 * hidden)


def small_shapes(total: int) -> list[tuple[int, ...]]:
    """Many small tensors (64 x 64 = 4096 elements each): the per-tensor overhead regime."""
    return [SMALL_TENSOR_SHAPE] * max(1, round(total / math.prod(SMALL_TENSOR_SHAPE)))


def layout_shapes(layout: str, total: int) -> list[tuple[int, ...]]:
    if layout == "llama":
        return llama_shapes(total)
    if layout == "small":
        return small_shapes(total)
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
