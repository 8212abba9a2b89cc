"""Drop-in use of ``hbat.HybridEWC`` in other trainers.

``hbat.integrations.transformers.HybridEWCCallback`` plugs the penalty into ``transformers.Trainer`` and so
into TRL's ``SFTTrainer``, ``DPOTrainer`` and ``RewardTrainer`` (one process, DDP, DeepSpeed ZeRO-1/2/3, FSDP2);
``hbat.integrations.accelerate.prepare_ewc`` into a loop prepared by accelerate. This package imports with
torch alone; ``hbat.integrations.transformers`` imports transformers when it is imported.
"""

from .accelerate import PreparedEWC, prepare_ewc

__all__ = ["HybridEWCCallback", "release_trainer", "prepare_ewc", "PreparedEWC"]


def __getattr__(name):
    # lazy, so that `import hbat.integrations` does not import transformers
    if name in ("HybridEWCCallback", "release_trainer"):
        from . import transformers

        return getattr(transformers, name)
    raise AttributeError(f"module 'hbat.integrations' has no attribute {name!r}")
