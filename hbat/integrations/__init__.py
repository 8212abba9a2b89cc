"""Drop-in use of ``hbat.HybridEWC`` in other trainers.

``hbat.integrations.transformers.HybridEWCCallback`` plugs the penalty into ``transformers.Trainer`` and so
into TRL's ``SFTTrainer``, ``DPOTrainer`` and ``RewardTrainer`` (one process, DDP, DeepSpeed ZeRO-1/2/3, FSDP2);
``hbat.integrations.accelerate.prepare_ewc`` into a loop prepared by accelerate. In-place model averaging
with the start model (uniform, HMA, ExPO, EMA anchor), ratio sweeps and the forgetting meter:
``AveragingCallback`` (``hbat.integrations.averaging_callback``) and ``prepare_averaging``
(``hbat.integrations.averaging``). This package imports with torch alone; ``hbat.integrations.transformers``
and ``averaging_callback`` import transformers when they are imported.
"""

from .accelerate import PreparedEWC, prepare_ewc
from .averaging import AveragingSpec, PreparedAveraging, prepare_averaging

__all__ = ["HybridEWCCallback", "release_trainer", "prepare_ewc", "PreparedEWC", "AveragingCallback",
           "prepare_averaging", "PreparedAveraging", "AveragingSpec"]


def __getattr__(name):
    # lazy, so that `import hbat.integrations` does not import transformers
    if name in ("HybridEWCCallback", "release_trainer"):
        from . import transformers

        return getattr(transformers, name)
    if name == "AveragingCallback":
        from .averaging_callback import AveragingCallback

        return AveragingCallback
    raise AttributeError(f"module 'hbat.integrations' has no attribute {name!r}")
