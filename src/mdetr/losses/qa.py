"""Question answering (MDETR Section 4.4): answer encoding, losses and decoding for CLEVR and GQA.

A CLEVR answer is one of three types, each with its own head (:data:`mdetr.models.heads.CLEVR_ANSWER_HEADS`):

- 0 ``binary``: "yes" / "no", one logit (``answer_binary``, yes = 1);
- 1 ``attribute``: one of the attribute words (``answer_attr``; CLEVR's 15, or ``model.qa_attributes``);
- 2 ``count``: an integer 0..19 (``answer_reg``, a 20-way classification despite its name).

:class:`ClevrQACriterion` is the official ``QACriterionClevr``: cross-entropy of the type head over all
questions, then each answer head's loss over the questions of its type only (masked sum divided by their
number, or by 1 when the batch has none); :func:`qa_weight_dict` gives its weights: ``loss_answer_type``
``loss.qa_loss_coef``, the others 1.

A GQA answer has one of five semantic types (obj, attr, rel, global, cat), each with its own head whose
classes are an answer vocabulary built from the training data (``model.qa_answers``, see
:mod:`mdetr.data.gqa`). :class:`GQAQACriterion` is the official ``QACriterionGQA``: the same masked scheme
over the five types (every loss weighted ``loss.qa_loss_coef``, :func:`gqa_weight_dict`), or one
cross-entropy over all answers for the unified head. An answer missing from a head's vocabulary is
trained as its ``"unknown"`` class, as the official datasets do.

:class:`QASetCriterion` adds either to MDETR's detection losses, or uses it alone
(``loss.detection_losses=false``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.models.heads import (
    CLEVR_ANSWER_TYPES,
    CLEVR_ATTRIBUTES,
    CLEVR_MAX_COUNT,
    GQA_ALL_ANSWERS,
    GQA_ANSWER_TYPES,
    GQA_UNKNOWN_ANSWER,
)

BINARY, ATTRIBUTE, COUNT = 0, 1, 2
IGNORE = -100
"""Target of the heads a question's type does not use (cross-entropy's ignore index, as the official)."""


@dataclass(frozen=True)
class EncodedAnswer:
    """One answer as the targets of the CLEVR heads (``IGNORE`` for the heads its type does not use)."""

    answer_type: int
    binary: float
    attribute: int
    count: int


def encode_clevr_answer(answer: str, attributes: Sequence[str] = CLEVR_ATTRIBUTES) -> EncodedAnswer:
    """"yes" / "no" -> binary; an attribute word -> its index; a whole number 0..19 -> count.

    Raises ValueError for anything else (the caller names the file and entry).
    """
    if answer in ("yes", "no"):
        return EncodedAnswer(BINARY, 1.0 if answer == "yes" else 0.0, IGNORE, IGNORE)
    if answer in attributes:
        return EncodedAnswer(ATTRIBUTE, 0.0, list(attributes).index(answer), IGNORE)
    if isinstance(answer, str) and answer.isdigit() and int(answer) <= CLEVR_MAX_COUNT:
        return EncodedAnswer(COUNT, 0.0, IGNORE, int(answer))
    raise ValueError(f"answer {answer!r} is not yes / no, a count 0..{CLEVR_MAX_COUNT} or one of the "
                     f"attributes {', '.join(attributes)}")


def answer_targets(answers: Sequence[str], attributes: Sequence[str] = CLEVR_ATTRIBUTES, *,
                   device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The batch's answers as ``answer_type`` (B,), ``answer_binary`` (B,) float, ``answer_attr`` and
    ``answer_reg`` (B,) long, the targets of the heads of the same names."""
    encoded = [encode_clevr_answer(a, attributes) for a in answers]
    return {
        "answer_type": torch.tensor([e.answer_type for e in encoded], dtype=torch.long, device=device),
        "answer_binary": torch.tensor([e.binary for e in encoded], dtype=torch.float32, device=device),
        "answer_attr": torch.tensor([e.attribute for e in encoded], dtype=torch.long, device=device),
        "answer_reg": torch.tensor([e.count for e in encoded], dtype=torch.long, device=device),
    }


