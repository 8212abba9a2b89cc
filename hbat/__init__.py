"""hbat: Hybrid Alignment Training of language models.

Fused EWC kernels (C++ CPU, CUDA, Triton) over lists of parameter tensors, and a compact trainer for the
alternating SFT / DPO / PPO loop of Wang et al. (2024). ``import hbat`` needs torch alone.
"""
from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
