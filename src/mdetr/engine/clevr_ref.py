"""CLEVR-Ref+ (referring expressions on CLEVR scenes) with the is-final head, as a training task.

MDETR's CLEVR-Ref+ files (COCO-like, from ``scripts/clevr/refclevr_to_coco.py``) give every object an
expression mentions a box, aligned to its words (``tokens``), and mark the referred objects with
``isfinal`` 1: in "the cube left of the red sphere" the cube is final, the sphere is not. With
``model.predict_final`` a per-query logit (``isfinal_embed``) learns that mark from the matched boxes (BCE,
``loss.isfinal_coef``), and a box's referring score is ``(1 - p(no object)) x sigmoid(is-final)``
(``scores_refexp``, :func:`mdetr.inference.postprocess.post_process`).

Evaluation is the official ``ClevrRefEvaluator``: precision@1/5/10 (GIoU >= 0.5) of the boxes ranked by the
referring score against the final box, over the expressions with exactly one final box, plus the
class-agnostic box AP of all the mentioned boxes. Precision@1 picks the best checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mdetr.config import Config
from mdetr.data.collate import Batch
from mdetr.data.modulated import ModulatedDetection
from mdetr.engine.evaluate import predict_dataset
from mdetr.engine.train import GroundingTask
from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator

DATASET_NAME = "clevrref"
"""The name precision@k is reported under for entries without a ``dataset_name`` (the official files have
none; the official evaluator reports ``clevrref``)."""


def final_box_ground_truth(ground_truth: Mapping[str, Any]) -> dict[str, Any]:
    """The ground truth with only the final boxes (``isfinal`` 1; unchanged when no box has ``isfinal``) and
    every entry's ``dataset_name`` defaulting to :data:`DATASET_NAME`."""
    data = copy.deepcopy(dict(ground_truth))
    if any("isfinal" in a for a in data["annotations"]):
        data["annotations"] = [a for a in data["annotations"] if float(a.get("isfinal", 0)) > 0.5]
    for entry in data["images"]:
        entry.setdefault("dataset_name", DATASET_NAME)
    return data


def score_clevr_ref(ground_truth: Mapping[str, Any], predictions: Mapping[int, Mapping[str, Any]], *,
                    overlap: str = "giou", dataset_names: Iterable[str] | None = None) -> dict[str, Any]:
    """``{"refexp": precision@k by the referring score, "box_ap": class-agnostic AP}``; ``dataset_names``
    limits precision@k to the entries of those datasets (``data.refexp_datasets``), None scores them all."""
    precision = RefExpEvaluator(final_box_ground_truth(ground_truth), overlap=overlap, skip_invalid=True,
                                allow_missing=True, dataset_names=dataset_names)
    precision.update(predictions)  # ranked by scores_refexp where the model has the is-final head
    box_ap = CocoBoxEvaluator(ground_truth)
    box_ap.update(predictions)  # every mentioned box, ranked by its object score ("scores")
    return {"refexp": precision.summarize(), "box_ap": box_ap.summarize()}


class ClevrRefTask(GroundingTask):
    """MDETR with the is-final head (``model.predict_final``) on MDETR-format CLEVR-Ref+ files."""

    name = "clevr_ref"

    def evaluate(self, config: Config, model: nn.Module, loader: Iterable[Batch],
                 dataset: ModulatedDetection, *, device: torch.device) -> dict[str, Any]:
        return self.score(config, dataset, predict_dataset(model, loader, device=device))

    def score(self, config: Config, dataset: ModulatedDetection,
              predictions: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return score_clevr_ref(dataset.ground_truth, predictions,
                               dataset_names=config.data.refexp_datasets or None)

    def headline(self, summaries: dict[str, Any]) -> tuple[str, float]:
        return "P@1", float(summaries["refexp"]["overall"]["P@1"])
