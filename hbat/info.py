"""`python -m hbat.info`: what was built, which backends work here, and the versions (like ds_report)."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from hbat._ext import load_extension
from hbat.ops._dispatch import BACKENDS, backend_status


def _version(distribution: str) -> str:
    """The installed version of ``distribution``, read from its metadata: nothing is imported (DeepSpeed would
    print "Setting accelerator to CPU" and TRL would import half of transformers)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    import hbat

    lines = [f"hbat {hbat.__version__} ({hbat.__file__})", f"python {sys.version.split()[0]} on {platform.platform()}"]
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
                 f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'})")
    for mod in ("triton", "transformers", "trl", "deepspeed", "datasets"):
        lines.append(f"{mod} {_version(mod)}")
    lines.append("")
    lines.append("extensions:")
    for ext in ("hbat._C", "hbat._C_cuda"):
        module, why = load_extension(ext)
        if module is not None:
            info = getattr(module, "build_info", lambda: "built")()
            lines.append(f"  {ext:13s} loaded: {info}")
        else:
            lines.append(f"  {ext:13s} not available: {why}")
    lines.append("")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append("backends:")
    for device in devices:
        for name in BACKENDS:
            ok, why = backend_status(name, device)
            lines.append(f"  {device:4s} {name:9s} {'yes' if ok else 'no: ' + why}")
    from hbat.ops import available_backends
    for device in devices:
        lines.append(f"  auto on {device}: {available_backends(device)[0]}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
