"""Binary masks: COCO segmentations (polygons, RLE) to pixels and back, box pixel sets, mask IoU.

Pixel convention (pycocotools'): pixel (row r, column c) covers the square [c, c + 1) x [r, r + 1), so the
polygon with corners (1, 1) and (5, 4) covers columns 1..4 of rows 1..3. Masks are NumPy ``bool`` arrays
``(H, W)``; RLE dicts are COCO's ``{"size": [H, W], "counts": str}`` (compressed, JSON-ready).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

# pycocotools reads a polygon of exactly four numbers as a box, so a polygon needs at least three points.
MIN_POLYGON_COORDS = 6


def is_rle(segmentation: Any) -> bool:
    """Whether a COCO ``segmentation`` is run-length encoded (a dict) rather than a list of polygons."""
    return isinstance(segmentation, Mapping)


def usable_polygons(polygons: Sequence[Sequence[float]]) -> list[list[float]]:
    """The polygons ``[x1, y1, x2, y2, ...]`` with at least three points (fewer cover no area)."""
    return [[float(v) for v in p] for p in polygons if len(p) >= MIN_POLYGON_COORDS]


def _rle(segmentation: Any, height: int, width: int) -> dict:
    """One pycocotools RLE for polygons, an uncompressed RLE (``counts`` a list) or a compressed one."""
    if is_rle(segmentation):
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return coco_mask.frPyObjects(dict(segmentation), height, width)
        return {"size": list(segmentation["size"]),
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    polygons = usable_polygons(segmentation)
    if not polygons:
        return coco_mask.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (list of polygons ``[[x1, y1, ...], ...]`` in pixels, or an RLE dict of size
    ``[height, width]``) as a ``(height, width)`` bool mask; polygons are united."""
    with warnings.catch_warnings():
        # pycocotools' decoder builds its array the NumPy 1 way, which NumPy 2 deprecates (harmlessly)
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return coco_mask.decode(_rle(segmentation, height, width)).astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """``(H, W)`` bool mask -> ``{"size": [H, W], "counts": str}`` (COCO compressed RLE)."""
    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`mask_to_rle` (also takes uncompressed RLE)."""
    height, width = (int(s) for s in rle["size"])
    return segmentation_to_mask(rle, height, width)


def boxes_to_mask(boxes_xyxy: Sequence[Sequence[float]] | np.ndarray, height: int, width: int) -> np.ndarray:
    """The union of boxes as pixels: ``(height, width)`` bool. A box ``(x0, y0, x1, y1)`` in pixel coordinates
    covers the pixels whose centre lies in ``[x0, x1) x [y0, y1)`` (clipped to the image); an integer box
    ``[1, 1, 5, 4]`` covers the same pixels as its polygon."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4):
        # pixel c's centre c + 0.5 lies in [x0, x1) for c in [ceil(x0 - 0.5), ceil(x1 - 0.5))
        c0, c1 = (int(np.clip(np.ceil(v - 0.5), 0, width)) for v in (x0, x1))
        r0, r1 = (int(np.clip(np.ceil(v - 0.5), 0, height)) for v in (y0, y1))
        mask[r0:r1, c0:c1] = True
    return mask


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, int, int]:
    """``(IoU, intersection, union)`` pixel counts of two bool masks of one shape.

    IoU is 0 when the masks do not intersect, also when both are empty (the PhraseCut convention: an empty
    prediction for an empty region scores nothing).
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"masks of different shapes: {predicted.shape} and {truth.shape}")
    intersection = int(np.logical_and(predicted, truth).sum())
    union = int(np.logical_or(predicted, truth).sum())
    return (intersection / union if intersection else 0.0), intersection, union
