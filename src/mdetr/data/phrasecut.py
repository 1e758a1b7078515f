"""PhraseCut (Wu et al., CVPR 2020): referring segmentation on Visual Genome, in two formats.

**MDETR's conversion** (``finetune_phrasecut_{train,miniv,val,test}.json``, MDETR's annotations on Zenodo) is
the MDETR format of :mod:`mdetr.data.modulated`: one image entry per task (phrase) with ``caption`` = the
phrase, ``task_id``, ``original_id`` (the Visual Genome image id) and ``file_name`` ``"{image id}.jpg"``; one
annotation per referred instance with its ``bbox`` (COCO ``[x, y, w, h]``), ``tokens_positive``
``[[0, len(phrase)]]`` and ``segmentation``: COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` or an RLE dict
``{"size": [H, W], "counts": ...}``.

**The original release** (``VGPhraseCut_v0/``) holds ``refer_{train,val,test,miniv}.json``, each a list of
tasks::

    {"task_id": "2342341__4", "image_id": 2342341, "phrase": "large window on building",
     "instance_boxes": [[x, y, w, h], ...],            # one box per referred instance
     "Polygons": [[[[x, y], [x, y], ...], ...], ...],  # per instance, its polygons, each a list of points
     "ann_ids": [...], "phrase_structure": {...}}

and ``image_data_split3000.json``, a list of ``{"image_id", "width", "height", "split", ...}`` giving the
image sizes. :func:`phrasecut_to_mdetr` converts a refer file into MDETR's format, as MDETR's own conversion
does (one entry per task, one annotation per instance with its polygons flattened, the whole phrase as the
span); :class:`PhraseCutDataset` reads either format (a refer file is converted when it is loaded).

Images are Visual Genome's ``{image_id}.jpg`` (one folder, e.g. ``VG_100K`` parts 1 and 2 merged).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mdetr.data.errors import DataError, Problem
from mdetr.data.modulated import ModulatedDetection, OnError
from mdetr.data.tokens import MAX_TOKENS
from mdetr.data.transforms import Target
from mdetr.data.validate import (
    ImageRoot,
    annotation_entry_name,
    is_finite_number,
    read_annotation_file,
)
from mdetr.ops.masks import MIN_POLYGON_COORDS, is_rle, segmentation_to_mask

IMAGE_DATA_FILE = "image_data_split3000.json"
"""The original release's image list (ids and sizes), looked for next to a refer file by default."""
SPLITS = ("train", "val", "test", "miniv")
DATASET_NAME = "phrasecut"


def is_refer_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds the original release's task list (a JSON list) rather than an MDETR file (a
    JSON object); only the first character is read. An unreadable file is not one (its reader reports it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            while True:
                chunk = handle.read(1)
                if not chunk or not chunk.isspace():
                    return chunk == "["
    except (OSError, UnicodeDecodeError):
        return False


def split_from_file_name(path: str | os.PathLike) -> str | None:
    """``"miniv"`` for ``finetune_phrasecut_miniv.json`` or ``refer_miniv.json``; None for other names."""
    match = re.fullmatch(r"(?:finetune_phrasecut|refer)_(\w+)", Path(path).stem)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------------------------------------
# The original release


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"the {what} does not exist", file=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"the file is not valid JSON ({error})", file=str(path)) from None


