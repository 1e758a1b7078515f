"""PhraseCut referring segmentation metrics (Wu et al. 2020; MDETR Section 4.3, Table 4).

Each entry of a PhraseCut file is one phrase; its ground-truth region is the union of the masks of its
annotations (every instance the phrase refers to). A prediction is one mask per phrase (MDETR: the union of
the masks of the boxes scoring above 0.7, :func:`mdetr.inference.postprocess.post_process_phrasecut`).

- **mean IoU** (M-IoU, the paper's headline): the mean over phrases of the mask IoU;
- **cumulative IoU**: total intersection over total union, summed over phrases;
- **Pr@t**: the fraction of phrases whose IoU exceeds t, for t = 0.5, 0.7, 0.9.

The IoU of a phrase is 0 when prediction and ground truth do not intersect (also when both are empty), as
in the PhraseCut evaluator. The same metrics are given for boxes: the union of the predicted boxes scoring
above the threshold against the union of the ground-truth boxes, both as pixel sets of the image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from mdetr.eval.coco import GroundTruth, _check_boxes_and_scores, _check_image_id, load_ground_truth
from mdetr.inference.postprocess import PHRASECUT_SCORE_THRESHOLD
from mdetr.ops.masks import boxes_to_mask, is_rle, mask_iou, rle_to_mask, segmentation_to_mask

__all__ = ["PhraseCutEvaluator", "region_metrics"]

THRESHOLDS = (0.5, 0.7, 0.9)
_MAX_IDS_SHOWN = 5


def region_metrics(stats: Iterable[tuple[float, int, int]], thresholds: Iterable[float] = THRESHOLDS
                   ) -> dict[str, float]:
    """``mean_iou``, ``cum_iou`` and ``Pr@t`` of per-phrase ``(iou, intersection, union)`` triples (all 0.0
    for none)."""
    stats = list(stats)
    ious = np.array([s[0] for s in stats], dtype=np.float64)
    union = sum(s[2] for s in stats)
    metrics = {"mean_iou": float(ious.mean()) if len(ious) else 0.0,
               "cum_iou": sum(s[1] for s in stats) / union if union else 0.0}
    for t in thresholds:
        metrics[f"Pr@{t:g}"] = float((ious > t).mean()) if len(ious) else 0.0
    return metrics


class PhraseCutEvaluator:
    """Mask (and box) IoU of one predicted region per phrase against the phrase's ground-truth region.

    Args:
        ground_truth: MDETR-format dict or JSON path: ``images`` entries with ``id``, ``height``, ``width``;
            ``annotations`` with ``image_id``, ``bbox`` ([x, y, w, h] pixels) and ``segmentation`` (COCO
            polygons or RLE). Crowd annotations are ignored.
        thresholds: the t of Pr@t (IoU strictly above t).
        score_threshold: boxes scoring above it form the predicted box region.
        allow_missing: at summarize(), score only the entries that received predictions instead of raising.
    """

    def __init__(self, ground_truth: GroundTruth, *, thresholds: Iterable[float] = THRESHOLDS,
                 score_threshold: float = PHRASECUT_SCORE_THRESHOLD, allow_missing: bool = False) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.score_threshold = float(score_threshold)
        self.allow_missing = allow_missing
        data = load_ground_truth(ground_truth)
        self._entries = {int(e["id"]): e for e in data["images"]}
        self._annotations: dict[int, list[dict]] = {i: [] for i in self._entries}
        for annotation in data["annotations"]:
            if not annotation.get("iscrowd", 0) and int(annotation["image_id"]) in self._annotations:
                self._annotations[int(annotation["image_id"])].append(annotation)
        self._mask_stats: dict[int, tuple[float, int, int]] = {}
        self._box_stats: dict[int, tuple[float, int, int]] = {}

    def ground_truth_mask(self, entry_id: int) -> np.ndarray:
        """The entry's region: the union of its annotations' masks, (height, width) bool."""
        entry = self._entries[entry_id]
        height, width = int(entry["height"]), int(entry["width"])
        region = np.zeros((height, width), dtype=bool)
        for annotation in self._annotations[entry_id]:
            if "segmentation" not in annotation:
                raise ValueError(f"annotation id {annotation.get('id')} (image id {entry_id}) has no "
                                 "'segmentation': PhraseCut evaluation needs the ground-truth masks")
            region |= segmentation_to_mask(annotation["segmentation"], height, width)
        return region

    def ground_truth_box_mask(self, entry_id: int) -> np.ndarray:
        """The union of the entry's ground-truth boxes as pixels, (height, width) bool."""
        entry = self._entries[entry_id]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in self._annotations[entry_id])]
        return boxes_to_mask(boxes, int(entry["height"]), int(entry["width"]))

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        """Score some entries.

        Args:
            predictions: entry id -> a dict with ``mask``, the predicted region at the entry's original size:
                a (height, width) bool tensor or array, or a COCO RLE dict; and/or ``scores`` (Q,) with
                ``boxes`` (Q, 4) xyxy original pixels, for the box metrics. Predicting an entry again
                replaces the earlier result.

        Raises:
            ValueError: an id absent from the ground truth, a mask of the wrong size, or neither a mask nor
                boxes.
        """
        for raw_id, prediction in predictions.items():
            entry_id = _check_image_id(raw_id, self._entries)
            if "mask" not in prediction and "boxes" not in prediction:
                raise ValueError(f"prediction for image id {entry_id} has neither a 'mask' nor 'boxes'")
            if "mask" in prediction:
                predicted = _as_mask(prediction["mask"])
                truth = self.ground_truth_mask(entry_id)
                if predicted.shape != truth.shape:
                    raise ValueError(f"prediction for image id {entry_id}: the mask is "
                                     f"{predicted.shape[::-1]} (width, height), the image "
                                     f"{truth.shape[::-1]}")
                self._mask_stats[entry_id] = mask_iou(predicted, truth)
            if "boxes" in prediction:
                scores, boxes = _check_boxes_and_scores(entry_id, prediction)
                truth = self.ground_truth_box_mask(entry_id)
                kept = boxes[scores > self.score_threshold].numpy()
                self._box_stats[entry_id] = mask_iou(boxes_to_mask(kept, *truth.shape), truth)

    def summarize(self) -> dict[str, Any]:
        """``{"mask": region metrics, "box": region metrics, "num_evaluated", "num_missing"}``; each region
        metrics dict holds ``mean_iou``, ``cum_iou`` and ``Pr@t`` (fractions in [0, 1]); ``mask`` or ``box``
        is absent when no prediction had it.

        Raises:
            ValueError: some entries have no prediction and allow_missing is False.
        """
        evaluated = set(self._mask_stats) | set(self._box_stats)
        missing = sorted(set(self._entries) - evaluated)
        if missing and not self.allow_missing:
            shown = ", ".join(str(i) for i in missing[:_MAX_IDS_SHOWN])
            more = ", ..." if len(missing) > _MAX_IDS_SHOWN else ""
            raise ValueError(f"{len(missing)} of {len(self._entries)} PhraseCut entries have no predictions "
                             f"(ids {shown}{more}); pass allow_missing=True to score only the predicted ones")
        summary: dict[str, Any] = {}
        if self._mask_stats:
            summary["mask"] = region_metrics(self._mask_stats.values(), self.thresholds)
        if self._box_stats:
            summary["box"] = region_metrics(self._box_stats.values(), self.thresholds)
        summary.update(num_evaluated=len(evaluated), num_missing=len(missing))
        return summary


def _as_mask(mask: Any) -> np.ndarray:
    """A predicted mask as a bool array: from an RLE dict, a tensor or an array."""
    if is_rle(mask):
        return rle_to_mask(mask)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a predicted mask must be (height, width), got shape {mask.shape}")
    return mask.astype(bool)
