"""CLEVR-style question answering as a training task: the hooks of :class:`mdetr.engine.train.TrainingTask`
for a grounding config with ``model.qa_dataset=clevr``, and the answer-accuracy metric.

Training is MDETR's (detection losses on the boxes the question mentions) plus the official CLEVR answer
losses (:mod:`mdetr.losses.qa`). Evaluation answers every question (the official ``eval_clevr.py`` rule)
and reports answer accuracy overall, per question family (the entries' ``question_type``: count, exist,
compare_number, query_attribute, compare_attribute on CLEVR and the shapes set; on a CLEVR questions file,
from each program, :mod:`mdetr.data.clevr`) and per answer type, plus the class-agnostic box AP of the
grounded objects when the file has boxes. The overall accuracy picks the best checkpoint. CLEVR-Humans and
the other question files without boxes train on the answer losses alone (``loss.detection_losses=false``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdetr.config import Config
from mdetr.data.clevr import entry_family, write_clevr_predictions
from mdetr.data.collate import Batch
from mdetr.data.errors import DataError
from mdetr.data.modulated import ModulatedDetection
from mdetr.data.validate import image_entry_name
from mdetr.engine.evaluate import batch_outputs
from mdetr.engine.train import GroundingTask
from mdetr.eval import CocoBoxEvaluator
from mdetr.inference.postprocess import post_process
from mdetr.losses.qa import answer_confidence, decode_clevr_answers, encode_clevr_answer
from mdetr.models.heads import CLEVR_ANSWER_TYPES, clevr_attributes

FAMILY_ORDER = ("count", "exist", "compare_number", "query_attribute", "compare_attribute")
"""How the CLEVR paper orders its per-family accuracies (other families follow alphabetically)."""


def answer_type_name(answer: str, attributes: Sequence[str]) -> str:
    """"binary", "attribute" or "count": the head that answers ``answer``."""
    return CLEVR_ANSWER_TYPES[encode_clevr_answer(answer, attributes).answer_type]


def qa_accuracy(predicted: Sequence[str], truth: Sequence[str], families: Sequence[str] | None = None,
                *, attributes: Sequence[str] | None = None) -> dict[str, Any]:
    """Exact-match answer accuracy.

    Returns ``accuracy`` (over all questions), ``num_questions``, ``per_family`` (family -> accuracy, for
    the families given, ordered as :data:`FAMILY_ORDER`), ``family_counts`` and, with ``attributes`` (the
    model's attribute vocabulary), ``per_answer_type`` over binary / attribute / count questions.
    """
    if len(predicted) != len(truth) or (families is not None and len(families) != len(truth)):
        raise ValueError(f"got {len(predicted)} predictions, {len(truth)} answers and "
                         f"{len(families) if families is not None else 'no'} families")
    correct = [p == t for p, t in zip(predicted, truth, strict=True)]
    summary: dict[str, Any] = {"accuracy": sum(correct) / len(correct) if correct else 0.0,
                               "num_questions": len(correct)}

    def grouped(keys: Sequence[str], order: Sequence[str]) -> tuple[dict[str, float], dict[str, int]]:
        hits: dict[str, list[bool]] = defaultdict(list)
        for key, ok in zip(keys, correct, strict=True):
            hits[key].append(ok)
        names = [k for k in order if k in hits] + sorted(k for k in hits if k not in order)
        return {k: sum(hits[k]) / len(hits[k]) for k in names}, {k: len(hits[k]) for k in names}

    if families is not None:
        summary["per_family"], summary["family_counts"] = grouped(list(families), FAMILY_ORDER)
    if attributes is not None:
        types = [answer_type_name(t, attributes) for t in truth]
        summary["per_answer_type"], _ = grouped(types, CLEVR_ANSWER_TYPES)
    return summary


def check_answers(dataset: ModulatedDetection, attributes: Sequence[str], *,
                  require_answers: bool = True) -> None:
    """Raise :class:`DataError` naming the file and entry of the first question without a usable answer
    (with ``require_answers`` False, questions without one are allowed: test splits have none)."""
    kept = set(dataset.ids)
    for entry in dataset.ground_truth.get("images", []):
        if entry.get("id") not in kept:
            continue
        name = image_entry_name(entry)
        if "answer" not in entry:
            if not require_answers:
                continue
            raise DataError("a QA entry needs an 'answer' (model.qa_dataset=clevr)", file=dataset.file,
                            entry=name)
        try:
            encode_clevr_answer(str(entry["answer"]), attributes)
        except ValueError as err:
            raise DataError(f"{err} (set model.qa_attributes to the data's attribute answers)",
                            file=dataset.file, entry=name) from None


@torch.no_grad()
def predict_answers(model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu",
                    progress: bool = False) -> dict[int, dict[str, Any]]:
    """Image id -> ``scores`` (Q,), ``boxes`` (Q, 4) xyxy original pixels, ``answer`` str and
    ``answer_confidence`` float, for every question of the loader."""
    attributes = clevr_attributes(model.config.qa_attributes)
    results: dict[int, dict[str, Any]] = {}
    for batch, outputs in batch_outputs(model, loader, device=device, progress=progress):
        answers = decode_clevr_answers(outputs.qa, attributes)
        confidence = answer_confidence(outputs.qa).tolist()
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        for k, (target, result) in enumerate(zip(batch.targets, post_process(outputs, sizes), strict=True)):
            results[int(target["image_id"])] = {
                "scores": result["scores"].cpu(), "boxes": result["boxes"].cpu(), "answer": answers[k],
                "answer_confidence": confidence[k]}
    return results


def score_answers(ground_truth: Mapping[str, Any], predictions: Mapping[int, Mapping[str, Any]], *,
                  attributes: Sequence[str], box_ap: bool = True) -> dict[str, Any]:
    """``{"qa": qa_accuracy(...), "box_ap": ...}`` of predictions for entries of an MDETR QA file (or a
    converted CLEVR questions file); questions without an answer are not scored, a file without boxes gets
    no box AP."""
    entries = {e["id"]: e for e in ground_truth["images"]}
    ids = [i for i in predictions if i in entries and "answer" in entries[i]]
    summaries: dict[str, Any] = {"qa": qa_accuracy(
        [predictions[i]["answer"] for i in ids], [str(entries[i]["answer"]) for i in ids],
        [entry_family(entries[i]) for i in ids], attributes=attributes)}
    if box_ap and ground_truth.get("annotations"):
        evaluator = CocoBoxEvaluator(ground_truth)
        evaluator.update({i: {"scores": predictions[i]["scores"], "boxes": predictions[i]["boxes"]}
                          for i in ids})
        summaries["box_ap"] = evaluator.summarize()
    return summaries


def evaluate_qa(model: nn.Module, loader: Iterable[Batch], dataset: ModulatedDetection, *,
                device: str | torch.device = "cpu", progress: bool = False,
                predictions_file: str | Path | None = None) -> dict[str, Any]:
    """Answer accuracy (overall, per family, per answer type) and box AP of a CLEVR QA model;
    ``predictions_file`` receives every answer, one per line in questionId order (``eval_clevr.py``)."""
    predictions = predict_answers(model, loader, device=device, progress=progress)
    if predictions_file is not None:
        write_clevr_predictions(predictions_file, dataset.ground_truth,
                                {i: p["answer"] for i, p in predictions.items()})
    return score_answers(dataset.ground_truth, predictions,
                         attributes=clevr_attributes(model.config.qa_attributes))


def format_qa_metrics(metrics: Mapping[str, Any]) -> str:
    qa = metrics["qa"]
    if not qa["num_questions"]:
        return "no question has a ground-truth answer to score"
    lines = [f"Answer accuracy {qa['accuracy'] * 100:.2f} over {qa['num_questions']} questions"]
    for name, value in qa.get("per_family", {}).items():
        lines.append(f"  {name:<20} {value * 100:6.2f}  ({qa['family_counts'][name]} questions)")
    if qa.get("per_answer_type"):
        by_type = qa["per_answer_type"].items()
        lines.append("  by answer type: " + "  ".join(f"{k} {v * 100:.2f}" for k, v in by_type))
    if "box_ap" in metrics:
        b = metrics["box_ap"]
        lines.append("Class-agnostic box AP: "
                     + "  ".join(f"{k} {b[k] * 100:.2f}" for k in ("AP", "AP50", "AP75")))
    return "\n".join(lines)


class QATask(GroundingTask):
    """MDETR with CLEVR answer heads (``model.qa_dataset=clevr``) on MDETR-format question files."""

    name = "qa"

    def dataset(self, config: Config, split: str, model: nn.Module) -> ModulatedDetection:
        dataset = super().dataset(config, split, model)
        check_answers(dataset, clevr_attributes(config.model.qa_attributes), require_answers=split == "train")
        return dataset

    def evaluate(self, config: Config, model: nn.Module, loader: Iterable[Batch],
                 dataset: ModulatedDetection, *, device: torch.device) -> dict[str, Any]:
        return evaluate_qa(model, loader, dataset, device=device)

    def predict(self, model: nn.Module, loader: Iterable[Batch], *,
                device: torch.device) -> dict[int, dict[str, Tensor]]:
        return predict_answers(model, loader, device=device)

    def score(self, config: Config, dataset: ModulatedDetection,
              predictions: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return score_answers(dataset.ground_truth, predictions,
                             attributes=clevr_attributes(config.model.qa_attributes))

    def headline(self, summaries: dict[str, Any]) -> tuple[str, float]:
        return "accuracy", float(summaries["qa"]["accuracy"])
