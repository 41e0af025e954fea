"""The one error type of ``fastseg.data``: a problem with the user's data, naming the file."""
from __future__ import annotations

import contextlib
from pathlib import Path


class DataError(ValueError):
    """A file or case that cannot be used: unreadable, unpaired, mismatched or mislabelled.

    The message starts with the offending path and ends with the case id when known, so a user
    with thousands of files can find the one at fault. ``problem`` is the message without them,
    ``path`` and ``case_id`` are kept as attributes for reports.
    """

    def __init__(self, problem: str, path: str | Path | None = None, case_id: str | None = None):
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.case_id = case_id
        message = problem if path is None else f"{path}: {problem}"
        super().__init__(message if case_id is None else f"{message} [case {case_id}]")

    def __reduce__(self):
        # Keep path and case id when the error crosses a DataLoader worker or a pickle.
        return DataError, (self.problem, self.path, self.case_id)


@contextlib.contextmanager
def in_case(case_id: str):
    """Tag every :class:`DataError` raised inside the block with ``case_id``."""
    try:
        yield
    except DataError as err:
        raise DataError(err.problem, err.path, case_id) from err