def decode_clevr_answers(qa: dict[str, Tensor], attributes: Sequence[str] = CLEVR_ATTRIBUTES) -> list[str]:
    """The answer strings of a batch of CLEVR head outputs (the official ``eval_clevr.py`` rule): the type
    head's argmax picks the head; binary "yes" when sigmoid > 0.5, attribute and count by argmax."""
    types = qa["answer_type"].argmax(-1).tolist()
    yes = (qa["answer_binary"].float().sigmoid() > 0.5).tolist()
    attrs = qa["answer_attr"].argmax(-1).tolist()
    counts = qa["answer_reg"].argmax(-1).tolist()
    answers = []
    for t, y, a, c in zip(types, yes, attrs, counts, strict=True):
        answers.append(("yes" if y else "no") if t == BINARY else attributes[a] if t == ATTRIBUTE else str(c))
    return answers


def answer_confidence(qa: dict[str, Tensor]) -> Tensor:
    """(B,) probability of the decoded answer: p(type) x p(answer | type)."""
    type_probs = qa["answer_type"].float().softmax(-1)
    types = type_probs.argmax(-1)
    p_yes = qa["answer_binary"].float().sigmoid()
    per_type = torch.stack([
        torch.maximum(p_yes, 1 - p_yes),
        qa["answer_attr"].float().softmax(-1).amax(-1),
        qa["answer_reg"].float().softmax(-1).amax(-1),
    ], dim=-1)
    return type_probs.gather(-1, types[:, None])[:, 0] * per_type.gather(-1, types[:, None])[:, 0]


def _masked_mean(values: Tensor, mask: Tensor, count: int) -> Tensor:
    """Sum of ``values`` where ``mask``, divided by ``count`` (the questions of this kind in the whole
    step, see :class:`_Group`; by 1 when there are none)."""
    return values.masked_fill(~mask, 0.0).sum() / max(count, 1)


def _accuracy(correct: Tensor, mask: Tensor, count: int, share: float) -> Tensor:
    """This batch's part of the fraction of ``correct`` among the step's ``count`` questions of the kind;
    when the step has none, its ``share`` of 1 (an empty kind counts as all right, as the official)."""
    if count == 0:
        return torch.full((), share, device=correct.device)
    return correct[mask].float().sum() / count


@dataclass(frozen=True)
class _Group:
    """The question counts the losses divide by: those of the whole optimisation step (every micro-batch
    of a gradient-accumulation group), so that the micro-batches' losses add up to the step's. ``size``:
    all questions; ``of_kind``: per answer type (or per target key); ``share``: this micro-batch's
    fraction of ``size``."""

    size: int
    of_kind: dict[object, int]
    share: float

    @classmethod
    def of(cls, batch: Tensor, group: Tensor | None, kinds: Sequence[object]) -> _Group:
        """Counts of ``group`` (default: ``batch``, one micro-batch) per value in ``kinds``."""
        group = batch if group is None else group
        return cls(group.numel(), {k: int((group == k).sum()) for k in kinds},
                   batch.numel() / max(group.numel(), 1))


