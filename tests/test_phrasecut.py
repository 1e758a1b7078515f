"""PhraseCut referring segmentation: mask ops, the metrics on hand-computed masks, the mask losses against
direct computations, both data formats (fixtures written here), post-processing, the shapes segmentations,
and the two-stage recipe end to end through the CLI on the tiny shapes set."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mdetr.builder import build_model, detector_weights_for_segmentation
from mdetr.config import ConfigError, LossConfig, ModelConfig
from mdetr.data.build import build_dataset
from mdetr.data.errors import DataError
from mdetr.data.phrasecut import PhraseCutDataset, is_refer_file, phrasecut_to_mdetr, split_from_file_name
from mdetr.data.transforms import crop
from mdetr.eval.phrasecut import PhraseCutEvaluator, region_metrics
from mdetr.inference.postprocess import post_process_phrasecut
from mdetr.losses.criterion import build_criterion
from mdetr.losses.masks import SegmentationCriterion, dice_loss, mask_focal_loss
from mdetr.models.mdetr import MDETROutput
from mdetr.ops.masks import boxes_to_mask, mask_iou, mask_to_rle, rle_to_mask, segmentation_to_mask


def rect(x0, y0, x1, y1):
    """A rectangle as a COCO polygon."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def pixels(height, width, *blocks):
    """A bool mask with the (rows, cols) slices set."""
    mask = np.zeros((height, width), dtype=bool)
    for rows, cols in blocks:
        mask[rows, cols] = True
    return mask


# ----------------------------------------------------------------------------------------------------- ops


def test_polygons_and_rle_decode_to_the_expected_pixels():
    # pixel (r, c) covers [c, c + 1) x [r, r + 1): the rectangle (1, 1)-(5, 4) covers columns 1-4 of rows 1-3
    expected = pixels(6, 8, (slice(1, 4), slice(1, 5)))
    assert np.array_equal(segmentation_to_mask([rect(1, 1, 5, 4)], 6, 8), expected)
    # two polygons are united; a two-point polygon covers nothing and is ignored
    two = segmentation_to_mask([rect(1, 1, 5, 4), rect(6, 0, 8, 2), [0, 5, 3, 5]], 6, 8)
    assert np.array_equal(two, expected | pixels(6, 8, (slice(0, 2), slice(6, 8))))
    rle = mask_to_rle(expected)
    assert rle["size"] == [6, 8] and isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(rle), expected)
    assert np.array_equal(segmentation_to_mask(json.loads(json.dumps(rle)), 6, 8), expected)
    # uncompressed RLE: column-major runs, starting with background
    column_major = [7, 3, 3, 3, 3, 3, 3, 3, 20]
    assert np.array_equal(segmentation_to_mask({"size": [6, 8], "counts": column_major}, 6, 8), expected)


def test_box_pixels_and_mask_iou_by_hand():
    assert np.array_equal(boxes_to_mask([[1, 1, 5, 4]], 6, 8), pixels(6, 8, (slice(1, 4), slice(1, 5))))
    # pixel centres c + 0.5 inside [0.4, 2.5) are columns 0 and 1; inside [0.6, 2.4) only row 1
    assert np.array_equal(boxes_to_mask([[0.4, 0.6, 2.5, 2.4]], 4, 4), pixels(4, 4, (1, slice(0, 2))))
    union = boxes_to_mask([[0, 0, 2, 2], [1, 1, 3, 3], [-5, 3, 1, 9]], 4, 4)  # clipped to the image
    assert union.sum() == 4 + 4 - 1 + 1
    a, b = pixels(4, 6, (slice(0, 2), slice(0, 3))), pixels(4, 6, (slice(0, 2), slice(1, 4)))
    assert mask_iou(a, b) == (0.5, 4, 8)
    empty = np.zeros((4, 6), dtype=bool)
    assert mask_iou(empty, empty) == (0.0, 0, 0)  # PhraseCut: no intersection scores 0
    assert mask_iou(a, empty) == (0.0, 0, 6)
    with pytest.raises(ValueError, match="shapes"):
        mask_iou(a, np.zeros((6, 4), dtype=bool))


# ------------------------------------------------------------------------------------------------- metrics


