"""Which tensors a merge touches, and in which block of layers: the plan shared by every averager.

``scope``: "all" floating parameters, or "linear" (weights of nn.Linear / Conv1D modules only, as the released
HMA code does; everything else, embeddings and norms, is copied from the pre-RLHF model). For per-block
ratios, tensors outside the numbered layers (embeddings, final norm, lm_head) follow ``non_layer``: "attach"
(default; the block of the nearest preceding layer, block 0 before the first layer: embeddings go with the
bottom block, the final norm and lm_head with the top one), "mean" (merged with the mean ratio, not learned,
as the released split-merge script does) or "pre" (copied from the pre-RLHF model).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..ops import _validate

__all__ = ["SCOPES", "NON_LAYER", "MergePlan", "layer_index", "plan_merge", "check_alpha"]


SCOPES = ("all", "linear")
NON_LAYER = ("attach", "mean", "pre")
# "model.layers.3.", "transformer.h.3.", "encoder.layer.3.", "blocks.3." ...
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_LINEAR_CLASS_NAMES = ("Linear", "Conv1D")  # Conv1D: GPT-2's transposed Linear


@dataclass
class MergePlan:
    """The merged tensors (in ``named_parameters`` order), the block of each, and what is copied from pre.

    ``blocks[i]`` is the block index of ``names[i]``, or -1 for a tensor merged with the mean ratio
    (``non_layer="mean"``). ``copied`` lists the parameters that keep the pre-RLHF values.
    """

    names: list[str]
    blocks: list[int]
    block_names: list[str]
    copied: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)


def layer_index(name: str) -> int | None:
    """The transformer layer number in a parameter name ("model.layers.3.mlp..." -> 3), or None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def _is_linear_weight(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return attr == "weight" and type(module).__name__ in _LINEAR_CLASS_NAMES


def _block_of_layer(blocks, num_layers: int) -> tuple[Callable[[int], int], list[str]]:
    if blocks == "layer":
        return (lambda layer: layer), [f"layer {i}" for i in range(num_layers)]
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive int or 'layer', got {blocks!r}")
    if blocks > num_layers:
        raise ValueError(f"blocks={blocks} but the model has only {num_layers} layers")
    # contiguous, as equal as possible: layer l -> floor(l * blocks / num_layers)
    names = []
    for b in range(blocks):
        members = [l for l in range(num_layers) if l * blocks // num_layers == b]
        names.append(f"layers {members[0]}-{members[-1]}" if len(members) > 1 else f"layer {members[0]}")
    return (lambda layer: layer * blocks // num_layers), names


def plan_merge(model: nn.Module, *, scope: str = "all", blocks=None, non_layer: str = "attach") -> MergePlan:
    """Choose the merged tensors of ``model`` and group them into blocks of layers.

    blocks: None (one block: uniform averaging), an int (that many contiguous blocks of layers, bottom to top),
    or "layer" (one block per layer).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if non_layer not in NON_LAYER:
        raise ValueError(f"non_layer must be one of {NON_LAYER}, got {non_layer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    merged = [n for n, _ in named if scope == "all" or _is_linear_weight(model, n)]
    merged_set = set(merged)
    copied = [n for n, _ in model.named_parameters() if n not in merged_set]
    if blocks is None:
        return MergePlan(merged, [0] * len(merged), ["all"], copied)

    layers = {n: layer_index(n) for n in merged}
    found = [l for l in layers.values() if l is not None]
    if not found:
        raise ValueError(
            "no parameter name contains a layer number (like 'model.layers.3.'); per-block averaging needs one"
        )
    num_layers = max(found) + 1
    block_of, block_names = _block_of_layer(blocks, num_layers)
    names, block_ids, previous = [], [], 0
    for n in merged:
        layer = layers[n]
        if layer is not None:
            previous = block = block_of(layer)
        elif non_layer == "attach":
            block = previous  # the nearest preceding layer's block (block 0 before the first layer)
        elif non_layer == "mean":
            block = -1
        else:  # "pre"
            copied.append(n)
            continue
        names.append(n)
        block_ids.append(block)
    return MergePlan(names, block_ids, block_names, copied)


def check_alpha(alpha, *, extrapolate: bool = False) -> float:
    """``alpha`` (the aligned model's weight) as a float in [0, 1] (with ``extrapolate``: any finite alpha >= 0,
    above 1 past the aligned model, ExPO), or one clear error."""
    alpha = _validate.check_scalar("alpha", alpha)
    if extrapolate and not (alpha >= 0.0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and >= 0 (above 1 extrapolates past the aligned model), got {alpha}")
    if not extrapolate and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of the aligned model), got {alpha}")
    return alpha
