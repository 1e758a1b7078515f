"""GQA question answering data (MDETR Section 4.4): both published formats, and the answer vocabularies.

**MDETR's converted files**
(``finetune_gqa_{train,val,testdev,test,challenge,submission}_{all,balanced}.json``, COCO-like): one
image entry per question with the question as ``caption``, ``questionId``, ``answer``, the semantic type
(``question_type``; ``answer_type`` is read as a synonym), ``file_name`` = ``{imageId}.jpg``, and one box
per object the question mentions (``tokens_positive`` spans).

**The original release** (``questions1.2/{split}_{all,balanced}_questions.json``):
``{questionId: {"imageId", "question", "answer", "types": {"structural", "semantic", "detailed"},
"annotations": {"question": {"i" or "i:j": objectId, ...}, ...}, ...}}``, where ``"i:j"`` names the
question's words i..j-1 (words split on spaces). Boxes come from the scene graphs
(``{split}_sceneGraphs.json``: ``{imageId: {"width", "height", "objects": {objectId: {"name", "x", "y",
"w", "h", ...}}}}``, train and val only), looked up beside the questions file or in a sibling
``sceneGraphs/`` folder; without them the questions have no boxes (test-dev, test, challenge, submission)
and image sizes are read from the image files. :func:`gqa_questions_to_mdetr` converts (also ``mdetr data
gqa``); :class:`GQAQuestions` reads such a file directly.

**Answer vocabularies.** The split heads (obj, attr, rel, global, cat) each classify over the answers of
their semantic type in the training data (:func:`build_answer_vocab`), plus ``"unknown"``, the class any
other answer is trained as (as the official code). They are stored in the model config
(``model.qa_answers``) so a checkpoint maps class ids back to words. The official vocabulary file
``gqa_answer2id_by_type.json`` (``{"answer_obj": {answer: id}, ...}``) or ``gqa_answer2id.json`` (the
unified head's) is read by :func:`read_answer_vocab`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mdetr.config import DataConfig
from mdetr.data.errors import DataError, Problem
from mdetr.data.modulated import ModulatedDetection
from mdetr.data.questions import (
    ImageSize,
    QuestionFileDataset,
    header_image_sizes,
    load_json,
    question_file_format,
)
from mdetr.data.validate import image_entry_name, read_annotation_file
from mdetr.models.heads import GQA_ALL_ANSWERS, GQA_ANSWER_TYPES, GQA_UNKNOWN_ANSWER

DATASET_NAME = "gqa"
STRUCTURAL_TYPES = ("verify", "query", "choose", "logical", "compare")
"""GQA's structural types, in the order of its evaluation script."""
_TRAILING_PUNCTUATION = "?.,!;:"
ANSWER_WORDS = ("What", "what", "Who", "who", "Where", "where")
"""The question words an answer's objects are aligned to when the question names them nowhere else (in
this order of preference, as the official conversion)."""


# ------------------------------------------------------------------------------------------------ reading


def normalise_entry(entry: dict) -> dict:
    """An MDETR GQA entry with ``question_type`` (from ``answer_type`` when only that is given) and a
    string ``questionId``; changed in place and returned.

    The official conversion writes ``"answer": null`` and ``"question_type": null`` for the test,
    challenge and submission questions: such keys are removed, so those questions read as unanswered.
    """
    for key in ("answer", "question_type", "answer_type"):
        if key in entry and entry[key] is None:
            del entry[key]
    if "question_type" not in entry and "answer_type" in entry:
        entry["question_type"] = entry["answer_type"]
    if "questionId" in entry:
        entry["questionId"] = str(entry["questionId"])
    return entry


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character span of each space-separated word, trailing punctuation excluded ("dark?" -> "dark")."""
    spans = []
    for match in re.finditer(r"\S+", text):
        beg, end = match.span()
        while end - 1 > beg and text[end - 1] in _TRAILING_PUNCTUATION:
            end -= 1
        spans.append((beg, end))
    return spans


def word_range_span(text: str, key: str) -> tuple[int, int] | None:
    """The character span of a GQA annotation key: ``"i"`` (word i) or ``"i:j"`` (words i..j-1)."""
    words = word_spans(text)
    first, _, last = key.partition(":")
    try:
        i = int(first)
        j = int(last) if last else i + 1
    except ValueError:
        return None
    if not 0 <= i < j <= len(words):
        return None
    return words[i][0], words[j - 1][1]


def _split_of(path: Path) -> str:
    """``"val"`` for ``val_balanced_questions.json`` / ``val_all_questions.json`` / ``val_questions.json``."""
    return re.sub(r"(_(all|balanced))?_questions(_\d+)?$", "", path.stem)


def find_scene_graphs(questions_file: str | os.PathLike) -> Path | None:
    """``{split}_sceneGraphs.json`` beside the questions file, or in ``../sceneGraphs/``; None if absent."""
    path = Path(questions_file)
    name = f"{_split_of(path)}_sceneGraphs.json"
    parents = path.parent, path.parent.parent / "sceneGraphs", path.parent.parent.parent / "sceneGraphs"
    for folder in parents:
        if (folder / name).is_file():
            return folder / name
    return None


def implicit_mentions(record: Mapping[str, Any],
                      aligned: set[str]) -> list[tuple[tuple[int, int] | None, str]]:
    """(span, objectId) of the objects a question uses without its word annotations naming them, aligned as
    the official conversion (``gqa_coco_format.py``) does.

    1. An object its program selects (a ``select`` operation with the argument ``"name (objectId)"``) is
       aligned to the first occurrence of the name in the question.
    2. An object of the answer's annotations is aligned to the question word of the first of
       :data:`ANSWER_WORDS` that the question contains ("What is on the table?" -> "What").

    Spans are None where the word is not in the question (such objects are left out).
    """
    question = str(record["question"])
    found: list[tuple[tuple[int, int] | None, str]] = []
    for operation in record.get("semantic") or []:
        object_id = re.search(r"\((\d+)\)", str(operation.get("argument", "")))
        name = re.match(r"\s*([A-Za-z][A-Za-z ]*?)\s*\(", str(operation.get("argument", "")))
        if operation.get("operation") != "select" or object_id is None or name is None:
            continue
        if object_id.group(1) not in aligned:
            beg = question.find(name.group(1))
            found.append(((beg, beg + len(name.group(1))) if beg >= 0 else None, object_id.group(1)))
    seen = aligned | {o for _, o in found}
    word = next((w for w in ANSWER_WORDS if w in question), None)
    for object_id in ((record.get("annotations") or {}).get("answer") or {}).values():
        if str(object_id) not in seen:
            beg = question.find(word) if word else -1
            found.append(((beg, beg + len(word)) if word and beg >= 0 else None, str(object_id)))
            seen.add(str(object_id))
    return found


def gqa_questions_to_mdetr(questions: Mapping[str, Mapping[str, Any]],
                           scene_graphs: Mapping[str, Mapping[str, Any]] | None = None, *,
                           image_size: ImageSize | None = None) -> dict[str, Any]:
    """The MDETR-format dict of GQA questions (questionId -> question record).

    Image sizes come from the scene graph, else from ``image_size`` (``{imageId}.jpg`` -> (w, h)); an image
    with neither gets width and height 0 (a dataset reports and drops it). Each object of the scene graph
    that the question's annotations name becomes a box, aligned to the words naming it (all of them, one
    span each), and so does each object the question uses without naming it (:func:`implicit_mentions`);
    objects the scene graph lacks are left out.
    """
    scene_graphs = scene_graphs or {}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for question_id, record in questions.items():
        image_id = str(record["imageId"])
        caption = str(record["question"])
        graph = scene_graphs.get(image_id)
        file_name = f"{image_id}.jpg"
        if graph is not None:
            width, height = int(graph["width"]), int(graph["height"])
        else:
            width, height = (image_size(file_name) if image_size else None) or (0, 0)
        types = record.get("types") or {}
        entry = {"id": len(images) + 1, "file_name": file_name, "height": height, "width": width,
                 "caption": caption, "dataset_name": DATASET_NAME, "tokens_negative": [],
                 "original_id": image_id, "questionId": str(question_id)}
        if "answer" in record:
            entry["answer"] = str(record["answer"])
        for key, field in (("semantic", "question_type"), ("structural", "structural_type"),
                           ("detailed", "detailed_type")):
            if types.get(key):
                entry[field] = str(types[key])
        images.append(entry)
        if graph is None:
            continue
        spans_of: dict[str, list[list[int]]] = {}
        mentioned = [(word_range_span(caption, str(key)), str(object_id))
                     for key, object_id in ((record.get("annotations") or {}).get("question") or {}).items()]
        for span, object_id in mentioned + implicit_mentions(record, {o for _, o in mentioned}):
            if span is not None and object_id in graph.get("objects", {}):
                spans_of.setdefault(object_id, []).append(list(span))
        for object_id, spans in spans_of.items():
            obj = graph["objects"][object_id]
            bbox = [float(obj["x"]), float(obj["y"]), float(obj["w"]), float(obj["h"])]
            annotations.append({"id": len(annotations) + 1, "image_id": entry["id"], "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0, "category_id": 1,
                                "tokens_positive": sorted(spans), "original_id": object_id})
    return {"info": {"description": "GQA questions in the MDETR format"}, "licenses": [], "images": images,
            "annotations": annotations,
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}


def read_gqa_file(path: str | os.PathLike, *, scene_graphs: str | os.PathLike | None = None,
                  image_size: ImageSize | None = None) -> dict[str, Any]:
    """An MDETR-format dict from either GQA format (entries normalised by :func:`normalise_entry`).

    Raises :class:`DataError` naming the file when it cannot be read.
    """
    if question_file_format(path) == "gqa":
        questions, problems = load_json(path)
        if questions is None:
            raise problems[0].to_error()
        graphs_file = scene_graphs or find_scene_graphs(path)
        graphs = None
        if graphs_file is not None:
            graphs, problems = load_json(graphs_file)
            if graphs is None:
                raise problems[0].to_error()
        return gqa_questions_to_mdetr(questions, graphs, image_size=image_size)
    data, problems = read_annotation_file(path)
    if data is None:
        raise next(p for p in problems if p.severity == "error").to_error()
    for entry in data["images"]:
        if isinstance(entry, dict):
            normalise_entry(entry)
    return data


class GQAQuestions(QuestionFileDataset):
    """A GQA questions file of the original release (``{split}_{all,balanced}_questions.json``) as an MDETR
    dataset; boxes from the scene graphs found by :func:`find_scene_graphs` (or ``scene_graphs``)."""

    def __init__(self, ann_file: str | os.PathLike, image_root: Any, *,
                 scene_graphs: str | os.PathLike | None = None, **kwargs: Any) -> None:
        self._scene_graphs_file = scene_graphs or find_scene_graphs(ann_file)
        super().__init__(ann_file, image_root, **kwargs)

    def convert(self, data: Any, image_size: ImageSize) -> dict:
        graphs = None
        if self._scene_graphs_file is not None:
            graphs, problems = load_json(self._scene_graphs_file)
            if graphs is None:
                raise problems[0].to_error()
        return gqa_questions_to_mdetr(data, graphs, image_size=image_size)


class GQAFile(ModulatedDetection):
    """MDETR's converted GQA file: entries normalised by :func:`normalise_entry` (``answer_type`` read as
    ``question_type``, string question ids, null answers dropped).

    The official conversion gives every question of ``finetune_gqa_submission_*.json`` the placeholder size
    800 x 400; an entry without an answer and without boxes, whose size matters to nothing, therefore takes
    its image's real size (read from the file header) instead of failing the size check.
    """

    def __init__(self, ann_file: str | os.PathLike, image_root: Any, **kwargs: Any) -> None:
        self._image_root_for_sizes = image_root
        super().__init__(ann_file, image_root, **kwargs)

    def _read_annotations(self, ann_file: str | os.PathLike) -> tuple[dict | None, list[Problem]]:
        data, problems = read_annotation_file(ann_file)
        if data is None:
            return data, problems
        boxed = {a.get("image_id") for a in data["annotations"] if isinstance(a, dict)}
        sizes = None if isinstance(self._image_root_for_sizes, Mapping) else header_image_sizes(
            self._image_root_for_sizes)
        for entry in data["images"]:
            if not isinstance(entry, dict):
                continue
            normalise_entry(entry)
            if sizes is not None and "answer" not in entry and entry.get("id") not in boxed:
                size = sizes(str(entry.get("file_name", "")))
                if size is not None:
                    entry["width"], entry["height"] = size
        return data, problems


def build_gqa_dataset(data: DataConfig, split: str, tokenizer: object, *,
                      ann_file: str | os.PathLike | None = None,
                      image_root: str | os.PathLike | None = None) -> ModulatedDetection:
    """The train or val GQA set of ``data`` (or the given file), in either format, with the split's
    transforms."""
    from mdetr.data.build import build_transforms

    if ann_file is None:
        ann_file, image_root = ((data.train_ann, data.train_images) if split == "train"
                                else (data.val_ann, data.val_images))
    cls = GQAQuestions if question_file_format(ann_file) == "gqa" else GQAFile
    return cls(ann_file, image_root, tokenizer=tokenizer, transforms=build_transforms(data, split),
               on_error=data.on_error)


def check_gqa_entries(dataset: ModulatedDetection, *, require_answers: bool) -> None:
    """Raise :class:`DataError` naming the first entry without a usable ``answer`` / semantic type (only
    entries that have an answer when ``require_answers`` is False: test files have none)."""
    kept = set(dataset.ids)
    for entry in dataset.ground_truth["images"]:
        if entry.get("id") not in kept:
            continue
        if "answer" not in entry:
            if require_answers:
                raise DataError("a GQA training question needs an 'answer'", file=dataset.file,
                                entry=image_entry_name(entry))
            continue
        if entry.get("question_type") not in GQA_ANSWER_TYPES:
            raise DataError(f"the semantic type (question_type) is {entry.get('question_type')!r}, not one "
                            f"of {', '.join(GQA_ANSWER_TYPES)}", file=dataset.file,
                            entry=image_entry_name(entry))


# ------------------------------------------------------------------------------------------- vocabularies


def build_answer_vocab(entries: Iterable[Mapping[str, Any]], *,
                       split_qa_heads: bool = True) -> dict[str, list[str]]:
    """Answer vocabularies from training entries (``answer`` and ``question_type``).

    Split heads: ``{type: answers}`` for the five semantic types; unified: ``{"all": answers}``. Each list
    is ordered by frequency, then alphabetically, and ends with ``"unknown"`` unless the data has it (a
    type without training questions gets ``["unknown"]`` alone).
    """
    counts: dict[str, Counter[str]] = {key: Counter() for key in (
        GQA_ANSWER_TYPES if split_qa_heads else (GQA_ALL_ANSWERS,))}
    for entry in entries:
        if "answer" not in entry:
            continue
        key = GQA_ALL_ANSWERS if not split_qa_heads else entry.get("question_type")
        if key in counts:
            counts[key][str(entry["answer"])] += 1
    vocab = {}
    for key, counter in counts.items():
        answers = sorted(counter, key=lambda a: (-counter[a], a))
        if GQA_UNKNOWN_ANSWER not in counter:
            answers.append(GQA_UNKNOWN_ANSWER)
        vocab[key] = answers
    return vocab


def read_answer_vocab(path: str | os.PathLike) -> dict[str, list[str]]:
    """Vocabularies from a JSON file: the official ``gqa_answer2id_by_type.json`` (``{"answer_obj": {answer:
    id}, ...}``) or ``gqa_answer2id.json`` (``{answer: id}``, the unified head), or ``model.qa_answers``'s
    own layout (``{"obj": [answers], ...}`` / ``{"all": [...]}``)."""
    raw, problems = load_json(path)
    if raw is None:
        raise problems[0].to_error()
    if not isinstance(raw, dict) or not raw:
        raise DataError("an answer vocabulary file must hold a JSON object", file=str(path))

    def by_id(mapping: Mapping[str, Any]) -> list[str]:
        return [a for a, _ in sorted(mapping.items(), key=lambda item: int(item[1]))]

    if all(isinstance(v, list) for v in raw.values()):
        return {str(k): [str(a) for a in v] for k, v in raw.items()}
    if all(isinstance(v, dict) for v in raw.values()):
        return {str(k).removeprefix("answer_"): by_id(v) for k, v in raw.items()}
    if all(isinstance(v, int) for v in raw.values()):
        return {GQA_ALL_ANSWERS: by_id(raw)}
    raise DataError("expected {type: {answer: id}}, {answer: id} or {type: [answers]}", file=str(path))


def write_answer_vocab(answers: Mapping[str, list[str]], path: str | os.PathLike) -> None:
    """The vocabularies in the official layout (``gqa_answer2id_by_type.json`` / ``gqa_answer2id.json``)."""
    import json

    if GQA_ALL_ANSWERS in answers:
        payload: dict[str, Any] = {a: i for i, a in enumerate(answers[GQA_ALL_ANSWERS])}
    else:
        payload = {f"answer_{k}": {a: i for i, a in enumerate(v)} for k, v in answers.items()}
    Path(path).write_text(json.dumps(payload, indent=1))


__all__ = [
    "ANSWER_WORDS", "GQAFile", "GQAQuestions", "STRUCTURAL_TYPES", "build_answer_vocab",
    "build_gqa_dataset", "check_gqa_entries", "find_scene_graphs", "gqa_questions_to_mdetr",
    "implicit_mentions", "normalise_entry", "read_answer_vocab",
    "read_gqa_file", "word_range_span", "word_spans", "write_answer_vocab",
]
