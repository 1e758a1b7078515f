"""Prediction heads shared by MDETR and its task variants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """A few Linear layers with ReLU between them (DETR's box head); parameters ``layers.{i}``."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass(frozen=True)
class AnswerHeadSpec:
    """One question-answering head, fed by one appended QA query.

    name: the head is the model attribute ``{name}_head`` (the official parameter name) and its output is
        ``MDETROutput.qa[name]`` (the official output key is ``pred_{name}``).
    num_outputs: answer classes (1 for the CLEVR yes/no logit).
    mlp: a 3-layer MLP (CLEVR counting) instead of one Linear layer.
    squeeze: drop the trailing size-1 dimension, giving (B,) instead of (B, 1).
    """

    name: str
    num_outputs: int
    mlp: bool = False
    squeeze: bool = False


# Listed in the order of the QA queries they read (query i of the appended block feeds head i).
GQA_ANSWER_HEADS = (
    AnswerHeadSpec("answer_type", 5),
    AnswerHeadSpec("answer_obj", 3),
    AnswerHeadSpec("answer_rel", 1594),
    AnswerHeadSpec("answer_attr", 403),
    AnswerHeadSpec("answer_cat", 678),
    AnswerHeadSpec("answer_global", 111),
)
# The unified GQA head: one query, one class per answer of the GQA answer vocabulary.
GQA_UNIFIED_ANSWER_HEADS = (AnswerHeadSpec("answer", 1853),)
CLEVR_ANSWER_HEADS = (
    AnswerHeadSpec("answer_type", 3),
    AnswerHeadSpec("answer_binary", 1, squeeze=True),
    AnswerHeadSpec("answer_reg", 20, mlp=True),
    AnswerHeadSpec("answer_attr", 15),
)

# Class index -> meaning for the type heads, as in the official datasets.
GQA_ANSWER_TYPES = ("obj", "attr", "rel", "global", "cat")
# The key of the unified head's vocabulary in ``model.qa_answers`` (split heads use GQA_ANSWER_TYPES).
GQA_ALL_ANSWERS = "all"
# The answer a GQA target falls back to when the head's vocabulary lacks the true one (as the official
# datasets map unseen answers); every vocabulary built from data holds it.
GQA_UNKNOWN_ANSWER = "unknown"
CLEVR_ANSWER_TYPES = ("binary", "attribute", "count")
# Count answers 0 .. CLEVR_MAX_COUNT are the classes of the answer_reg head.
CLEVR_MAX_COUNT = 19
CLEVR_ATTRIBUTES = (
    "small", "large", "gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow",
    "cube", "sphere", "cylinder", "rubber", "metal",
)


def clevr_attributes(qa_attributes: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The attribute answers of a CLEVR-style model: ``model.qa_attributes``, or CLEVR's 15 when empty."""
    return tuple(qa_attributes) or CLEVR_ATTRIBUTES


def gqa_answer_head_specs(qa_answers: Mapping[str, Sequence[str]] | None = None, *,
                          split_qa_heads: bool = True) -> tuple[AnswerHeadSpec, ...]:
    """The GQA heads, sized by ``qa_answers`` (answer type -> answer list, or ``{"all": [...]}`` for the
    unified head) when given, else by the released checkpoints' vocabularies."""
    if not qa_answers:
        return GQA_ANSWER_HEADS if split_qa_heads else GQA_UNIFIED_ANSWER_HEADS
    if not split_qa_heads:
        return (AnswerHeadSpec("answer", len(qa_answers[GQA_ALL_ANSWERS])),)
    return tuple(AnswerHeadSpec(spec.name, len(qa_answers[spec.name.removeprefix("answer_")]))
                 if spec.name != "answer_type" else spec for spec in GQA_ANSWER_HEADS)


def answer_head_specs(qa_dataset: str, *, split_qa_heads: bool = True,
                      qa_attributes: list[str] | tuple[str, ...] = (),
                      qa_answers: Mapping[str, Sequence[str]] | None = None) -> tuple[AnswerHeadSpec, ...]:
    """The heads (and so the number of QA queries) of a QA variant; ``()`` when ``qa_dataset`` is empty.

    qa_attributes: CLEVR only, the attribute answer vocabulary (one ``answer_attr`` class each); empty is
        CLEVR's 15 (:data:`CLEVR_ATTRIBUTES`), the released checkpoints' head.
    qa_answers: GQA only, the answer vocabulary of each answer head (``model.qa_answers``); empty gives
        the released checkpoints' head sizes (obj 3, rel 1594, attr 403, cat 678, global 111; unified 1853).
    """
    if not qa_dataset:
        return ()
    if qa_dataset == "gqa":
        return gqa_answer_head_specs(qa_answers, split_qa_heads=split_qa_heads)
    if qa_dataset == "clevr" and split_qa_heads:
        attributes = clevr_attributes(qa_attributes)
        if len(attributes) == len(CLEVR_ATTRIBUTES):
            return CLEVR_ANSWER_HEADS
        return tuple(AnswerHeadSpec("answer_attr", len(attributes)) if spec.name == "answer_attr" else spec
                     for spec in CLEVR_ANSWER_HEADS)
    raise ValueError(f"no answer heads for qa_dataset={qa_dataset!r}, split_qa_heads={split_qa_heads}")


def build_answer_head(spec: AnswerHeadSpec, *, hidden_dim: int) -> nn.Module:
    if spec.mlp:
        return MLP(input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=spec.num_outputs, num_layers=3)
    return nn.Linear(hidden_dim, spec.num_outputs)
