"""COCO box AP on post-processed detections, class-agnostic by default (MDETR section 5).

Every MDETR validation set is scored with pycocotools' ``COCOeval`` on the boxes of the post-processor,
with ``params.useCats = 0``: a box counts as a hit if it overlaps any ground-truth box of its image,
whatever phrase or category it was predicted for. The pre-training table's "AP" is AP50 (``stats[1]``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from mdetr.ops.boxes import box_xyxy_to_xywh

__all__ = ["CocoBoxEvaluator", "load_ground_truth"]

GroundTruth = str | os.PathLike[str] | Mapping[str, Any]

# Order of COCOeval.stats for iouType="bbox".
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_ground_truth(ground_truth: GroundTruth) -> dict[str, Any]:
    """Return a private deep copy of an MDETR/COCO-format annotation dict, read from JSON if given a path.

    The copy matters: pycocotools writes ``ignore`` flags into the ground-truth annotations it evaluates,
    and callers should be able to reuse their dict.
    """
    if isinstance(ground_truth, (str, os.PathLike)):
        with open(ground_truth, encoding="utf-8") as f:
            data = json.load(f)
    elif isinstance(ground_truth, Mapping):
        data = copy.deepcopy(dict(ground_truth))
    else:
        raise TypeError(
            f"ground_truth must be an annotation dict or a path to a JSON file, got {type(ground_truth)!r}"
        )
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"ground truth has no top-level {key!r} list (expected MDETR/COCO format)")
    return data


def _check_image_id(image_id: Any, known_ids: Mapping[int, Any] | set[int]) -> int:
    """Normalise an image id key (int, numpy int or 0-d tensor) and check that the ground truth has it."""
    image_id = int(image_id)
    if image_id not in known_ids:
        raise ValueError(f"prediction for image id {image_id}, which is not in the ground truth")
    return image_id


def _check_boxes_and_scores(image_id: int, prediction: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Validate one image's ``scores`` (Q,) and ``boxes`` (Q, 4) and return them as float CPU tensors."""
    for key in ("scores", "boxes"):
        if key not in prediction:
            raise ValueError(f"prediction for image id {image_id} has no {key!r} entry")
    scores = torch.as_tensor(prediction["scores"]).detach().to("cpu", torch.float64)
    boxes = torch.as_tensor(prediction["boxes"]).detach().to("cpu", torch.float64)
    if scores.ndim != 1 or boxes.ndim != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != scores.shape[0]:
        raise ValueError(
            f"prediction for image id {image_id}: expected scores (Q,) and boxes (Q, 4), "
            f"got {tuple(scores.shape)} and {tuple(boxes.shape)}"
        )
    return scores, boxes


class CocoBoxEvaluator:
    """Accumulates detections and scores them with pycocotools' bbox ``COCOeval``.

    Args:
        ground_truth: MDETR/COCO-format annotation dict, or a path to its JSON file. Annotations need
            ``image_id`` and ``bbox`` ([x, y, w, h] pixels); ``iscrowd`` defaults to 0, ``area`` to w * h and
            ``category_id`` to 1 when absent.
        class_agnostic: ignore categories (``params.useCats = 0``), as MDETR's validation does. When False,
            each prediction must carry ``labels`` holding ground-truth category ids.
        verbose: let pycocotools print its progress and the usual 12-line summary.

    Only images that received predictions are evaluated (``params.imgIds``), so scoring a subset of a
    validation set is meaningful. Predicting the same image twice replaces the earlier detections.
    """

    def __init__(self, ground_truth: GroundTruth, *, class_agnostic: bool = True, verbose: bool = False):
        self.class_agnostic = class_agnostic
        self.verbose = verbose
        data = load_ground_truth(ground_truth)
        data.setdefault("categories", [])
        for new_id, ann in enumerate(data["annotations"], start=1):
            # COCOeval stores matched ground-truth ids in a zero-initialised array and reads 0 as "no
            # match", so an annotation with id 0 could never be a true positive; renumber from 1.
            ann["id"] = new_id
            ann.setdefault("iscrowd", 0)
            ann.setdefault("category_id", 1)
            if "area" not in ann:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        with self._quiet():
            self.coco_gt = COCO()
            self.coco_gt.dataset = data
            self.coco_gt.createIndex()
        # COCOeval only looks at ground truth and detections whose category is in params.catIds, even with
        # useCats = 0, and defaults catIds to the "categories" list, which MDETR's mixed/GQA files leave
        # empty. So list every category the annotations use.
        self._category_ids = sorted(
            {cat["id"] for cat in data["categories"]} | {ann["category_id"] for ann in data["annotations"]}
        ) or [1]
        # image id -> (xywh boxes (Q, 4), scores (Q,), category ids (Q,)), all numpy.
        self._detections: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _quiet(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())

    def update(self, results: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Add detections for some images.

        Args:
            results: image id -> ``{"scores": FloatTensor (Q,), "boxes": FloatTensor (Q, 4) xyxy in
                original-image pixels, "labels": LongTensor (Q,) (required when class_agnostic=False)}``.

        Raises:
            ValueError: an image id absent from the ground truth, malformed tensors, or missing labels.
        """
        for raw_id, prediction in results.items():
            image_id = _check_image_id(raw_id, self.coco_gt.imgs)
            scores, boxes = _check_boxes_and_scores(image_id, prediction)
            if self.class_agnostic:
                # Labels play no part, but a detection must carry one of params.catIds to be seen at all.
                labels = torch.full_like(scores, self._category_ids[0], dtype=torch.long)
            elif "labels" in prediction:
                labels = torch.as_tensor(prediction["labels"]).detach().cpu().long().reshape(-1)
                if labels.shape[0] != scores.shape[0]:
                    raise ValueError(
                        f"prediction for image id {image_id}: labels has {labels.shape[0]} entries, "
                        f"scores has {scores.shape[0]}"
                    )
            else:
                raise ValueError(
                    f"prediction for image id {image_id} has no 'labels', needed when class_agnostic=False"
                )
            self._detections[image_id] = (
                box_xyxy_to_xywh(boxes).numpy(),  # COCO results are [x, y, w, h]
                scores.numpy(),
                labels.numpy(),
            )

    def _results_list(self) -> list[dict[str, Any]]:
        return [
            {"image_id": image_id, "category_id": int(label), "bbox": box.tolist(), "score": float(score)}
            for image_id, (boxes, scores, labels) in self._detections.items()
            for box, score, label in zip(boxes, scores, labels, strict=True)
        ]

    def summarize(self) -> dict[str, float]:
        """Run COCOeval on everything accumulated so far.

        Returns:
            ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}`` ->
            float, in COCOeval's ``stats`` order (the by-area values use 100 detections per image). Values
            are in [0, 1], except COCO's -1.0 for "nothing to measure" (e.g. APs when no evaluated
            ground-truth box is small). With no detections at all every value is 0.0.
        """
        detections = self._results_list()
        if not detections:
            return dict.fromkeys(_STAT_NAMES, 0.0)
        with self._quiet():
            coco_dt = self.coco_gt.loadRes(detections)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(self._detections)
            coco_eval.params.catIds = self._category_ids
            coco_eval.params.useCats = 0 if self.class_agnostic else 1
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return {name: float(value) for name, value in zip(_STAT_NAMES, coco_eval.stats, strict=True)}
