"""The alternating trainer of HBAT: stages (SFT, reward model, DPO, PPO), Algorithm 1, methods, config.

    from hbat.trainer import load_config, prepare, run_method
    cfg = load_config("run.yaml", overrides=["method=hbat"])
    result = run_method(prepare(cfg), cfg)

``run_method`` raises ``TrainingDiverged`` (naming the method, stage and step) when a loss or weight turns
non-finite. Needs transformers, tqdm and pyyaml (``pip install hbat[train]``); imported when used.
"""
from __future__ import annotations

__all__ = ["load_config", "prepare", "run_method", "TrainConfig", "METHODS", "TrainingDiverged"]


def __getattr__(name):
    # lazy on purpose: `import hbat.trainer.checkpoint` (hbat.averaging) and `hbat --help` load no stage module
    if name in ("load_config", "TrainConfig", "METHODS"):
        from . import config

        return getattr(config, name)
    if name == "prepare":
        from .workspace import prepare

        return prepare
    if name == "TrainingDiverged":
        from .guards import TrainingDiverged

        return TrainingDiverged
    if name == "run_method":
        from .algorithm import run_method

        return run_method
    raise AttributeError(f"module 'hbat.trainer' has no attribute {name!r}")
