"""The EMA anchor of a DPO stage (``ema_anchor: r > 0``): an exponential moving average of the weights, kept beside
them from the stage's start, ``anchor <- (1 - r) anchor + r theta`` after every optimizer step (one fused ``lerp_``
pass, hbat.averaging.WeightShards.ema_); at the stage's end the weights become the anchor (an exact exchange).

This is the EMA anchor of ``hbat.AveragingCallback(method="ema")`` inside hbat train: an average over the stage's
trajectory instead of its last point (a smaller r remembers longer: about 1 / r steps). One copy of the trained
weights (the memory plan's row). The anchor has the weights' dtype, so it needs fp32 weights (in bf16 an update
below the resolution is lost), one process (not under DeepSpeed) and DPO stages (PPO's loop is its own).
"""
from __future__ import annotations

from ..averaging.shards import WeightShards


class EMAAnchor:
    def __init__(self, model, rate: float):
        self.rate = rate
        self.shards = WeightShards(model)  # the anchor starts at the stage's start weights

    def update(self) -> None:
        """After an optimizer step: the anchor moves ``rate`` of the way to the weights."""
        self.shards.ema_(self.rate)

    def finish(self) -> None:
        """At the stage's end: the weights become the anchor."""
        self.shards.swap_()
