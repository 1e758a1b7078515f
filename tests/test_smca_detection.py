"""The SMCA object detector: focal loss and matcher, COCO data and evaluation, training and the CLI."""

import json
import math

import pytest
import torch

from mdetr.cli import main
from mdetr.config import ConfigError, LossConfig, ModelConfig, load_config
from mdetr.data.coco_detection import CocoDetection, collate_detection
from mdetr.data.errors import DataError
from mdetr.data.shapes import SHAPES, detection_categories, export_detection, generate_shapes
from mdetr.engine.detection import DetectionTask, build_detection, evaluate_detection, resolve_classes
from mdetr.engine.distributed import DistributedContext, shard_indices
from mdetr.eval import CocoBoxEvaluator
from mdetr.inference.detection import DetectionPredictor, post_process_detection
from mdetr.losses.criterion import total_loss
from mdetr.losses.detection import DetectionCriterion, FocalHungarianMatcher, sigmoid_focal_loss
from mdetr.models.detector import DetectionOutput, SMCADetector
from mdetr.ops.boxes import box_xyxy_to_cxcywh


def _focal(logit: float, target: float, alpha: float, gamma: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_sigmoid_focal_loss_against_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5) * 3
    targets = (torch.rand(3, 4, 5) > 0.7).float()
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    for index in torch.cartesian_prod(torch.arange(3), torch.arange(4), torch.arange(5)).tolist():
        i = tuple(index)
        expected = _focal(logits[i].item(), targets[i].item(), 0.25, 2.0)
        assert loss[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # gamma = 0 and alpha < 0: plain binary cross-entropy
    plain = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)
    assert torch.allclose(plain, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets,
                                                                                      reduction="none"))


def test_focal_matcher_cost_and_assignment():
    matcher = FocalHungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    logits = torch.tensor([[[3.0, -2.0, -4.0], [-3.0, -1.0, 2.5]]])  # 2 queries, 3 classes
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]])
    tgt_boxes = torch.tensor([[0.7, 0.6, 0.3, 0.2], [0.3, 0.3, 0.2, 0.2]])
    tgt_labels = torch.tensor([2, 0])
    cost = matcher.cost_matrix(logits, boxes, tgt_boxes, tgt_labels)
    p = logits[0, 1, 2].sigmoid().item()
    positive = 0.25 * (1 - p) ** 2 * -math.log(p)
    negative = 0.75 * p**2 * -math.log(1 - p)
    assert cost[1, 0].item() == pytest.approx(2 * (positive - negative) + 0 - 2 * 1.0, abs=1e-5)
    (rows, cols), = matcher(logits, boxes, [tgt_boxes], [tgt_labels])
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}


def test_criterion_against_direct_computation_and_empty_targets():
    criterion = DetectionCriterion(matcher=FocalHungarianMatcher(), alpha=0.25, gamma=2.0)
    logits = torch.tensor([[[2.0, -1.0], [-3.0, 0.5], [0.0, 0.0]]], requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]],
                         requires_grad=True)
    target = {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]]), "labels": torch.tensor([0])}
    losses = criterion(DetectionOutput(logits, boxes), [target])
    # query 0 matches (best class and box); its target row is (1, 0), every other row (0, 0)
    one_hot = torch.zeros(1, 3, 2)
    one_hot[0, 0, 0] = 1
    expected_ce = sum(_focal(logits[0, q, c].item(), one_hot[0, q, c].item(), 0.25, 2.0)
                      for q in range(3) for c in range(2))
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.2, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(1 - 0.5, abs=1e-6)  # IoU 0.5, enclosing = union
    total_loss(losses, {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}).backward()
    assert boxes.grad[0, 0].abs().sum() > 0 and boxes.grad[0, 1:].abs().sum() == 0
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = criterion(DetectionOutput(logits, boxes), [empty])
    assert losses["loss_bbox"].item() == 0 and torch.isfinite(losses["loss_ce"])
    with pytest.raises(ValueError, match="num_classes"):
        criterion(DetectionOutput(logits, boxes), [{"boxes": target["boxes"], "labels": torch.tensor([5])}])


