"""GQA answer accuracy (MDETR Table 5) and the GQA submission file.

Accuracy is exact match of the predicted answer word with the question's ``answer``, as the GQA evaluation
script and the leaderboard score it, reported over all questions, per semantic type (obj, attr, rel,
global, cat: the official per-type accuracies) and per structural type (verify, query, choose, logical,
compare) when the entries carry it. Questions without an answer (test-dev's public copy has them; test,
challenge and submission do not) are predicted but not scored.

The submission file is a JSON list ``[{"questionId": str, "prediction": str}, ...]`` (the format of the
GQA evaluation server and of the official ``scripts/eval_gqa.py``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mdetr.data.gqa import STRUCTURAL_TYPES, normalise_entry
from mdetr.eval.coco import GroundTruth, load_ground_truth
from mdetr.models.heads import GQA_ANSWER_TYPES

__all__ = ["GQAEvaluator", "grouped_accuracy", "write_submission"]


def grouped_accuracy(keys: Sequence[str], correct: Sequence[bool],
                     order: Sequence[str] = ()) -> tuple[dict[str, float], dict[str, int]]:
    """Accuracy and count per key; keys of ``order`` first in that order, the others alphabetically."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for key, ok in zip(keys, correct, strict=True):
        hits[key].append(ok)
    names = [k for k in order if k in hits] + sorted(k for k in hits if k not in order)
    return {k: sum(hits[k]) / len(hits[k]) for k in names}, {k: len(hits[k]) for k in names}


class GQAEvaluator:
    """Exact-match accuracy of predicted answers for the questions of an MDETR-format GQA file.

    Args:
        ground_truth: the MDETR-format dict (or path); entries need ``id`` and, to be scored, ``answer``;
            ``question_type`` (semantic type, ``answer_type`` accepted) and ``structural_type`` give the
            breakdowns; ``questionId`` names the question in the submission (the entry id when absent).

    ``update({entry id: answer})`` adds predictions; ``summarize()`` returns ``accuracy``, ``num_questions``
    (scored), ``num_predicted``, ``per_type`` / ``type_counts`` and ``per_structural_type`` /
    ``structural_counts``; ``submission()`` the records of every predicted question, in file order.
    """

    def __init__(self, ground_truth: GroundTruth) -> None:
        data = load_ground_truth(ground_truth)
        self._entries = {int(e["id"]): normalise_entry(dict(e)) for e in data["images"]}
        self._order = [int(e["id"]) for e in data["images"]]
        self._answers: dict[int, str] = {}

    def update(self, predictions: Mapping[int, str]) -> None:
        for raw_id, answer in predictions.items():
            image_id = int(raw_id)
            if image_id not in self._entries:
                raise ValueError(f"prediction for entry {image_id}, which is not in the ground truth")
            self._answers[image_id] = str(answer)

    def summarize(self) -> dict[str, Any]:
        scored = [i for i in self._order if i in self._answers and "answer" in self._entries[i]]
        correct = [self._answers[i] == str(self._entries[i]["answer"]) for i in scored]
        summary: dict[str, Any] = {"accuracy": sum(correct) / len(correct) if correct else 0.0,
                                   "num_questions": len(scored), "num_predicted": len(self._answers)}
        types = [str(self._entries[i].get("question_type", "unknown")) for i in scored]
        summary["per_type"], summary["type_counts"] = grouped_accuracy(types, correct, GQA_ANSWER_TYPES)
        with_structure = [k for k, i in enumerate(scored) if "structural_type" in self._entries[i]]
        if with_structure:
            structural = [str(self._entries[scored[k]]["structural_type"]) for k in with_structure]
            summary["per_structural_type"], summary["structural_counts"] = grouped_accuracy(
                structural, [correct[k] for k in with_structure], STRUCTURAL_TYPES)
        return summary

    def submission(self) -> list[dict[str, str]]:
        """``[{"questionId": str, "prediction": str}]`` for every predicted question, in file order."""
        return [{"questionId": str(self._entries[i].get("questionId", i)), "prediction": self._answers[i]}
                for i in self._order if i in self._answers]


def write_submission(path: str | os.PathLike, records: Sequence[Mapping[str, str]]) -> None:
    """Write the GQA submission JSON (a list of ``{"questionId", "prediction"}``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(list(records)))
