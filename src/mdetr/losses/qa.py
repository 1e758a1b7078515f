"""Question answering for CLEVR-style data (MDETR Section 4.4): answer encoding, loss and decoding.

A CLEVR answer is one of three types, each with its own head (:data:`mdetr.models.heads.CLEVR_ANSWER_HEADS`):

- 0 ``binary``: "yes" / "no", one logit (``answer_binary``, yes = 1);
- 1 ``attribute``: one of the attribute words (``answer_attr``; CLEVR's 15, or ``model.qa_attributes``);
- 2 ``count``: an integer 0..19 (``answer_reg``, a 20-way classification despite its name).

:class:`ClevrQACriterion` is the official ``QACriterionClevr``: cross-entropy of the type head over all
questions, then each answer head's loss over the questions of its type only (masked sum divided by their
number, or by 1 when the batch has none). :class:`QASetCriterion` adds it to MDETR's detection losses, and
:func:`qa_weight_dict` gives the weights: ``loss_answer_type`` ``loss.qa_loss_coef``, the others 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.models.heads import CLEVR_ANSWER_TYPES, CLEVR_ATTRIBUTES, CLEVR_MAX_COUNT

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


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask``, divided by the mask's count (by 1 when it is empty)."""
    return values.masked_fill(~mask, 0.0).sum() / (mask.sum() if mask.any() else 1.0)


def _accuracy(correct: Tensor, mask: Tensor) -> Tensor:
    """Fraction of ``correct`` among ``mask`` (1 when the mask is empty, as the official)."""
    if not mask.any():
        return torch.ones((), device=correct.device)
    return correct[mask].float().sum() / mask.sum()


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

    def forward(self, qa: dict[str, Tensor], answers: dict[str, Tensor]) -> dict[str, Tensor]:
        """qa: the model's ``MDETROutput.qa``; answers: :func:`answer_targets`."""
        answer_type = answers["answer_type"]
        type_logits = qa["answer_type"].float()
        is_binary, is_attr, is_reg = (answer_type == k for k in (BINARY, ATTRIBUTE, COUNT))
        losses = {"loss_answer_type": F.cross_entropy(type_logits, answer_type)}
        binary_logits = qa["answer_binary"].float()
        losses["loss_answer_binary"] = _masked_mean(
            F.binary_cross_entropy_with_logits(binary_logits, answers["answer_binary"], reduction="none"),
            is_binary)
        losses["loss_answer_attr"] = _masked_mean(
            F.cross_entropy(qa["answer_attr"].float(), answers["answer_attr"], reduction="none",
                            ignore_index=IGNORE), is_attr)
        losses["loss_answer_reg"] = _masked_mean(
            F.cross_entropy(qa["answer_reg"].float(), answers["answer_reg"], reduction="none",
                            ignore_index=IGNORE), is_reg)
        with torch.no_grad():
            type_ok = type_logits.argmax(-1) == answer_type
            binary_ok = (binary_logits.sigmoid() > 0.5) == (answers["answer_binary"] > 0.5)
            attr_ok = qa["answer_attr"].argmax(-1) == answers["answer_attr"]
            reg_ok = qa["answer_reg"].argmax(-1) == answers["answer_reg"]
            losses["accuracy_answer_type"] = type_ok.float().mean()
            losses["accuracy_answer_binary"] = _accuracy(binary_ok, is_binary)
            losses["accuracy_answer_attr"] = _accuracy(attr_ok, is_attr)
            losses["accuracy_answer_reg"] = _accuracy(reg_ok, is_reg)
            answer_ok = (is_binary & binary_ok) | (is_attr & attr_ok) | (is_reg & reg_ok)
            losses["accuracy_answer_total"] = (type_ok & answer_ok).float().mean()
        return losses


def qa_weight_dict(qa_loss_coef: float) -> dict[str, float]:
    """The official CLEVR weights: the type loss ``qa_loss_coef``, the per-type answer losses 1."""
    return {"loss_answer_type": qa_loss_coef, "loss_answer_binary": 1.0, "loss_answer_attr": 1.0,
            "loss_answer_reg": 1.0}


class QASetCriterion(nn.Module):
    """MDETR's detection losses (:class:`~mdetr.losses.criterion.SetCriterion`) plus the CLEVR QA losses.

    Each target needs ``answer`` (the string of the entry's ``answer`` field). The QA losses are means over
    the batch's questions, not divided by the box count: with ``train.accumulate_steps`` > 1 they add up
    over the micro-batches, as the detection losses do not.
    """

    def __init__(self, detection: nn.Module, attributes: Sequence[str] = CLEVR_ATTRIBUTES) -> None:
        super().__init__()
        self.detection = detection
        self.qa = ClevrQACriterion(attributes)

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.qa.attributes

    def forward(self, outputs, targets: list[dict], num_boxes: float | None = None) -> dict[str, Tensor]:
        losses = self.detection(outputs, targets, num_boxes=num_boxes)
        if not outputs.qa:
            raise ValueError("QASetCriterion needs a QA model's outputs (model.qa_dataset=clevr)")
        missing = [t.get("image_id") for t in targets if "answer" not in t]
        if missing:
            raise ValueError(f"QA training needs an 'answer' in every entry; entries {missing[:5]} have none")
        device = outputs.qa["answer_type"].device
        answers = answer_targets([str(t["answer"]) for t in targets], self.attributes, device=device)
        losses.update(self.qa(outputs.qa, answers))
        return losses


__all__ = [
    "ATTRIBUTE", "BINARY", "COUNT", "CLEVR_ANSWER_TYPES", "ClevrQACriterion", "EncodedAnswer",
    "QASetCriterion", "answer_confidence", "answer_targets", "decode_clevr_answers", "encode_clevr_answer",
    "qa_weight_dict",
]
