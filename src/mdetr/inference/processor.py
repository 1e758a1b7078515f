"""Prepare images and captions for MDETR and turn its raw predictions into detections.

The interface follows Hugging Face zero-shot detection: a processor makes the model inputs and
:func:`post_process_grounded_detection` returns, per image, ``scores``, pixel ``boxes`` and the grounded
``phrases``. Detection from class names builds captions "name1. name2. ..." in which each name is its own span
(:func:`build_class_prompts`), split into several captions when the names do not fit the text encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mdetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_size
from mdetr.inference.postprocess import post_process, select_groundings
from mdetr.models.mdetr import MDETROutput

# The official MDETR tokenizes with max_length 256; one position fewer keeps room for RoBERTa's offset.
DEFAULT_MAX_TOKENS = 255
_CLASS_SEPARATOR = ". "


def text_encoder_max_tokens(config: object) -> int:
    """How many token positions (specials included) a transformers encoder config can embed.

    RoBERTa-family encoders number positions from ``pad_token_id + 1``, so that many fewer are usable.
    """
    positions = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_TOKENS))
    if "roberta" in str(getattr(config, "model_type", "")):
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


@dataclass(frozen=True)
class ClassPrompt:
    """One caption built from class names: ``caption`` is "name_0. name_1. ... name_n." and ``spans[i]`` is
    the (start, end) character span of ``names[i]`` in it. ``label_offset`` is the index of ``names[0]`` in
    the full class-name list, so a name's global label is ``label_offset + i``."""

    caption: str
    names: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    label_offset: int = 0

    @classmethod
    def from_names(cls, names: Sequence[str], *, label_offset: int = 0) -> ClassPrompt:
        spans, start = [], 0
        for name in names:
            spans.append((start, start + len(name)))
            start += len(name) + len(_CLASS_SEPARATOR)
        return cls(_CLASS_SEPARATOR.join(names) + ".", tuple(names), tuple(spans), label_offset)

    def positive_map(self, tokenized: object, batch_index: int = 0) -> Tensor:
        """(N, L) float 0/1: which token positions of the tokenized caption each name covers."""
        length = len(tokenized["input_ids"][batch_index])
        positive = torch.zeros(len(self.names), length)
        for i, (start, end) in enumerate(self.spans):
            for char in range(start, end):
                token = tokenized.char_to_token(batch_index, char)
                if token is not None:
                    positive[i, token] = 1.0
        return positive


def build_class_prompts(class_names: Sequence[str], tokenizer: object, *,
                        max_tokens: int = DEFAULT_MAX_TOKENS) -> list[ClassPrompt]:
    """Captions that hold every class name exactly once, in order, split between whole names so that each
    tokenizes to at most ``max_tokens`` tokens (specials included)."""
    names = [str(n).strip() for n in class_names]
    if not names:
        raise ValueError("the list of class names is empty")
    if any(not n for n in names):
        raise ValueError("a class name is empty")

    def fits(chunk: list[str]) -> bool:
        return len(tokenizer(ClassPrompt.from_names(chunk).caption)["input_ids"]) <= max_tokens

    prompts: list[ClassPrompt] = []
    chunk: list[str] = []
    offset = 0
    for name in names:
        if not fits([name]):
            raise ValueError(f"the class name {name[:40]!r} alone is longer than the {max_tokens} tokens the "
                             "text encoder reads")
        if chunk and not fits([*chunk, name]):
            prompts.append(ClassPrompt.from_names(chunk, label_offset=offset))
            offset += len(chunk)
            chunk = []
        chunk.append(name)
    prompts.append(ClassPrompt.from_names(chunk, label_offset=offset))
    return prompts


