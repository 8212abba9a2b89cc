"""csrc/cuda's kernels compiled for the CPU against a stand-in CUDA runtime (include/emu_core.h).

No GPU is needed: the kernel sources are copied with one mechanical change (``k<<<grid, block, 0, s>>>(args)``
becomes ``hbat_emu::launch_kernel(k, grid, block, 0, s, args)``) and built with g++ together with the host
planner and ``launch()``. ``EmulatedCuda`` has a function for every op of the op table (hbat/ops/table.py),
with the backend modules' signature (hbat/ops/*_backend.py), and runs it on CPU tensors, so the tests can hold
the CUDA code path (plan, table, chunking, 16-byte vector body, head and tail, dtype conversions, per-block and
per-tensor reductions) to the reference.

What it cannot show: speed, the GPU memory model (all threads here see memory in program order), and
anything of the torch binding (csrc/bindings/cuda_binding.cpp).
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hbat.ops import table

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
CUDA_SRC = CSRC / "cuda"
LAUNCH = re.compile(r"([A-Za-z_][\w:]*)<<<(.*?)>>>\(", re.S)

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
STATS = ("chunk_size", "num_chunks", "groups", "vector_accesses", "scalar_accesses")


def compiler() -> str | None:
    return shutil.which("g++")


def build(out_dir: Path) -> ctypes.CDLL:
    """Copy and rewrite the kernel sources into ``out_dir``, compile them with g++ and load the library."""
    src = out_dir / "src" / "cuda"
    src.mkdir(parents=True, exist_ok=True)
    launches = 0
    for path in sorted(CUDA_SRC.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            text, count = LAUNCH.subn(r"hbat_emu::launch_kernel(\1, \2, ", path.read_text())
            launches += count
            (src / path.name).write_text(text)
    if launches == 0:
        raise RuntimeError("no kernel launch (<<<...>>>) found in csrc/cuda: the emulator's rewrite is stale")
    units = sorted(src.glob("*.cu")) + [HERE / "harness.cpp"]
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-fno-strict-aliasing", "-x", "c++",
             f"-I{HERE / 'include'}", f"-I{out_dir / 'src'}", f"-I{CSRC}"]

    def compile_unit(unit: Path) -> Path:
        obj = out_dir / f"{unit.name}.o"
        done = subprocess.run([compiler(), *flags, "-c", str(unit), "-o", str(obj)], capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"g++ failed on {unit.name}:\n{done.stderr[-4000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_unit, units))
    library = out_dir / "libhbat_cuda_emulated.so"
    done = subprocess.run([compiler(), "-shared", "-pthread", *map(str, objects), "-o", str(library)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"linking the emulated kernels failed:\n{done.stderr[-4000:]}")
    lib = ctypes.CDLL(str(library))
    i64p, i32p, f32p = (ctypes.POINTER(t) for t in (ctypes.c_int64, ctypes.c_int32, ctypes.c_float))
    f64p = ctypes.POINTER(ctypes.c_double)
    lib.hbat_emu_run.argtypes = [ctypes.c_int, ctypes.c_int64, i64p, i64p, i32p, ctypes.POINTER(f32p), f64p, f32p,
                                 ctypes.c_int, i64p, ctypes.c_char_p, ctypes.c_int]
    lib.hbat_emu_run.restype = ctypes.c_int
    lib.hbat_emu_huge_tail.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, f64p, f64p, i64p,
                                       ctypes.c_char_p, ctypes.c_int]
    lib.hbat_emu_huge_tail.restype = ctypes.c_int64
    return lib


def huge_tensor_tail(lib: ctypes.CDLL, numel: int, tail_chunks: int, coef: float) -> dict:
    """ewc_penalty_grad_ over the last ``tail_chunks`` chunks of one ``numel``-element tensor (harness.cpp)."""
    got, exact = (ctypes.c_double * tail_chunks)(), (ctypes.c_double * tail_chunks)()
    chunk_size = ctypes.c_int64()
    msg = ctypes.create_string_buffer(1024)
    wrong = lib.hbat_emu_huge_tail(numel, tail_chunks, coef, got, exact, ctypes.byref(chunk_size), msg, len(msg))
    if wrong == -2:
        raise MemoryError(msg.value.decode())  # e.g. vm.overcommit_memory=2 refuses MAP_NORESERVE mappings
    if wrong < 0:
        raise RuntimeError(f"emulated ewc_penalty_grad_ on {numel} elements: {msg.value.decode()}")
    return {"partials": list(got), "exact": list(exact), "wrong_grads": wrong, "chunk_size": chunk_size.value}


class EmulatedCuda:
    """The CUDA backend's functions on CPU tensors (contiguous float32 / bfloat16 / float16): one per op of the
    table, called like the backend modules' (``emu.ewc_penalty_grad_(params, anchors, grads, coef)``)."""

    def __init__(self, lib: ctypes.CDLL, num_sms: int = 4):
        self.lib, self.num_sms = lib, num_sms
        self.stats: dict[str, int] = {}

    def __getattr__(self, name: str):
        if name not in table.BY_NAME:
            raise AttributeError(name)
        return lambda *args: self.run(table.op(name), *args)

    def run(self, op: table.OpDef, *args):
        """``op`` with its arguments in schema order (lists, vectors, scalars); returns what the op returns."""
        num_lists, num_vectors = len(op.arguments), len(op.vectors)
        if len(args) != num_lists + num_vectors + len(op.scalars):
            raise TypeError(f"{op.name} takes {op.schema}")
        given = dict(zip((t.name for t in op.arguments), args[:num_lists]))
        vectors = [v.to(torch.float32).contiguous() for v in args[num_lists:num_lists + num_vectors]]
        scalars = [float(s) for s in args[num_lists + num_vectors:]]
        lead = given[op.lists[0].name]
        n = len(lead)
        if op.returned is not None:  # new tensors, like the list its dtype rule names
            like = given[op.returned.dtype]
            given[op.returned.name] = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
        lists = [given[t.name] for t in op.lists]
        for spec, tensors in zip(op.lists, lists):
            for i, t in enumerate(tensors):
                if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in DTYPE_CODES:
                    raise ValueError(f"{spec.name}[{i}]: a contiguous CPU float32/bfloat16/float16 tensor is expected")
                if t.numel() != lead[i].numel():
                    raise ValueError(f"{spec.name}[{i}] has {t.numel()} elements, expected {lead[i].numel()}")

        def words(values, ctype=ctypes.c_int64):
            return (ctype * max(len(values), 1))(*values)

        f32p = ctypes.POINTER(ctypes.c_float)
        vector_ptrs = (f32p * max(num_vectors, 1))(*(ctypes.cast(v.data_ptr(), f32p) for v in vectors))
        out = torch.zeros(n, dtype=torch.float32)
        stats = (ctypes.c_int64 * len(STATS))()
        msg = ctypes.create_string_buffer(1024)
        rc = self.lib.hbat_emu_run(
            op.code, n, words([t.data_ptr() for ts in lists for t in ts]), words([t.numel() for t in lead]),
            words([DTYPE_CODES[t.dtype] for ts in lists for t in ts], ctypes.c_int32), vector_ptrs,
            words(scalars, ctypes.c_double), ctypes.cast(out.data_ptr(), f32p), self.num_sms, stats, msg, len(msg))
        self.stats = dict(zip(STATS, stats))
        if rc != 0:
            raise RuntimeError(f"emulated {op.name}: {msg.value.decode()}")
        if op.reduces:
            return out
        return given[op.returned.name] if op.returned is not None else None
