"""Errors about a run's inputs, which `run.py` prints as one message (no traceback) and exits non-zero on.

A missing input names the file and the key to set (`MissingFileError`); a corrupt one names the file and the
underlying error (`CorruptFileError`), so the two are never confused: a truncated checkpoint is not "missing".
"""

from pathlib import Path
from typing import Union


class MissingFileError(FileNotFoundError):
    """An input file is not on this machine; the message says which, the key to set and where to get it."""


class CorruptFileError(ValueError):
    """An input file exists but cannot be read; the message names it and the reader's own error.

    Args:
        path: the file (or folder) that failed to load.
        what: what it is, e.g. "The DrawBench prompt CSV".
        error: the reader's exception.
        fix: what to do about it.
    """

    def __init__(self, path: Union[str, Path], what: str, error: BaseException, fix: str = "") -> None:
        self.path = Path(path)
        super().__init__(f"{what} at {path} exists but cannot be read: {type(error).__name__}: {error}. "
                         f"{fix or 'Replace it with a complete copy.'}")
