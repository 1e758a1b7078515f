"""Turn raw MDETR predictions into pixel boxes, scores and the phrases each box grounds, and a segmentation
model's mask logits into masks (one region per phrase for PhraseCut)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdetr.models.mdetr import MDETROutput
from mdetr.ops.boxes import box_cxcywh_to_xyxy
from mdetr.ops.masks import mask_to_rle


def pixel_boxes(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """Normalised cxcywh ``boxes`` (B, N, 4) as float32 xyxy in the pixels of ``target_sizes`` (B, 2) given as
    (height, width); the sizes may sit on another device (predictors build them on the CPU)."""
    h, w = target_sizes.to(boxes.device).float().unbind(-1)
    return box_cxcywh_to_xyxy(boxes.float()) * torch.stack([w, h, w, h], dim=-1)[:, None, :]


@torch.no_grad()
def post_process(outputs: MDETROutput, target_sizes: Tensor) -> list[dict[str, Tensor]]:
    """Per image: ``scores`` (Q,) = 1 - p(no object), ``boxes`` (Q, 4) xyxy in pixels of ``target_sizes``
    (B, 2) given as (height, width), and ``token_probs`` (Q, S-1) the softmax over token slots without the
    no-object slot.
    """
    prob = outputs.pred_logits.float().softmax(-1)  # (B, Q, S)
    scores = 1 - prob[..., -1]
    boxes = pixel_boxes(outputs.pred_boxes, target_sizes)
    results = [
        {"scores": s, "boxes": b, "token_probs": p[:, :-1]}
        for s, b, p in zip(scores, boxes, prob, strict=True)
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
    padded = tuple(image_sizes.max(0).values.tolist())
    sizes = zip(image_sizes.tolist(), original_sizes.tolist(), strict=True)
    return [mask_logits_at_original_size(logits, padded, size, original).sigmoid() > threshold
            for logits, (size, original) in zip(pred_masks, sizes, strict=True)]


def mask_logits_at_original_size(logits: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                                 original_size: tuple[int, int]) -> Tensor:
    """One image's mask logits (K, h, w) at stride 4 of a batch padded to ``padded_size`` -> (K, H, W) logits
    at ``original_size``: upsampled (bilinear) to the padded size, cropped to ``image_size`` (the image as fed
    to the model), resized (bilinear) to the original size. All sizes are (height, width)."""
    if len(logits) == 0:
        return logits.new_zeros((0, *original_size), dtype=torch.float32)
    upsampled = F.interpolate(logits[None].float(), size=tuple(padded_size), mode="bilinear",
                              align_corners=False)
    height, width = image_size
    cropped = upsampled[:, :, :height, :width]
    return F.interpolate(cropped, size=tuple(original_size), mode="bilinear", align_corners=False)[0]


PHRASECUT_SCORE_THRESHOLD = 0.7
"""The official PhraseCut post-processing keeps the boxes scoring above this."""


@torch.no_grad()
def post_process_phrasecut(
    outputs: MDETROutput, image_sizes: Tensor, original_sizes: Tensor, *,
    score_threshold: float = PHRASECUT_SCORE_THRESHOLD, mask_threshold: float = 0.5,
) -> list[dict[str, Tensor]]:
    """One mask per phrase: the union of the masks of the boxes scoring above ``score_threshold``.

    outputs: a segmentation model's predictions for B images (``pred_masks`` (B, Q, h, w) logits).
    image_sizes: (B, 2) (height, width) of each image as fed to the model, before padding.
    original_sizes: (B, 2) (height, width) of the original images.
    Returns per image ``scores`` (Q,) = 1 - p(no object), ``boxes`` (Q, 4) xyxy original pixels, ``keep``
    (K,) int64 the kept queries best first, and ``mask`` (H, W) bool at the original size: pixels where some
    kept query's mask probability exceeds ``mask_threshold`` (all False when no box is kept). Only the kept
    queries' masks are resized.
    """
    if outputs.pred_masks is None:
        raise ValueError("post_process_phrasecut needs a segmentation model's outputs (model.masks=true)")
    padded = tuple(image_sizes.max(0).values.tolist())
    results = post_process(outputs, original_sizes)
    for b, (result, size, original) in enumerate(zip(results, image_sizes.tolist(), original_sizes.tolist(),
                                                     strict=True)):
        keep = rank_detections(result["scores"], threshold=score_threshold)
        # (K, H, W): only the kept queries' masks are resized
        logits = mask_logits_at_original_size(outputs.pred_masks[b, keep], padded, size, original)
        result["keep"] = keep
        result["mask"] = (logits.sigmoid() > mask_threshold).any(0)
    return results


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
            for box, score, phrase, spans in zip(
                self.boxes, self.scores, self.phrases, self.spans, strict=True
            )
        ]
        if self.labels is not None:
            for record, label in zip(records, self.labels.tolist(), strict=True):
                record["label"] = label
        return records


@dataclass
class Segmentation:
    """The region a sentence refers to in one image (a segmentation model, PhraseCut): ``mask`` (H, W) bool
    at the original size, the union of the masks of the boxes scoring above the threshold, and
    ``grounding``, those boxes with their scores and phrases."""

    mask: Tensor
    grounding: Grounding

    def to_json(self) -> dict:
        """``mask_rle`` (COCO compressed RLE ``{"size": [H, W], "counts"}``), ``mask_area`` (pixels) and the
        boxes (:meth:`Grounding.to_json`)."""
        mask = self.mask.cpu().numpy()
        return {"mask_rle": mask_to_rle(mask), "mask_area": int(mask.sum()),
                "boxes": self.grounding.to_json()}


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
