"""Dataset for plain COCO-format object detection (category labels, no captions).

The file is standard COCO: ``images`` entries with ``id``, ``file_name``, ``height``, ``width``;
``annotations`` with ``id``, ``image_id``, ``bbox`` (``[x, y, w, h]`` pixels), ``category_id``, optional
``area`` and ``iscrowd``; ``categories`` with ``id`` and ``name``. Construction loads the file once and
checks every entry (ids unique, image sizes and file names present, boxes usable, every ``category_id`` one
of the listed categories), so a bad file fails at once with the file and the entry named; ``on_error``
works as for :class:`mdetr.data.modulated.ModulatedDetection` (``"fail"`` raises, ``"skip"`` leaves the
faulty annotation or entry out and records it in ``problems``).

Crowd annotations (``iscrowd`` 1) are not training targets (as in DETR); they stay in ``ground_truth``,
where COCO evaluation treats them as regions to ignore. Images without annotations are kept: they teach
"no object".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mdetr.data.collate import Batch, pad_images
from mdetr.data.errors import DataError, Problem
from mdetr.data.transforms import Compose, Normalize, Target, ToTensor
from mdetr.data.validate import (
    _check_box,
    annotation_entry_name,
    clamped_box_xyxy,
    image_entry_name,
    index_annotations,
    keep_problems,
    open_image_or_skip,
    read_annotation_file,
    resolve_image_path,
)

OnError = Literal["fail", "skip"]
Sample = tuple[Tensor, Target]


def read_categories(data: dict, file: str) -> dict[int, str]:
    """Category id -> name of a COCO file's ``categories`` list; raises :class:`DataError` when malformed."""
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise DataError("a detection file needs a non-empty 'categories' list", file=file)
    names: dict[int, str] = {}
    for position, category in enumerate(categories):
        cat_id = category.get("id") if isinstance(category, dict) else None
        if not isinstance(cat_id, int) or isinstance(cat_id, bool) or cat_id < 0:
            raise DataError("the category has no non-negative integer 'id'", file=file,
                            entry=f"category #{position}")
        if cat_id in names:
            raise DataError(f"category id {cat_id} is listed twice", file=file, entry=f"category #{position}")
        names[cat_id] = str(category.get("name", cat_id))
    return names


def num_classes_of(ann_file: str | os.PathLike) -> int:
    """Classification logits a detector needs for a COCO file: its largest category id plus one."""
    data, problems = read_annotation_file(ann_file)
    if data is None:
        raise next(p for p in problems if p.severity == "error").to_error()
    return max(read_categories(data, str(ann_file))) + 1


def _entry_problems(entry: dict, file: str) -> list[Problem]:
    name = image_entry_name(entry)
    problems = [
        Problem(file, name, f"'{key}' is missing or not a positive integer")
        for key in ("height", "width")
        if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool) or entry[key] <= 0
    ]
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        problems.append(Problem(file, name, "the image entry has no 'file_name'"))
    return problems


def _annotation_problems(
    annotation: dict, entry: dict, file: str, categories: dict[int, str]
) -> list[Problem]:
    name = annotation_entry_name(annotation)
    problems = _check_box(annotation.get("bbox"), entry, file, name)
    if annotation.get("category_id") not in categories:
        known = ", ".join(str(c) for c in sorted(categories)[:8]) + (" ..." if len(categories) > 8 else "")
        category = annotation.get("category_id")
        message = f"category_id {category!r} is not one of the file's category ids ({known})"
        problems.append(Problem(file, name, message))
    return problems


