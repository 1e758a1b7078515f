"""The paper's benchmarks end to end: run a model on a task's data, score it, print the paper's table.

One function per task returns a JSON-ready dict of metrics; :func:`format_table` lays it out as the
paper's table (Flickr30k: Table 3, RefCOCO/+/g: Table 2, LVIS: Table 6). ``mdetr evaluate --task`` is a
thin wrapper around :func:`run_benchmark`.

- ``flickr``: MDETR's Flickr file (``final_flickr_{separate|merged}GT_{split}.json``) gives images,
  sentences and phrase spans; the ground truth comes from the original annotation folder when given (the
  official protocol), else from the file. Also reports class-agnostic box AP on the file.
- ``refexp``: one or more ``finetune_{dataset}_{split}.json`` files; precision@1/5/10 with GIoU >= 0.5
  (official) or IoU >= 0.5, plus class-agnostic box AP.
- ``lvis``: an LVIS v1 file (minival for the paper) and the COCO 2017 image root; box AP fixed.
- ``phrasecut``: ``finetune_phrasecut_{split}.json`` or the original ``refer_{split}.json`` and the Visual
  Genome image folder; mean IoU, cumulative IoU and Pr@0.5/0.7/0.9 of the union of the masks of the boxes
  scoring above 0.7 (Table 4), and the same for the boxes (a box-only model gets those alone).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mdetr.data.build import build_dataset, build_transforms
from mdetr.data.collate import collate
from mdetr.data.flickr import FlickrDataset
from mdetr.data.tokens import positive_map_from_spans
from mdetr.engine.evaluate import predict_dataset
from mdetr.eval.coco import CocoBoxEvaluator
from mdetr.eval.flickr import FlickrEvaluator, FlickrGroundTruth, rank_boxes_for_phrases
from mdetr.eval.lvis import CHUNK_SIZE, TOPK_PER_CATEGORY, LvisEvaluator, detect_classes, encode_class_names
from mdetr.eval.refexp import RefExpEvaluator
from mdetr.inference.postprocess import post_process

BENCHMARKS = ("flickr", "refexp", "lvis", "phrasecut")


@dataclass
class BenchmarkOptions:
    """Settings of :func:`run_benchmark` (the ``mdetr evaluate`` flags)."""

    batch_size: int = 8
    device: str = "cpu"
    progress: bool = False
    # flickr
    flickr_root: str | None = None
    split: str | None = None
    protocol: str = "any"
    # refexp
    overlap: str = "giou"
    refexp_datasets: Sequence[str] = ()
    # lvis
    chunk_size: int = CHUNK_SIZE
    topk: int = TOPK_PER_CATEGORY
    max_images: int = 0
    # phrasecut: the image list of a refer_*.json file (default: image_data_split3000.json beside it)
    image_data: str | None = None


def run_benchmark(
    task: str,
    model: nn.Module,
    ann_files: Sequence[str | os.PathLike],
    images: str | os.PathLike,
    options: BenchmarkOptions | None = None,
) -> dict[str, Any]:
    """Evaluate a loaded model (``mdetr.load``) on one of :data:`BENCHMARKS`; returns the metrics dict."""
    options = options or BenchmarkOptions()
    if task not in BENCHMARKS:
        raise ValueError(f"task must be one of {', '.join(BENCHMARKS)}, got {task!r}")
    if task != "refexp" and len(ann_files) != 1:
        raise ValueError(f"--task {task} evaluates one annotation file, got {len(ann_files)}")
    if task == "flickr":
        return evaluate_flickr(model, ann_files[0], images, options)
    if task == "refexp":
        return evaluate_refexp(model, ann_files, images, options)
    if task == "phrasecut":
        return evaluate_phrasecut(model, ann_files[0], images, options)
    return evaluate_lvis(model, ann_files[0], images, options)


def _split_from_name(path: str | os.PathLike, pattern: str) -> str | None:
    match = re.fullmatch(pattern, Path(path).stem)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------------------------------------
# Flickr30k Entities


def evaluate_flickr(
    model: nn.Module, ann_file: str | os.PathLike, images: str | os.PathLike, options: BenchmarkOptions
) -> dict[str, Any]:
    """Recall@k (and box AP) of a model on an MDETR Flickr file; see :mod:`mdetr.eval.flickr`."""
    data = model.train_config.data
    dataset = FlickrDataset(
        ann_file, images, tokenizer=model.tokenizer, transforms=build_transforms(data, "val")
    )
    split = options.split or _split_from_name(ann_file, r"final_flickr_\w+GT_(\w+)") or "val"
    if options.flickr_root:
        image_ids = {str(e["original_img_id"]) for e in dataset.entries.values()}
        ground_truth = FlickrGroundTruth.from_entities(
            options.flickr_root, split, protocol=options.protocol, image_ids=sorted(image_ids)
        )
    else:
        ground_truth = FlickrGroundTruth.from_mdetr(dataset.ground_truth, protocol=options.protocol)
    recall = FlickrEvaluator(ground_truth)
    box_ap = CocoBoxEvaluator(dataset.ground_truth)
    ranked, detections = _predict_flickr(model, dataset, options)
    recall.update(ranked)
    box_ap.update(detections)
    summary = recall.summarize()
    summary.update(split=split, ground_truth=ground_truth.source)
    return {"task": "flickr", "flickr": summary, "box_ap": box_ap.summarize()}


@torch.no_grad()
def _predict_flickr(
    model: nn.Module, dataset: FlickrDataset, options: BenchmarkOptions
) -> tuple[dict[tuple[str, int], list[torch.Tensor]], dict[int, dict[str, torch.Tensor]]]:
    """Per sentence, each phrase's ranked boxes; per entry, the boxes and scores for box AP."""
    model.eval().to(options.device)
    num_slots = model.config.num_token_slots
    ranked: dict[tuple[str, int], list[torch.Tensor]] = {}
    detections: dict[int, dict[str, torch.Tensor]] = {}
    loader = DataLoader(dataset, batch_size=options.batch_size, collate_fn=collate)
    for batch in _progress(loader, options.progress):
        batch = batch.to(options.device)
        outputs = model(batch.images, batch.masks, batch.captions)
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        for target, result in zip(batch.targets, post_process(outputs, sizes), strict=True):
            result = {k: v.cpu() for k, v in result.items()}
            entry = dataset.entries[target["image_id"]]
            tokenized = model.tokenizer(target["caption"])
            maps = positive_map_from_spans(
                tokenized, target["tokens_positive_eval"], num_slots=num_slots, caption=target["caption"]
            )  # (P, S)
            key = (str(entry["original_img_id"]), int(entry["sentence_id"]))
            ranked[key] = rank_boxes_for_phrases(result["token_probs"], result["boxes"], maps)
            detections[int(target["image_id"])] = {"scores": result["scores"], "boxes": result["boxes"]}
    return ranked, detections


