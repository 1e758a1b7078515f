"""Errors and problem reports for annotation files and images.

A :class:`Problem` is one thing wrong with one entry of one file; a :class:`DataError` is the exception
that carries it. Both name the file and the entry ("image id 12", "annotation id 40 (image id 12)") so a
user can go straight to the faulty line instead of guessing which of a million samples broke training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


def _describe(file: str, entry: str | None, message: str) -> str:
    where = f"{file}, {entry}" if entry else file
    text = f"{where}: {message}"
    return text if text.endswith((".", "?", "!")) else text + "."


@dataclass(frozen=True)
class Problem:
    """One problem found in an annotation file or one of its images.

    ``severity`` is ``"error"`` for something the dataset refuses (or drops under ``on_error="skip"``) and
    ``"warning"`` for something it repairs on its own, such as a box reaching past the image border, which
    is clamped when loaded.
    """

    file: str
    entry: str | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return _describe(self.file, self.entry, self.message)

    def to_error(self) -> DataError:
        return DataError(self.message, file=self.file, entry=self.entry)


class DataError(ValueError):
    """Bad input data, naming the file (or image path) and the entry it was found in.

    ``str(error)`` reads as one sentence, e.g.
    ``"train.json, annotation id 40 (image id 12): span [3, 90) lies outside the caption (20 characters)."``
    """

    def __init__(self, message: str, *, file: str | None = None, entry: str | None = None) -> None:
        # ``file`` may be omitted so that a DataLoader worker can re-raise the error in the main process
        # from its text alone (it calls ``type(err)(text)``); the text then already names file and entry.
        self.file = file or ""
        self.entry = entry
        self.message = message
        super().__init__(_describe(file, entry, message) if file else message)

    @property
    def problem(self) -> Problem:
        return Problem(file=self.file, entry=self.entry, message=self.message)
