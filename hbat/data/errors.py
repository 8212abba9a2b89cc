"""The one error type of hbat.data: a bad row, named by where it came from."""


class DataError(ValueError):
    """A row that does not match its format.

    The message names the source (file path, "list" or "dataset"), the place in it (1-based ``line`` of a
    JSONL file, or 0-based ``row`` index of a list / data set) and the missing or bad field, e.g.
    ``data/sft.jsonl, line 7: missing field 'response'``. The parts are also attributes for programs.
    """

    def __init__(self, source: str, where: str, field: str | None, problem: str):
        self.source = source
        self.where = where
        self.field = field
        self.problem = problem
        super().__init__(f"{source}, {where}: {problem}")
