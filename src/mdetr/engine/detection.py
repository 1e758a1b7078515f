"""The detection task: build, load, predict and evaluate the SMCA object detector, and the hooks through
which :func:`mdetr.engine.train.train` trains it (``task: detection``).

Evaluation is COCO box AP with categories (``useCats = 1``) through pycocotools, on the ``top_k`` = 100
best (query, category) pairs per image; the headline metric that picks the best checkpoint is AP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdetr.config import Config
from mdetr.data.build import build_transforms
from mdetr.data.coco_detection import CocoDetection, collate_detection, read_categories
from mdetr.data.collate import Batch
from mdetr.data.validate import read_annotation_file
from mdetr.engine.checkpoint import EMA_FILE, MODEL_FILE, load_weights, read_checkpoint_doc
from mdetr.eval.coco import CocoBoxEvaluator
from mdetr.inference.detection import post_process_detection
from mdetr.losses.detection import DetectionCriterion, build_detection_criterion, detection_weight_dict
from mdetr.models.detector import DetectionOutput, SMCADetector

METRIC_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def resolve_classes(config: Config) -> None:
    """Fill ``model.num_classes`` (0: largest category id + 1) and ``model.class_names`` from the training
    annotations' categories, in place, so the checkpoint's config describes the model's logits."""
    model = config.model
    if model.num_classes and model.class_names:
        return
    file = config.data.train_ann
    data, problems = read_annotation_file(file)
    if data is None:
        raise next(p for p in problems if p.severity == "error").to_error()
    categories = read_categories(data, str(file))
    if not model.num_classes:
        model.num_classes = max(categories) + 1
    if not model.class_names:
        model.class_names = [categories.get(i, "") for i in range(model.num_classes)]
    model.validate()


def build_detection(config: Config) -> tuple[SMCADetector, DetectionCriterion, dict[str, float]]:
    """The detector, its criterion and the loss weights (aux layers included) for a detection config."""
    model = SMCADetector(config.model)
    num_aux = config.model.dec_layers - 1 if config.model.aux_loss else 0
    weights = detection_weight_dict(config.loss, num_aux=num_aux)
    return model, build_detection_criterion(config.loss), weights


def checkpoint_task(path: str | Path) -> str:
    """The task a checkpoint was trained for: the folder's config says so; runs that predate tasks and
    official ``.pth`` files are "grounding"."""
    if not Path(path).is_dir():
        return "grounding"
    return read_checkpoint_doc(path)["config"].get("task", "grounding")


def load_detector(path: str | Path, *, weights: str = "model", device: str = "cpu") -> SMCADetector:
    """A detector from a checkpoint folder written by ``mdetr train --task detection`` (eval mode)."""
    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    config = Config.from_dict(read_checkpoint_doc(path)["config"], source=f"{path}/state.json")
    model = SMCADetector(dataclasses.replace(config.model, backbone_pretrained=False))
    load_weights(model, Path(path) / (MODEL_FILE if weights == "model" else EMA_FILE))
    model.train_config = config
    return model.to(device).eval()


