"""Run a model over a dataset and feed the evaluators."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from mdetr.data.collate import Batch
from mdetr.inference.postprocess import post_process
from mdetr.models.mdetr import MDETROutput


def batch_outputs(model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu",
                  progress: bool = False) -> Iterator[tuple[Batch, MDETROutput]]:
    """The model's raw predictions for every batch of ``loader``, in eval mode and without gradients.

    Yields ``(batch, outputs)`` with the batch moved to ``device``: the loop shared by the prediction
    functions (boxes here, answers in :mod:`mdetr.engine.qa` and :mod:`mdetr.engine.gqa`, masks in
    :mod:`mdetr.engine.segmentation`), which only differ in how they post-process ``outputs``.
    """
    model.eval()
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", leave=False)
    for batch in loader:
        batch = batch.to(device)
        with torch.no_grad():
            outputs = model(batch.images, batch.masks, batch.captions)
        yield batch, outputs


@torch.no_grad()
def predict_dataset(model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu",
                    progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Predictions for every entry: image id -> ``scores`` (Q,), ``boxes`` (Q, 4) xyxy original pixels, and
    for a model with the is-final head (CLEVR-Ref+) ``scores_refexp`` (Q,) = score x p(final)."""
    results: dict[int, dict[str, torch.Tensor]] = {}
    for batch, outputs in batch_outputs(model, loader, device=device, progress=progress):
        orig_sizes = torch.stack([t["orig_size"] for t in batch.targets])
        for target, result in zip(batch.targets, post_process(outputs, orig_sizes), strict=True):
            keys = [k for k in ("scores", "boxes", "scores_refexp") if k in result]
            results[int(target["image_id"])] = {k: result[k].cpu() for k in keys}
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
