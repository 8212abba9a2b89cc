"""Test configuration shared by the whole suite.

Without a GPU the Triton backend runs under Triton's interpreter on CPU tensors; the variable must be set
before triton is first imported, which is why it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
