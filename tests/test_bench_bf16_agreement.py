"""``bench/bf16_agreement.py`` measures what it claims: known perturbations of the second predictor's
outputs come back as the differences it reports, and its precision@1 is the refexp evaluator's criterion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mdetr.inference.predictor import Predictor, open_image

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bf16_agreement.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bf16_agreement", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Shifted(Predictor):
    """A float32 Predictor whose boxes move right by ``dx`` (fraction of the image width)."""

    dx = 0.0

    def _forward(self, images, masks, text):
        outputs = super()._forward(images, masks, text)
        outputs.pred_boxes = outputs.pred_boxes + torch.tensor([self.dx, 0.0, 0.0, 0.0])
        return outputs


@pytest.fixture(scope="module")
def setting(tiny_checkpoint, shapes_dir, bench):
    items = bench.expressions(json.loads((shapes_dir / "val.json").read_text()), "shapes_refexp")
    assert items
    return items, shapes_dir / "images"


def test_identical_predictors_agree_exactly(bench, tiny_checkpoint, setting) -> None:
    items, root = setting
    predictors = {name: Predictor.from_checkpoint(tiny_checkpoint) for name in ("float32", "bfloat16")}
    report = bench.compare(predictors, items, root, batch_size=2, confident=0.0)
    assert report["expressions"] == len(items)
    assert report["top_query"]["same"] == len(items)
    assert report["top_query"]["hit_to_miss"] == report["top_query"]["miss_to_hit"] == 0
    assert report["score_abs_diff"]["all_queries"]["max"] == 0.0
    assert report["box_max_abs_diff_px"]["float32_top_query"]["max"] == 0.0
    p1 = report["precision_at_1"]
    assert p1["float32"] == p1["bfloat16"]


def test_a_known_box_shift_is_reported_in_pixels(bench, tiny_checkpoint, setting) -> None:
    items, root = setting
    shifted = Shifted.from_checkpoint(tiny_checkpoint)
    shifted.dx = 0.05
    plain = Predictor.from_checkpoint(tiny_checkpoint)
    report = bench.compare({"float32": plain, "bfloat16": shifted}, items, root, batch_size=2, confident=0.0)
    # every query's box moves by 0.05 of its image's width in x0 and x1 and nowhere else; scores stay
    (width,) = {open_image(root / f).width for f, _, _ in items}  # the fixture's images share one size
    for group in ("float32_top_query", "queries_scored_above_0"):
        for stat in ("median", "max"):
            assert report["box_max_abs_diff_px"][group][stat] == pytest.approx(0.05 * width, rel=1e-4)
    assert report["score_abs_diff"]["all_queries"]["max"] == 0.0
    assert report["top_query"]["same"] == len(items)

class Placed(Predictor):
    """A float32 Predictor that puts every query of a caption's prediction on that caption's own box."""

    boxes: dict[str, list[float]] = {}

    def _forward(self, images, masks, text):
        outputs = super()._forward(images, masks, text)
        placed = torch.tensor([self.boxes[caption] for caption in text])  # (B, 4) normalised cxcywh
        outputs.pred_boxes = placed[:, None, :].expand_as(outputs.pred_boxes).clone()
        return outputs


def test_precision_at_1_uses_each_expressions_own_top_box(bench, tiny_checkpoint, setting) -> None:
    """Each expression's prediction sits on a box of its own (side by side, no two overlapping); the
    referred box is that box for every other expression and the next expression's box for the rest:
    precision@1 must come out at exactly that share, whatever the batch size."""
    items, root = setting
    captions = [caption for _, caption, _ in items]
    assert len(set(captions)) == len(captions)
    n = len(items)
    assert n >= 2
    placed = Placed.from_checkpoint(tiny_checkpoint)
    placed.boxes = {c: [(k + 0.5) / n, 0.5, 0.5 / n, 0.5] for k, c in enumerate(captions)}

    def pixels(k: int, width: int, height: int) -> list[float]:  # box k as xywh pixels
        cx, cy, w, h = placed.boxes[captions[k % n]]
        return [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]

    crafted = []
    for k, (file_name, caption, _) in enumerate(items):
        size = open_image(root / file_name).size
        crafted.append((file_name, caption, pixels(k if k % 2 == 0 else k + 1, *size)))
    hits = len(range(0, n, 2))
    for batch_size in (1, 2, 3):
        report = bench.compare({"float32": placed, "bfloat16": placed}, crafted, root, batch_size=batch_size,
                               confident=0.5)
        assert report["precision_at_1"] == pytest.approx({"float32": 100 * hits / n,
                                                          "bfloat16": 100 * hits / n})
    # The second predictor puts each caption on the next caption's box: every float32 hit is a bf16 miss
    # and every float32 miss (referred box: the next one) a bf16 hit; no top box overlaps.
    moved = Placed.from_checkpoint(tiny_checkpoint)
    moved.boxes = {c: placed.boxes[captions[(k + 1) % n]] for k, c in enumerate(captions)}
    report = bench.compare({"float32": placed, "bfloat16": moved}, crafted, root, batch_size=2, confident=0.5)
    assert report["precision_at_1"] == pytest.approx({"float32": 100 * hits / n,
                                                      "bfloat16": 100 * (n - hits) / n})
    assert report["top_query"]["hit_to_miss"] == hits and report["top_query"]["miss_to_hit"] == n - hits
    assert report["top_query"]["boxes_overlap_iou_0.5"] == 0
    # One that misses everything (a box in a corner no referred box reaches): float32's hits all flip.
    moved.boxes = {c: [0.02, 0.02, 0.01, 0.01] for c in captions}
    report = bench.compare({"float32": placed, "bfloat16": moved}, crafted, root, batch_size=3, confident=0.5)
    assert report["precision_at_1"]["bfloat16"] == 0.0
    assert report["top_query"]["hit_to_miss"] == hits and report["top_query"]["miss_to_hit"] == 0


def test_an_expression_without_exactly_one_box_is_refused(bench) -> None:
    data = {"images": [{"id": 1, "file_name": "a.png", "caption": "a red circle", "dataset_name": "x"}],
            "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}, {"image_id": 1, "bbox": [1, 1, 1, 1]}]}
    with pytest.raises(ValueError, match=r"image entry 1 \(a.png\) has 2 annotations"):
        bench.expressions(data, "x")