def _metric_ground_truth():
    """Four 4x6 phrases; region IoUs of the predictions in _metric_predictions: 0.5, 1.0, 0.0, 0.75."""
    rle_rows_2_3_cols_4_5 = mask_to_rle(pixels(4, 6, (slice(2, 4), slice(4, 6))))
    annotations = [
        (1, [rect(0, 0, 3, 2)], [0, 0, 3, 2]),              # 6 px
        (2, [rect(0, 0, 2, 2)], [0, 0, 2, 2]),              # 4 px
        (2, rle_rows_2_3_cols_4_5, [4, 2, 2, 2]),           # 4 px, as RLE
        (3, [rect(0, 0, 6, 4)], [0, 0, 6, 4]),              # 24 px
        (4, [rect(0, 0, 4, 2)], [0, 0, 4, 2]),              # 8 px
    ]
    return {
        "images": [{"id": i, "height": 4, "width": 6, "file_name": f"{i}.jpg", "caption": "x"}
                   for i in (1, 2, 3, 4)],
        "annotations": [{"id": k, "image_id": i, "segmentation": s, "bbox": b, "iscrowd": 0}
                        for k, (i, s, b) in enumerate(annotations)],
    }


def _metric_predictions():
    return {
        1: {"mask": pixels(4, 6, (slice(0, 2), slice(1, 4)))},                      # I 4, U 8
        2: {"mask": torch.from_numpy(pixels(4, 6, (slice(0, 2), slice(0, 2)), (slice(2, 4), slice(4, 6))))},
        3: {"mask": mask_to_rle(np.zeros((4, 6), dtype=bool))},                      # I 0, U 24
        4: {"mask": pixels(4, 6, (slice(0, 2), slice(0, 3)))},                      # I 6, U 8
    }


def test_phrasecut_metrics_on_hand_computed_masks():
    evaluator = PhraseCutEvaluator(_metric_ground_truth())
    evaluator.update(_metric_predictions())
    summary = evaluator.summarize()
    assert summary["num_evaluated"] == 4 and summary["num_missing"] == 0 and "box" not in summary
    mask = summary["mask"]
    assert mask["mean_iou"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.75) / 4)
    assert mask["cum_iou"] == pytest.approx((4 + 8 + 0 + 6) / (8 + 8 + 24 + 8))
    # IoU strictly above the threshold: 0.5 does not count at 0.5
    assert (mask["Pr@0.5"], mask["Pr@0.7"], mask["Pr@0.9"]) == (0.5, 0.5, 0.25)


def test_box_metrics_keep_scores_above_the_threshold_only():
    evaluator = PhraseCutEvaluator(_metric_ground_truth(), allow_missing=True)
    # the 0.7 box would cover the whole image; it is not above 0.7, so only [1, 0, 4, 2] counts
    boxes = torch.tensor([[1, 0, 4, 2], [0, 0, 6, 4.0]])
    evaluator.update({1: {"scores": torch.tensor([0.9, 0.7]), "boxes": boxes}})
    summary = evaluator.summarize()
    assert summary["box"] == {"mean_iou": 0.5, "cum_iou": 0.5, "Pr@0.5": 0.0, "Pr@0.7": 0.0, "Pr@0.9": 0.0}
    assert summary["num_evaluated"] == 1 and summary["num_missing"] == 3 and "mask" not in summary


def test_metrics_refuse_missing_and_malformed_predictions():
    evaluator = PhraseCutEvaluator(_metric_ground_truth())
    evaluator.update({1: _metric_predictions()[1]})
    with pytest.raises(ValueError, match="3 of 4 PhraseCut entries have no predictions"):
        evaluator.summarize()
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.update({99: {"mask": np.zeros((4, 6), dtype=bool)}})
    with pytest.raises(ValueError, match="the mask is"):
        evaluator.update({1: {"mask": np.zeros((6, 4), dtype=bool)}})
    with pytest.raises(ValueError, match="neither a 'mask' nor 'boxes'"):
        evaluator.update({1: {}})
    zeros = {"mean_iou": 0.0, "cum_iou": 0.0, "Pr@0.5": 0.0, "Pr@0.7": 0.0, "Pr@0.9": 0.0}
    assert region_metrics([]) == zeros


