"""Flickr30k Entities phrase grounding: Recall@k under the ANY-BOX and MERGED-BOXES protocols (Table 3).

Every phrase that has ground-truth boxes is a query. The model's boxes are ranked for a phrase by the
largest probability the box's token distribution gives to one of the phrase's tokens
(:func:`rank_boxes_for_phrases`, as MDETR's Flickr post-processor); the phrase is recalled at k when one
of the top-k boxes overlaps one of its ground-truth boxes with IoU >= 0.5 (plain IoU). The *upper bound*
is recall over all Q boxes of the model.

- **ANY-BOX** (``protocol="any"``): the ground truth is every box of the phrase's entity; a hit on any one
  counts.
- **MERGED-BOXES** (``protocol="merged"``): each entity's boxes are replaced by their enclosing box.

The official ground truth is the original annotation folder (``Annotations/*.xml``, ``Sentences/*.txt``;
:meth:`FlickrGroundTruth.from_entities`). :meth:`FlickrGroundTruth.from_mdetr` reads an MDETR
``final_flickr_*`` file instead, where a phrase's boxes are those of the annotations aligned to its span;
those annotations merge boxes of IoU >= 0.95, so numbers may differ slightly from the official ones.
Recall is reported for all phrases and for each coarse phrase type (a phrase with two types counts for
both).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mdetr.data.errors import DataError
from mdetr.data.flickr import PHRASE_TYPES, FlickrEntities, enclosing_box
from mdetr.eval.coco import GroundTruth, load_ground_truth
from mdetr.ops.boxes import box_iou, box_xywh_to_xyxy

__all__ = ["FlickrEvaluator", "FlickrGroundTruth", "PROTOCOLS", "rank_boxes_for_phrases"]

PROTOCOLS = {"any": "ANY-BOX", "merged": "MERGED-BOXES"}
SentenceKey = tuple[str, int]
"""(Flickr image id as a string, sentence index in its Sentences file)."""
_MAX_SHOWN = 5


@dataclass(frozen=True)
class PhraseQuery:
    """One evaluated phrase: its text, coarse types and ground-truth boxes (N, 4) pixel xyxy."""

    text: str
    types: tuple[str, ...]
    boxes: Tensor


def rank_boxes_for_phrases(token_probs: Tensor, boxes: Tensor, phrase_token_maps: Tensor) -> list[Tensor]:
    """The model's boxes ranked for each phrase.

    token_probs: (Q, S) each box's probability over token slots (softmax over all slots, no-object
        included; the no-object column may be dropped).
    boxes: (Q, 4) the boxes, any format.
    phrase_token_maps: (P, S') bool, the tokens of each phrase; S' <= S columns are used.
    Returns P tensors (Q, 4): the boxes sorted by ``max_{t in phrase} token_probs[q, t]``, best first
    (ties keep query order).
    """
    width = min(token_probs.shape[1], phrase_token_maps.shape[1])
    probs = token_probs[:, :width].float()  # (Q, S')
    maps = phrase_token_maps[:, :width].bool()  # (P, S')
    ranked = []
    for row in maps:
        scores = (probs * row).max(dim=-1).values  # (Q,)
        ranked.append(boxes[torch.sort(scores, descending=True, stable=True).indices])
    return ranked


class FlickrGroundTruth:
    """Evaluated phrases per sentence: ``queries[(image_id, sentence_id)]`` lists the phrases that have
    boxes, in sentence order (the order of MDETR's ``tokens_positive_eval``). Sentences without such a
    phrase are absent."""

    def __init__(self, queries: dict[SentenceKey, list[PhraseQuery]], *, protocol: str, source: str) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be 'any' or 'merged', got {protocol!r}")
        self.queries = queries
        self.protocol = protocol
        self.source = source

    @property
    def num_phrases(self) -> int:
        return sum(len(v) for v in self.queries.values())

    @classmethod
    def from_entities(
        cls,
        root: str | os.PathLike,
        split: str,
        *,
        protocol: str = "any",
        image_ids: Iterable[str] | None = None,
    ) -> FlickrGroundTruth:
        """The official ground truth from the original folder (``image_ids``: only these images)."""
        entities = FlickrEntities(root, split)
        queries: dict[SentenceKey, list[PhraseQuery]] = {}
        for image_id in image_ids if image_ids is not None else entities.image_ids:
            boxes = entities.boxes(image_id).boxes
            if protocol == "merged":
                boxes = {entity: [enclosing_box(b)] for entity, b in boxes.items()}
            for sentence_id, sentence in enumerate(entities.sentences(image_id)):
                phrases = [
                    PhraseQuery(p.text, p.types, torch.tensor(boxes[p.entity_id], dtype=torch.float64))
                    for p in sentence.phrases
                    if p.entity_id in boxes
                ]
                if phrases:
                    queries[(str(image_id), sentence_id)] = phrases
        return cls(queries, protocol=protocol, source=f"{root} ({split})")

    @classmethod
    def from_mdetr(cls, ground_truth: GroundTruth, *, protocol: str = "any") -> FlickrGroundTruth:
        """Phrases and boxes from an MDETR Flickr file: a phrase's boxes are those of the annotations
        with a span overlapping the phrase's; phrase types are unknown there ("other" is not assumed, only
        "all" is reported)."""
        data = load_ground_truth(ground_truth)
        file = ground_truth if isinstance(ground_truth, (str, os.PathLike)) else "<annotations>"
        by_image: dict[Any, list[dict]] = {}
        for annotation in data["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        queries: dict[SentenceKey, list[PhraseQuery]] = {}
        for entry in data["images"]:
            phrases = _phrases_of_entry(entry, by_image.get(entry["id"], []), protocol, str(file))
            if phrases:
                queries[(str(entry["original_img_id"]), int(entry["sentence_id"]))] = phrases
        return cls(queries, protocol=protocol, source=str(file))


def _phrases_of_entry(entry: dict, annotations: list[dict], protocol: str, file: str) -> list[PhraseQuery]:
    for key in ("original_img_id", "sentence_id", "tokens_positive_eval", "caption"):
        if key not in entry:
            raise DataError(f"the entry has no {key!r}", file=file, entry=f"image id {entry.get('id')}")
    phrases = []
    for index, spans in enumerate(entry["tokens_positive_eval"]):
        boxes = [
            a["bbox"]
            for a in annotations
            if any(b < pe and pb < e for b, e in a.get("tokens_positive", []) for pb, pe in spans)
        ]
        if not boxes:
            raise DataError(
                f"phrase {index} of 'tokens_positive_eval' has no annotation aligned to it",
                file=file,
                entry=f"image id {entry['id']}",
            )
        xyxy = box_xywh_to_xyxy(torch.tensor(boxes, dtype=torch.float64))
        if protocol == "merged":
            xyxy = torch.tensor([enclosing_box(xyxy.tolist())], dtype=torch.float64)
        text = " ".join(entry["caption"][b:e] for b, e in spans)
        phrases.append(PhraseQuery(text, (), xyxy))
    return phrases


class FlickrEvaluator:
    """Recall@k of ranked boxes per phrase.

    Args:
        ground_truth: a :class:`FlickrGroundTruth` (its ``protocol`` names the report).
        ks: the k of Recall@k; -1 is the upper bound (any of the model's boxes).
        iou_threshold: a box is correct if its IoU with a ground-truth box of the phrase is >= this.

    ``update`` takes, per sentence key ``(image_id, sentence_id)``, the ranked boxes of each evaluated
    phrase in sentence order; ``summarize`` raises when sentences lack predictions.
    """

    def __init__(
        self,
        ground_truth: FlickrGroundTruth,
        *,
        ks: Sequence[int] = (1, 5, 10, -1),
        iou_threshold: float = 0.5,
    ) -> None:
        if not ks or any(k == 0 or k < -1 for k in ks):
            raise ValueError(f"ks must be integers >= 1, or -1 for the upper bound; got {ks!r}")
        self.ground_truth = ground_truth
        self.ks = tuple(int(k) for k in ks)
        self.iou_threshold = float(iou_threshold)
        # sentence key -> per phrase, hit at each k (order of self.ks)
        self._hits: dict[SentenceKey, list[tuple[bool, ...]]] = {}

    @staticmethod
    def _key(raw: Any) -> SentenceKey:
        image_id, sentence_id = raw
        return str(image_id), int(sentence_id)

    def update(self, predictions: Mapping[Any, Sequence[Tensor]]) -> None:
        """Score ranked boxes.

        predictions: ``{(image_id, sentence_id): [boxes (K, 4) pixel xyxy, best first] per phrase}``.
        Predictions for sentences without evaluated phrases are ignored (when empty) or rejected.

        Raises:
            ValueError: an unknown sentence, or a number of phrases different from the ground truth's.
        """
        for raw, per_phrase in predictions.items():
            key = self._key(raw)
            phrases = self.ground_truth.queries.get(key)
            if phrases is None:
                if len(per_phrase):
                    raise ValueError(
                        f"sentence {key[1]} of image {key[0]} has no phrase with boxes in "
                        f"{self.ground_truth.source}, but {len(per_phrase)} were predicted"
                    )
                continue
            if len(per_phrase) != len(phrases):
                raise ValueError(
                    f"sentence {key[1]} of image {key[0]}: got ranked boxes for {len(per_phrase)} "
                    f"phrases, the ground truth has {len(phrases)}"
                )
            self._hits[key] = [
                self._phrase_hits(torch.as_tensor(boxes), phrase)
                for boxes, phrase in zip(per_phrase, phrases, strict=True)
            ]

    def _phrase_hits(self, ranked: Tensor, phrase: PhraseQuery) -> tuple[bool, ...]:
        if ranked.numel() == 0:
            return tuple(False for _ in self.ks)
        ious = box_iou(ranked.to(torch.float64).reshape(-1, 4), phrase.boxes)[0].max(dim=1).values  # (K,)
        return tuple(bool((ious if k == -1 else ious[:k]).max() >= self.iou_threshold) for k in self.ks)

    def _label(self, k: int) -> str:
        return "upper_bound" if k == -1 else f"R@{k}"

    def summarize(self) -> dict[str, Any]:
        """Recall per k, for "all" phrases and per phrase type.

        Returns ``{"all": {"R@1", "R@5", "R@10", "upper_bound"}, <type>: {...}, ..., "protocol":
        "ANY-BOX", "criterion": "IoU >= 0.5", "num_phrases": int, "num_sentences": int}``; recalls are
        fractions in [0, 1]. Types with no phrase are left out.

        Raises:
            ValueError: some sentences with evaluated phrases received no prediction (at most five named).
        """
        missing = sorted(set(self.ground_truth.queries) - set(self._hits))
        if missing:
            shown = ", ".join(f"sentence {s} of image {i}" for i, s in missing[:_MAX_SHOWN])
            more = ", ..." if len(missing) > _MAX_SHOWN else ""
            raise ValueError(
                f"missing predictions for {len(missing)} of {len(self.ground_truth.queries)} "
                f"sentences ({shown}{more})"
            )
        groups: dict[str, list[tuple[bool, ...]]] = {"all": []}
        for key, hits in self._hits.items():
            for phrase, hit in zip(self.ground_truth.queries[key], hits, strict=True):
                groups["all"].append(hit)
                for phrase_type in phrase.types:
                    groups.setdefault(phrase_type, []).append(hit)
        order = ["all", *PHRASE_TYPES, *sorted(set(groups) - {"all", *PHRASE_TYPES})]
        summary: dict[str, Any] = {}
        for name in order:
            if name in groups:
                hits = groups[name]
                summary[name] = {
                    self._label(k): (sum(h[j] for h in hits) / len(hits) if hits else 0.0)
                    for j, k in enumerate(self.ks)
                }
        summary["protocol"] = PROTOCOLS[self.ground_truth.protocol]
        summary["criterion"] = f"IoU >= {self.iou_threshold:g}"
        summary["num_phrases"] = len(groups["all"])
        summary["num_sentences"] = len(self._hits)
        return summary