class GroundingProcessor:
    """Image preprocessing and caption tokenization for MDETR.

    Images are resized so their shorter side is ``image_size`` (long side at most ``max_size``; 0 keeps the
    size), normalised with the ImageNet statistics used in training and zero-padded into a batch. Captions
    are tokenized as the model does (padding to the longest), refusing captions over ``max_tokens``.
    """

    def __init__(self, tokenizer: object, *, image_size: int = 800, max_size: int = 1333,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_size = max_size
        self.max_tokens = max_tokens
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, image_size: int = 800,
                  max_size: int = 1333) -> GroundingProcessor:
        """A processor with the model's tokenizer and token limit (255, or the text encoder's positions)."""
        detector = getattr(model, "detr", model)  # a segmentation model wraps the detector
        limit = min(DEFAULT_MAX_TOKENS, text_encoder_max_tokens(detector.transformer.text_encoder.config))
        return cls(model.tokenizer, image_size=image_size, max_size=max_size, max_tokens=limit)

    def preprocess_images(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) float32 normalised, zero-padded batch and its (B, H, W) bool mask (True on
        padding)."""
        tensors = []
        for image in images:
            if self.image_size:
                image = image.resize(resized_size(image.width, image.height, self.image_size, self.max_size),
                                     Image.BILINEAR)
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            tensors.append((array - self._mean) / self._std)
        height = max(t.shape[1] for t in tensors)
        width = max(t.shape[2] for t in tensors)
        batch = torch.zeros(len(tensors), 3, height, width)
        mask = torch.ones(len(tensors), height, width, dtype=torch.bool)
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t
            mask[i, : t.shape[1], : t.shape[2]] = False
        return batch, mask

    def tokenize(self, captions: Sequence[str]) -> object:
        """The captions' BatchEncoding (``input_ids``/``attention_mask`` (B, L), character offsets), padded to
        the longest; the model tokenizes its string input the same way."""
        for caption in captions:
            if not caption or not caption.strip():
                raise ValueError("the text to ground is empty")
        tokenized = self.tokenizer(list(captions), padding="longest", return_tensors="pt")
        lengths = tokenized["attention_mask"].sum(-1).tolist()
        for caption, length in zip(captions, lengths, strict=True):
            if length > self.max_tokens:
                raise ValueError(f"the text {caption[:40]!r}... has {length} tokens; the model reads at most "
                                 f"{self.max_tokens}")
        return tokenized

    def __call__(self, images: Sequence[Image.Image], text: Sequence[str]) -> dict[str, object]:
        """Model inputs: ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W) True on padding,
        ``captions`` (B strings), ``tokenized`` (their BatchEncoding) and ``target_sizes`` (B, 2) int64
        original (height, width), to pass to :func:`post_process_grounded_detection`."""
        if len(images) != len(text):
            raise ValueError(f"got {len(images)} images but {len(text)} texts")
        pixel_values, pixel_mask = self.preprocess_images(images)
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "captions": list(text),
                "tokenized": self.tokenize(text),
                "target_sizes": torch.tensor([[im.height, im.width] for im in images], dtype=torch.int64)}


def _per_image(value: object, batch: int, what: str) -> list:
    """A per-image list from one value for the whole batch or a sequence of ``batch`` values."""
    if value is None or isinstance(value, (str, ClassPrompt)):
        return [value] * batch
    values = list(value)
    if len(values) == 1:
        return values * batch
    if len(values) != batch:
        raise ValueError(f"got {len(values)} {what} for {batch} images")
    return values


@torch.no_grad()
def post_process_grounded_detection(
    outputs: MDETROutput, *, target_sizes: Tensor | Sequence[Sequence[int]], threshold: float = 0.7,
    text_threshold: float = 0.1, top_k: int | None = None, captions: str | Sequence[str] | None = None,
    tokenized: object | None = None, class_prompts: ClassPrompt | Sequence[ClassPrompt] | None = None,
) -> list[dict[str, object]]:
    """Detections per image from raw predictions.

    outputs: the model's predictions for B images (``pred_logits`` (B, Q, S), ``pred_boxes`` (B, Q, 4)
        normalised cxcywh; any float dtype).
    target_sizes: (B, 2) (height, width) of the original images; boxes come back in their pixels.
    threshold: keep boxes whose score ``1 - p(no object)`` is above it (times p(final) for a model with the
        CLEVR-Ref+ is-final head).
    text_threshold: a box's phrase is the caption text under the tokens it gives more than this probability
        (its most probable token when none does).
    captions / tokenized: the B captions and their BatchEncoding (default ``outputs.tokenized``); one caption
        or a batch-of-one encoding is shared by every image.
    class_prompts: for detection from class names, the :class:`ClassPrompt` behind each caption (or one for
        all). Each box is then labelled with the name whose tokens get most of its token probability mass.

    Returns per image a dict with ``scores`` (K,) float32 best first, ``boxes`` (K, 4) float32 pixel xyxy,
    ``phrases`` (K strings), ``spans`` (K lists of (start, end) character spans in the caption),
    ``token_probs`` (K, S-1) and ``labels`` (K,) int64: the index into the class-name list, or -1 without
    class prompts. With class prompts, a box's phrase is its class name and its span that name's span.
    """
    batch = outputs.pred_boxes.shape[0]
    tokenized = outputs.tokenized if tokenized is None else tokenized
    captions_list = _per_image(captions, batch, "captions")
    prompts = _per_image(class_prompts, batch, "class prompts")
    for i, prompt in enumerate(prompts):
        if prompt is not None and captions_list[i] is None:
            captions_list[i] = prompt.caption
    if any(c is None for c in captions_list) or tokenized is None:
        raise ValueError("naming the grounded phrases needs the captions and their tokenization")
    shared_encoding = len(tokenized["input_ids"]) == 1
    sizes = torch.as_tensor(target_sizes).reshape(batch, 2)
    results = []
    for i, result in enumerate(post_process(outputs, sizes)):
        row = 0 if shared_encoding else i
        result = {k: v.cpu() for k, v in result.items()}
        if "scores_refexp" in result:  # CLEVR-Ref+: the referred boxes are those the is-final head keeps
            result["scores"] = result["scores_refexp"]
        grounding = select_groundings(result, captions_list[i], tokenized, row, threshold=threshold,
                                      top_k=top_k, token_threshold=text_threshold)
        detections = {"scores": grounding.scores, "boxes": grounding.boxes, "phrases": grounding.phrases,
                      "spans": grounding.spans, "token_probs": grounding.token_probs,
                      "labels": torch.full((len(grounding.scores),), -1, dtype=torch.int64)}
        if prompts[i] is not None:
            label_detections(detections, prompts[i], tokenized, row)
        results.append(detections)
    return results


def label_detections(detections: dict[str, object], prompt: ClassPrompt, tokenized: object,
                     batch_index: int) -> None:
    """Set ``labels``, ``phrases`` and ``spans`` of one image's detections from the class names: each box
    goes to the name whose tokens hold most of its token probability (``token_probs`` (K, L))."""
    token_probs = detections["token_probs"]  # (K, S-1): the model's token slots, often more than L
    positive = prompt.positive_map(tokenized, batch_index)  # (N, L)
    width = token_probs.shape[1]
    positive = torch.nn.functional.pad(positive, (0, max(0, width - positive.shape[1])))[:, :width]
    mass = token_probs.float() @ positive.T  # (K, N)
    local = mass.argmax(-1) if len(token_probs) else torch.zeros(0, dtype=torch.int64)
    detections["labels"] = local + prompt.label_offset
    detections["phrases"] = [prompt.names[j] for j in local.tolist()]
    detections["spans"] = [[prompt.spans[j]] for j in local.tolist()]
