"""The errors of hbat.data: a bad row named by where it came from, a bad field inside one, a missing split, a file
that cannot be read."""
from __future__ import annotations

from ..errors import UserError


class DataError(UserError):
    """A row that does not match its format.

    The message names the source (file path, folder, data set name, "list" or "dataset"), the place in it
    (1-based ``line`` of a JSONL file, 0-based ``item`` of a JSON array, or 0-based ``row`` of anything else)
    and the missing or bad field, e.g. ``data/sft.jsonl, line 7: missing field 'response'``. The parts are
    also attributes for programs.
    """

    def __init__(self, source: str, where: str, field: str | None, problem: str):
        self.source = source
        self.where = where
        self.field = field
        self.problem = problem
        super().__init__(f"{source}, {where}: {problem}")


class FieldProblem(KeyError):
    """A field of one row is missing or bad (raised by adapters and formats; the loader adds the source and
    place and raises a DataError). ``field`` is None when the row as a whole matches no format."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(field)
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return self.problem


class SplitError(UserError):
    """The split asked for is not one of the source's (``splits``)."""

    def __init__(self, source: str, split: str, splits: list[str]):
        self.source, self.split, self.splits = source, split, splits
        super().__init__(f"{source} has no split {split!r}; its splits: {', '.join(map(repr, splits))}")


class SourceUnreadable(UserError):
    """A data file that cannot be read at all (e.g. a damaged parquet file): ``source`` names it, ``problem`` says
    why (``cannot be read as a parquet file (ArrowInvalid: ...)``)."""

    def __init__(self, source: str, problem: str):
        self.source, self.problem = source, problem
        super().__init__(f"{source}: {problem}")
