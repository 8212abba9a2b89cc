"""Drop-in use of ``hbat.HybridEWC`` in other trainers.

``hbat.integrations.transformers.HybridEWCCallback`` plugs the penalty into ``transformers.Trainer`` and so
into TRL's ``SFTTrainer``, ``DPOTrainer`` and ``RewardTrainer``. This package imports with torch alone; the
submodule imports transformers when it is imported.
"""

__all__ = ["HybridEWCCallback"]


def __getattr__(name):
    # lazy, so that `import hbat.integrations` does not import transformers
    if name == "HybridEWCCallback":
        from .transformers import HybridEWCCallback

        return HybridEWCCallback
    raise AttributeError(f"module 'hbat.integrations' has no attribute {name!r}")
