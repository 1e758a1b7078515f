"""GQA question answering as a training task (MDETR Section 4.4, Table 5).

A grounding config with ``model.qa_dataset=gqa`` trains the six GQA QA queries (answer type, then one head
per semantic type) with the official weighted loss (:class:`~mdetr.losses.qa.GQAQACriterion`), added to
the detection losses on the boxes the question mentions, or alone (``loss.detection_losses=false``). The
paper's two phases are two presets: ``configs/gqa_r101_all.yaml`` (the unbalanced "all" split, with the
detection losses) and ``configs/gqa_r101_balanced.yaml`` (the balanced split, answer losses only,
initialised from the first phase).

The answer vocabularies (``model.qa_answers``) are filled before the model is built: from the config when
it has them, else from the checkpoint folder named by ``train.init_weights`` (the second phase keeps the
first phase's heads), else from the training file (:func:`mdetr.data.gqa.build_answer_vocab`). Every
checkpoint's config then carries them, so a prediction maps class ids back to answer words.

Evaluation answers every question (the official ``eval_gqa.py`` rule) and reports exact-match accuracy
overall (it picks the best checkpoint), per semantic type and per structural type
(:class:`~mdetr.eval.gqa.GQAEvaluator`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdetr.config import Config, ConfigError
from mdetr.data.collate import Batch
from mdetr.data.gqa import build_answer_vocab, build_gqa_dataset, check_gqa_entries, read_gqa_file
from mdetr.data.modulated import ModulatedDetection
from mdetr.engine.evaluate import batch_outputs
from mdetr.engine.train import GroundingTask
from mdetr.eval.gqa import GQAEvaluator
from mdetr.losses.qa import decode_gqa_answers
from mdetr.models.heads import answer_head_specs
from mdetr.models.text import load_tokenizer


def answers_from_checkpoint(path: str | Path, *, split_qa_heads: bool) -> dict[str, list[str]] | None:
    """The GQA answer vocabularies in a checkpoint folder's config, if it has matching ones."""
    from mdetr.engine.checkpoint import read_checkpoint_doc

    if not Path(path).is_dir():
        return None
    model = read_checkpoint_doc(path)["config"].get("model", {})
    answers = model.get("qa_answers") or None
    same_heads = model.get("qa_dataset") == "gqa" and model.get("split_qa_heads", True) == split_qa_heads
    if answers is None or not same_heads:
        return None
    return answers


def resolve_answer_vocab(config: Config, read_entries: Callable[[], list[dict]] | None = None) -> None:
    """Fill ``config.model.qa_answers`` in place (see the module docstring for where they come from).

    ``read_entries`` gives the training entries when the vocabularies come from them (default: read
    ``data.train_ann``); the training task passes one that keeps the dataset it reads, so the file is
    parsed once."""
    model = config.model
    if model.qa_answers:
        return
    if config.train.init_weights:
        answers = answers_from_checkpoint(config.train.init_weights, split_qa_heads=model.split_qa_heads)
        if answers is not None:
            model.qa_answers = answers
            model.validate()
            return
    if not config.data.train_ann:
        raise ConfigError("GQA answer heads need their vocabularies: set data.train_ann (they are built from "
                          "its answers) or model.qa_answers")
    entries = read_entries() if read_entries is not None else read_gqa_file(config.data.train_ann)["images"]
    model.qa_answers = build_answer_vocab(entries, split_qa_heads=model.split_qa_heads)
    model.validate()


@torch.no_grad()
def predict_gqa_answers(model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu",
                        progress: bool = False) -> dict[int, dict[str, Any]]:
    """Entry id -> ``answer`` (word), ``answer_type`` (the semantic type the type head chose) and
    ``answer_confidence`` (p(type) x p(answer)) for every question of the loader."""
    answers = model.config.qa_answers
    results: dict[int, dict[str, Any]] = {}
    for batch, outputs in batch_outputs(model, loader, device=device, progress=progress):
        for target, decoded in zip(batch.targets, decode_gqa_answers(outputs.qa, answers), strict=True):
            results[int(target["image_id"])] = {"answer": decoded.answer, "answer_type": decoded.answer_type,
                                                "answer_confidence": decoded.confidence}
    return results


