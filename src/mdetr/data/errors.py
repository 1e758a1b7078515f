"""Errors and problem reports for annotation files and images.

A :class:`Problem` is one thing wrong with one entry of one file; a :class:`DataError` is the exception
that carries it. Both name the file and the entry ("image id 12", "annotation id 40 (image id 12)") so a
user can go straight to the faulty line instead of guessing which of a million samples broke training.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

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


# ----------------------------------------------------------------------------------------------------------
# What a run skipped

# Problems of samples a dataset skipped while loading (``on_error="skip"``) in this process, not yet taken
# by :func:`take_skipped`. A DataLoader worker loads a batch's samples and collates them in one process,
# so the collate function takes them and they travel to the training loop with the batch. Bounded, so a
# dataset indexed without a collate step never grows it without limit.
_SKIPPED_HERE: deque[Problem] = deque(maxlen=10_000)


def record_skipped(problem: Problem) -> None:
    """Note that a sample was skipped because of ``problem`` (called by the datasets)."""
    _SKIPPED_HERE.append(problem)


def take_skipped() -> list[Problem]:
    """The problems recorded in this process since the last call, oldest first (and forget them)."""
    taken = list(_SKIPPED_HERE)
    _SKIPPED_HERE.clear()
    return taken


def skip_report(problems: dict[str, Iterable[Problem]], *, policy: str) -> dict[str, Any]:
    """The report of what a run left out: every error once per split, with how often it was met.

    ``problems`` maps a split name (``"train"``, ``"val"``) to the problems found while building and
    loading it; warnings (things repaired, such as clamped boxes) are counted, not listed. The result is
    JSON-ready: ``{"policy", "skipped": [{"split", "file", "entry", "message", "times"}], "count",
    "warnings"}``, in the order the problems were first met.
    """
    seen: dict[tuple[str, str, str | None, str], int] = {}
    warnings = 0
    for split, found in problems.items():
        for problem in found:
            if problem.severity != "error":
                warnings += 1
                continue
            key = (split, problem.file, problem.entry, problem.message)
            seen[key] = seen.get(key, 0) + 1
    skipped = [{"split": split, "file": file, "entry": entry, "message": message, "times": times}
               for (split, file, entry, message), times in seen.items()]
    return {"policy": policy, "count": len(skipped), "skipped": skipped, "warnings": warnings}


def skip_summary(report: dict[str, Any]) -> str:
    """One line for the log: how many entries each split lost, and where the full list is."""
    if not report["count"]:
        return f"data: nothing skipped ({report['warnings']} warning(s): things repaired on load)"
    per_split: dict[str, int] = {}
    for item in report["skipped"]:
        per_split[item["split"]] = per_split.get(item["split"], 0) + 1
    parts = ", ".join(f"{count} {split}" for split, count in per_split.items())
    first = report["skipped"][0]
    example = _describe(first["file"], first["entry"], first["message"])
    return f"data: skipped {report['count']} entries or annotations ({parts}), e.g. {example}"