# -------------------------------------------------------------------------------------------------- losses


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _direct_dice(logits, targets):
    total = 0.0
    for row, truth in zip(logits, targets, strict=True):
        p = [_sigmoid(v) for v in row]
        inter = sum(pi * ti for pi, ti in zip(p, truth, strict=True))
        total += 1 - (2 * inter + 1) / (sum(p) + sum(truth) + 1)
    return total


def _direct_focal(logits, targets, alpha=0.25, gamma=2.0):
    total = 0.0
    for row, truth in zip(logits, targets, strict=True):
        per_pixel = []
        for x, t in zip(row, truth, strict=True):
            p = _sigmoid(x)
            if t:
                per_pixel.append(-alpha * (1 - p) ** gamma * math.log(p))
            else:
                per_pixel.append(-(1 - alpha) * p**gamma * math.log(1 - p))
        total += sum(per_pixel) / len(per_pixel)
    return total


def test_dice_and_focal_losses_match_direct_computation():
    logits = [[2.0, -1.0, 0.5, 0.0, 3.0], [-3.0, 1.5, 0.2, -0.7, -2.0]]
    targets = [[1, 0, 1, 0, 1], [0, 1, 1, 1, 0]]
    lt, tt = torch.tensor(logits, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
    assert dice_loss(lt, tt, 3.0).item() == pytest.approx(_direct_dice(logits, targets) / 3)
    assert mask_focal_loss(lt, tt, 3.0).item() == pytest.approx(_direct_focal(logits, targets) / 3)
    # an empty target predicted empty costs (almost) nothing under dice thanks to the +1 terms
    assert dice_loss(torch.full((1, 4), -30.0), torch.zeros(1, 4), 1.0).item() == pytest.approx(0.0, abs=1e-9)


def _mask_batch():
    torch.manual_seed(0)
    slots = 8
    sizes = [(8, 12), (6, 8)]  # the batch is padded to 8 x 12; masks are predicted at stride 4: 2 x 3
    targets = []
    for b, ((h, w), n) in enumerate(zip(sizes, (2, 1), strict=True)):
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        masks[0, : h // 2, : w // 2] = True
        if n == 2:
            masks[1, h // 2 :, 2:] = True
        positive = torch.zeros(n, slots, dtype=torch.bool)
        positive[:, 1 + b] = True
        targets.append({"boxes": torch.rand(n, 4) * 0.4 + 0.3, "positive_map": positive, "masks": masks,
                        "size": torch.tensor([h, w]), "image_id": b})
    outputs = MDETROutput(pred_logits=torch.randn(2, 3, slots), pred_boxes=torch.rand(2, 3, 4) * 0.4 + 0.3,
                          proj_queries=None, proj_tokens=None,
                          text_padding_mask=torch.zeros(2, 4, dtype=torch.bool),
                          pred_masks=torch.randn(2, 3, 2, 3, dtype=torch.float64))
    return outputs, targets


def test_segmentation_criterion_matches_direct_computation():
    outputs, targets = _mask_batch()
    criterion = SegmentationCriterion(build_criterion(LossConfig(), num_token_slots=8))
    losses = criterion(outputs, targets)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"} <= set(losses)
    # the same matching as the box losses; each matched mask upsampled to the padded batch (8 x 12), each
    # target zero-padded to it; sums over the 3 boxes divided by 3
    tokens = [t["positive_map"].float() for t in targets]
    indices = criterion.detection.matcher(outputs.pred_logits, outputs.pred_boxes,
                                          [t["boxes"] for t in targets], tokens)
    logits, truth = [], []
    for b, (queries, boxes) in enumerate(indices):
        for q, n in zip(queries.tolist(), boxes.tolist(), strict=True):
            up = F.interpolate(outputs.pred_masks[b, q][None, None], size=(8, 12), mode="bilinear",
                               align_corners=False)
            logits.append(up.flatten().tolist())
            padded = torch.zeros(8, 12)
            mask = targets[b]["masks"][n]
            padded[: mask.shape[0], : mask.shape[1]] = mask.float()
            truth.append(padded.flatten().tolist())
    assert len(logits) == 3
    assert losses["loss_dice"].item() == pytest.approx(_direct_dice(logits, truth) / 3, rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(_direct_focal(logits, truth) / 3, rel=1e-5)
    # the normaliser is the (global) number of boxes when given
    halved = criterion(outputs, targets, num_boxes=6.0)
    assert halved["loss_dice"].item() == pytest.approx(losses["loss_dice"].item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="needs the target's 'masks'"):
        criterion(outputs, [{k: v for k, v in t.items() if k != "masks"} for t in targets])


def test_mask_losses_give_gradients_to_the_masks_only_through_matched_queries():
    outputs, targets = _mask_batch()
    outputs.pred_masks.requires_grad_(True)
    criterion = SegmentationCriterion(build_criterion(LossConfig(), num_token_slots=8))
    losses = criterion(outputs, targets)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    grad = outputs.pred_masks.grad.abs().flatten(2).sum(-1)  # (B, Q)
    assert torch.isfinite(grad).all()
    assert (grad > 0).sum().item() == 3  # the three matched queries


# ---------------------------------------------------------------------------------------------------- data


def _write_image(path, width, height):
    Image.fromarray(np.full((height, width, 3), 120, dtype=np.uint8)).save(path)


REFER_TASKS = [
    {"task_id": "7__1", "image_id": 7, "phrase": "red car", "ann_ids": [11, 12],
     "instance_boxes": [[1, 1, 4, 3], [6, 5, 3, 3]],
     "Polygons": [[[[1, 1], [5, 1], [5, 4], [1, 4]]],
                  [[[6, 5], [9, 5], [9, 6], [6, 6]], [[6, 7], [9, 7], [9, 8], [6, 8]]]],
     "phrase_structure": {"name": "car", "attributes": ["red"], "type": "attribute"}},
    {"task_id": "8__3", "image_id": 8, "phrase": "sky ", "ann_ids": [13],
     "instance_boxes": [[0, 0, 8, 2]], "Polygons": [[[[0, 0], [8, 0], [8, 2], [0, 2]]]],
     "phrase_structure": {"name": "sky", "attributes": [], "type": "name"}},
]


@pytest.fixture
def release(tmp_path):
    """The original release's layout: refer_miniv.json, image_data_split3000.json and VG images."""
    root = tmp_path / "VGPhraseCut_v0"
    (root / "images").mkdir(parents=True)
    (root / "refer_miniv.json").write_text(json.dumps(REFER_TASKS))
    sizes = {7: (12, 10), 8: (8, 6)}
    images = [{"image_id": i, "width": w, "height": h, "split": "miniv", "coco_id": None}
              for i, (w, h) in sizes.items()]
    (root / "image_data_split3000.json").write_text(json.dumps(images))
    for image_id, (w, h) in sizes.items():
        _write_image(root / "images" / f"{image_id}.jpg", w, h)
    return root


def _mdetr_file(tmp_path, segmentation_of_second=None):
    """MDETR's conversion of the same two tasks (finetune_phrasecut_miniv.json), the first instance as RLE."""
    first = mask_to_rle(segmentation_to_mask([rect(1, 1, 5, 4)], 10, 12))
    data = {
        "images": [
            {"id": 1, "file_name": "7.jpg", "height": 10, "width": 12, "caption": "red car",
             "task_id": "7__1", "original_id": 7, "dataset_name": "phrasecut", "tokens_negative": []},
            {"id": 2, "file_name": "8.jpg", "height": 6, "width": 8, "caption": "sky", "task_id": "8__3",
             "original_id": 8, "dataset_name": "phrasecut", "tokens_negative": []},
        ],
        "annotations": [
            {"id": 4, "image_id": 1, "bbox": [1, 1, 4, 3], "area": 12, "iscrowd": 0, "category_id": 1,
             "tokens_positive": [[0, 7]], "segmentation": first},
            {"id": 5, "image_id": 1, "bbox": [6, 5, 3, 3], "area": 9, "iscrowd": 0, "category_id": 1,
             "tokens_positive": [[0, 7]],
             "segmentation": segmentation_of_second or [rect(6, 5, 9, 6), rect(6, 7, 9, 8)]},
            {"id": 6, "image_id": 2, "bbox": [0, 0, 8, 2], "area": 16, "iscrowd": 0, "category_id": 1,
             "tokens_positive": [[0, 3]], "segmentation": [rect(0, 0, 8, 2)]},
        ],
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
    path = tmp_path / "finetune_phrasecut_miniv.json"
    path.write_text(json.dumps(data))
    return path


def test_original_release_converts_to_mdetr_format(release):
    data = phrasecut_to_mdetr(release / "refer_miniv.json")
    first, second = data["images"]
    assert first == {"id": 0, "file_name": "7.jpg", "height": 10, "width": 12, "caption": "red car",
                     "dataset_name": "phrasecut", "tokens_negative": [], "original_id": 7, "task_id": "7__1"}
    assert second["caption"] == "sky" and second["task_id"] == "8__3"
    anns = data["annotations"]
    assert [a["image_id"] for a in anns] == [0, 0, 1] and [a["id"] for a in anns] == [0, 1, 2]
    assert anns[0]["bbox"] == [1, 1, 4, 3] and anns[0]["tokens_positive"] == [[0, 7]]
    assert anns[1]["segmentation"] == [rect(6, 5, 9, 6), rect(6, 7, 9, 8)]  # points flattened, per polygon
    assert anns[2]["tokens_positive"] == [[0, 3]]  # the whole (stripped) phrase
    assert is_refer_file(release / "refer_miniv.json") and split_from_file_name("refer_miniv.json") == "miniv"
    assert split_from_file_name("finetune_phrasecut_test.json") == "test"
    # the same through the CLI, with the image list named explicitly
    from mdetr.cli import main

    moved = release.parent / "elsewhere.json"
    (release / "image_data_split3000.json").rename(moved)
    out = release.parent / "finetune_phrasecut_miniv.json"
    refer = str(release / "refer_miniv.json")
    assert main(["data", "phrasecut", refer, str(out), "--image-data", str(moved)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert not is_refer_file(out)


@pytest.mark.parametrize("form", ["refer", "mdetr"])
def test_dataset_reads_both_formats_with_masks(form, release, tmp_path, tokenizer):
    ann = release / "refer_miniv.json" if form == "refer" else _mdetr_file(tmp_path)
    dataset = PhraseCutDataset(ann, release / "images", tokenizer=tokenizer)
    assert len(dataset) == 2
    _, target = dataset[0]
    assert target["task_id"] == "7__1" and target["caption"] == "red car"
    masks = target["masks"]
    assert masks.shape == (2, 10, 12) and masks.dtype == torch.bool
    assert np.array_equal(masks[0].numpy(), pixels(10, 12, (slice(1, 4), slice(1, 5))))
    assert np.array_equal(masks[1].numpy(), pixels(10, 12, (5, slice(6, 9)), (7, slice(6, 9))))
    _, target = dataset[1]
    assert np.array_equal(target["masks"][0].numpy(), pixels(6, 8, (slice(0, 2), slice(0, 8))))
    assert target["boxes"].shape == (1, 4)  # normalised cxcywh
    assert torch.allclose(target["boxes"][0], torch.tensor([0.5, 1 / 6, 1.0, 1 / 3]))
    # the ground truth an evaluator scores against: the kept entries and annotations
    assert len(dataset.kept_ground_truth["annotations"]) == 3


def test_masks_move_with_the_boxes_through_crop():
    image = Image.new("RGB", (12, 10))
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 1:4, 1:5] = True
    masks[1, 7:9, 9:12] = True
    target = {"boxes": torch.tensor([[1.0, 1, 5, 4], [9, 7, 12, 9]]), "masks": masks,
              "labels": torch.tensor([0, 1]), "area": torch.tensor([12.0, 6.0])}
    _, out = crop(image, target, top=0, left=0, height=6, width=6)  # the second box leaves the crop
    assert out["boxes"].tolist() == [[1, 1, 5, 4]] and out["masks"].shape == (1, 6, 6)
    assert torch.equal(out["masks"][0], masks[0, :6, :6])
    _, out = crop(image, target, top=2, left=3, height=8, width=9)
    assert out["boxes"].tolist() == [[0, 0, 2, 2], [6, 5, 9, 7]]
    assert torch.equal(out["masks"], masks[:, 2:10, 3:12])


def test_build_dataset_reads_a_refer_file_for_box_training(release, tokenizer):
    from mdetr.config import DataConfig

    data = DataConfig(val_ann=str(release / "refer_miniv.json"), val_images=str(release / "images"),
                      val_size=0)
    dataset = build_dataset(data, "val", tokenizer)
    assert isinstance(dataset, PhraseCutDataset) and len(dataset) == 2
    _, target = dataset[0]
    assert "masks" not in target and target["boxes"].shape == (2, 4)


@pytest.mark.parametrize("change, message", [
    (lambda tasks: tasks[1].pop("Polygons"), "task_id 8__3: the task has no 'Polygons'"),
    (lambda tasks: tasks[0]["Polygons"].pop(),
     "task_id 7__1: 'Polygons' must list the polygons of each of the 2"),
    (lambda tasks: tasks[0].update(image_id=99), "task_id 7__1: image_id 99 is not in"),
    (lambda tasks: tasks[0]["Polygons"][1][0].append([1]), "task_id 7__1: polygon 0 of instance 1 is not"),
    (lambda tasks: tasks[1].update(phrase="  "), "task_id 8__3: the task's 'phrase' is empty"),
])
def test_bad_refer_tasks_name_file_and_task(release, change, message):
    tasks = json.loads(json.dumps(REFER_TASKS))
    change(tasks)
    (release / "refer_miniv.json").write_text(json.dumps(tasks))
    with pytest.raises(DataError, match=message) as error:
        phrasecut_to_mdetr(release / "refer_miniv.json")
    assert "refer_miniv.json" in str(error.value)


def test_refer_file_without_its_image_list_is_a_clear_error(release, tokenizer):
    (release / "image_data_split3000.json").unlink()
    with pytest.raises(DataError, match="image_data_split3000.json"):
        PhraseCutDataset(release / "refer_miniv.json", release / "images", tokenizer=tokenizer)


def test_bad_segmentation_names_the_annotation_and_follows_the_policy(release, tmp_path, tokenizer):
    ann = _mdetr_file(tmp_path, segmentation_of_second="oops")
    with pytest.raises(DataError, match=r"annotation id 5 \(image id 1\): 'segmentation' is neither"):
        PhraseCutDataset(ann, release / "images", tokenizer=tokenizer)
    dataset = PhraseCutDataset(ann, release / "images", tokenizer=tokenizer, on_error="skip")
    assert len(dataset) == 2 and any("annotation id 5" in str(p) for p in dataset.problems)
    _, target = dataset[0]
    assert target["masks"].shape == (1, 10, 12)  # the bad instance is left out with its box
    wrong_size = {"size": [3, 3], "counts": mask_to_rle(np.zeros((3, 3), dtype=bool))["counts"]}
    with pytest.raises(DataError, match="RLE segmentation's size"):
        PhraseCutDataset(_mdetr_file(tmp_path, wrong_size), release / "images", tokenizer=tokenizer)


# -------------------------------------------------------------------------------------------- post-process


def test_post_process_unites_the_masks_of_confident_boxes():
    # query 0: certain object, mask on the left half; query 1: mostly "no object", mask everywhere
    logits = torch.tensor([[[6.0, 0.0, 0.0, -6.0], [-6.0, 0.0, 0.0, 6.0]]])
    masks = torch.full((1, 2, 2, 2), 10.0)
    masks[0, 0, :, 1] = -10.0
    outputs = MDETROutput(pred_logits=logits, pred_boxes=torch.full((1, 2, 4), 0.5), proj_queries=None,
                          proj_tokens=None, text_padding_mask=torch.zeros(1, 3, dtype=torch.bool),
                          pred_masks=masks)
    sizes, originals = torch.tensor([[8, 8]]), torch.tensor([[16, 16]])
    (result,) = post_process_phrasecut(outputs, sizes, originals)
    assert result["keep"].tolist() == [0]
    assert result["mask"].shape == (16, 16)
    assert result["mask"][:, :8].all() and not result["mask"][:, 8:].any()
    (everything,) = post_process_phrasecut(outputs, sizes, originals, score_threshold=0.0)
    assert everything["keep"].tolist() == [0, 1] and everything["mask"].all()
    (nothing,) = post_process_phrasecut(outputs, sizes, originals, score_threshold=1.0)
    assert len(nothing["keep"]) == 0 and nothing["mask"].shape == (16, 16) and not nothing["mask"].any()


# ---------------------------------------------------------------------------------------------- the model


def test_freezing_the_detector_leaves_only_the_mask_branch_trainable(roberta_like):
    config = ModelConfig(backbone="resnet18", backbone_pretrained=False, text_encoder=roberta_like,
                         hidden_dim=128, nheads=8, enc_layers=1, dec_layers=2, dim_feedforward=64,
                         num_queries=4, contrastive_align=False, masks=True, freeze_detector=True)
    model = build_model(config)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bbox_attention", "mask_head"}
    with pytest.raises(ConfigError, match="needs model.masks=true"):
        ModelConfig(freeze_detector=True).validate()
    # a detector's weights go into the segmentation model's detr, its alignment projections are left out
    detector = {"class_embed.weight": torch.zeros(1),
                "contrastive_align_projection_text.bias": torch.zeros(1)}
    assert set(detector_weights_for_segmentation(detector)) == {"detr.class_embed.weight"}
    assert detector_weights_for_segmentation({"detr.x": torch.zeros(1)}).keys() == {"detr.x"}


# --------------------------------------------------------------------------------------------------- shapes


def test_shapes_annotations_carry_the_drawn_outline(shapes_dir):
    from mdetr.data import shapes

    data = json.loads((shapes_dir / "train.json").read_text())
    scenes = {s["file_name"]: s for s in json.loads((shapes_dir / "train_scenes.json").read_text())}
    entries = {e["id"]: e for e in data["images"]}
    checked, ious = set(), []
    for ann in data["annotations"]:
        entry = entries[ann["image_id"]]
        mask = segmentation_to_mask(ann["segmentation"], entry["height"], entry["width"])
        rows, cols = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        # the polygon's pixels span the box (a sharp tip may cover no whole pixel: up to 2 px short)
        assert abs(cols.min() - x) <= 2 and abs(cols.max() + 1 - (x + w)) <= 2
        assert abs(rows.min() - y) <= 2 and abs(rows.max() + 1 - (y + h)) <= 2
        # and are the pixels the renderer covers
        record = next(o for o in scenes[entry["file_name"]]["objects"] if o["bbox"] == ann["bbox"])
        obj = shapes.ShapeObject(record["shape"], record["color"], record["size"], record["material"],
                                 record["x"], record["y"], record["radius"])
        _, coverage, (px, py) = shapes._render_object(obj, image_size=entry["width"])
        drawn = np.zeros_like(mask)
        drawn[py : py + coverage.shape[0], px : px + coverage.shape[1]] = coverage > 0.5
        ious.append(mask_iou(mask, drawn)[0])
        assert ious[-1] > 0.8, ann["shape"]  # rasterising the edges differs most on 6 px stars
        checked.add(ann["shape"])
    assert np.mean(ious) > 0.9 and "circle" in checked and len(checked) >= 3


# ---------------------------------------------------------------------------------------------- end to end


def _shapes_as_refer(shapes_dir, split, out):
    """The shapes split in the original PhraseCut layout: refer_{split}.json, image_data_split3000.json and
    {image_id}.jpg images (the PNG bytes under VG-style names)."""
    data = json.loads((shapes_dir / f"{split}.json").read_text())
    (out / "images").mkdir(parents=True)
    tasks, images = [], {}
    for entry in data["images"]:
        image_id = entry["original_id"] + 1
        if image_id not in images:
            shutil.copy(shapes_dir / "images" / entry["file_name"], out / "images" / f"{image_id}.jpg")
            images[image_id] = {"image_id": image_id, "width": entry["width"], "height": entry["height"],
                                "split": split}
        anns = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
        tasks.append({"task_id": f"{image_id}__{entry['id']}", "image_id": image_id,
                      "phrase": entry["caption"], "ann_ids": [a["id"] for a in anns],
                      "instance_boxes": [a["bbox"] for a in anns],
                      "Polygons": [[[p[i : i + 2] for i in range(0, len(p), 2)] for p in a["segmentation"]]
                                   for a in anns]})
    (out / f"refer_{split}.json").write_text(json.dumps(tasks))
    (out / "image_data_split3000.json").write_text(json.dumps(list(images.values())))
    return out / f"refer_{split}.json"


def test_two_stage_recipe_through_the_cli(shapes_dir, tmp_path, tiny_overrides, capsys):
    from safetensors.torch import load_file

    from mdetr.cli import main

    config = tmp_path / "lite.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    width = ["model.hidden_dim=128", "model.nheads=8", "data.num_workers=0", "train.epochs=1"]
    stage1 = tmp_path / "stage1"
    assert main(["train", "--config", str(config), "--no-progress",
                 *tiny_overrides(shapes_dir, stage1, *width)]) == 0
    stage2 = tmp_path / "stage2"
    masks = ["model.masks=true", "model.contrastive_align=false", "model.freeze_detector=true",
             "model.aux_loss=false", "train.init_allow_new_heads=true", "data.refexp_datasets=[]"]
    assert main(["train", "--config", str(config), "--no-progress", "--init", str(stage1 / "last"),
                 *tiny_overrides(shapes_dir, stage2, *width, *masks)]) == 0
    records = [json.loads(line) for line in (stage2 / "log.jsonl").read_text().splitlines()]
    train_record = next(r for r in records if r["type"] == "train")
    assert {"loss_mask", "loss_dice", "loss_ce"} <= set(train_record)
    evaluation = next(r for r in records if r["type"] == "eval")
    assert "mIoU" in evaluation and 0 <= evaluation["mIoU"] <= 1
    assert evaluation["metrics"]["phrasecut"]["num_evaluated"] > 0

    # the detector is frozen: stage 2 kept stage 1's weights (less the alignment heads); the mask head trained
    before = load_file(stage1 / "last" / "model.safetensors")
    after = load_file(stage2 / "last" / "model.safetensors")
    for key, value in detector_weights_for_segmentation(before).items():
        assert torch.equal(after[key], value), key
    assert any(k.startswith("mask_head.") for k in after)

    # evaluate on MDETR's format and on the original release's: the same phrases, the same numbers
    capsys.readouterr()
    mdetr_metrics, refer_metrics = tmp_path / "mdetr.json", tmp_path / "refer.json"
    assert main(["evaluate", str(stage2 / "last"), "--ann", str(shapes_dir / "val.json"), "--images",
                 str(shapes_dir / "images"), "--output", str(mdetr_metrics)]) == 0
    assert "M-IoU" in capsys.readouterr().out
    refer = _shapes_as_refer(shapes_dir, "val", tmp_path / "VGPhraseCut_v0")
    assert main(["evaluate", str(stage2 / "last"), "--task", "phrasecut", "--ann", str(refer), "--images",
                 str(refer.parent / "images"), "--output", str(refer_metrics)]) == 0
    first, second = (json.loads(p.read_text())["phrasecut"] for p in (mdetr_metrics, refer_metrics))
    assert first["mask"] == pytest.approx(second["mask"]) and first["box"] == pytest.approx(second["box"])
    phrases = len(json.loads((shapes_dir / "val.json").read_text())["images"])
    assert first["num_evaluated"] == second["num_evaluated"] == phrases
    assert second["split"] == "val"

    # predict: the union mask as RLE at the image's size, drawn under the boxes
    image = shapes_dir / "images" / "val" / "000000.png"
    assert main(["predict", str(stage2 / "last"), "--image", str(image), "--text", "the red circle",
                 "--threshold", "0", "--output-dir", str(tmp_path / "pred")]) == 0
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]
    mask = rle_to_mask(record["mask_rle"])
    assert mask.shape == (128, 128) and record["mask_area"] == int(mask.sum())
    assert record["detections"] and Image.open(record["picture"]).size[0] == 128
    # a segmentation region is every box above the threshold: --top-k would silently change it, so it is
    # refused
    with pytest.raises(SystemExit):
        main(["predict", str(stage2 / "last"), "--image", str(image), "--text", "the red circle",
              "--top-k", "1", "--output-dir", str(tmp_path / "pred_topk")])
    assert "--top-k does not apply to a segmentation checkpoint" in capsys.readouterr().err
