"""hbat: Hybrid Alignment Training of language models.

Fused EWC kernels (C++ CPU, CUDA, Triton) over lists of parameter tensors, and a compact trainer for the
alternating SFT / DPO / PPO loop of Wang et al. (2024). ``import hbat`` needs torch alone; the trainer and
the integrations import their own dependencies when they are used.
"""
from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "HybridEWC", "HybridAdamW", "AveragingCallback", "__version__"]


def __getattr__(name):
    # lazy, so that `import hbat` stays light
    if name == "HybridEWC":
        from .ewc import HybridEWC

        return HybridEWC
    if name == "AveragingCallback":  # imports transformers
        from .integrations.averaging_callback import AveragingCallback

        return AveragingCallback
    if name == "HybridAdamW":
        from .optim import HybridAdamW

        return HybridAdamW
    if name == "optim":  # `hbat.optim.HybridAdamW` after a plain `import hbat`
        import importlib

        return importlib.import_module(".optim", __name__)
    raise AttributeError(f"module 'hbat' has no attribute {name!r}")
