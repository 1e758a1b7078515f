"""The CLEVR family's question files (CLEVR v1.0, CLEVR CoGenT, CLEVR-Humans) as question-answering data.

**CLEVR v1.0 / CoGenT** (``CLEVR_{split}_questions.json``; CoGenT splits ``trainA``, ``valA``, ``valB``,
``testA``, ``testB``): ``{"info": {...}, "questions": [{"image_index", "image_filename", "question",
"answer", "question_index", "question_family_index", "program": [{"function" (or "type"), "inputs",
"value_inputs"}, ...]}, ...]}``; the test splits have no answers and no programs. Images are
``images/{split}/{image_filename}``.

**CLEVR-Humans** (``CLEVR-Humans-{train,val,test}.json``): the same layout with human-written questions on
CLEVR images, answers from CLEVR's answer space and no programs.

The question family of the per-family accuracy table (the official README; MDETR Table 1 gives the overall
accuracy) comes from the last function of the program (:func:`clevr_question_family`): ``count``;
``exist``; ``compare_number`` (``equal_integer``, ``less_than``, ``greater_than``); ``query_attribute``
(``query_*``); ``compare_attribute`` (``equal_*``).
Questions without a program (CLEVR-Humans) have the family ``unknown``.

These files have no boxes: :class:`ClevrQuestions` reads one as a question-answering set whose entries have
none (the official ``clevr_question`` dataset), for answer-only training (``loss.detection_losses=false``,
the CLEVR-Humans recipe) and evaluation. Training with boxes uses MDETR's converted CLEVR files
(``clevr_annotations``: ``full/{train,val}.json``, ``medium/...``, ``cogent_*/...``; COCO-like, the
question as ``caption``, ``answer``, boxes with ``tokens`` spans; CLEVR-Ref+ boxes also with ``isfinal``),
which :class:`~mdetr.data.modulated.ModulatedDetection` reads as they are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mdetr.data.questions import ImageSize, QuestionFileDataset

FAMILIES = ("count", "exist", "compare_number", "query_attribute", "compare_attribute")
"""The CLEVR paper's question families, in the order of its accuracy table."""
UNKNOWN_FAMILY = "unknown"
_COMPARE_NUMBER = {"equal_integer", "less_than", "greater_than"}


def program_function(node: Mapping[str, Any]) -> str:
    """A program node's function name (``function`` in CLEVR v1.0, ``type`` in the generator's output)."""
    return str(node.get("function", node.get("type", "")))


def clevr_question_family(program: Sequence[Mapping[str, Any]] | None) -> str:
    """The family of a question from its program's last function (:data:`FAMILIES`, else ``unknown``)."""
    if not program:
        return UNKNOWN_FAMILY
    function = program_function(program[-1])
    if function in ("count", "exist"):
        return function
    if function in _COMPARE_NUMBER:
        return "compare_number"
    if function.startswith("query_"):
        return "query_attribute"
    if function.startswith("equal_"):
        return "compare_attribute"
    return UNKNOWN_FAMILY


def entry_family(entry: Mapping[str, Any]) -> str:
    """The family of an MDETR-format QA entry: its ``question_type``, else from a CLEVR ``program`` list."""
    if entry.get("question_type"):
        return str(entry["question_type"])
    program = entry.get("program")
    return clevr_question_family(program) if isinstance(program, list) else UNKNOWN_FAMILY


def clevr_questions_to_mdetr(data: Mapping[str, Any], *, image_size: ImageSize | None = None,
                             dataset_name: str = "clevr") -> dict[str, Any]:
    """The MDETR-format dict of a CLEVR-family questions file: one entry per question, no boxes.

    Each entry has the question as ``caption``, ``answer`` (when the split has answers), its family as
    ``question_type``, ``questionId`` (the question's ``question_index``, else its position) and the image's
    ``image_index`` as ``original_id``; width and height from ``image_size`` (0 when unknown).
    """
    images = []
    for position, question in enumerate(data["questions"]):
        file_name = str(question["image_filename"])
        width, height = (image_size(file_name) if image_size else None) or (0, 0)
        entry: dict[str, Any] = {
            "id": position + 1, "file_name": file_name, "height": height, "width": width,
            "caption": str(question["question"]), "dataset_name": dataset_name, "tokens_negative": [],
            "original_id": question.get("image_index", -1),
            "questionId": int(question.get("question_index", position)),
            "question_type": clevr_question_family(question.get("program")),
        }
        if "answer" in question:
            entry["answer"] = str(question["answer"])
        images.append(entry)
    return {"info": dict(data.get("info") or {}), "licenses": [], "images": images, "annotations": [],
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}


class ClevrQuestions(QuestionFileDataset):
    """A CLEVR / CoGenT / CLEVR-Humans questions file as a question-answering set without boxes; image sizes
    are read from the image headers under ``image_root`` (``images/{split}``)."""

    def convert(self, data: Any, image_size: ImageSize) -> dict:
        name = "clevr_humans" if "humans" in Path(self.file).stem.lower() else "clevr"
        return clevr_questions_to_mdetr(data, image_size=image_size, dataset_name=name)


def write_clevr_predictions(path: str | os.PathLike, ground_truth: Mapping[str, Any],
                            answers: Mapping[int, str]) -> int:
    """``{split}_predictions.txt`` as the official ``eval_clevr.py``: one answer per line, ordered by
    ``questionId`` (entry id when absent). Returns the number of lines."""
    entries = [e for e in ground_truth["images"] if e["id"] in answers]

    def order(entry: Mapping[str, Any]) -> tuple[int, Any]:
        qid = entry.get("questionId", entry["id"])
        return (0, int(qid)) if str(qid).lstrip("-").isdigit() else (1, str(qid))

    lines = [answers[e["id"]] for e in sorted(entries, key=order)]
    Path(path).write_text("".join(f"{line}\n" for line in lines))
    return len(lines)


__all__ = ["ClevrQuestions", "FAMILIES", "UNKNOWN_FAMILY", "clevr_question_family",
           "clevr_questions_to_mdetr", "entry_family", "program_function", "write_clevr_predictions"]