@torch.no_grad()
def predict_detections(model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu",
                       progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Image id -> ``scores`` (K,), ``labels`` (K,) category ids, ``boxes`` (K, 4) xyxy original pixels."""
    model.eval()
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", leave=False)
    results: dict[int, dict[str, torch.Tensor]] = {}
    for batch in loader:
        batch = batch.to(device)
        outputs = model(batch.images, batch.masks)
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        for target, result in zip(batch.targets, post_process_detection(outputs, sizes), strict=True):
            results[int(target["image_id"])] = {k: v.cpu() for k, v in result.items()}
    return results


def score_detections(ground_truth: Any, predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """``{"box_ap": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", ...}}``: COCO AP with categories of
    :func:`predict_detections`' output."""
    evaluator = CocoBoxEvaluator(ground_truth, class_agnostic=False)
    evaluator.update(predictions)
    return {"box_ap": evaluator.summarize()}


def evaluate_detection(model: nn.Module, loader: Iterable[Batch], ground_truth: Any, *,
                       device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """:func:`score_detections` of the model's predictions on ``loader``."""
    return score_detections(ground_truth, predict_detections(model, loader, device=device, progress=progress))


def format_detection_metrics(metrics: dict[str, Any]) -> str:
    box = metrics["box_ap"]
    return "COCO box AP: " + "  ".join(f"{k} {box[k] * 100:.2f}" for k in METRIC_ORDER)


class DetectionTask:
    """The hooks of :class:`mdetr.engine.train.TrainingTask` for ``task: detection``."""

    name = "detection"

    def build(self, config: Config) -> tuple[nn.Module, nn.Module, dict[str, float]]:
        resolve_classes(config)
        return build_detection(config)

    def dataset(self, config: Config, split: str, model: nn.Module) -> CocoDetection:
        ann, images = (config.data.train_ann, config.data.train_images) if split == "train" else \
            (config.data.val_ann, config.data.val_images)
        return CocoDetection(ann, images, transforms=build_transforms(config.data, split),
                             on_error=config.data.on_error)

    def collate(self, config: Config, split: str) -> Any:
        divisibility = config.data.size_divisibility if split == "train" else 1
        return partial(collate_detection, size_divisibility=divisibility)

    def forward(self, model: nn.Module, batch: Batch) -> DetectionOutput:
        return model(batch.images, batch.masks)

    def evaluate(self, config: Config, model: nn.Module, loader: Iterable[Batch], dataset: CocoDetection, *,
                 device: torch.device) -> dict[str, Any]:
        return evaluate_detection(model, loader, dataset.ground_truth, device=device)

    def predict(self, model: nn.Module, loader: Iterable[Batch], *,
                device: torch.device) -> dict[int, dict[str, torch.Tensor]]:
        """The first half of :meth:`evaluate` (under torchrun each process predicts its share)."""
        return predict_detections(model, loader, device=device)

    def score(self, config: Config, dataset: CocoDetection,
              predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The second half of :meth:`evaluate`, on the predictions gathered from every process."""
        return score_detections(dataset.ground_truth, predictions)

    def headline(self, summaries: dict[str, Any]) -> tuple[str, float]:
        return "AP", float(summaries["box_ap"]["AP"])


def evaluate_checkpoint(checkpoint: str | Path, ann_file: str | Path, image_root: str | Path, *,
                        weights: str = "model", batch_size: int = 8, device: str = "cpu",
                        progress: bool = False, optimize: bool = False) -> dict[str, Any]:
    """COCO AP of a detection checkpoint on a COCO file, with the checkpoint's evaluation transforms;
    ``optimize`` runs the inference copy of :func:`mdetr.inference.optimize.optimize_for_inference`."""
    from torch.utils.data import DataLoader

    from mdetr.inference.optimize import optimize_for_inference

    model = load_detector(checkpoint, weights=weights, device=device)
    if optimize:
        model = optimize_for_inference(model)
    data = model.train_config.data
    dataset = CocoDetection(ann_file, image_root, transforms=build_transforms(data, "val"),
                            on_error=data.on_error)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection)
    return evaluate_detection(model, loader, dataset.ground_truth, device=device, progress=progress)


def predict_images(checkpoint: str | Path, images: list[Path], output_dir: Path, *, threshold: float = 0.3,
                   top_k: int | None = None, batch_size: int = 4, device: str = "cpu",
                   dtype: str = "float32", compile: bool = False) -> list[dict[str, Any]]:
    """Detect objects in image files; writes ``predictions.json``, ``results_coco.json`` (COCO results with
    the model's category ids), ``results_coco_images.json`` (image ids, file names, categories) and one
    annotated PNG per image into ``output_dir``. Returns the prediction records."""
    import json

    from mdetr.inference.detection import DetectionPredictor
    from mdetr.inference.predictor import open_image
    from mdetr.inference.visualize import draw_groundings

    predictor = DetectionPredictor.from_checkpoint(checkpoint, device=device, dtype=dtype, compile=compile)
    output_dir.mkdir(parents=True, exist_ok=True)
    records, coco, index = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start: start + batch_size]
        found_all = predictor.predict_batch(chunk, threshold=threshold, top_k=top_k)
        for path, found in zip(chunk, found_all, strict=True):
            image_id = len(index) + 1
            index.append({"id": image_id, "file_name": str(path)})
            picture = output_dir / f"{path.stem}.png"
            draw_groundings(open_image(path), found).save(picture)
            detections = found.to_json()
            for detection in detections:
                x0, y0, x1, y1 = detection["box_xyxy"]
                coco.append({"image_id": image_id, "category_id": detection["label"],
                             "score": detection["score"],
                             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})
                del detection["spans"]
            records.append({"image": str(path), "image_id": image_id, "picture": str(picture),
                            "detections": detections})
    categories = [{"id": i, "name": n} for i, n in enumerate(predictor.model.config.class_names) if n]
    (output_dir / "predictions.json").write_text(json.dumps(records, indent=2))
    (output_dir / "results_coco.json").write_text(json.dumps(coco))
    index_doc = {"images": index, "categories": categories}
    (output_dir / "results_coco_images.json").write_text(json.dumps(index_doc, indent=2))
    return records
