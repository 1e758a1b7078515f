"""What the training loop does about numerical faults and skipped data.

:class:`FaultTracker` holds, for one run, the count of optimizer steps skipped because the loss or the
gradient was NaN or infinite (and how many of those came in a row), and the problems of the samples the
datasets skipped under ``data.on_error="skip"``. At the end of a run :func:`write_skip_report` writes
them to ``skipped.json`` in the run folder.

A step is judged on the loss and on the total gradient norm after ``backward()``. Under data-parallel
training the gradients are averaged across processes before that norm is taken, so a NaN on one process
makes every process skip the same step and the replicas stay identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdetr.data.errors import Problem, skip_report, skip_summary

SKIP_REPORT_FILE = "skipped.json"


class NonFiniteLossError(RuntimeError):
    """Too many batches in a row had a NaN or infinite loss or gradient; the message names their image ids."""


def gradient_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients together (0 when there are none); NaN or Inf if any gradient is."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _value(x: torch.Tensor) -> float | str:
    """A loss or norm for the JSON log: a float, or its name ("nan", "inf") when not finite."""
    value = float(x)
    return value if math.isfinite(value) else str(value)


@dataclass
class FaultTracker:
    """Counts of skipped steps and skipped samples of one run (see the module docstring).

    ``max_nonfinite_in_a_row``: how many consecutive non-finite batches end the run.
    """

    max_nonfinite_in_a_row: int
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    recent_batches: list[str] = field(default_factory=list)
    skipped_samples: list[Problem] = field(default_factory=list)

    def note_skipped_samples(self, problems: Sequence[Problem]) -> None:
        """Keep the problems of samples a dataset dropped while loading a batch."""
        self.skipped_samples.extend(problems)

    def check_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, *, image_ids: list[Any], epoch: int,
                   step: int) -> dict[str, Any] | None:
        """None when loss and gradient norm are finite (the step may go ahead); else the log record of
        the skipped step.

        Raises :class:`NonFiniteLossError` naming the image ids of every batch of the run of skipped
        steps once it reaches ``max_nonfinite_in_a_row``.
        """
        loss_ok, grad_ok = bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm))
        if loss_ok and grad_ok:
            self.nonfinite_in_a_row = 0
            self.recent_batches.clear()
            return None
        what = "loss" if not loss_ok else "gradient"
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        value = _value(loss if not loss_ok else grad_norm)
        self.recent_batches.append(f"epoch {epoch} step {step}: {what} {value}, image ids {image_ids}")
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"stopping: {self.nonfinite_in_a_row} batches in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_in_a_row={self.max_nonfinite_in_a_row}); the last at epoch {epoch}, "
                f"step {step}, image ids {image_ids}. All of them: " + "; ".join(self.recent_batches)
            )
        return {"type": "nonfinite", "epoch": epoch, "step": step, "what": what, "loss": _value(loss),
                "grad_norm": _value(grad_norm), "image_ids": image_ids, "in_a_row": self.nonfinite_in_a_row,
                "nonfinite_total": self.nonfinite_total}


def write_skip_report(
    folder: Path, problems: dict[str, Iterable[Problem]], *, policy: str
) -> tuple[dict[str, Any], str]:
    """Write ``skipped.json`` (:func:`mdetr.data.errors.skip_report`) into ``folder``; returns the report
    and its one-line summary."""
    report = skip_report(problems, policy=policy)
    (folder / SKIP_REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report, skip_summary(report)
