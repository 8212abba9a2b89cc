"""The table-driven half of every op's checks: its tensor lists, by the roles and dtype rules of its entry in the
op table (table.py), and the backend that runs it.

``prepare(op_name, backend, *lists)`` is the first line of every public op (hbat/ops/__init__.py) and what runs
an op of the table generically (the benchmarks' hbat providers): lengths, shapes, devices, each list's dtype
rule, writable lists overlapping nothing but their ``may_alias`` partners, density and layout for the native
backends; the error names the list and the index, before anything is written (validate.py words it).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from hbat._ext import load_extension

from . import table
from . import validate as V
from ._dispatch import accepted_dtypes, resolve_traceable


def prepare(op_name: str, backend: str, *lists):
    """Validate the tensor lists of op ``op_name`` (its arguments, in the table's order) by the roles and dtype
    rules of its table entry, and pick the backend. Returns (lists, device, backend module).

    For a native backend the C++ extension first answers whether every check passes (one pass in C++, the
    per-call cost of a few hundred tensors); if not, or for the reference backend, the Python checks run and
    raise their error."""
    op = table.op(op_name)
    names = [t.name for t in op.arguments]
    items = [V.as_list(name, seq) for name, seq in zip(names, lists)]  # read each iterable once
    # not while torch.compile traces: the extension's answer could not be traced (the Python checks run then)
    fast_check = None if torch.compiler.is_compiling() else lists_pass()
    if fast_check is not None and fast_check(items, *list_rules(op_name)):
        device = items[0][0].device
        backend_name, module = resolve_traceable(backend, device)
        if backend_name != "reference":
            return items, device, module
    given = {name: V.as_tensor_list(name, seq) for name, seq in zip(names, items)}
    lead = given[names[0]]
    backend_name, module = resolve_traceable(backend, lead[0].device if lead else None)
    converted, device = check_in_python(op, backend_name, given)
    return converted, device, module


def check_in_python(op: table.OpDef, backend_name: str, given: dict):
    """check_lists of the argument lists ``given`` (name -> list of tensors) by op's table entry: the lists as
    lists and the common device, or the error."""
    may_alias: dict[str, tuple] = {}
    for written, reader in op.may_alias:
        may_alias[written] = may_alias.get(written, ()) + (reader,)
    return V.check_lists(
        given,
        dtypes=accepted_dtypes(backend_name),
        need_dense=backend_name != "reference",
        writable=[t.name for t in op.arguments if t.written_in_place],
        may_alias=may_alias,
        rules={t.name: t.dtype for t in op.arguments if t.dtype != table.ANY_FLOAT},
    )


@lru_cache(maxsize=None)
def lists_pass():
    """hbat._C.lists_pass (csrc/bindings/check_lists.h), or None without the extension."""
    module = load_extension("hbat._C")[0]
    return getattr(module, "lists_pass", None)


@lru_cache(maxsize=None)
def list_rules(op_name: str) -> tuple:
    """Op ``op_name``'s list checks as hbat._C.lists_pass takes them: per argument list its dtype rule (-1 any
    float, -2 float32, i: the dtype of list i) and whether it is written in place; the may_alias index pairs."""
    op = table.op(op_name)
    names = [t.name for t in op.arguments]
    rules = [{table.ANY_FLOAT: -1, table.FLOAT32: -2}.get(t.dtype, None) for t in op.arguments]
    rules = [names.index(t.dtype) if r is None else r for r, t in zip(rules, op.arguments)]
    return rules, [t.written_in_place for t in op.arguments], [(names.index(w), names.index(r)) for w, r in op.may_alias]