def score_gqa(ground_truth: Mapping[str, Any],
              predictions: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"qa": accuracy summary}`` of predictions for entries of an MDETR-format GQA dict."""
    evaluator = GQAEvaluator(ground_truth)
    evaluator.update({i: p["answer"] for i, p in predictions.items()})
    return {"qa": evaluator.summarize()}


def gqa_submission(ground_truth: Mapping[str, Any],
                   predictions: Mapping[int, Mapping[str, Any]]) -> list[dict[str, str]]:
    """The GQA submission records (``questionId``, ``prediction``) of the predicted questions."""
    evaluator = GQAEvaluator(ground_truth)
    evaluator.update({i: p["answer"] for i, p in predictions.items()})
    return evaluator.submission()


def attach_answer_vocab(model: nn.Module, answers_file: str | Path) -> None:
    """Give a GQA model without vocabularies (a converted official checkpoint) those of ``answers_file``
    (``gqa_answer2id_by_type.json``); a file whose sizes do not fit the model's heads is refused."""
    from mdetr.data.gqa import read_answer_vocab

    model.config.qa_answers = read_answer_vocab(answers_file)
    model.config.validate()
    expected = {s.name: s.num_outputs for s in model.answer_specs}
    given = {s.name: s.num_outputs for s in answer_head_specs(
        "gqa", split_qa_heads=model.config.split_qa_heads, qa_answers=model.config.qa_answers)}
    if expected != given:
        raise ConfigError(f"{answers_file} has vocabularies of sizes {given}, but the model's heads have "
                          f"{expected} classes")


def evaluate_gqa_file(model: nn.Module, ann_file: str | Path, image_root: str | Path, *, batch_size: int = 8,
                      device: str | torch.device = "cpu", answers_file: str | Path | None = None,
                      predictions_file: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Answer every question of a GQA file (either format) with a loaded GQA model and score the answered
    ones; ``predictions_file`` receives the submission JSON. ``answers_file`` gives the vocabularies of a
    model without them (a converted official checkpoint: ``gqa_answer2id_by_type.json``)."""
    from torch.utils.data import DataLoader

    from mdetr.data.collate import collate
    from mdetr.eval.gqa import write_submission

    if answers_file is not None:
        attach_answer_vocab(model, answers_file)
    dataset = build_gqa_dataset(model.train_config.data, "val", model.tokenizer, ann_file=ann_file,
                                image_root=image_root)
    check_gqa_entries(dataset, require_answers=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    predictions = predict_gqa_answers(model, loader, device=device, progress=progress)
    if predictions_file is not None:
        write_submission(predictions_file, gqa_submission(dataset.ground_truth, predictions))
    return score_gqa(dataset.ground_truth, predictions)


def format_gqa_metrics(metrics: Mapping[str, Any]) -> str:
    qa = metrics["qa"]
    if not qa["num_questions"]:
        return f"{qa['num_predicted']} questions answered; none has a ground-truth answer to score"
    lines = [f"GQA accuracy {qa['accuracy'] * 100:.2f} over {qa['num_questions']} questions"]
    for title, values, counts in (("semantic type", "per_type", "type_counts"),
                                  ("structural type", "per_structural_type", "structural_counts")):
        if qa.get(values):
            lines.append(f"  by {title}:")
            lines += [f"    {k:<10} {v * 100:6.2f}  ({qa[counts][k]} questions)"
                      for k, v in qa[values].items()]
    return "\n".join(lines)


class GQATask(GroundingTask):
    """MDETR with the GQA answer heads (``model.qa_dataset=gqa``) on GQA files of either format."""

    name = "gqa"

    def __init__(self) -> None:
        # The training set read while building the answer vocabularies, handed to dataset("train") so a
        # large file (GQA's train_all is 1.4 GB) is parsed once.
        self._train_set: ModulatedDetection | None = None

    def build(self, config: Config) -> tuple[nn.Module, nn.Module, dict[str, float]]:
        from mdetr.builder import build

        self._train_set = None

        def read_training_entries() -> list[dict]:
            tokenizer = load_tokenizer(config.model.text_encoder)
            self._train_set = build_gqa_dataset(config.data, "train", tokenizer)
            return self._train_set.ground_truth["images"]

        resolve_answer_vocab(config, read_training_entries)
        return build(config)

    def dataset(self, config: Config, split: str, model: nn.Module) -> ModulatedDetection:
        if split == "train" and self._train_set is not None:
            dataset, self._train_set = self._train_set, None
        else:
            dataset = build_gqa_dataset(config.data, split, model.tokenizer)
        check_gqa_entries(dataset, require_answers=split == "train")
        return dataset

    def evaluate(self, config: Config, model: nn.Module, loader: Iterable[Batch],
                 dataset: ModulatedDetection, *, device: torch.device) -> dict[str, Any]:
        return score_gqa(dataset.ground_truth, predict_gqa_answers(model, loader, device=device))

    def predict(self, model: nn.Module, loader: Iterable[Batch], *,
                device: torch.device) -> dict[int, dict[str, Any]]:
        return predict_gqa_answers(model, loader, device=device)

    def score(self, config: Config, dataset: ModulatedDetection,
              predictions: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return score_gqa(dataset.ground_truth, predictions)

    def headline(self, summaries: dict[str, Any]) -> tuple[str, float]:
        return "accuracy", float(summaries["qa"]["accuracy"])
