"""LVIS box AP *fixed* (Dave et al. 2021; MDETR Table 6) and detection by querying every class name.

**Inference.** MDETR detects LVIS classes by grounding each class name on its own: caption c is the
cleaned name of category c, and every one of the model's Q boxes for that caption is a detection of category
c scored 1 - P(no object). The class names are encoded once (text encoder + resizer) in chunks of
``chunk_size`` captions (:func:`encode_class_names`); for each image the backbone runs once and its
features are paired with every chunk (:func:`detect_classes`), so an image costs one backbone pass and
``ceil(#classes / chunk_size)`` cross-encoder + decoder passes.

**Metric.** Fixed AP removes the per-image detection cap and keeps instead the ``topk`` (10,000) best
detections of each category over the whole evaluated set, then runs LVIS's federated evaluation: a
detection of a category counts only on images where the category is annotated or listed in
``neg_category_ids``, and unmatched detections of ``not_exhaustive_category_ids`` are ignored. AP is
averaged over categories with ground truth, and over rare / common / frequent ones for AP_r / AP_c / AP_f.
The evaluation itself is faster-coco-eval's LVIS mode (``lvis_style=True``), which runs on current numpy
(the ``lvis`` package still uses the removed ``np.float``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mdetr.data.errors import DataError
from mdetr.data.lvis import clean_name
from mdetr.eval.coco import _check_boxes_and_scores
from mdetr.inference.postprocess import post_process
from mdetr.models.transformer import EncodedText
from mdetr.ops.boxes import box_xyxy_to_xywh

__all__ = ["LvisEvaluator", "detect_classes", "encode_class_names"]

TOPK_PER_CATEGORY = 10_000
CHUNK_SIZE = 32
_STATS = {
    "AP": "AP_all",
    "AP50": "AP_50",
    "AP75": "AP_75",
    "APs": "AP_small",
    "APm": "AP_medium",
    "APl": "AP_large",
    "APr": "APr",
    "APc": "APc",
    "APf": "APf",
}


def _faster_coco_eval() -> Any:
    try:
        import faster_coco_eval
    except ImportError:
        raise ImportError("LVIS evaluation needs faster-coco-eval: pip install 'mdetr[lvis]'") from None
    return faster_coco_eval


# ----------------------------------------------------------------------------------------------------------
# Inference


@torch.no_grad()
def encode_class_names(
    model: nn.Module,
    names: Sequence[str],
    *,
    chunk_size: int = CHUNK_SIZE,
    device: str | torch.device = "cpu",
) -> list[EncodedText]:
    """Each class name as its own caption, encoded once: chunks of ``chunk_size`` captions, each an
    :class:`EncodedText` with ``features`` (C, L, D) and ``padding_mask`` (C, L)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if not names or any(not str(n).strip() for n in names):
        raise ValueError("the class names must be a non-empty list of non-empty names")
    device = torch.device(device)
    return [
        model.transformer.encode_text(list(names[i : i + chunk_size]), device)
        for i in range(0, len(names), chunk_size)
    ]


