"""Evaluators against hand-computed values: RefExp precision@k and class-agnostic COCO box AP."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator
from mdetr.ops.boxes import box_iou, generalized_box_iou

# --------------------------------------------------------------------------------------------------------
# RefExp
# --------------------------------------------------------------------------------------------------------

# Every entry's ground truth is the same box; WRONG is far from it (IoU 0, negative GIoU).
GT_XYWH = [10.0, 10.0, 20.0, 20.0]
RIGHT = [10.0, 10.0, 30.0, 30.0]  # GT_XYWH as xyxy
WRONG = [60.0, 60.0, 80.0, 80.0]


def _image(image_id: int, dataset_name: str) -> dict:
    return {"id": image_id, "height": 100, "width": 100, "caption": "the thing", "dataset_name": dataset_name}


def _annotation(ann_id: int, image_id: int, bbox: list[float]) -> dict:
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "iscrowd": 0, "category_id": 1}


def _refexp_gt() -> dict:
    return {
        "images": [_image(1, "refcoco"), _image(2, "refcoco"), _image(3, "refcocog")],
        "annotations": [_annotation(i, i, GT_XYWH) for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }


def _ranked_predictions() -> dict[int, dict[str, torch.Tensor]]:
    """The right box is always first in the tensors, but its *score* ranks it 1st, 5th and 10th.

    Ranked by score: entry 1 is a hit at k = 1, 5, 10; entry 2 (right box 5th) at k = 5, 10; entry 3 (right
    box 10th, the lowest score) only at k = 10. So P@1 = 1/3, P@5 = 2/3, P@10 = 1. Read in tensor order
    instead, every entry would be a hit at k = 1.
    """
    return {
        1: {"scores": torch.tensor([0.9, 0.2, 0.1]), "boxes": torch.tensor([RIGHT, WRONG, WRONG])},
        2: {
            "scores": torch.tensor([0.5, 0.95, 0.9, 0.8, 0.6, 0.1]),
            "boxes": torch.tensor([RIGHT] + [WRONG] * 5),
        },
        3: {
            "scores": torch.tensor([0.01, 0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]),
            "boxes": torch.tensor([RIGHT] + [WRONG] * 9),
        },
    }


def test_refexp_precision_at_k_follows_score_ranking() -> None:
    evaluator = RefExpEvaluator(_refexp_gt())
    evaluator.update(_ranked_predictions())
    summary = evaluator.summarize()
    assert summary["overall"] == pytest.approx({"P@1": 1 / 3, "P@5": 2 / 3, "P@10": 1.0})
    assert summary["criterion"] == "GIoU >= 0.5"
    assert summary["num_evaluated"] == 3
    assert summary["num_missing"] == 0
    assert summary["num_skipped"] == 0


def test_refexp_breakdown_per_dataset_name() -> None:
    evaluator = RefExpEvaluator(_refexp_gt())
    evaluator.update(_ranked_predictions())
    summary = evaluator.summarize()
    assert set(summary) == {"overall", "refcoco", "refcocog", "criterion", "num_evaluated", "num_missing",
                            "num_skipped"}
    # refcoco = entries 1 (hit at 1) and 2 (hit at 5); refcocog = entry 3 (hit at 10 only).
    assert summary["refcoco"] == pytest.approx({"P@1": 0.5, "P@5": 1.0, "P@10": 1.0})
    assert summary["refcocog"] == pytest.approx({"P@1": 0.0, "P@5": 0.0, "P@10": 1.0})


def test_refexp_incremental_updates_match_one_update() -> None:
    evaluator = RefExpEvaluator(_refexp_gt(), ks=(1, 2, 10))
    for image_id, prediction in _ranked_predictions().items():
        evaluator.update({image_id: prediction})
    summary = evaluator.summarize()
    assert summary["overall"] == pytest.approx({"P@1": 1 / 3, "P@2": 1 / 3, "P@10": 1.0})


def test_refexp_dataset_names_filter() -> None:
    evaluator = RefExpEvaluator(_refexp_gt(), dataset_names=("refcocog",))
    # Predictions for the filtered-out refcoco entries are accepted and ignored.
    evaluator.update(_ranked_predictions())
    summary = evaluator.summarize()
    assert summary["num_evaluated"] == 1
    assert summary["overall"] == pytest.approx({"P@1": 0.0, "P@5": 0.0, "P@10": 1.0})
    assert "refcoco" not in summary


def test_refexp_ranks_by_the_referring_score_when_given() -> None:
    # A model with the is-final head: by "scores" the wrong box leads in every entry; by "scores_refexp"
    # (the referring score) the right box leads in entries 1 and 3. Without it entry 1 keeps "scores".
    predictions = {
        i: {"boxes": torch.tensor([RIGHT, WRONG]), "scores": torch.tensor([0.4, 0.9])} for i in (1, 2, 3)
    }
    predictions[2]["scores_refexp"] = torch.tensor([0.1, 0.3])
    predictions[3]["scores_refexp"] = torch.tensor([0.3, 0.1])
    evaluator = RefExpEvaluator(_refexp_gt(), ks=(1, 2))
    evaluator.update(predictions)
    assert evaluator.summarize()["overall"] == pytest.approx({"P@1": 1 / 3, "P@2": 1.0})
    predictions[1]["scores_refexp"] = torch.tensor([0.8, 0.2])
    evaluator.update(predictions)
    assert evaluator.summarize()["overall"] == pytest.approx({"P@1": 2 / 3, "P@2": 1.0})


def test_giou_and_iou_criteria_differ_on_hand_computed_pair() -> None:
    # GT 6x6 at the origin, prediction 6x6 shifted by (1, 1):
    #   intersection [1, 1, 6, 6] = 25, union 36 + 36 - 25 = 47, IoU = 25/47 ~ 0.532 (>= 0.5);
    #   enclosing box [0, 0, 7, 7] = 49, GIoU = 25/47 - (49 - 47)/49 ~ 0.491 (< 0.5).
    gt = {
        "images": [_image(7, "refcoco")],
        "annotations": [_annotation(1, 7, [0.0, 0.0, 6.0, 6.0])],
        "categories": [],
    }
    pred_xyxy = torch.tensor([[1.0, 1.0, 7.0, 7.0]])
    gt_xyxy = torch.tensor([[0.0, 0.0, 6.0, 6.0]])
    iou = box_iou(pred_xyxy, gt_xyxy)[0].item()
    giou = generalized_box_iou(pred_xyxy, gt_xyxy).item()
    assert iou == pytest.approx(25 / 47)
    assert giou == pytest.approx(25 / 47 - 2 / 49)

    prediction = {7: {"scores": torch.tensor([0.9]), "boxes": pred_xyxy}}
    by_iou = RefExpEvaluator(gt, overlap="iou")
    by_iou.update(prediction)
    by_giou = RefExpEvaluator(gt, overlap="giou")
    by_giou.update(prediction)
    iou_summary, giou_summary = by_iou.summarize(), by_giou.summarize()
    assert iou_summary["criterion"] == "IoU >= 0.5"
    assert iou_summary["overall"]["P@1"] == 1.0
    assert giou_summary["overall"]["P@1"] == 0.0


def test_refexp_threshold_is_inclusive_and_configurable() -> None:
    gt = {"images": [_image(1, "refcoco")], "annotations": [_annotation(1, 1, [0.0, 0.0, 10.0, 10.0])]}
    # IoU = GIoU = 0.5 exactly: the prediction is the left half of the GT box (enclosing box = GT).
    prediction = {1: {"scores": torch.tensor([1.0]), "boxes": torch.tensor([[0.0, 0.0, 5.0, 10.0]])}}
    at_half = RefExpEvaluator(gt, threshold=0.5)
    at_half.update(prediction)
    assert at_half.summarize()["overall"]["P@1"] == 1.0
    stricter = RefExpEvaluator(gt, threshold=0.7)
    stricter.update(prediction)
    summary = stricter.summarize()
    assert summary["overall"]["P@1"] == 0.0
    assert summary["criterion"] == "GIoU >= 0.7"


def test_refexp_empty_prediction_is_a_miss_and_json_path_loads(tmp_path) -> None:
    path = tmp_path / "refexp.json"
    path.write_text(json.dumps(_refexp_gt()))
    evaluator = RefExpEvaluator(str(path), allow_missing=True)
    evaluator.update({1: {"scores": torch.zeros(0), "boxes": torch.zeros(0, 4)}})
    summary = evaluator.summarize()
    assert summary["overall"] == {"P@1": 0.0, "P@5": 0.0, "P@10": 0.0}
    assert summary["num_evaluated"] == 1
    assert summary["num_missing"] == 2


@pytest.mark.parametrize("num_annotations", [0, 2])
def test_refexp_rejects_entries_without_exactly_one_annotation(num_annotations: int) -> None:
    gt = _refexp_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 2]
    gt["annotations"] += [_annotation(10 + i, 2, GT_XYWH) for i in range(num_annotations)]
    with pytest.raises(ValueError, match=rf"entry 2 .*has {num_annotations} annotations"):
        RefExpEvaluator(gt)

    evaluator = RefExpEvaluator(gt, skip_invalid=True)
    evaluator.update(_ranked_predictions())  # the prediction for skipped entry 2 is ignored
    summary = evaluator.summarize()
    assert summary["num_skipped"] == 1
    assert summary["num_evaluated"] == 2
    # Entries 1 (hit at 1) and 3 (hit at 10 only) remain.
    assert summary["overall"] == pytest.approx({"P@1": 0.5, "P@5": 0.5, "P@10": 1.0})


def test_refexp_missing_predictions_are_an_error_unless_allowed() -> None:
    predictions = _ranked_predictions()
    del predictions[2]
    evaluator = RefExpEvaluator(_refexp_gt())
    evaluator.update(predictions)
    with pytest.raises(ValueError, match=r"1 of 3 .*ids 2\)"):
        evaluator.summarize()

    lenient = RefExpEvaluator(_refexp_gt(), allow_missing=True)
    lenient.update(predictions)
    summary = lenient.summarize()
    assert summary["num_evaluated"] == 2
    assert summary["num_missing"] == 1
    assert summary["overall"] == pytest.approx({"P@1": 0.5, "P@5": 0.5, "P@10": 1.0})


def test_refexp_rejects_unknown_ids_bad_boxes_and_bad_options() -> None:
    evaluator = RefExpEvaluator(_refexp_gt())
    with pytest.raises(ValueError, match="image id 99"):
        evaluator.update({99: {"scores": torch.ones(1), "boxes": torch.tensor([RIGHT])}})
    with pytest.raises(ValueError, match="entry 1"):  # x1 < x0 makes GIoU meaningless
        evaluator.update({1: {"scores": torch.ones(1), "boxes": torch.tensor([[30.0, 10.0, 10.0, 30.0]])}})
    with pytest.raises(ValueError, match="boxes"):
        evaluator.update({1: {"scores": torch.ones(2), "boxes": torch.zeros(3, 4)}})
    with pytest.raises(ValueError, match="overlap"):
        RefExpEvaluator(_refexp_gt(), overlap="dice")
    with pytest.raises(ValueError, match="ks"):
        RefExpEvaluator(_refexp_gt(), ks=(0, 1))


# --------------------------------------------------------------------------------------------------------
# COCO box AP
# --------------------------------------------------------------------------------------------------------


def _coco_gt() -> dict:
    # Annotation id 0 is deliberate: COCOeval reads a matched ground-truth id of 0 as "unmatched", so the
    # evaluator must renumber ids for the perfect-prediction test to pass.
    boxes = {1: [[0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 40.0, 40.0]], 2: [[10.0, 20.0, 5.0, 8.0]]}
    annotations = []
    for image_id, image_boxes in boxes.items():
        for bbox in image_boxes:
            annotations.append(
                {"id": len(annotations), "image_id": image_id, "bbox": bbox, "iscrowd": 0, "category_id": 1,
                 "area": bbox[2] * bbox[3]}
            )
    return {
        "images": [_image(1, "flickr"), _image(2, "flickr")],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }


def _xyxy(xywh: list[float]) -> list[float]:
    return [xywh[0], xywh[1], xywh[0] + xywh[2], xywh[1] + xywh[3]]


def _single_gt() -> dict:
    gt = _coco_gt()
    gt["images"] = gt["images"][:1]
    gt["annotations"] = gt["annotations"][:1]  # [0, 0, 40, 40], medium area
    return gt


def _one_image(boxes: list[list[float]], scores: list[float], labels: list[int] | None = None) -> dict:
    prediction = {"scores": torch.tensor(scores), "boxes": torch.tensor(boxes)}
    if labels is not None:
        prediction["labels"] = torch.tensor(labels)
    return {1: prediction}


def test_coco_perfect_predictions(capsys) -> None:
    gt = _coco_gt()
    gt_before = copy.deepcopy(gt)
    evaluator = CocoBoxEvaluator(gt)
    for image_id in (1, 2):  # incremental updates, one image each
        boxes = [_xyxy(a["bbox"]) for a in gt["annotations"] if a["image_id"] == image_id]
        scores = torch.linspace(0.9, 0.8, len(boxes))
        evaluator.update({image_id: {"scores": scores, "boxes": torch.tensor(boxes)}})
    stats = evaluator.summarize()
    assert stats["AP"] == pytest.approx(1.0)
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert set(stats) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                          "ARl"}
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert gt == gt_before  # COCOeval's bookkeeping went into a private copy


def test_coco_iou_06_counts_at_50_not_at_75() -> None:
    evaluator = CocoBoxEvaluator(_single_gt())
    # Bottom of the box cut to 24 px: IoU = (40 * 24) / (40 * 40) = 0.6.
    evaluator.update(_one_image([[0.0, 0.0, 40.0, 24.0]], [0.9]))
    stats = evaluator.summarize()
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AP75"] == pytest.approx(0.0)

    # IoU 0.62 clears the thresholds 0.50, 0.55 and 0.60 of COCO's ten (0.50:0.05:0.95): AP = 3/10.
    evaluator = CocoBoxEvaluator(_single_gt())
    evaluator.update(_one_image([[0.0, 0.0, 40.0, 24.8]], [0.9]))
    assert evaluator.summarize()["AP"] == pytest.approx(0.3)


def test_coco_false_positive_ranked_above_true_positive() -> None:
    # One GT; detections by score: FP (0.9), then TP (0.8). Recall/precision after each: (0, 0), (1, 1/2).
    # COCO replaces each precision by the maximum precision at any higher recall (the right-to-left
    # envelope), so the curve is 1/2 everywhere, and each of the 101 recall thresholds 0, 0.01, ..., 1 is
    # looked up at the first detection reaching it: all 101 samples are 1/2, AP50 = 0.5.
    evaluator = CocoBoxEvaluator(_single_gt())
    evaluator.update(_one_image([[0.0, 60.0, 20.0, 90.0], [0.0, 0.0, 40.0, 40.0]], [0.9, 0.8]))
    assert evaluator.summarize()["AP50"] == pytest.approx(0.5)


def test_coco_101_point_interpolation_hand_derived() -> None:
    # Two GT boxes; detections by score: TP (0.9), FP (0.8), TP (0.7).
    #   recall    = 1/2, 1/2, 1;   precision = 1, 1/2, 2/3;   envelope = 1, 2/3, 2/3.
    # Recall thresholds 0.00..0.50 (51 points) first reach recall 1/2 at the first detection -> 1;
    # thresholds 0.51..1.00 (50 points) are reached at the third -> 2/3.
    # AP50 = (51 * 1 + 50 * 2/3) / 101 = 253/303 ~ 0.835 (all boxes are exact, so AP75 and AP too).
    gt = _coco_gt()
    gt["images"] = gt["images"][:1]
    gt["annotations"] = gt["annotations"][:2]
    evaluator = CocoBoxEvaluator(gt)
    evaluator.update(
        _one_image(
            [[0.0, 0.0, 40.0, 40.0], [0.0, 60.0, 20.0, 90.0], [50.0, 50.0, 90.0, 90.0]], [0.9, 0.8, 0.7]
        )
    )
    stats = evaluator.summarize()
    assert stats["AP50"] == pytest.approx(253 / 303)
    assert stats["AP"] == pytest.approx(253 / 303)
    assert stats["AR1"] == pytest.approx(0.5)  # one detection per image finds one of the two boxes
    assert stats["APs"] == -1.0  # no small GT box: COCO's "nothing to measure"


def test_coco_class_agnostic_ignores_labels() -> None:
    boxes, scores, wrong_labels = [[0.0, 0.0, 40.0, 40.0]], [0.9], [7]
    agnostic = CocoBoxEvaluator(_single_gt())
    agnostic.update(_one_image(boxes, scores, wrong_labels))
    assert agnostic.summarize()["AP50"] == pytest.approx(1.0)

    per_class = CocoBoxEvaluator(_single_gt(), class_agnostic=False)
    per_class.update(_one_image(boxes, scores, wrong_labels))
    assert per_class.summarize()["AP50"] == pytest.approx(0.0)

    per_class = CocoBoxEvaluator(_single_gt(), class_agnostic=False)
    per_class.update(_one_image(boxes, scores, [1]))
    assert per_class.summarize()["AP50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels"):
        per_class.update(_one_image(boxes, scores))


def test_coco_no_detections_gives_zeros() -> None:
    evaluator = CocoBoxEvaluator(_coco_gt())
    assert all(value == 0.0 for value in evaluator.summarize().values())
    evaluator.update({1: {"scores": torch.zeros(0), "boxes": torch.zeros(0, 4)}})
    stats = evaluator.summarize()
    assert len(stats) == 12
    assert all(value == 0.0 for value in stats.values())


def test_coco_only_predicted_images_are_evaluated(tmp_path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_coco_gt()))
    evaluator = CocoBoxEvaluator(path)
    # Image 1 predicted perfectly; image 2's ground truth is not counted as missed.
    evaluator.update(_one_image([[0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 90.0, 90.0]], [0.9, 0.8]))
    stats = evaluator.summarize()
    assert stats["AP50"] == pytest.approx(1.0)
    assert all(math.isfinite(value) for value in stats.values())


def test_coco_unknown_image_id_and_verbose(capsys) -> None:
    evaluator = CocoBoxEvaluator(_single_gt(), verbose=True)
    with pytest.raises(ValueError, match="image id 42"):
        evaluator.update({42: {"scores": torch.ones(1), "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}})
    evaluator.update(_one_image([[0.0, 0.0, 40.0, 40.0]], [0.9]))
    evaluator.summarize()
    assert "Average Precision" in capsys.readouterr().out


def test_coco_empty_category_list_still_scores_boxes() -> None:
    # MDETR's mixed and GQA annotation files have "categories": []; COCOeval would then see no ground truth.
    gt = _single_gt()
    gt["categories"] = []
    evaluator = CocoBoxEvaluator(gt)
    evaluator.update(_one_image([[0.0, 0.0, 40.0, 40.0]], [0.9]))
    assert evaluator.summarize()["AP50"] == pytest.approx(1.0)
