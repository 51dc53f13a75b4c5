"""`DataError`: a problem in the user's data, said so that the user can fix it.

Instruction data is hand-made, scraped and concatenated; it is the input most likely to be
wrong, and a stack trace from deep inside a tokenizer helps nobody. Every problem we detect in a
data file raises `DataError`, which carries *where* (`path`, and `line`: 1-based line of a JSON
Lines file or of the start of the offending record in a JSON array, row of a CSV), *what* (`field`,
the message) and *what to do* (the hint), and prints as

    data.jsonl:17: field 'output' must be a non-empty string (got int). Fix the record or remove it.

It subclasses `ValueError`, so code that catches bad values keeps working. Errors found before the
location is known (while encoding one example) are raised without one and re-raised by the caller
with `at(path, line)`.
"""

from __future__ import annotations

DEFAULT_HINT = "Fix the record or remove it."


class DataError(ValueError):
    """A problem in a data file, located (`path`, `line`, `index`, `field`) and explained."""

    def __init__(
        self,
        path: str | None,
        line: int | None,
        message: str,
        *,
        field: str | None = None,
        index: int | None = None,
        hint: str = DEFAULT_HINT,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.index = index  # the record's position in a JSON array (0-based), when it is one
        self.message = message
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.path or "<data>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        record = "" if self.index is None else f"record {self.index} of the array: "
        hint = f" {self.hint}" if self.hint else ""
        return f"{where}: {record}{self.message}.{hint}"

    def at(self, path: str | None, line: int | None, index: int | None = None) -> DataError:
        """The same error, located in `path` at `line` (and array `index`)."""
        return DataError(path, line, self.message, field=self.field, index=index, hint=self.hint)
