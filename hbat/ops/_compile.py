"""What torch.compile needs from the ops' Python side; imported only while dynamo traces an op, so that
`import hbat` does not import torch._dynamo."""
from __future__ import annotations

import torch

from ._dispatch import resolve


@torch.compiler.assume_constant_result
def backend_name(backend: str, device: torch.device | None) -> str:
    """The backend ``resolve`` picks, computed when the graph is traced and kept in it as a constant."""
    return resolve(backend, device)[0]
