"""Run a model over a dataset and feed the evaluators."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mdetr.data.collate import Batch
from mdetr.inference.postprocess import post_process


@torch.no_grad()
def predict_dataset(model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu",
                    progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Predictions for every entry: image id -> ``scores`` (Q,), ``boxes`` (Q, 4) xyxy original pixels."""
    model.eval()
    results: dict[int, dict[str, torch.Tensor]] = {}
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", leave=False)
    for batch in loader:
        batch = batch.to(device)
        outputs = model(batch.images, batch.masks, batch.captions)
        orig_sizes = torch.stack([t["orig_size"] for t in batch.targets])
        for target, result in zip(batch.targets, post_process(outputs, orig_sizes)):
            results[int(target["image_id"])] = {"scores": result["scores"].cpu(), "boxes": result["boxes"].cpu()}
    return results


def evaluate(model: nn.Module, loader: Iterable[Batch], evaluators: dict[str, object], *,
             device: str | torch.device = "cpu", progress: bool = False) -> dict[str, object]:
    """Predict once, then ``update`` and ``summarize`` every evaluator; returns name -> summary."""
    results = predict_dataset(model, loader, device=device, progress=progress)
    summaries = {}
    for name, evaluator in evaluators.items():
        evaluator.update(results)
        summaries[name] = evaluator.summarize()
    return summaries
