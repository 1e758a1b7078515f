"""Box conversions and overlap measures against hand-computed values and per-pair brute force."""

from __future__ import annotations

import math

import pytest
import torch

from mdetr.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
)


def _random_xyxy(n: int, generator: torch.Generator, scale: float = 10.0) -> torch.Tensor:
    """(n, 4) valid float64 xyxy boxes with positive width and height."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale + 0.1
    return torch.cat([xy, xy + wh], dim=1)


def _pair_iou_giou(a: list[float], b: list[float]) -> tuple[float, float]:
    """IoU and GIoU of two xyxy boxes, written out in plain Python."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = area_a + area_b - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union
    return iou, iou - (enclosing - union) / enclosing


# ---------------------------------------------------------------------------------------------- formats


def test_conversions_hand_computed() -> None:
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))
    assert torch.equal(box_xyxy_to_xywh(xyxy), torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([[3.0, 6.0, 4.0, 8.0]])), xyxy)
    assert torch.equal(box_xywh_to_xyxy(torch.tensor([[1.0, 2.0, 4.0, 8.0]])), xyxy)
    assert torch.equal(box_area(xyxy), torch.tensor([32.0]))


def test_conversions_round_trip_and_keep_batch_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    xyxy = _random_xyxy(24, generator).reshape(2, 3, 4, 4)  # any leading dims
    pairs = ((box_xyxy_to_cxcywh, box_cxcywh_to_xyxy), (box_xyxy_to_xywh, box_xywh_to_xyxy))
    for to_format, from_format in pairs:
        converted = to_format(xyxy)
        assert converted.shape == xyxy.shape
        torch.testing.assert_close(from_format(converted), xyxy)
        torch.testing.assert_close(to_format(from_format(converted)), converted)
    # Width and height agree between the two formats that carry them.
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy)[..., 2:], box_xyxy_to_xywh(xyxy)[..., 2:])


# ---------------------------------------------------------------------------------------------- overlaps


def test_iou_and_giou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # Overlapping: intersection 1, union 4 + 4 - 1 = 7, enclosing [0, 0, 3, 3] = 9.
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou, union = box_iou(a, b)
    assert iou.item() == pytest.approx(1 / 7)
    assert union.item() == pytest.approx(7.0)
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9)
    # Disjoint: IoU 0, union 8, enclosing [0, 0, 4, 2] = 8, GIoU = 0 - 0/8 = 0 (they touch the hull).
    c = torch.tensor([[2.0, 0.0, 4.0, 2.0]])
    assert box_iou(a, c)[0].item() == 0.0
    assert generalized_box_iou(a, c).item() == pytest.approx(0.0)
    # Disjoint with a gap: union 8, enclosing [0, 0, 6, 2] = 12, GIoU = -(12 - 8)/12 = -1/3.
    d = torch.tensor([[4.0, 0.0, 6.0, 2.0]])
    assert generalized_box_iou(a, d).item() == pytest.approx(-1 / 3)


def test_pairwise_matrices_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(1)
    boxes1, boxes2 = _random_xyxy(7, generator), _random_xyxy(5, generator)
    iou, _ = box_iou(boxes1, boxes2)
    giou = generalized_box_iou(boxes1, boxes2)
    assert iou.shape == giou.shape == (7, 5)
    for i, a in enumerate(boxes1.tolist()):
        for j, b in enumerate(boxes2.tolist()):
            expected_iou, expected_giou = _pair_iou_giou(a, b)
            assert iou[i, j].item() == pytest.approx(expected_iou, abs=1e-12)
            assert giou[i, j].item() == pytest.approx(expected_giou, abs=1e-12)


def test_known_identities() -> None:
    generator = torch.Generator().manual_seed(2)
    boxes1, boxes2 = _random_xyxy(16, generator, scale=5.0), _random_xyxy(12, generator, scale=5.0)
    iou, _ = box_iou(boxes1, boxes2)
    giou = generalized_box_iou(boxes1, boxes2)
    # Ranges, the ordering GIoU <= IoU, and symmetry.
    assert ((iou >= 0) & (iou <= 1)).all()
    assert ((giou >= -1) & (giou <= 1)).all()
    assert (giou <= iou + 1e-12).all()
    torch.testing.assert_close(generalized_box_iou(boxes2, boxes1), giou.T)
    # A box with itself: IoU = GIoU = 1.
    ones = torch.ones(16, dtype=torch.float64)
    torch.testing.assert_close(generalized_box_iou(boxes1, boxes1).diagonal(), ones)
    torch.testing.assert_close(box_iou(boxes1, boxes1)[0].diagonal(), ones)
    # Containment: the enclosing box is the outer box, which is also the union, so GIoU = IoU = inner/outer.
    outer = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    inner = torch.tensor([[2.0, 3.0, 6.0, 8.0]])  # area 20
    assert generalized_box_iou(inner, outer).item() == pytest.approx(box_iou(inner, outer)[0].item())
    assert generalized_box_iou(inner, outer).item() == pytest.approx(0.2)
    # Tiny boxes far apart: the enclosing box dwarfs the union, GIoU tends to -1.
    unit, distant = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[1e4, 1e4, 1e4 + 1, 1e4 + 1]])
    far = generalized_box_iou(unit, distant)
    assert -1.0 <= far.item() < -0.9999


def test_giou_handles_empty_sets() -> None:
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert generalized_box_iou(torch.zeros(0, 4), boxes).shape == (0, 1)
    assert box_iou(boxes, torch.zeros(0, 4))[0].shape == (1, 0)


@pytest.mark.parametrize("bad", [[2.0, 0.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]])
def test_giou_rejects_degenerate_boxes(bad: list[float]) -> None:
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(torch.tensor([bad]), good)
    with pytest.raises(ValueError, match="boxes2"):
        generalized_box_iou(good, torch.tensor([bad]))
    # Zero width or height is a valid (if empty) box, not a degenerate one.
    flat = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert torch.isfinite(generalized_box_iou(flat, good)).all()


def test_giou_of_a_nan_prediction_is_nan_not_an_error() -> None:
    """A diverged prediction (first argument): its row is NaN (training skips the step), the other rows
    keep their values; a NaN target (second argument) is still an error."""
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [float("nan")] * 4])
    other = torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    giou = generalized_box_iou(boxes, other)
    assert giou[0, 0].item() == pytest.approx(0.5) and math.isnan(giou[1, 0].item())
    with pytest.raises(ValueError, match="boxes2 has non-finite"):  # a target is data, and must be valid
        generalized_box_iou(other, boxes)
