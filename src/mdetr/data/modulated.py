"""Dataset for the MDETR annotation format (Flickr30k, RefExp, GQA, mixed pre-training, CLEVR, ...).

The file is COCO-like: one ``images`` entry per (image, caption) pair, with ``caption``, ``file_name``,
``height``, ``width``, ``id`` and optional ``dataset_name``, ``data_source``, ``sentence_id``,
``original_img_id``, ``original_id``, ``task_id``, ``answer``, ``question_type``; and ``annotations`` with
``image_id``, ``id``, ``bbox`` (COCO ``[x, y, w, h]``, pixels), ``category_id``, ``area``, ``iscrowd``,
the caption's character spans ``tokens_positive`` (``tokens`` in the CLEVR files) and optionally
``isfinal`` (CLEVR-Ref+).

Construction loads the file once, indexes annotations by image id and runs every cheap check of
:mod:`mdetr.data.validate` (captions present and short enough, spans inside their caption and covering a
token, boxes usable, ids unique), so a bad file fails at once. Images are opened only in ``__getitem__``.

Error policy (``on_error``):

- ``"fail"``: the first problem raises :class:`~mdetr.data.errors.DataError` naming the file and entry;
  a missing or unreadable image raises it from ``__getitem__``, naming the image path and entry.
- ``"skip"``: the faulty entry or annotation is left out and recorded in ``problems``. An entry whose
  boxes were all rejected is left out too, since its caption would then teach only "no object". A missing
  or unreadable image makes ``__getitem__`` return ``None`` (with a warning, and the problem appended to
  ``problems`` of the process that loaded it and passed on by :func:`mdetr.data.errors.record_skipped`);
  :func:`mdetr.data.collate.collate` drops ``None`` samples and hands those problems to the training loop
  with the batch (``Batch.skipped``), which lists them in the run's ``skipped.json``.
  Returning ``None`` rather than raising is what lets a ``DataLoader`` worker carry on, and rather than
  substituting another sample it keeps every image id seen at most once, which evaluators rely on.

A file that cannot be used at all (unreadable, not JSON, no ``images`` / ``annotations`` lists) raises
under both policies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mdetr.data.errors import DataError, Problem
from mdetr.data.tokens import MAX_TOKENS, positive_map_from_spans
from mdetr.data.transforms import Compose, Normalize, Target, ToTensor
from mdetr.data.validate import (
    EntryReport,
    ImageRoot,
    annotation_spans,
    check_entries,
    clamped_box_xyxy,
    image_entry_name,
    index_annotations,
    is_finite_number,
    keep_problems,
    open_image_or_skip,
    read_annotation_file,
    resolve_image_path,
)

OnError = Literal["fail", "skip"]

PASSTHROUGH_KEYS = ("sentence_id", "original_img_id", "original_id", "task_id", "answer", "question_type")
"""Image-entry fields copied into the target unchanged when present."""

Sample = tuple[Tensor, Target]


class ModulatedDetection(Dataset):
    """Images with a caption and boxes aligned to spans of that caption.

    Args:
        ann_file: the MDETR annotation JSON.
        image_root: folder holding the entries' ``file_name``; or a mapping ``data_source -> folder`` for
            files whose entries name their source (MDETR's mixed file: ``"coco"`` / ``"vg"``).
        tokenizer: a fast Hugging Face tokenizer, the text encoder's (positive-map slots are its tokens).
        transforms: ``(PIL image, target) -> (image, target)``, ending with ``ToTensor`` and ``Normalize``
            (see :func:`mdetr.data.transforms.make_transforms`); None means only those two.
        max_tokens: positive-map width; captions may have ``max_tokens - 1`` tokens with special tokens,
            the last slot being "no object".
        on_error: ``"fail"`` or ``"skip"`` (see the module docstring).

    ``dataset[i]`` is ``(image, target)`` (or None, see ``on_error``) with ``image`` a normalised
    FloatTensor ``[3, H, W]`` and ``target``:

    - ``boxes`` FloatTensor ``[N, 4]``, normalised cxcywh relative to the transformed image;
    - ``positive_map`` BoolTensor ``[N, max_tokens]``: row n marks the caption tokens of box n;
    - ``tokens_positive`` list of N lists of ``(beg, end)`` character spans (end exclusive);
    - ``labels`` LongTensor ``[N]`` (category ids), ``area`` FloatTensor ``[N]`` (pixels², after
      transforms), ``iscrowd`` LongTensor ``[N]`` (zeros: crowd boxes are dropped);
    - ``isfinal`` FloatTensor ``[N]`` when the entry's annotations have it (missing values are 0);
    - ``caption`` str, ``image_id`` int, ``dataset_name`` str (the entry's, else the file's stem);
    - ``orig_size`` / ``size`` LongTensor ``[2]``: (h, w) of the image before / after transforms;
    - each of :data:`PASSTHROUGH_KEYS` present in the image entry.

    Attributes: ``problems`` (list of :class:`Problem`: warnings, and what ``"skip"`` left out),
    ``ground_truth`` (the loaded JSON dict, unfiltered, for COCO-style evaluators), ``ids`` (image ids in
    dataset order), ``file`` (the annotation file as a string).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: ImageRoot,
        *,
        tokenizer: Any,
        transforms: Callable[[Image.Image, Target], tuple[Any, Target]] | None = None,
        max_tokens: int = MAX_TOKENS,
        on_error: OnError = "fail",
    ) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "ModulatedDetection needs a fast tokenizer: positive maps use its character offsets"
            )
        self.file = str(ann_file)
        self.image_root = image_root
        self.tokenizer = tokenizer
        self.transforms = transforms if transforms is not None else Compose([ToTensor(), Normalize()])
        self.max_tokens = max_tokens
        self.on_error: OnError = on_error
        self.problems: list[Problem] = []
        self._default_name = Path(ann_file).stem

        data, problems = self._read_annotations(ann_file)
        if data is None:
            raise next(p for p in problems if p.severity == "error").to_error()
        self.ground_truth: dict = data
        self._record(problems)
        index, problems = index_annotations(data, self.file)
        self._record(problems)

        self._samples: list[tuple[dict, list[dict], Path]] = []
        for report in check_entries(index, self.file, tokenizer=tokenizer, max_tokens=max_tokens):
            sample = self._admit(report)
            if sample is not None:
                self._samples.append(sample)
        self.ids = [entry["id"] for entry, _, _ in self._samples]

    def _read_annotations(self, ann_file: str | os.PathLike) -> tuple[dict | None, list[Problem]]:
        """The MDETR-format dict and the problems found reading it (a subclass may read another format)."""
        return read_annotation_file(ann_file)

    def _check_annotation(self, annotation: dict, entry: dict) -> list[Problem]:
        """Checks a subclass adds to :func:`mdetr.data.validate.check_annotation` (none here)."""
        return []

    def _admit(self, report: EntryReport) -> tuple[dict, list[dict], Path] | None:
        """The entry, its usable annotations and its image path; None when the entry is left out."""
        problems = list(report.problems)
        path = None
        try:
            path = resolve_image_path(report.entry, self.image_root, self.file)
        except DataError as error:
            problems.append(error.problem)
        kept, rejected = [], 0
        for annotation, annotation_problems in report.annotations:
            annotation_problems = [*annotation_problems, *self._check_annotation(annotation, report.entry)]
            problems += annotation_problems
            if any(p.severity == "error" for p in annotation_problems):
                rejected += 1
            elif not annotation.get("iscrowd"):
                kept.append(annotation)
        self._record(problems)
        if path is None or any(p.severity == "error" for p in report.problems):
            return None
        if rejected and not kept:
            name = image_entry_name(report.entry)
            message = "every box of the entry was rejected, so the entry is left out"
            self.problems.append(Problem(self.file, name, message))
            return None
        return report.entry, kept, path

    def _record(self, problems: list[Problem]) -> None:
        keep_problems(problems, self.problems, on_error=self.on_error)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample | None:
        entry, annotations, path = self._samples[index]
        image = open_image_or_skip(path, entry, self.problems, on_error=self.on_error)
        if image is None:
            return None
        target = self._target(entry, annotations, image.size)
        image, target = self.transforms(image, target)
        target["size"] = torch.tensor([int(image.shape[-2]), int(image.shape[-1])])
        return image, target

    def _target(self, entry: dict, annotations: list[dict], image_size: tuple[int, int]) -> Target:
        """The target before transforms: pixel-xyxy boxes clamped to the image, and the positive map."""
        width, height = image_size
        caption: str = entry["caption"]
        boxes = torch.tensor(
            [clamped_box_xyxy(a["bbox"], width, height) for a in annotations], dtype=torch.float32
        ).reshape(-1, 4)
        spans = [[(int(beg), int(end)) for beg, end in annotation_spans(a)] for a in annotations]
        tokenized = self.tokenizer(caption, truncation=False)
        area = [
            float(a["area"])
            if is_finite_number(a.get("area"))
            else float(a["bbox"][2] * a["bbox"][3])
            for a in annotations
        ]
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
            "area": torch.tensor(area, dtype=torch.float32),
            "iscrowd": torch.zeros(len(annotations), dtype=torch.int64),
            "positive_map": positive_map_from_spans(
                tokenized, spans, num_slots=self.max_tokens, caption=caption
            ),
            "tokens_positive": spans,
            "caption": caption,
            "image_id": entry["id"],
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([height, width]),
            "dataset_name": entry.get("dataset_name", self._default_name),
        }
        if any("isfinal" in a for a in annotations):
            target["isfinal"] = torch.tensor([float(a.get("isfinal", 0)) for a in annotations])
        for key in PASSTHROUGH_KEYS:
            if key in entry:
                target[key] = entry[key]
        return target
