"""Model averaging of the model before and after RLHF (Lin et al., 2024), on the fused ``hbat.ops.lerp_``.

Convention used everywhere in hbat: ``alpha`` (a "ratio") is the weight of the ALIGNED (post-RLHF, or the
currently trained) model,

    theta = (1 - alpha) * theta_pre + alpha * theta_post      alpha = 0: the SFT model, alpha = 1: the aligned one,

and alpha > 1 extrapolates past the aligned model (ExPO: theta_post + (alpha - 1) (theta_post - theta_pre)).
(The released HMA code writes its ratio on the pre-RLHF model: their ``ratio`` is our ``1 - alpha``.)

One module per job:

* ``plan``: which tensors are merged (``scope``) and in which block of layers (``blocks``, ``non_layer``).
* ``merge``: ``ModelAverager`` / ``average`` / ``sweep``: two models in, a merged model out.
* ``hma``: heterogeneous averaging, one learned ratio per block with a fixed mean (``learn_hma``).
* ``samples``: aligned-policy samples for the HMA loss (JSONL / text, tokenised, or sampled).
* ``shards`` / ``inplace``: averaging IN PLACE of the weights a run trains, on every rank's own shard (one
  process, DDP, DeepSpeed ZeRO-1/2/3, FSDP2), against a start copy; swaps and exact restores.
* ``sweep``: a ratio sweep evaluated in memory (table, Pareto front, plot), resumable from its table.
* ``kl``: the forgetting meter, the exact token-level KL to the start model on a fixed batch.
* ``command``: ``hbat average`` (``main(argv)``), including ``--sweep`` on saved models.

The callbacks that use them in training are ``hbat.AveragingCallback`` (transformers / TRL) and
``hbat.integrations.averaging.prepare_averaging`` (accelerate loops).
"""
from __future__ import annotations

from .command import build_parser, main, run
from .hma import HMAConfig, HMAResult, _hma_step, _ratio_gradients, hma_ratios, learn_hma
from .inplace import InPlaceAverager, check_ratio
from .kl import kl_to_start, token_kl
from .merge import ModelAverager, average, sweep
from .plan import NON_LAYER, SCOPES, MergePlan, check_alpha, layer_index, plan_merge
from .samples import encode_samples, load_samples, sample_responses
from .shards import WeightShards
from .sweep import SweepResult, pareto_front, run_sweep

_check_alpha = check_alpha  # the name it had before the split

__all__ = [
    "SCOPES",
    "NON_LAYER",
    "MergePlan",
    "plan_merge",
    "layer_index",
    "ModelAverager",
    "average",
    "sweep",
    "hma_ratios",
    "HMAConfig",
    "HMAResult",
    "learn_hma",
    "encode_samples",
    "load_samples",
    "sample_responses",
    "build_parser",
    "run",
    "main",
    "InPlaceAverager",
    "WeightShards",
    "check_ratio",
    "run_sweep",
    "SweepResult",
    "pareto_front",
    "kl_to_start",
    "token_kl",
]