def _progress(loader: Any, enabled: bool) -> Any:
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc="eval", leave=False)


# ----------------------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg


def evaluate_refexp(
    model: nn.Module,
    ann_files: Sequence[str | os.PathLike],
    images: str | os.PathLike,
    options: BenchmarkOptions,
) -> dict[str, Any]:
    """Precision@k per file (a dataset split) and class-agnostic box AP."""
    results: dict[str, Any] = {"task": "refexp", "criterion": None, "splits": []}
    data = model.train_config.data
    for ann_file in ann_files:
        dataset = build_dataset(data, "val", model.tokenizer, ann_file=ann_file, image_root=images)
        names = list(options.refexp_datasets) or None
        precision = RefExpEvaluator(dataset.ground_truth, overlap=options.overlap, dataset_names=names)
        box_ap = CocoBoxEvaluator(dataset.ground_truth)
        loader = DataLoader(dataset, batch_size=options.batch_size, collate_fn=collate)
        predictions = predict_dataset(
            model.to(options.device), loader, device=options.device, progress=options.progress
        )
        precision.update(predictions)
        box_ap.update(predictions)
        summary = precision.summarize()
        results["criterion"] = summary["criterion"]
        split = _split_from_name(ann_file, r"finetune_[\w+]+?_(\w+)") or Path(ann_file).stem
        results["splits"].append(
            {"file": str(ann_file), "split": split, "precision": summary, "box_ap": box_ap.summarize()}
        )
    return results


# ----------------------------------------------------------------------------------------------------------
# LVIS


def evaluate_lvis(
    model: nn.Module, ann_file: str | os.PathLike, images: str | os.PathLike, options: BenchmarkOptions
) -> dict[str, Any]:
    """Box AP fixed of a model that queries every LVIS class name (``max_images``: only the first N)."""
    from mdetr.data.lvis import lvis_file_name
    from mdetr.data.validate import open_image
    from mdetr.eval.lvis import lvis_class_names
    from mdetr.inference.processor import GroundingProcessor

    evaluator = LvisEvaluator(ann_file, topk=options.topk)
    names, category_ids = lvis_class_names(evaluator.ground_truth)
    model.eval().to(options.device)
    encodings = encode_class_names(model, names, chunk_size=options.chunk_size, device=options.device)
    data = model.train_config.data
    processor = GroundingProcessor.for_model(model, image_size=data.val_size, max_size=data.max_size)
    entries = sorted(evaluator.ground_truth["images"], key=lambda im: im["id"])
    if options.max_images:
        entries = entries[: options.max_images]
    for start in _progress(range(0, len(entries), options.batch_size), options.progress):
        batch = entries[start : start + options.batch_size]
        pictures = [open_image(Path(images) / lvis_file_name(im), im) for im in batch]
        pixels, masks = processor.preprocess_images(pictures)
        sizes = torch.tensor([[im["height"], im["width"]] for im in batch])
        found = detect_classes(
            model,
            pixels.to(options.device),
            masks.to(options.device),
            sizes.to(options.device),
            encodings,
            category_ids,
        )
        evaluator.update({im["id"]: result for im, result in zip(batch, found, strict=True)})
    summary = evaluator.summarize()
    summary.update(num_classes=len(names), chunk_size=options.chunk_size)
    return {"task": "lvis", "lvis": summary}