@torch.no_grad()
def detect_classes(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    orig_sizes: Tensor,
    encodings: Sequence[EncodedText],
    labels: Sequence[int],
) -> list[dict[str, Tensor]]:
    """Every class name's boxes in each image of a batch.

    images: (B, 3, H, W) normalised, padded; masks: (B, H, W) True on padding; orig_sizes: (B, 2) (h, w).
    encodings: from :func:`encode_class_names`; labels: the category id of each encoded caption, in order.
    Returns per image ``scores`` (N,), ``boxes`` (N, 4) xyxy original pixels, ``labels`` (N,) int64 with
    N = Q x #captions: every query's box for every caption.
    """
    sizes = [int(e.features.shape[0]) for e in encodings]
    if sum(sizes) != len(labels):
        raise ValueError(f"{sum(sizes)} encoded captions but {len(labels)} labels")
    model.eval()
    levels = model.backbone(images, masks)
    feat, mask, pos = levels[model.config.backbone_level]
    src = model.input_proj(feat)  # (B, D, h, w): computed once, shared by every chunk
    shape = (src.shape[-2], src.shape[-1])
    label_chunks = torch.tensor(list(labels), dtype=torch.int64).split(sizes)
    results = []
    for b in range(images.shape[0]):
        tokens = src[b].flatten(1).transpose(0, 1)  # (hw, D)
        token_pos = pos[b].flatten(1).transpose(0, 1)
        token_mask = mask[b].flatten()
        found: list[dict[str, Tensor]] = []
        for text, chunk_labels in zip(encodings, label_chunks, strict=True):
            c = text.features.shape[0]
            cache = model.transformer.encode(
                tokens.expand(c, -1, -1),
                token_mask.expand(c, -1),
                token_pos.expand(c, -1, -1),
                text,
                image_shape=shape,
            )
            outputs = model.decode(cache)
            for caption, result in enumerate(post_process(outputs, orig_sizes[b].expand(c, 2))):
                found.append(
                    {
                        "scores": result["scores"].cpu(),
                        "boxes": result["boxes"].cpu(),
                        "labels": chunk_labels[caption].expand(result["scores"].shape[0]),
                    }
                )
        results.append({k: torch.cat([f[k] for f in found]) for k in ("scores", "boxes", "labels")})
    return results


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def load_lvis_ground_truth(ground_truth: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of an LVIS annotation dict (read and checked if given a path)."""
    if isinstance(ground_truth, (str, os.PathLike)):
        from mdetr.data.lvis import read_lvis

        return read_lvis(ground_truth)
    return copy.deepcopy(dict(ground_truth))


class LvisEvaluator:
    """Box AP fixed on an LVIS v1 set.

    Args:
        ground_truth: the LVIS JSON (path or dict) with ``neg_category_ids``, ``not_exhaustive_category_ids``
            and category ``frequency``.
        topk: detections kept per category over the whole set (10,000 for AP fixed).
        verbose: let faster-coco-eval print its summary.

    Only images that received predictions are evaluated, so a subset of a validation set can be scored.
    """

    def __init__(
        self,
        ground_truth: str | os.PathLike | Mapping[str, Any],
        *,
        topk: int = TOPK_PER_CATEGORY,
        verbose: bool = False,
    ) -> None:
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        self.topk = topk
        self.verbose = verbose
        self.ground_truth = load_lvis_ground_truth(ground_truth)
        self.category_ids = sorted(c["id"] for c in self.ground_truth["categories"])
        self._known_images = {im["id"] for im in self.ground_truth["images"]}
        self._known_categories = set(self.category_ids)
        self._evaluated: set[int] = set()
        # category -> kept rows (image_id, x, y, w, h, score), pruned to the top-k as they grow
        self._kept: dict[int, list[np.ndarray]] = {}
        self._sizes: dict[int, int] = {}

    def update(self, results: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Add detections: image id -> ``{"scores" (N,), "boxes" (N, 4) xyxy pixels, "labels" (N,) LVIS
        category ids}``.

        Raises:
            ValueError: an unknown image or category id, an image predicted twice, or malformed tensors.
        """
        for raw_id, prediction in results.items():
            image_id = int(raw_id)
            if image_id not in self._known_images:
                raise ValueError(f"prediction for image id {image_id}, which is not in the LVIS ground truth")
            if image_id in self._evaluated:  # kept detections cannot be taken back: refuse duplicates
                raise ValueError(f"image id {image_id} already received predictions")
            scores, boxes = _check_boxes_and_scores(image_id, prediction)
            labels = torch.as_tensor(prediction["labels"]).reshape(-1).long()
            if labels.shape[0] != scores.shape[0]:
                raise ValueError(
                    f"prediction for image id {image_id}: {labels.shape[0]} labels, {scores.shape[0]} scores"
                )
            unknown = set(labels.unique().tolist()) - self._known_categories
            if unknown:
                raise ValueError(
                    f"prediction for image id {image_id} has category ids {sorted(unknown)[:3]}, "
                    "which are not LVIS categories"
                )
            self._evaluated.add(image_id)
            rows = np.concatenate(
                [
                    np.full((len(scores), 1), image_id, dtype=np.float64),
                    box_xyxy_to_xywh(boxes).numpy(),
                    scores.numpy()[:, None],
                ],
                axis=1,
            )
            labels_np = labels.numpy()
            for category in np.unique(labels_np):
                self._add(int(category), rows[labels_np == category])

    def _add(self, category: int, rows: np.ndarray) -> None:
        self._kept.setdefault(category, []).append(rows)
        self._sizes[category] = self._sizes.get(category, 0) + len(rows)
        if self._sizes[category] > 2 * self.topk:
            self._kept[category] = [self._top(category)]
            self._sizes[category] = len(self._kept[category][0])

    def _top(self, category: int) -> np.ndarray:
        rows = np.concatenate(self._kept[category])
        order = np.argsort(-rows[:, 5], kind="stable")[: self.topk]
        return rows[order]

    def _detections(self) -> list[dict[str, Any]]:
        detections = []
        for category in sorted(self._kept):
            for image_id, x, y, w, h, score in self._top(category).tolist():
                detections.append(
                    {"image_id": int(image_id), "category_id": category, "bbox": [x, y, w, h], "score": score}
                )
        return detections

    def summarize(self) -> dict[str, Any]:
        """AP fixed over the evaluated images.

        Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}`` -> float in [0, 1]
        (-1.0 where there is nothing to measure, e.g. no rare category in the evaluated images), plus
        ``"criterion"`` (a sentence naming the protocol) and ``"num_images"``. With no detections every
        AP is 0.0.
        """
        summary: dict[str, Any] = dict.fromkeys(_STATS, 0.0)
        detections = self._detections()
        if detections:
            summary.update(self._evaluate(detections))
        summary["criterion"] = f"box AP fixed: top {self.topk} detections per category, no per-image cap"
        summary["num_images"] = len(self._evaluated)
        return summary

    def _evaluate(self, detections: list[dict[str, Any]]) -> dict[str, float]:
        fce = _faster_coco_eval()
        data = copy.deepcopy(self.ground_truth)
        for annotation in data["annotations"]:
            annotation.setdefault("iscrowd", 0)
            annotation.setdefault("area", float(annotation["bbox"][2] * annotation["bbox"][3]))
        quiet = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_gt = fce.COCO(data)
            coco_dt = coco_gt.loadRes(detections)
            evaluator = fce.COCOeval_faster(
                coco_gt,
                coco_dt,
                iouType="bbox",
                lvis_style=True,
                print_function=print if self.verbose else (lambda *a, **k: None),
            )
            per_image = Counter(d["image_id"] for d in detections)
            evaluator.params.maxDets = [max(per_image.values())]  # fixed AP: no per-image cap
            evaluator.params.imgIds = sorted(self._evaluated)
            evaluator.params.catIds = self.category_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats_as_dict
        return {name: float(stats[key]) for name, key in _STATS.items()}


def lvis_class_names(ground_truth: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """The cleaned class names of an LVIS dict and their category ids, in category-id order."""
    categories = sorted(ground_truth["categories"], key=lambda c: c["id"])
    names = [clean_name(c["name"]) for c in categories]
    if any(not n for n in names):
        raise DataError("a category name is empty once cleaned", file="<LVIS categories>")
    return names, [c["id"] for c in categories]