class CocoDetection(Dataset):
    """Images with category-labelled boxes from a COCO detection file.

    Args:
        ann_file: the COCO annotation JSON.
        image_root: folder holding the entries' ``file_name``.
        transforms: ``(PIL image, target) -> (image, target)`` ending with ``ToTensor`` and ``Normalize``
            (:func:`mdetr.data.transforms.make_transforms`); None means only those two.
        on_error: ``"fail"`` or ``"skip"`` (see the module docstring).

    ``dataset[i]`` is ``(image, target)`` (or None when a skipped image cannot be read) with ``image`` a
    normalised FloatTensor ``[3, H, W]`` and ``target``: ``boxes`` FloatTensor ``[N, 4]`` normalised cxcywh
    relative to the transformed image, ``labels`` LongTensor ``[N]`` (category ids), ``area`` FloatTensor
    ``[N]``, ``iscrowd`` LongTensor ``[N]`` (zeros), ``image_id`` int, ``orig_size`` / ``size`` LongTensor
    ``[2]`` as (h, w) before / after the transforms.

    Attributes: ``ground_truth`` (the loaded JSON dict, for :class:`mdetr.eval.CocoBoxEvaluator`),
    ``categories`` (id -> name), ``num_classes`` (largest id + 1), ``ids``, ``problems``, ``file``.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        transforms: Callable[[Image.Image, Target], tuple[Any, Target]] | None = None,
        on_error: OnError = "fail",
    ) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.file = str(ann_file)
        self.image_root = image_root
        self.transforms = transforms if transforms is not None else Compose([ToTensor(), Normalize()])
        self.on_error: OnError = on_error
        self.problems: list[Problem] = []
        data, problems = read_annotation_file(ann_file)
        if data is None:
            raise next(p for p in problems if p.severity == "error").to_error()
        self.ground_truth: dict = data
        self.categories = read_categories(data, self.file)
        self._record(problems)
        index, problems = index_annotations(data, self.file)
        self._record(problems)
        self._samples: list[tuple[dict, list[dict], Path]] = []
        for entry in index.images:
            sample = self._admit(entry, index.annotations[entry["id"]])
            if sample is not None:
                self._samples.append(sample)
        self.ids = [entry["id"] for entry, _, _ in self._samples]

    @property
    def num_classes(self) -> int:
        return max(self.categories) + 1

    def _admit(self, entry: dict, annotations: list[dict]) -> tuple[dict, list[dict], Path] | None:
        """The entry, its usable non-crowd annotations and its image path; None when the entry is left out."""
        entry_problems = _entry_problems(entry, self.file)
        self._record(entry_problems)
        if entry_problems:
            return None
        kept = []
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                continue
            problems = _annotation_problems(annotation, entry, self.file, self.categories)
            self._record(problems)
            if not any(p.severity == "error" for p in problems):
                kept.append(annotation)
        return entry, kept, resolve_image_path(entry, self.image_root, self.file)

    def _record(self, problems: Sequence[Problem]) -> None:
        keep_problems(problems, self.problems, on_error=self.on_error)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample | None:
        entry, annotations, path = self._samples[index]
        image = open_image_or_skip(path, entry, self.problems, on_error=self.on_error)
        if image is None:
            return None
        width, height = image.size
        boxes = [clamped_box_xyxy(a["bbox"], width, height) for a in annotations]
        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in annotations],
                                 dtype=torch.float32),
            "iscrowd": torch.zeros(len(annotations), dtype=torch.int64),
            "image_id": entry["id"],
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([height, width]),
        }
        image, target = self.transforms(image, target)
        target["size"] = torch.tensor([int(image.shape[-2]), int(image.shape[-1])])
        return image, target


def collate_detection(samples: Sequence[Sample | None], *, size_divisibility: int = 1) -> Batch:
    """Pad ``(image, target)`` samples into a :class:`Batch`; None samples are dropped.

    Detection has no text: ``captions`` holds one empty string per image.
    """
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return Batch(images=torch.zeros((0, 3, 0, 0)), masks=torch.zeros((0, 0, 0), dtype=torch.bool),
                     captions=[], targets=[])
    images, masks = pad_images([image for image, _ in kept], size_divisibility=size_divisibility)
    return Batch(images=images, masks=masks, captions=[""] * len(kept), targets=[t for _, t in kept])
