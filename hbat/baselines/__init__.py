"""Baselines of the HBAT paper that replace the HybridEWC penalty.

* ``FisherEWC`` (fisher.py): the "original EWC" of eq. (13)-(14), a per-element diagonal empirical Fisher.
* ``TensorFreezer`` (freeze.py): HBAT-Freeze, freezing the most important tensors instead of penalising them.

Model averaging (uniform and HMA) lives in ``hbat.averaging``.
"""
from .fisher import FisherEWC, empirical_fisher, sequence_logprob
from .freeze import FREEZE_BY, FreezeRecord, TensorFreezer, select_top

__all__ = [
    "FisherEWC",
    "empirical_fisher",
    "sequence_logprob",
    "FREEZE_BY",
    "FreezeRecord",
    "TensorFreezer",
    "select_top",
]
