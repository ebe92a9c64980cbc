"""The one exception type for errors a user can cause (bad input, bad config, unknown names)."""

from __future__ import annotations

import os


class HarnessError(Exception):
    """A user-facing error; the CLI prints it on one line and exits with code 2.

    The message names where the problem is: ``file``, ``record`` (index in the file) and ``field``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike | None = None,
        record: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.record = record
        self.field = field
        self.reason = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        message = " ".join(self.reason.split())  # always one line
        return f"{', '.join(where)}: {message}" if where else message
