"""Turn raw MDETR predictions into pixel boxes, scores and the phrases each box grounds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdetr.models.mdetr import MDETROutput
from mdetr.ops.boxes import box_cxcywh_to_xyxy


@torch.no_grad()
def post_process(outputs: MDETROutput, target_sizes: Tensor) -> list[dict[str, Tensor]]:
    """Per image: ``scores`` (Q,) = 1 - p(no object), ``boxes`` (Q, 4) xyxy in pixels of ``target_sizes``
    (B, 2) given as (height, width), and ``token_probs`` (Q, S-1) the softmax over token slots without the
    no-object slot.
    """
    prob = outputs.pred_logits.float().softmax(-1)  # (B, Q, S)
    scores = 1 - prob[..., -1]
    h, w = target_sizes.float().unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]
    boxes = box_cxcywh_to_xyxy(outputs.pred_boxes.float()) * scale
    results = [
        {"scores": s, "boxes": b, "token_probs": p[:, :-1]} for s, b, p in zip(scores, boxes, prob, strict=True)
    ]
    if outputs.pred_isfinal is not None:
        # CLEVR-Ref+: a box counts for the referring expression only if it is also in the final set.
        refexp = scores * outputs.pred_isfinal.float().sigmoid().squeeze(-1)
        for result, value in zip(results, refexp, strict=True):
            result["scores_refexp"] = value
    return results


@torch.no_grad()
def post_process_masks(
    pred_masks: Tensor, image_sizes: Tensor, original_sizes: Tensor, *, threshold: float = 0.5
) -> list[Tensor]:
    """Binary masks in original pixels from the segmentation model's mask logits.

    pred_masks: (B, Q, h, w) logits at stride 4 of the padded batch.
    image_sizes: (B, 2) (height, width) of each image as fed to the model, before padding.
    original_sizes: (B, 2) (height, width) to return the masks at.
    Returns per image a (Q, H, W) bool tensor: logits upsampled (bilinear) to the padded input size, cropped
    to the image, resized (bilinear) to the original size, then sigmoid > threshold.
    """
    padded_h, padded_w = image_sizes.max(0).values.tolist()
    logits = F.interpolate(pred_masks.float(), size=(padded_h, padded_w), mode="bilinear",
                           align_corners=False)
    masks = []
    for logit, (h, w), (orig_h, orig_w) in zip(logits, image_sizes.tolist(), original_sizes.tolist(),
                                               strict=True):
        cropped = logit[None, :, :h, :w]  # (1, Q, h, w)
        resized = F.interpolate(cropped, size=(orig_h, orig_w), mode="bilinear", align_corners=False)
        masks.append(resized[0].sigmoid() > threshold)
    return masks


def token_char_spans(tokenized: object, batch_index: int, token_ids: list[int]) -> list[tuple[int, int]]:
    """Character spans of the given token positions, adjacent/overlapping spans merged, specials skipped."""
    spans = []
    for t in sorted(token_ids):
        chars = tokenized.token_to_chars(batch_index, t)
        if chars is None or chars.start == chars.end:
            continue
        spans.append((chars.start, chars.end))
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


@dataclass
class Grounding:
    """Detections for one image and caption: ``boxes`` (K, 4) xyxy pixels, ``scores`` (K,), and per box the
    character ``spans`` of the caption it refers to and the ``phrases`` they spell; ``token_probs`` (K, L)
    is each box's probability over the caption's token positions (no-object slot removed).

    For detection from class names, ``labels`` (K,) int64 holds each box's index into the class-name list
    (its phrase is that name) and ``prompts`` the caption each box was predicted with (long class lists are
    split over several captions); both are None otherwise.
    """

    boxes: Tensor
    scores: Tensor
    phrases: list[str]
    spans: list[list[tuple[int, int]]]
    token_probs: Tensor
    labels: Tensor | None = None
    prompts: list[str] | None = None

    def to_json(self) -> list[dict]:
        records = [
            {"box_xyxy": [round(float(v), 2) for v in box], "score": round(float(score), 4), "phrase": phrase,
             "spans": [list(s) for s in spans]}
            for box, score, phrase, spans in zip(self.boxes, self.scores, self.phrases, self.spans, strict=True)
        ]
        if self.labels is not None:
            for record, label in zip(records, self.labels.tolist(), strict=True):
                record["label"] = label
        return records


def rank_detections(scores: Tensor, *, threshold: float, top_k: int | None = None) -> Tensor:
    """Indices (K,) of the scores above ``threshold``, best first, at most ``top_k``."""
    order = scores.argsort(descending=True, stable=True)
    order = order[scores[order] > threshold]
    return order if top_k is None else order[:top_k]


def select_groundings(
    result: dict[str, Tensor], caption: str, tokenized: object, batch_index: int, *,
    threshold: float = 0.7, top_k: int | None = None, token_threshold: float = 0.1,
) -> Grounding:
    """Keep boxes with score > threshold (best first, at most top_k) and name the caption text they ground.

    ``result`` is one image's entry of :func:`post_process`. A box's phrase is the caption text under the
    tokens to which it gives probability > token_threshold (as in the official demo); when none passes, its
    most probable token is used.
    """
    order = rank_detections(result["scores"], threshold=threshold, top_k=top_k)
    phrases, spans = [], []
    for q in order.tolist():
        probs = result["token_probs"][q]
        tokens = (probs > token_threshold).nonzero().flatten().tolist() or [int(probs.argmax())]
        box_spans = token_char_spans(tokenized, batch_index, tokens)
        spans.append(box_spans)
        phrases.append(" ".join(caption[s:e] for s, e in box_spans))
    return Grounding(result["boxes"][order], result["scores"][order], phrases, spans,
                     result["token_probs"][order])
