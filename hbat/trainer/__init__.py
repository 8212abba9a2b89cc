"""The alternating trainer of HBAT: stages (SFT, reward model, DPO, PPO), Algorithm 1, methods, config.

    from hbat.trainer import load_config, prepare, run_method
    cfg = load_config("run.yaml", overrides=["method=hbat"])
    result = run_method(prepare(cfg), cfg)

``run_method`` raises ``TrainingDiverged`` (naming the method, stage and step) when a loss or weight turns
non-finite. Needs transformers, tqdm and pyyaml (``pip install hbat[train]``); each is imported where it is used.
The map of the modules: CONTRIBUTING.md, "The trainer: a map".
"""
from __future__ import annotations

from .algorithm import run_method
from .config import METHODS, TrainConfig, load_config
from .guards import TrainingDiverged
from .workspace import prepare

__all__ = ["load_config", "prepare", "run_method", "TrainConfig", "METHODS", "TrainingDiverged"]
