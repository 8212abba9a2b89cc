"""Where rows come from: files, folders, data set names, lists and ``datasets`` objects, each row with its place.

``iter_source(source, split)`` yields ``(source name, place, raw row)`` for every row:

- a path (str or os.PathLike) to a file ending in ``.parquet``: read with pyarrow, places ``row N`` (0-based);
- a path to any other file: JSONL (one JSON object per line, blank lines skipped; places ``line N``, 1-based),
  or one JSON array of objects when the content starts with ``[`` (places ``item N``, 0-based), UTF-8;
- a folder written by ``save_to_disk`` (a Dataset, or a DatasetDict: the ``split`` is picked):
  ``datasets.load_from_disk``;
- any other folder: ``datasets.load_dataset(folder)`` (its parquet, JSON or CSV files), then the ``split``;
- a string that is no file or folder and looks like a data set name (``name`` or ``owner/name``, no data file
  extension): ``datasets.load_dataset(name)``, which finds the hub, or offline (``HF_HUB_OFFLINE=1``) its local
  cache; then the ``split``;
- a list (or tuple) of dicts, places ``row N``;
- a ``datasets.Dataset`` / ``IterableDataset`` (used whole) or ``DatasetDict`` (the ``split`` is picked).

A file, and a folder of one Dataset, hold one split (``"train"``, or the Dataset's own); another ``split`` is
refused like a split a DatasetDict lacks (SplitError, naming the splits there are). ``datasets`` and pyarrow
are imported only for the sources that need them. No source runs code: hbat never passes
``trust_remote_code``, and ``datasets`` 4 and later has no loading scripts.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

from ..errors import reason
from .errors import DataError, SourceUnreadable, SplitError

Place = tuple[str, str, Any]  # (source name, place in it, raw row)

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow", ".txt")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SINGLE_FILE_SPLIT = "train"


def looks_like_dataset_name(text: str) -> bool:
    """``name`` or ``owner/name`` without a data file extension (``data/sft.jsonl`` is a missing file, not a name)."""
    return bool(_DATASET_NAME.match(text)) and not text.lower().endswith(DATA_FILE_SUFFIXES)


def iter_source(source, split: str = SINGLE_FILE_SPLIT) -> Iterator[Place]:
    """Every row of ``source`` with its place (module docstring)."""
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_path(os.fspath(source), split)
    elif isinstance(source, (list, tuple)):
        for index, row in enumerate(source):
            yield "list", f"row {index}", row
    elif _is_datasets_object(source):
        yield from _iter_dataset(source, _dataset_name(source), split)
    else:
        raise TypeError(f"data source must be a path (a JSONL, JSON or parquet file, a folder), a data set name, a "
                        f"list of dicts or a datasets.Dataset, got {type(source).__name__}")


def _is_datasets_object(source) -> bool:
    # no import of datasets: a datasets object already implies the module is loaded
    return type(source).__module__.split(".")[0] == "datasets"


def _dataset_name(ds) -> str:
    info = getattr(ds, "info", None)
    return f"dataset {getattr(info, 'dataset_name', None) or ''}".strip()


def _iter_dataset(ds, name: str, split: str, *, strict: bool = False) -> Iterator[Place]:
    """The rows of a Dataset, or of the ``split`` of a DatasetDict; ``strict``: a Dataset (a folder of one
    split) is refused for a split other than "train" or its own."""
    if isinstance(ds, dict):  # DatasetDict / IterableDatasetDict
        if split not in ds:
            raise SplitError(name, split, sorted(ds))
        ds, name = ds[split], f"{name} (split {split!r})"
    elif strict and split not in (SINGLE_FILE_SPLIT, str(getattr(ds, "split", None))):
        raise SplitError(name, split, [str(getattr(ds, "split", None) or SINGLE_FILE_SPLIT)])
    for index, row in enumerate(ds):
        yield name, f"row {index}", row


def _iter_path(path: str, split: str) -> Iterator[Place]:
    if not path:
        raise FileNotFoundError("data file not found: the path is empty")
    if os.path.isfile(path):
        if split != SINGLE_FILE_SPLIT:
            raise SplitError(path, split, [SINGLE_FILE_SPLIT])
        yield from (_iter_parquet(path) if path.lower().endswith(".parquet") else _iter_json(path))
    elif os.path.isdir(path):
        yield from _iter_dataset(_load_folder(path), path, split, strict=True)
    elif looks_like_dataset_name(path):
        yield from _iter_dataset(_load_named(path), path, split)
    else:
        raise FileNotFoundError(f"data file not found: {path}")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a data set folder or name needs the datasets package (pip install datasets)") \
            from None
    return datasets


def _load_folder(path: str):
    datasets = _datasets()
    if any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")):
        return _loaded(datasets.load_from_disk, path, f"{path}: datasets.load_from_disk cannot load it")  # save_to_disk
    return _loaded(datasets.load_dataset, path, f"{path}: datasets.load_dataset cannot load the folder")


def _load_named(name: str):
    return _loaded(_datasets().load_dataset, name, f"data set {name!r} is no file or folder, and "
                                                   "datasets.load_dataset cannot load it")


def _loaded(load, source: str, problem: str):
    """``load(source)``; any failure (offline, not found, unreadable) becomes one error: ``problem (reason)``."""
    try:
        return load(source)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one message with the source and reason
        reason = " ".join(str(exc).split())[:300]
        raise FileNotFoundError(f"{problem} ({type(exc).__name__}: {reason})") from None


def _iter_parquet(path: str) -> Iterator[Place]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet files needs pyarrow (pip install datasets)") from None
    index, batches = 0, None
    while True:
        try:  # pyarrow's errors name no file (e.g. "Parquet file size is 208 bytes, smaller than ..."): add it
            batches = batches or iter(pq.ParquetFile(path).iter_batches(batch_size=1024))
            rows = next(batches).to_pylist()
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise SourceUnreadable(path, f"cannot be read as a parquet file ({reason(exc)})") from None
        for row in rows:
            yield path, f"row {index}", row
            index += 1


def _iter_json(path: str) -> Iterator[Place]:
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
                raise DataError(path, f"line {line_number}", None,
                                f"invalid JSON ({error.msg} at column {error.colno})") from None
            yield path, f"line {line_number}", row


def _decode(data: bytes, path: str, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        raise DataError(path, f"line {line}", None, f"not UTF-8 text (byte 0x{data[error.start]:02x})") from None


def _iter_json_array(path: str, data: bytes) -> Iterator[Place]:
    """A file holding one JSON array of objects (as some releases ship); places are 0-based items."""
    try:
        rows = json.loads(_decode(data, path, 1))
    except json.JSONDecodeError as error:
        raise DataError(path, f"line {error.lineno}", None,
                        f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(rows, list):
        raise DataError(path, "line 1", None, f"expected one JSON array of objects, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield path, f"item {index}", row
