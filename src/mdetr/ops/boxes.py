"""Box format conversions and overlap measures (pure functions).

Formats are named in every function: ``cxcywh`` is (centre x, centre y, width, height), ``xyxy`` is
(x0, y0, x1, y1) and ``xywh`` is COCO's (x0, y0, width, height). Whether coordinates are normalised to
[0, 1] or in pixels is up to the caller; these functions do not care.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> IoU (N, M) and union (N, M)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes: (N, 4) x (M, 4) -> (N, M).

    Inverted boxes (x1 < x0 or y1 < y0) give infinities and NaNs, so they are rejected up front. NaN
    coordinates in ``boxes1`` (the losses and matchers pass predictions first: a diverged step) give NaN
    rows, which training skips as a non-finite step, instead of an error; ``boxes2`` (the targets) must be
    finite.
    """
    if (boxes1[:, 2:] < boxes1[:, :2]).any():
        raise ValueError("generalized_box_iou: boxes1 has x1 < x0 or y1 < y0")
    if not torch.isfinite(boxes2).all():
        raise ValueError("generalized_box_iou: boxes2 has non-finite coordinates")
    if (boxes2[:, 2:] < boxes2[:, :2]).any():
        raise ValueError("generalized_box_iou: boxes2 has x1 < x0 or y1 < y0")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing
