"""Row formats of the three data kinds, and loading them from JSONL files, lists or ``datasets`` data sets.

Formats (every field a string; extra fields are dropped unless ``keep_extra=True``):

- SFT (instruction following, eq. 2):  ``{"prompt": str, "response": str}``; response non-empty.
- preference (DPO, reward model):      ``{"prompt": str, "chosen": str, "rejected": str}``; both non-empty.
- PPO prompts:                          ``{"prompt": str}``; non-empty.

The prompt is the exact text the model is conditioned on (any chat/instruction template already applied)
and the completion follows it directly: ``prompt + response`` is the full text. The tokenisation helpers
(hbat.data.tokenization) tokenise the two parts separately so the boundary between them is exact.

Sources:

- a path (str or os.PathLike) to a JSONL file: one JSON object per line, blank lines skipped; errors
  name the file and the 1-based line. A file whose content starts with ``[`` is read as one JSON array of
  objects instead (errors name the 0-based ``item``), whatever its extension;
- a list (or tuple) of dicts: errors name the 0-based row index;
- a ``datasets.Dataset`` (datasets is imported only when one is passed): errors name the 0-based row index.
  A ``DatasetDict`` is refused: pick a split first.

``adapter`` maps a source row to the format before it is checked: a name in ``hbat.data.ADAPTERS`` or any
callable ``row -> row``. A ``KeyError`` raised by the adapter becomes a DataError naming the missing key.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Iterator

from .adapters import ADAPTERS, FieldProblem
from .errors import DataError

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)

Adapter = Callable[[dict], dict]


def load_sft(source, *, adapter: str | Adapter | None = None, keep_extra: bool = False) -> list[dict]:
    """Rows ``{"prompt", "response"}`` from ``source`` (see the module docstring)."""
    return _load(source, adapter, SFT_FIELDS, non_empty=("response",), keep_extra=keep_extra)


def load_preference(source, *, adapter: str | Adapter | None = None, keep_extra: bool = False) -> list[dict]:
    """Rows ``{"prompt", "chosen", "rejected"}`` from ``source``."""
    return _load(source, adapter, PREFERENCE_FIELDS, non_empty=("chosen", "rejected"), keep_extra=keep_extra)


def load_prompts(source, *, adapter: str | Adapter | None = None, keep_extra: bool = False) -> list[dict]:
    """Rows ``{"prompt"}`` from ``source``. SFT or preference rows are accepted too (their prompt is kept)."""
    return _load(source, adapter, PROMPT_FIELDS, non_empty=("prompt",), keep_extra=keep_extra)


def _resolve_adapter(adapter) -> Adapter | None:
    if adapter is None or callable(adapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}; known adapters: {sorted(ADAPTERS)}")
        return ADAPTERS[adapter]
    raise TypeError(f"adapter must be None, a name in hbat.data.ADAPTERS or a callable, got {type(adapter).__name__}")


def _load(source, adapter, fields: tuple[str, ...], *, non_empty: tuple[str, ...], keep_extra: bool) -> list[dict]:
    adapt = _resolve_adapter(adapter)
    rows = []
    for source_name, where, raw in _iter_source(source):
        if not isinstance(raw, dict):
            raise DataError(source_name, where, None, f"expected a JSON object (dict), got {type(raw).__name__}")
        if adapt is not None:
            try:
                row = adapt(raw)
            except FieldProblem as problem:
                raise DataError(source_name, where, problem.field, str(problem)) from None
            except KeyError as missing:
                key = missing.args[0] if missing.args else "?"
                raise DataError(source_name, where, str(key), f"missing field {key!r}") from None
            if not isinstance(row, dict):
                raise DataError(source_name, where, None, f"adapter returned {type(row).__name__}, not a dict")
        else:
            row = raw
        rows.append(_check_row(row, fields, non_empty, keep_extra, source_name, where))
    return rows


def _check_row(row: dict, fields, non_empty, keep_extra, source_name, where) -> dict:
    for field in fields:
        if field not in row or row[field] is None:
            raise DataError(source_name, where, field, f"missing field {field!r}")
        value = row[field]
        if not isinstance(value, str):
            raise DataError(source_name, where, field,
                            f"field {field!r} must be a string, got {type(value).__name__}")
        if field in non_empty and not value.strip():
            raise DataError(source_name, where, field, f"field {field!r} is empty")
    if keep_extra:
        return dict(row)
    return {field: row[field] for field in fields}


def _iter_source(source) -> Iterator[tuple[str, str, Any]]:
    """Yield (source name, place, raw row) for every row of ``source``."""
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_jsonl(os.fspath(source))
    elif isinstance(source, (list, tuple)):
        for index, row in enumerate(source):
            yield "list", f"row {index}", row
    elif _is_datasets_object(source):
        if not hasattr(source, "column_names") or isinstance(getattr(source, "column_names"), dict):
            raise TypeError("a datasets.DatasetDict holds several splits: pass one, e.g. ds['train']")
        name = f"dataset {getattr(source, 'info', None) and source.info.dataset_name or ''}".strip()
        for index, row in enumerate(source):
            yield name, f"row {index}", row
    else:
        raise TypeError(f"data source must be a .jsonl path, a list of dicts or a datasets.Dataset, "
                        f"got {type(source).__name__}")


def _is_datasets_object(source) -> bool:
    # no import of datasets: a datasets object already implies the module is loaded
    return type(source).__module__.split(".")[0] == "datasets"


def _iter_jsonl(path: str) -> Iterator[tuple[str, str, Any]]:
    if not path:
        raise FileNotFoundError("data file not found: the path is empty")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4096).lstrip().startswith(b"["):
            handle.seek(0)
            yield from _iter_json_array(path, handle.read())
            return
        handle.seek(0)
        for line_number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, line_number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(path, f"line {line_number}", None, f"invalid JSON ({error.msg} at column {error.colno})") from None
            yield path, f"line {line_number}", row


def _decode(data: bytes, path: str, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        raise DataError(path, f"line {line}", None, f"not UTF-8 text (byte 0x{data[error.start]:02x})") from None


def _iter_json_array(path: str, data: bytes) -> Iterator[tuple[str, str, Any]]:
    """A file holding one JSON array of objects (as some releases ship); places are 0-based items."""
    try:
        rows = json.loads(_decode(data, path, 1))
    except json.JSONDecodeError as error:
        raise DataError(path, f"line {error.lineno}", None, f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(rows, list):
        raise DataError(path, "line 1", None, f"expected one JSON array of objects, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield path, f"item {index}", row


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """Write rows as JSONL atomically (temp file + os.replace)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