def read_image_sizes(path: str | os.PathLike) -> dict[int, tuple[int, int]]:
    """``image_id -> (width, height)`` from ``image_data_split3000.json``."""
    path = Path(path)
    data = _load_json(path, "image list (image_data_split3000.json)")
    if not isinstance(data, list):
        raise DataError(f"the file holds a {type(data).__name__}, not a list of images", file=str(path))
    sizes: dict[int, tuple[int, int]] = {}
    for position, image in enumerate(data):
        values = [image.get(k) if isinstance(image, dict) else None for k in ("image_id", "width", "height")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            name = f"image_id {values[0]}" if values[0] is not None else f"image #{position}"
            raise DataError("the image needs positive integers 'image_id', 'width' and 'height'",
                            file=str(path), entry=name)
        sizes[values[0]] = (values[1], values[2])
    return sizes


def _flat_polygon(polygon: Any, file: str, entry: str, where: str) -> list[float]:
    """``[[x, y], ...]`` -> ``[x1, y1, x2, y2, ...]``, each coordinate a finite number."""
    if not isinstance(polygon, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(is_finite_number(v) for v in p) for p in polygon
    ):
        raise DataError(f"{where} is not a list of [x, y] points", file=file, entry=entry)
    return [float(v) for point in polygon for v in point]


def _task_annotations(task: dict, caption: str, file: str, entry: str) -> list[dict]:
    """One MDETR annotation per instance of a refer task (without ids)."""
    boxes, polygons = task["instance_boxes"], task["Polygons"]
    if not isinstance(boxes, list) or not isinstance(polygons, list) or len(boxes) != len(polygons):
        count = len(polygons) if isinstance(polygons, list) else "no list of"
        raise DataError(f"'Polygons' must list the polygons of each of the {len(boxes)} 'instance_boxes', "
                        f"got {count} instances", file=file, entry=entry)
    annotations = []
    for k, (box, instance) in enumerate(zip(boxes, polygons, strict=True)):
        if not isinstance(box, list) or len(box) != 4 or not all(is_finite_number(v) for v in box):
            raise DataError(f"instance box {k} is not four numbers [x, y, w, h]", file=file, entry=entry)
        if not isinstance(instance, list):
            raise DataError(f"the polygons of instance {k} are not a list", file=file, entry=entry)
        segmentation = [_flat_polygon(p, file, entry, f"polygon {j} of instance {k}")
                        for j, p in enumerate(instance)]
        annotations.append({
            "area": float(box[2]) * float(box[3]), "iscrowd": 0, "category_id": 1,
            "bbox": [float(v) for v in box], "tokens_positive": [[0, len(caption)]],
            "segmentation": segmentation,
        })
    return annotations


def phrasecut_to_mdetr(refer_file: str | os.PathLike, image_data: str | os.PathLike | None = None,
                       ) -> dict[str, Any]:
    """The MDETR-format dict of a refer file (as ``finetune_phrasecut_{split}.json``).

    image_data: ``image_data_split3000.json``; default: the file of that name next to ``refer_file``.
    Raises :class:`DataError` naming the file and task (``task_id ...``) for a task without its fields, a
    phrase that is empty, boxes and polygons that do not pair up, malformed points, or an image missing from
    the image list.
    """
    refer_file = Path(refer_file)
    image_data = Path(image_data) if image_data is not None else refer_file.parent / IMAGE_DATA_FILE
    tasks = _load_json(refer_file, "PhraseCut refer file")
    file = str(refer_file)
    if not isinstance(tasks, list):
        raise DataError(f"the file holds a {type(tasks).__name__}, not a list of PhraseCut tasks", file=file)
    sizes = read_image_sizes(image_data)
    images: list[dict] = []
    annotations: list[dict] = []
    for position, task in enumerate(tasks):
        entry = f"task_id {task['task_id']}" if isinstance(task, dict) and "task_id" in task \
            else f"task #{position}"
        missing = [k for k in ("task_id", "image_id", "phrase", "instance_boxes", "Polygons")
                   if not isinstance(task, dict) or k not in task]
        if missing:
            raise DataError(f"the task has no {', '.join(repr(k) for k in missing)}", file=file, entry=entry)
        caption = task["phrase"].strip() if isinstance(task["phrase"], str) else ""
        if not caption:
            raise DataError("the task's 'phrase' is empty or not a string", file=file, entry=entry)
        if task["image_id"] not in sizes:
            raise DataError(f"image_id {task['image_id']!r} is not in {image_data}", file=file, entry=entry)
        width, height = sizes[task["image_id"]]
        entry_id = len(images)
        images.append({
            "id": entry_id, "file_name": f"{task['image_id']}.jpg", "height": height, "width": width,
            "caption": caption, "dataset_name": DATASET_NAME, "tokens_negative": [],
            "original_id": task["image_id"], "task_id": str(task["task_id"]),
        })
        for annotation in _task_annotations(task, caption, file, entry):
            annotations.append({"id": len(annotations), "image_id": entry_id, **annotation})
    return {"info": {"description": f"PhraseCut {refer_file.stem} (converted from the original release)"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}


# ----------------------------------------------------------------------------------------------------------
# Segmentations


def check_segmentation(annotation: dict, entry: dict, file: str) -> list[Problem]:
    """Problems of an annotation's ``segmentation``: missing, neither polygons nor an RLE of the entry's size,
    or without a polygon of at least three points (shorter polygons are a warning: they cover no pixel)."""
    name = annotation_entry_name(annotation)
    segmentation = annotation.get("segmentation")
    if segmentation is None:
        return [Problem(file, name, "the annotation has no 'segmentation' (the mask of the referred region)")]
    if is_rle(segmentation):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if not isinstance(counts, (str, list)):
            return [Problem(file, name, "the RLE segmentation has no 'counts' string or list")]
        if list(size or []) != [entry.get("height"), entry.get("width")]:
            return [Problem(file, name, f"the RLE segmentation's size {size} is not the image's "
                            f"[height, width] = [{entry.get('height')}, {entry.get('width')}]")]
        return []
    if not isinstance(segmentation, list) or not all(
        isinstance(p, list) and len(p) % 2 == 0 and all(is_finite_number(v) for v in p) for p in segmentation
    ):
        return [Problem(file, name, "'segmentation' is neither polygons [[x1, y1, x2, y2, ...], ...] nor an "
                        "RLE {'size', 'counts'}")]
    short = [j for j, p in enumerate(segmentation) if len(p) < MIN_POLYGON_COORDS]
    if len(short) == len(segmentation):
        return [Problem(file, name, "the segmentation has no polygon of at least three points")]
    if short:
        return [Problem(file, name, f"polygon(s) {short} have fewer than three points and are ignored",
                        "warning")]
    return []


def annotation_masks(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """``(N, height, width)`` bool: each annotation's segmentation decoded (pycocotools)."""
    masks = np.zeros((len(annotations), height, width), dtype=bool)
    for k, annotation in enumerate(annotations):
        masks[k] = segmentation_to_mask(annotation["segmentation"], height, width)
    return masks


# ----------------------------------------------------------------------------------------------------------
# The dataset


class PhraseCutDataset(ModulatedDetection):
    """PhraseCut entries (either format) with each instance's mask.

    Args:
        ann_file: ``finetune_phrasecut_{split}.json`` (MDETR format) or ``refer_{split}.json`` (the release).
        image_root: the Visual Genome image folder.
        tokenizer, transforms, max_tokens, on_error: as :class:`ModulatedDetection`.
        masks: put the instances' masks in the targets (training the mask head); evaluation reads the
            ground-truth masks from :attr:`kept_ground_truth` instead, at the original size.
        image_data: the image list of a refer file (default: ``image_data_split3000.json`` beside it).

    ``dataset[i]`` is as :class:`ModulatedDetection` plus, with ``masks``, ``masks`` BoolTensor ``[N, H, W]``
    at the transformed image's size, one per box (the transforms resize and crop them with the image). Every
    annotation must have a ``segmentation``; one that cannot be decoded is an error under the ``on_error``
    policy, naming the file and the annotation.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: ImageRoot,
        *,
        tokenizer: Any,
        transforms: Callable[[Image.Image, Target], tuple[Any, Target]] | None = None,
        masks: bool = True,
        image_data: str | os.PathLike | None = None,
        max_tokens: int = MAX_TOKENS,
        on_error: OnError = "fail",
    ) -> None:
        self.load_masks = masks
        self.image_data = image_data
        super().__init__(ann_file, image_root, tokenizer=tokenizer, transforms=transforms,
                         max_tokens=max_tokens, on_error=on_error)

    def _read_annotations(self, ann_file: str | os.PathLike) -> tuple[dict | None, list[Problem]]:
        if is_refer_file(ann_file):
            return phrasecut_to_mdetr(ann_file, self.image_data), []
        return read_annotation_file(ann_file)

    def _check_annotation(self, annotation: dict, entry: dict) -> list[Problem]:
        if annotation.get("iscrowd", 0):
            return []
        return check_segmentation(annotation, entry, self.file)

    @property
    def kept_ground_truth(self) -> dict[str, list[dict]]:
        """The entries the dataset kept and their usable annotations, in the MDETR format (what an evaluator
        should score against: under ``on_error="skip"`` rejected annotations are not in it)."""
        return {"images": [entry for entry, _, _ in self._samples],
                "annotations": [a for _, annotations, _ in self._samples for a in annotations]}

    def _target(self, entry: dict, annotations: list[dict], image_size: tuple[int, int]) -> Target:
        target = super()._target(entry, annotations, image_size)
        if self.load_masks:
            width, height = image_size
            target["masks"] = torch.from_numpy(annotation_masks(annotations, height, width))
        return target
