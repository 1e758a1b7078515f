"""Referring-expression precision@k (RefCOCO / RefCOCO+ / RefCOCOg; MDETR section 5.2).

Each image entry of a RefExp annotation file is one referring expression with exactly one ground-truth box.
The model's boxes are ranked by score; the entry is a hit at k if one of the top-k boxes overlaps the
ground truth by at least the threshold. MDETR's own evaluator measures the overlap with *generalized* IoU
(``overlap="giou"``); most other papers use plain IoU (``overlap="iou"``). Since GIoU <= IoU, the GIoU
criterion is never more lenient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mdetr.eval.coco import GroundTruth, _check_boxes_and_scores, _check_image_id, load_ground_truth
from mdetr.ops.boxes import box_iou, box_xywh_to_xyxy, generalized_box_iou

__all__ = ["RefExpEvaluator"]

_OVERLAPS = {"giou": "GIoU", "iou": "IoU"}
# Shown in error messages that list entry ids.
_MAX_IDS_SHOWN = 5


@dataclass(frozen=True)
class _Entry:
    dataset_name: str
    box_xyxy: Tensor  # (1, 4) float64, pixels


class RefExpEvaluator:
    """Precision@k of ranked boxes against the single ground-truth box of each referring expression.

    Args:
        ground_truth: MDETR/COCO-format annotation dict or JSON path. ``images[i]`` needs ``id`` and
            ``dataset_name`` (a missing name is reported as "unknown"); ``annotations[j]`` needs
            ``image_id`` and ``bbox`` ([x, y, w, h] pixels).
        ks: the k of precision@k, each >= 1.
        overlap: ``"giou"`` (MDETR's criterion) or ``"iou"``.
        threshold: a box is correct if its overlap with the ground truth is >= this.
        dataset_names: evaluate only entries whose ``dataset_name`` is listed; predictions for other
            entries of the ground truth are accepted and ignored. None evaluates every entry.
        skip_invalid: skip (and count) entries with zero or several annotations instead of raising.
        allow_missing: at summarize(), score only the entries that received predictions instead of
            raising when some have none.

    Raises:
        ValueError: bad options, or (unless skip_invalid) an evaluated entry without exactly one annotation.
    """

    def __init__(
        self,
        ground_truth: GroundTruth,
        *,
        ks: Iterable[int] = (1, 5, 10),
        overlap: str = "giou",
        threshold: float = 0.5,
        dataset_names: Iterable[str] | None = None,
        skip_invalid: bool = False,
        allow_missing: bool = False,
    ):
        self.ks = tuple(int(k) for k in ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}")
        if overlap not in _OVERLAPS:
            raise ValueError(f"overlap must be one of {sorted(_OVERLAPS)}, got {overlap!r}")
        self.overlap = overlap
        self.threshold = float(threshold)
        if isinstance(dataset_names, str):
            # A bare string would otherwise be split into characters.
            dataset_names = (dataset_names,)
        self.dataset_names = None if dataset_names is None else frozenset(dataset_names)
        self.skip_invalid = skip_invalid
        self.allow_missing = allow_missing

        data = load_ground_truth(ground_truth)
        self._known_ids: set[int] = set()
        self._entries: dict[int, _Entry] = {}
        self.num_skipped = 0
        self._build_entries(data)
        # entry id -> hit at each k, in the order of self.ks.
        self._hits: dict[int, tuple[bool, ...]] = {}

    def _build_entries(self, data: Mapping[str, Any]) -> None:
        boxes_by_image: dict[int, list[list[float]]] = {}
        for ann in data["annotations"]:
            boxes_by_image.setdefault(int(ann["image_id"]), []).append(ann["bbox"])
        for image in data["images"]:
            image_id = int(image["id"])
            self._known_ids.add(image_id)
            dataset_name = str(image.get("dataset_name", "unknown"))
            if self.dataset_names is not None and dataset_name not in self.dataset_names:
                continue
            boxes = boxes_by_image.get(image_id, [])
            if len(boxes) != 1:
                if self.skip_invalid:
                    self.num_skipped += 1
                    continue
                raise ValueError(
                    f"RefExp image entry {image_id} ({dataset_name!r}) has {len(boxes)} annotations; "
                    "exactly one is expected (pass skip_invalid=True to skip such entries)"
                )
            box = box_xywh_to_xyxy(torch.tensor(boxes[0], dtype=torch.float64).reshape(1, 4))
            self._entries[image_id] = _Entry(dataset_name=dataset_name, box_xyxy=box)

    @property
    def criterion(self) -> str:
        """Human-readable hit rule, e.g. ``"GIoU >= 0.5"``."""
        return f"{_OVERLAPS[self.overlap]} >= {self.threshold:g}"

    def _overlap_with_gt(self, image_id: int, boxes_xyxy: Tensor, gt_xyxy: Tensor) -> Tensor:
        """(Q, 4) x (1, 4) -> (Q,) overlap of each predicted box with the ground-truth box."""
        if self.overlap == "iou":
            return box_iou(boxes_xyxy, gt_xyxy)[0][:, 0]
        try:
            return generalized_box_iou(boxes_xyxy, gt_xyxy)[:, 0]
        except ValueError as error:
            raise ValueError(f"image entry {image_id}: {error}") from error

    def update(self, results: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Score the ranked boxes of some entries.

        Args:
            results: entry id -> ``{"scores": FloatTensor (Q,), "boxes": FloatTensor (Q, 4) xyxy in
                original-image pixels}``; any other keys (e.g. ``labels``) are ignored, except
                ``scores_refexp`` (Q,): a model with the is-final head (CLEVR-Ref+) gives each box a
                referring score (its object score times the probability that it is the referred object
                rather than one only mentioned), and boxes are then ranked by it. Q may be 0 (no hit).
                Predicting the same entry again replaces the earlier result.

        Raises:
            ValueError: an id absent from the ground truth, malformed tensors, or degenerate boxes with GIoU.
        """
        for raw_id, prediction in results.items():
            image_id = _check_image_id(raw_id, self._known_ids)
            if "scores_refexp" in prediction:
                prediction = {"scores": prediction["scores_refexp"], "boxes": prediction["boxes"]}
            scores, boxes = _check_boxes_and_scores(image_id, prediction)
            entry = self._entries.get(image_id)
            if entry is None:  # filtered out by dataset_names or skipped as invalid
                continue
            # Stable sort, so equal scores keep the model's query order and results are reproducible.
            order = torch.sort(scores, descending=True, stable=True).indices
            overlaps = self._overlap_with_gt(image_id, boxes[order], entry.box_xyxy)  # (Q,), ranked
            self._hits[image_id] = tuple(
                bool((overlaps[:k] >= self.threshold).any()) for k in self.ks
            )

    def _precisions(self, ids: list[int]) -> dict[str, float]:
        if not ids:
            return {f"P@{k}": 0.0 for k in self.ks}
        counts = [sum(self._hits[i][j] for i in ids) for j in range(len(self.ks))]
        return {f"P@{k}": count / len(ids) for k, count in zip(self.ks, counts, strict=True)}

    def summarize(self) -> dict[str, Any]:
        """Precision@k overall and per ``dataset_name``.

        Returns:
            ``{"overall": {"P@1": float, "P@5": float, ...}, <dataset_name>: {"P@1": ...}, ...,
            "criterion": "GIoU >= 0.5", "num_evaluated": int, "num_missing": int, "num_skipped": int}``.
            Dataset names are those of the evaluated entries, in sorted order. Precisions are fractions in
            [0, 1] of the evaluated entries; they are 0.0 when nothing was evaluated.

        Raises:
            ValueError: some evaluated entries have no prediction and allow_missing is False.
        """
        missing = sorted(set(self._entries) - set(self._hits))
        if missing and not self.allow_missing:
            shown = ", ".join(str(i) for i in missing[:_MAX_IDS_SHOWN])
            more = ", ..." if len(missing) > _MAX_IDS_SHOWN else ""
            raise ValueError(
                f"{len(missing)} of {len(self._entries)} RefExp entries have no predictions "
                f"(ids {shown}{more}); pass allow_missing=True to score only the predicted ones"
            )
        evaluated = sorted(self._hits)
        summary: dict[str, Any] = {"overall": self._precisions(evaluated)}
        names = {self._entries[i].dataset_name for i in evaluated}
        for name in sorted(names):
            summary[name] = self._precisions([i for i in evaluated if self._entries[i].dataset_name == name])
        summary["criterion"] = self.criterion
        summary["num_evaluated"] = len(evaluated)
        summary["num_missing"] = len(missing)
        summary["num_skipped"] = self.num_skipped
        return summary