def test_post_process_picks_the_best_query_category_pairs():
    logits = torch.full((1, 3, 4), -9.0)
    logits[0, 2, 1], logits[0, 0, 3], logits[0, 2, 3] = 2.0, 1.0, 0.0
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 0.2]]])
    result, = post_process_detection(DetectionOutput(logits, boxes), torch.tensor([[100, 200]]), top_k=3)
    assert result["labels"].tolist() == [1, 3, 3]
    assert torch.allclose(result["scores"], torch.tensor([2.0, 1.0, 0.0]).sigmoid())
    assert torch.allclose(result["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))  # query 2, xyxy pixels
    assert torch.allclose(result["boxes"][1], torch.tensor([0.0, 0.0, 200.0, 100.0]))  # query 0


@pytest.fixture(scope="module")
def detection_shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-detection")
    generate_shapes(out, seed=0, num_train=4, num_val=2, num_val_unseen=0, image_size=128, max_objects=5)
    export_detection(out, scheme="shape", splits=("train", "val"))
    return out


def test_export_lists_every_object_with_its_shape(detection_shapes):
    data = json.loads((detection_shapes / "val_detection_shape.json").read_text())
    scenes = json.loads((detection_shapes / "val_scenes.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES)
    assert len(data["images"]) == len(scenes)
    assert len(data["annotations"]) == sum(len(s["objects"]) for s in scenes)
    names = {c["id"]: c["name"] for c in data["categories"]}
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    assert [names[a["category_id"]] for a in first] == [o["shape"] for o in scenes[0]["objects"]]
    assert [a["bbox"] for a in first] == [o["bbox"] for o in scenes[0]["objects"]]
    assert len(detection_categories("shape_color")) == 48
    assert detection_categories("shape_color")[0]["name"] == "gray circle"
    with pytest.raises(ValueError, match="scheme"):
        detection_categories("colour")


def test_dataset_targets_and_bad_input(detection_shapes, tmp_path):
    dataset = CocoDetection(detection_shapes / "val_detection_shape.json", detection_shapes / "images")
    assert dataset.num_classes == len(SHAPES) + 1
    image, target = dataset[0]
    data = json.loads((detection_shapes / "val_detection_shape.json").read_text())
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    x, y, w, h = first[0]["bbox"]
    expected = box_xyxy_to_cxcywh(torch.tensor([x, y, x + w, y + h])) / 128
    assert image.shape == (3, 128, 128) and torch.allclose(target["boxes"][0], expected, atol=1e-5)
    assert target["labels"].tolist() == [a["category_id"] for a in first]
    batch = collate_detection([dataset[0], None, dataset[1]])
    assert len(batch) == 2 and batch.captions == ["", ""]
    data["annotations"][1]["category_id"] = 42
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"bad.json, annotation id 2 \(image id 1\): category_id 42"):
        CocoDetection(bad, detection_shapes / "images")
    skipped = CocoDetection(bad, detection_shapes / "images", on_error="skip")
    assert len(skipped[0][1]["labels"]) == len(first) - 1 and len(skipped.problems) == 1


def _perfect_outputs(ground_truth, image_id, num_classes, *, shift=0.0):
    """A DetectionOutput whose query k predicts ground-truth box k of the image with its category."""
    annotations = [a for a in ground_truth["annotations"] if a["image_id"] == image_id]
    logits = torch.full((1, len(annotations) + 2, num_classes), -8.0)
    boxes = torch.full((1, len(annotations) + 2, 4), 0.1)
    for k, a in enumerate(annotations):
        x, y, w, h = a["bbox"]
        logits[0, k, a["category_id"]] = 8.0
        boxes[0, k] = box_xyxy_to_cxcywh(torch.tensor([x + shift * w, y, x + w + shift * w, y + h])) / 128
    return DetectionOutput(logits, boxes)


@pytest.mark.parametrize("shift,expected", [(0.0, 1.0), (0.3, None), (1.0, 0.0)])
def test_coco_ap_is_one_on_perfect_predictions_and_lower_on_shifted(detection_shapes, shift, expected):
    ground_truth = json.loads((detection_shapes / "val_detection_shape.json").read_text())
    evaluator = CocoBoxEvaluator(ground_truth, class_agnostic=False)
    for image in ground_truth["images"]:
        outputs = _perfect_outputs(ground_truth, image["id"], len(SHAPES) + 1, shift=shift)
        evaluator.update({image["id"]: post_process_detection(outputs, torch.tensor([[128, 128]]))[0]})
    ap = evaluator.summarize()
    if expected is None:  # IoU 0.54 under a 30 % shift: a hit at IoU 0.5 only
        assert 0 < ap["AP"] < ap["AP50"] == pytest.approx(1.0)
    else:
        assert ap["AP"] == pytest.approx(expected) and ap["AP50"] == pytest.approx(expected)


def _tiny_detection_overrides(data, out, *extra):
    return [
        "model.arch=smca_r50", "model.backbone=resnet18", "model.backbone_pretrained=false",
        "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
        "model.dim_feedforward=64", "model.num_queries=8", "model.num_classes=0", "model.dropout=0.0",
        f"data.train_ann={data / 'train_detection_shape.json'}", f"data.train_images={data / 'images'}",
        f"data.val_ann={data / 'val_detection_shape.json'}", f"data.val_images={data / 'images'}",
        "data.scales=[128]", "data.crop_scales=[128]", "data.crop_min=96", "data.crop_max=128",
        "data.val_size=0",
        "data.max_size=128", "data.batch_size=2", f"train.output_dir={out}", "train.log_every=1", *extra,
    ]


def test_detection_config_defaults_and_class_resolution(detection_shapes, tmp_path):
    config = load_config(None, _tiny_detection_overrides(detection_shapes, tmp_path), task="detection")
    loss = config.loss
    assert (loss.cost_class, loss.cost_bbox, loss.cost_giou) == (2, 5, 2)
    assert (loss.ce_coef, loss.bbox_coef, loss.giou_coef) == (2, 5, 2)
    assert config.model.num_queries == 8
    assert load_config(None, ["model.arch=smca_r50"]).model.num_queries == 300
    resolve_classes(config)
    assert config.model.num_classes == 7 and config.model.class_names == ["", *SHAPES]
    with pytest.raises(ConfigError, match="detection model only"):
        load_config(None, ["model.decoder=smca", "model.smca_multiscale=true", "model.enc_layers=5"])
    positions = _tiny_detection_overrides(detection_shapes, tmp_path, "model.image_position_in_values=true")
    with pytest.raises(ConfigError, match="grounding model only"):
        load_config(None, positions, task="detection")
    with pytest.raises(ConfigError, match="num_classes"):
        SMCADetector(ModelConfig(backbone="resnet18", backbone_pretrained=False, num_classes=0))


def test_multiscale_detector_overfits_a_batch(detection_shapes, tmp_path):
    """A few optimisation steps on one batch of the multi-scale SMCA detector lower the loss."""
    overrides = _tiny_detection_overrides(detection_shapes, tmp_path, "model.smca_multiscale=true",
                                          "model.enc_layers=3", "model.smca_encoder=intra-multi-intra",
                                          "model.backbone_frozen_levels=-1")
    config = load_config(None, overrides, task="detection")
    resolve_classes(config)
    torch.manual_seed(0)
    model, criterion, weights = build_detection(config)
    assert "decoder.layers.1.scale_selection.weight" in model.state_dict()
    dataset = CocoDetection(config.data.train_ann, config.data.train_images)
    batch = collate_detection([dataset[0], dataset[1]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(5):
        loss = total_loss(criterion(model(batch.images, batch.masks), batch.targets), weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    metrics = evaluate_detection(model, [batch], dataset.ground_truth)
    assert 0.0 <= metrics["box_ap"]["AP"] <= 1.0


def test_validation_split_over_processes_scores_as_one(detection_shapes, tmp_path):
    """What ``mdetr train`` does under torchrun: each process predicts its shard, rank 0 scores the merged
    predictions; that equals evaluating the whole split in one process."""
    from torch.utils.data import DataLoader, Subset

    config = load_config(None, _tiny_detection_overrides(detection_shapes, tmp_path), task="detection")
    task = DetectionTask()
    torch.manual_seed(0)
    model, _, _ = task.build(config)
    model.eval()
    dataset = task.dataset(config, "val", model)
    cpu = torch.device("cpu")

    def loader(indices):
        collate = task.collate(config, "val")
        return DataLoader(Subset(dataset, list(indices)), batch_size=2, collate_fn=collate)

    whole = task.evaluate(config, model, loader(range(len(dataset))), dataset, device=cpu)
    ranks = [DistributedContext(rank=r, world_size=2) for r in range(2)]
    shards = [task.predict(model, loader(shard_indices(len(dataset), ctx)), device=cpu) for ctx in ranks]
    assert all(shards) and not set(shards[0]) & set(shards[1])
    merged = {**shards[0], **shards[1]}
    assert sorted(merged) == sorted(image["id"] for image in dataset.ground_truth["images"])
    together = task.predict(model, loader(range(len(dataset))), device=cpu)
    for image_id, prediction in together.items():  # the same detections, image by image
        for key, value in prediction.items():
            torch.testing.assert_close(merged[image_id][key], value)
    assert task.score(config, dataset, merged) == whole


def test_cli_trains_evaluates_and_predicts_a_detector(detection_shapes, tmp_path, capsys, cxx_available,
                                                      compiled_parts):
    preset = tmp_path / "detector.yaml"
    preset.write_text("task: detection\nmodel:\n  arch: smca_r50\n")
    run = tmp_path / "run"
    args = ["train", "--config", str(preset), "--no-progress",
            *_tiny_detection_overrides(detection_shapes, run), "train.epochs=2"]
    assert main(args) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"] == "detection" and saved["model"]["class_names"][1:] == list(SHAPES)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["type"] for r in records].count("train") == 4 and len(evals) == 2 and "AP" in evals[-1]
    metrics_file = tmp_path / "metrics.json"
    val = ["--ann", str(detection_shapes / "val_detection_shape.json"),
           "--images", str(detection_shapes / "images")]
    metrics_args = ["--output", str(metrics_file)]
    assert main(["evaluate", str(run / "last"), "--task", "detection", *val, *metrics_args]) == 0
    assert "COCO box AP: AP" in capsys.readouterr().out
    metrics = json.loads(metrics_file.read_text())["box_ap"]
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert main(["evaluate", str(run / "last"), "--task", "detection", *val, "--optimize",
                 *metrics_args]) == 0
    optimized = json.loads(metrics_file.read_text())["box_ap"]  # the inference copy: float rounding only
    assert optimized["AP50"] == pytest.approx(metrics["AP50"], abs=0.01)
    assert main(["evaluate", str(run / "last"), "--task", "grounding", *val]) == 2  # the wrong task
    image = sorted((detection_shapes / "images" / "val").glob("*.png"))[0]
    out = tmp_path / "pred"
    assert main(["predict", str(run / "last"), "--image", str(image), "--threshold", "0", "--top-k", "3",
                 "--output-dir", str(out)]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions[0]["detections"]) == 3
    assert all(d["phrase"] in SHAPES for d in predictions[0]["detections"])
    coco = json.loads((out / "results_coco.json").read_text())
    assert {r["category_id"] for r in coco} <= set(range(1, 7))
    # The predictor runs the inference copy by default, as the grounding Predictor does: float rounding only
    copy_run, plain = (DetectionPredictor.from_checkpoint(run / "last", optimize=flag)
                       for flag in (True, False))
    assert copy_run._runner is not copy_run.model and plain._runner is plain.model
    found = [p.predict_batch([image], threshold=0.0, top_k=5)[0] for p in (copy_run, plain)]
    assert found[0].scores.tolist() == pytest.approx(found[1].scores.tolist(), abs=1e-4)
    assert torch.allclose(found[0].boxes, found[1].boxes, atol=1e-2)
    with pytest.raises(ValueError, match="needs optimize=True"):
        DetectionPredictor(plain.model, optimize=False, compile=True)
    if cxx_available:
        assert main(["predict", str(run / "last"), "--image", str(image), "--threshold", "0", "--top-k", "3",
                     "--compile", "--output-dir", str(tmp_path / "compiled")]) == 0
        assert compiled_parts == ["backbone"]  # float32: the backbone (the detector has no text encoder)
        compiled = json.loads((tmp_path / "compiled" / "predictions.json").read_text())[0]["detections"]
        scores = [sorted(d["score"] for d in found) for found in (predictions[0]["detections"], compiled)]
        assert scores[1] == pytest.approx(scores[0], abs=1e-3)  # the inference copy: float rounding only


def test_losses_config_rejects_bad_focal_parameters():
    with pytest.raises(ConfigError, match="focal"):
        LossConfig(focal_alpha=1.5).validate()
