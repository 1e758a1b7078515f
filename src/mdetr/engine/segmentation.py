"""Referring segmentation (PhraseCut, MDETR Section 4.3) as a training task: the hooks of
:class:`mdetr.engine.train.TrainingTask` for a grounding config with ``model.masks=true``.

The official recipe has two stages, both ``mdetr train`` runs:

1. box fine-tuning: an ordinary grounding run (``model.masks=false``) on the PhraseCut files, which the
   grounding task reads as they are (MDETR's conversion, or the original ``refer_*.json``);
2. mask training: ``model.masks=true`` with ``model.freeze_detector=true``, starting from the stage-1
   weights (``train.init_weights`` with ``train.init_allow_new_heads=true``: the weights go into the
   segmentation model's detector and the mask branch starts fresh). Only the mask head trains, with the
   sigmoid focal and dice losses (:mod:`mdetr.losses.masks`) on the masks of the matched queries.

Evaluation keeps the boxes scoring above 0.7, unites their masks into one mask per phrase at the original
image size and reports mean IoU, cumulative IoU and Pr@0.5/0.7/0.9 (:mod:`mdetr.eval.phrasecut`); mean
IoU picks the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mdetr.config import Config
from mdetr.data.build import build_transforms
from mdetr.data.collate import Batch, collate
from mdetr.data.phrasecut import PhraseCutDataset
from mdetr.engine.evaluate import batch_outputs
from mdetr.engine.train import GroundingTask
from mdetr.eval.phrasecut import PhraseCutEvaluator
from mdetr.inference.postprocess import PHRASECUT_SCORE_THRESHOLD, post_process, post_process_phrasecut
from mdetr.ops.masks import mask_to_rle


@torch.no_grad()
def predict_phrasecut(model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu",
                      score_threshold: float = PHRASECUT_SCORE_THRESHOLD,
                      progress: bool = False) -> dict[int, dict[str, Any]]:
    """Image id -> ``scores`` (Q,), ``boxes`` (Q, 4) xyxy original pixels and, for a segmentation model,
    ``mask``: the union of the masks of the boxes scoring above ``score_threshold``, as a COCO RLE dict at
    the original image size (compact, so a whole validation set's predictions stay small)."""
    results: dict[int, dict[str, Any]] = {}
    for batch, outputs in batch_outputs(model, loader, device=device, progress=progress):
        sizes = torch.stack([t["size"] for t in batch.targets])
        originals = torch.stack([t["orig_size"] for t in batch.targets])
        if outputs.pred_masks is None:  # a box model (stage 1): box metrics only
            processed = post_process(outputs, originals)
        else:
            processed = post_process_phrasecut(outputs, sizes, originals, score_threshold=score_threshold)
        for target, result in zip(batch.targets, processed, strict=True):
            prediction: dict[str, Any] = {"scores": result["scores"].cpu(), "boxes": result["boxes"].cpu()}
            if "mask" in result:
                prediction["mask"] = mask_to_rle(result["mask"].cpu().numpy())
            results[int(target["image_id"])] = prediction
    return results


def score_phrasecut(dataset: PhraseCutDataset, predictions: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``{"phrasecut": PhraseCutEvaluator summary}`` of predictions for the dataset's entries."""
    evaluator = PhraseCutEvaluator(dataset.kept_ground_truth)
    evaluator.update(predictions)
    return {"phrasecut": evaluator.summarize()}


def format_phrasecut_metrics(summary: dict[str, Any], *, title: str = "PhraseCut") -> str:
    """The paper's Table 4 columns (M-IoU, Pr@0.5/0.7/0.9) plus cumulative IoU, for masks and boxes."""
    lines = [f"{title}: {summary['num_evaluated']} phrases"]
    for kind in ("mask", "box"):
        if kind not in summary:
            continue
        metrics = summary[kind]
        precisions = "  ".join(f"{k} {v * 100:6.2f}" for k, v in metrics.items() if k.startswith("Pr@"))
        lines.append(f"  {kind:<4}  M-IoU {metrics['mean_iou'] * 100:6.2f}  cum-IoU "
                     f"{metrics['cum_iou'] * 100:6.2f}  {precisions}")
    return "\n".join(lines)


class SegmentationTask(GroundingTask):
    """A segmentation model (``model.masks=true``) on PhraseCut-style data (every box has a mask)."""

    name = "segmentation"

    def dataset(self, config: Config, split: str, model: nn.Module) -> PhraseCutDataset:
        data = config.data
        train = split == "train"
        ann, images = (data.train_ann, data.train_images) if train else (data.val_ann, data.val_images)
        # Training targets carry the masks; evaluation reads the ground truth at the original size instead.
        return PhraseCutDataset(ann, images, tokenizer=model.tokenizer,
                                transforms=build_transforms(data, split), masks=train, on_error=data.on_error)

    def collate(self, config: Config, split: str) -> Any:
        # Masks are matched to the padded batch as the official code does, which assumes the batch is padded
        # to its largest image: no size_divisibility.
        return collate

    def evaluate(self, config: Config, model: nn.Module, loader: Iterable[Batch],
                 dataset: PhraseCutDataset, *, device: torch.device) -> dict[str, Any]:
        return score_phrasecut(dataset, predict_phrasecut(model, loader, device=device))

    def predict(self, model: nn.Module, loader: Iterable[Batch], *,
                device: torch.device) -> dict[int, dict[str, Any]]:
        return predict_phrasecut(model, loader, device=device)

    def score(self, config: Config, dataset: PhraseCutDataset,
              predictions: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return score_phrasecut(dataset, predictions)

    def headline(self, summaries: dict[str, Any]) -> tuple[str, float]:
        return "mIoU", float(summaries["phrasecut"]["mask"]["mean_iou"])