# ----------------------------------------------------------------------------------------------------------
# PhraseCut


def evaluate_phrasecut(
    model: nn.Module, ann_file: str | os.PathLike, images: str | os.PathLike, options: BenchmarkOptions
) -> dict[str, Any]:
    """Mask (and box) metrics of a model on a PhraseCut file; see :mod:`mdetr.eval.phrasecut`."""
    from mdetr.data.phrasecut import PhraseCutDataset, split_from_file_name
    from mdetr.engine.segmentation import predict_phrasecut, score_phrasecut

    transforms = build_transforms(model.train_config.data, "val")
    dataset = PhraseCutDataset(ann_file, images, tokenizer=model.tokenizer, transforms=transforms,
                               masks=False, image_data=options.image_data)
    loader = DataLoader(dataset, batch_size=options.batch_size, collate_fn=collate)
    predictions = predict_phrasecut(model.to(options.device), loader, device=options.device,
                                    progress=options.progress)
    summary = score_phrasecut(dataset, predictions)["phrasecut"]
    summary["split"] = split_from_file_name(ann_file) or Path(ann_file).stem
    return {"task": "phrasecut", "phrasecut": summary}


# ----------------------------------------------------------------------------------------------------------
# Tables


def _pct(value: float) -> str:
    return f"{value * 100:6.2f}" if value >= 0 else "     -"


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics laid out as the paper's table for the task."""
    task = metrics["task"]
    if task == "flickr":
        return _flickr_table(metrics)
    if task == "refexp":
        return _refexp_table(metrics)
    if task == "phrasecut":
        from mdetr.engine.segmentation import format_phrasecut_metrics

        summary = metrics["phrasecut"]
        return format_phrasecut_metrics(summary, title=f"PhraseCut {summary['split']}")
    return _lvis_table(metrics)


def _flickr_table(metrics: dict[str, Any]) -> str:
    r = metrics["flickr"]
    labels = [k for k in r["all"]]
    header = "  ".join(f"{('Upper bound' if k == 'upper_bound' else k):>11}" for k in labels)
    lines = [
        f"Flickr30k Entities {r['split']}, {r['protocol']} protocol ({r['criterion']}): "
        f"{r['num_phrases']} phrases in {r['num_sentences']} sentences; ground truth: {r['ground_truth']}",
        f"  {'phrase type':<12} {header}",
    ]
    for name, values in r.items():
        if isinstance(values, dict):
            lines.append(f"  {name:<12} " + "  ".join(f"{_pct(values[k]):>11}" for k in labels))
    b = metrics["box_ap"]
    lines.append(
        "Class-agnostic box AP: " + "  ".join(f"{k} {b[k] * 100:.2f}" for k in ("AP", "AP50", "AP75"))
    )
    return "\n".join(lines)


def _refexp_table(metrics: dict[str, Any]) -> str:
    splits = metrics["splits"]
    datasets = sorted(
        {n for s in splits for n in s["precision"] if isinstance(s["precision"][n], dict) and n != "overall"}
    ) or ["overall"]
    lines = [
        f"Referring expressions, precision@k ({metrics['criterion']}); AP50: class-agnostic box AP",
        f"  {'dataset':<10} {'k':>4} " + " ".join(f"{s['split']:>8}" for s in splits),
    ]
    for name in datasets:
        for k in ("P@1", "P@5", "P@10"):
            cells = [_pct(s["precision"][name][k]) if name in s["precision"] else "     -" for s in splits]
            lines.append(f"  {name if k == 'P@1' else '':<10} {k:>4} " + " ".join(f"{c:>8}" for c in cells))
    lines.append(f"  {'AP50':<15} " + " ".join(f"{_pct(s['box_ap']['AP50']):>8}" for s in splits))
    return "\n".join(lines)


def _lvis_table(metrics: dict[str, Any]) -> str:
    r = metrics["lvis"]
    keys = ("AP", "AP50", "APr", "APc", "APf")
    return "\n".join(
        [
            f"LVIS {r['criterion']}; {r['num_images']} images, {r['num_classes']} class names",
            "  " + " ".join(f"{k:>6}" for k in keys),
            "  " + " ".join(_pct(r[k]) for k in keys),
        ]
    )