class ClevrQACriterion(nn.Module):
    """The official CLEVR QA losses and accuracies.

    Returns ``loss_answer_type`` (CE over the 3 types), ``loss_answer_binary`` (BCE with logits),
    ``loss_answer_attr`` (CE over the attributes) and ``loss_answer_reg`` (CE over counts 0..19), the last
    three over the questions of their type only; and, not weighted into the loss, ``accuracy_answer_type``,
    ``accuracy_answer_{binary,attr,reg}`` (within the type) and ``accuracy_answer_total`` (type and answer
    both right).
    """

    def __init__(self, attributes: Sequence[str] = CLEVR_ATTRIBUTES) -> None:
        super().__init__()
        self.attributes = tuple(attributes)

    def encode_targets(self, targets: Sequence[Mapping], device: torch.device | str) -> dict[str, Tensor]:
        """The answer targets of a batch's target dicts (each needs ``answer``)."""
        return answer_targets([str(t["answer"]) for t in targets], self.attributes, device=device)

    def forward(self, qa: dict[str, Tensor], answers: dict[str, Tensor],
                group: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """qa: the model's ``MDETROutput.qa``; answers: :func:`answer_targets`; group: the same for every
        micro-batch of the optimisation step (default: this batch alone), whose question counts divide
        the losses so that the micro-batches' losses sum to the step's means."""
        answer_type = answers["answer_type"]
        counts = _Group.of(answer_type, None if group is None else group["answer_type"],
                           (BINARY, ATTRIBUTE, COUNT))
        type_logits = qa["answer_type"].float()
        is_binary, is_attr, is_reg = (answer_type == k for k in (BINARY, ATTRIBUTE, COUNT))
        type_ce = F.cross_entropy(type_logits, answer_type, reduction="sum")
        losses = {"loss_answer_type": type_ce / counts.size}
        binary_logits = qa["answer_binary"].float()
        losses["loss_answer_binary"] = _masked_mean(
            F.binary_cross_entropy_with_logits(binary_logits, answers["answer_binary"], reduction="none"),
            is_binary, counts.of_kind[BINARY])
        losses["loss_answer_attr"] = _masked_mean(
            F.cross_entropy(qa["answer_attr"].float(), answers["answer_attr"], reduction="none",
                            ignore_index=IGNORE), is_attr, counts.of_kind[ATTRIBUTE])
        losses["loss_answer_reg"] = _masked_mean(
            F.cross_entropy(qa["answer_reg"].float(), answers["answer_reg"], reduction="none",
                            ignore_index=IGNORE), is_reg, counts.of_kind[COUNT])
        with torch.no_grad():
            type_ok = type_logits.argmax(-1) == answer_type
            binary_ok = (binary_logits.sigmoid() > 0.5) == (answers["answer_binary"] > 0.5)
            attr_ok = qa["answer_attr"].argmax(-1) == answers["answer_attr"]
            reg_ok = qa["answer_reg"].argmax(-1) == answers["answer_reg"]
            losses["accuracy_answer_type"] = type_ok.float().sum() / counts.size
            heads = (("binary", binary_ok, is_binary, BINARY), ("attr", attr_ok, is_attr, ATTRIBUTE),
                     ("reg", reg_ok, is_reg, COUNT))
            for key, ok, mask, kind in heads:
                losses[f"accuracy_answer_{key}"] = _accuracy(ok, mask, counts.of_kind[kind], counts.share)
            answer_ok = (is_binary & binary_ok) | (is_attr & attr_ok) | (is_reg & reg_ok)
            losses["accuracy_answer_total"] = (type_ok & answer_ok).float().sum() / counts.size
        return losses


def qa_weight_dict(qa_loss_coef: float) -> dict[str, float]:
    """The official CLEVR weights: the type loss ``qa_loss_coef``, the per-type answer losses 1."""
    return {"loss_answer_type": qa_loss_coef, "loss_answer_binary": 1.0, "loss_answer_attr": 1.0,
            "loss_answer_reg": 1.0}


# ------------------------------------------------------------------------------------------------------ GQA


class GQAQACriterion(nn.Module):
    """The official GQA QA losses and accuracies.

    Split heads (``qa_answers`` keyed by answer type) return ``loss_answer_type`` (CE over the 5 types)
    and ``loss_answer_{obj,attr,rel,global,cat}`` (CE over that type's vocabulary, over the questions of
    that type only: masked sum divided by their number, or by 1 when there are none); the unified head
    (``{"all": [...]}``) returns ``loss_answer_total``. Not weighted into the loss: ``accuracy_answer_type``,
    ``accuracy_answer_{type}`` (within the type) and ``accuracy_answer_total`` (type and answer both right;
    an answer outside the vocabulary only counts when the head predicts "unknown", as the official).
    """

    def __init__(self, answers: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.answers = {k: tuple(v) for k, v in answers.items()}
        self.split = GQA_ALL_ANSWERS not in self.answers
        self._index = {k: {a: i for i, a in enumerate(v)} for k, v in self.answers.items()}

    def _class(self, key: str, answer: str) -> int:
        """Class of ``answer`` in a head's vocabulary; one it lacks is its "unknown" class (the official
        fallback), or ignored when the vocabulary has none."""
        index = self._index[key]
        return index.get(answer, index.get(GQA_UNKNOWN_ANSWER, IGNORE))

    def encode_targets(self, targets: Sequence[Mapping], device: torch.device | str) -> dict[str, Tensor]:
        """``answer_type`` (B,) and, per head, ``answer_{type}`` (B,) long (``IGNORE`` for the questions of
        other types), or ``answer`` (B,) for the unified head; from each target's ``answer`` and
        ``question_type`` (the GQA semantic type)."""
        answers = [str(t["answer"]) for t in targets]
        if not self.split:
            return {"answer": torch.tensor([self._class(GQA_ALL_ANSWERS, a) for a in answers],
                                           dtype=torch.long, device=device)}
        types = [gqa_type_index(t.get("question_type")) for t in targets]
        encoded = {"answer_type": torch.tensor(types, dtype=torch.long, device=device)}
        for k, name in enumerate(GQA_ANSWER_TYPES):
            encoded[f"answer_{name}"] = torch.tensor(
                [self._class(name, a) if t == k else IGNORE for a, t in zip(answers, types, strict=True)],
                dtype=torch.long, device=device)
        return encoded

    def forward(self, qa: dict[str, Tensor], answers: dict[str, Tensor],
                group: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """qa: the model's ``MDETROutput.qa``; answers: :meth:`encode_targets`; group: the same for every
        micro-batch of the optimisation step (default: this batch alone), as in
        :meth:`ClevrQACriterion.forward`."""
        if not self.split:
            target = answers["answer"]
            known = target.ne(IGNORE)
            counts = _Group.of(known, None if group is None else group["answer"].ne(IGNORE), (True,))
            logits = qa["answer"].float()
            ce = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE)
            losses = {"loss_answer_total": _masked_mean(ce, known, counts.of_kind[True])}
            with torch.no_grad():
                losses["accuracy_answer_total"] = (logits.argmax(-1) == target).float().sum() / counts.size
            return losses
        answer_type = answers["answer_type"]
        counts = _Group.of(answer_type, None if group is None else group["answer_type"],
                           range(len(GQA_ANSWER_TYPES)))
        type_logits = qa["answer_type"].float()
        type_ce = F.cross_entropy(type_logits, answer_type, reduction="sum")
        losses = {"loss_answer_type": type_ce / counts.size}
        type_ok = type_logits.argmax(-1) == answer_type
        answer_ok = torch.zeros_like(type_ok)
        accuracies = {}
        for k, name in enumerate(GQA_ANSWER_TYPES):
            key = f"answer_{name}"
            of_type = answer_type == k
            logits = qa[key].float()
            losses[f"loss_{key}"] = _masked_mean(
                F.cross_entropy(logits, answers[key], reduction="none", ignore_index=IGNORE), of_type,
                counts.of_kind[k])
            with torch.no_grad():
                head_ok = logits.argmax(-1) == answers[key]
                accuracies[f"accuracy_{key}"] = _accuracy(head_ok, of_type, counts.of_kind[k], counts.share)
                answer_ok |= of_type & head_ok
        with torch.no_grad():
            losses["accuracy_answer_type"] = type_ok.float().sum() / counts.size
            losses.update(accuracies)
            losses["accuracy_answer_total"] = (type_ok & answer_ok).float().sum() / counts.size
        return losses


def gqa_type_index(question_type: object) -> int:
    """Index of a GQA semantic type ("obj", "attr", "rel", "global", "cat") in the type head."""
    if question_type not in GQA_ANSWER_TYPES:
        raise ValueError(f"question type {question_type!r} is not one of the GQA semantic types "
                         f"{', '.join(GQA_ANSWER_TYPES)}")
    return GQA_ANSWER_TYPES.index(str(question_type))


def gqa_weight_dict(qa_loss_coef: float, *, split_qa_heads: bool = True) -> dict[str, float]:
    """The official GQA weights: every answer loss ``qa_loss_coef``."""
    if not split_qa_heads:
        return {"loss_answer_total": qa_loss_coef}
    return {f"loss_answer_{k}": qa_loss_coef for k in ("type", *GQA_ANSWER_TYPES)}


@dataclass(frozen=True)
class GQAPrediction:
    """A decoded GQA answer: the word, its semantic type (the unified head: ``""``) and
    p(type) x p(answer)."""

    answer: str
    answer_type: str
    confidence: float


def decode_gqa_answers(qa: dict[str, Tensor], answers: Mapping[str, Sequence[str]]) -> list[GQAPrediction]:
    """The answers of a batch of GQA head outputs (the official ``eval_gqa.py`` rule): the type head's
    argmax picks the head, whose argmax is mapped through that type's vocabulary; the unified head's
    argmax through the whole vocabulary."""
    if not answers:
        raise ValueError("decoding GQA answers needs the answer vocabularies (model.qa_answers); a converted "
                         "official checkpoint gets them from gqa_answer2id_by_type.json")
    if GQA_ALL_ANSWERS in answers:
        probs = qa["answer"].float().softmax(-1)
        best, index = probs.max(-1)
        return [GQAPrediction(answers[GQA_ALL_ANSWERS][i], "", p)
                for i, p in zip(index.tolist(), best.tolist(), strict=True)]
    type_probs = qa["answer_type"].float().softmax(-1)
    type_p, types = type_probs.max(-1)
    per_head = {name: qa[f"answer_{name}"].float().softmax(-1).max(-1) for name in GQA_ANSWER_TYPES}
    decoded = []
    for b, (t, pt) in enumerate(zip(types.tolist(), type_p.tolist(), strict=True)):
        name = GQA_ANSWER_TYPES[t]
        p, i = per_head[name]
        decoded.append(GQAPrediction(answers[name][int(i[b])], name, pt * float(p[b])))
    return decoded


# ------------------------------------------------------------------------------------------ with detection


class QASetCriterion(nn.Module):
    """MDETR's detection losses (:class:`~mdetr.losses.criterion.SetCriterion`) plus the answer losses of
    ``qa`` (:class:`ClevrQACriterion` or :class:`GQAQACriterion`); ``detection`` None trains the answers
    alone (``loss.detection_losses=false``).

    Each target needs ``answer`` (the entry's ``answer`` field; GQA also ``question_type``). The QA losses
    are means over the step's questions (of each type): with gradient accumulation, ``group_targets``
    holds the targets of every micro-batch of the step and their counts divide each micro-batch's sums,
    as ``num_boxes`` does for the detection losses, so the micro-batches add up to one batch.
    """

    def __init__(self, detection: nn.Module | None, qa: ClevrQACriterion | GQAQACriterion) -> None:
        super().__init__()
        self.detection = detection
        self.qa = qa

    def forward(self, outputs, targets: list[dict], num_boxes: float | None = None,
                group_targets: list[dict] | None = None) -> dict[str, Tensor]:
        losses = {} if self.detection is None else self.detection(outputs, targets, num_boxes=num_boxes)
        if not outputs.qa:
            raise ValueError("QASetCriterion needs a QA model's outputs (model.qa_dataset=clevr or gqa)")
        missing = [t.get("image_id") for t in (group_targets or targets) if "answer" not in t]
        if missing:
            raise ValueError(f"QA training needs an 'answer' in every entry; entries {missing[:5]} have none")
        device = next(iter(outputs.qa.values())).device
        group = None if group_targets is None else self.qa.encode_targets(group_targets, device)
        losses.update(self.qa(outputs.qa, self.qa.encode_targets(targets, device), group))
        return losses


__all__ = [
    "ATTRIBUTE", "BINARY", "COUNT", "CLEVR_ANSWER_TYPES", "ClevrQACriterion", "EncodedAnswer",
    "GQAPrediction", "GQAQACriterion", "QASetCriterion", "answer_confidence", "answer_targets",
    "decode_clevr_answers", "decode_gqa_answers", "encode_clevr_answer", "gqa_type_index", "gqa_weight_dict",
    "qa_weight_dict",
]
