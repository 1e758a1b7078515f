"""Ground sentences in images: image + text in, pixel boxes, scores and phrases out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mdetr.inference.optimize import optimize_for_inference
from mdetr.inference.postprocess import Grounding, Segmentation, post_process_phrasecut
from mdetr.inference.processor import (
    ClassPrompt,
    GroundingProcessor,
    build_class_prompts,
    post_process_grounded_detection,
)
from mdetr.models.mdetr import MDETROutput
from mdetr.models.text import TextFeatureCache
from mdetr.models.transformer import EncodedText

ImageInput = Image.Image | str | Path | np.ndarray
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def open_image(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a PIL image, a path or an (H, W, 3) uint8 array; clear errors for bad files."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3), got shape {image.shape}")
        return Image.fromarray(image.astype(np.uint8), "RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


@dataclass
class Answer:
    """A QA model's answer to one question about one image: ``answer`` (the decoded word), ``answer_type``
    (CLEVR: "binary", "attribute" or "count"; GQA: the semantic type "obj", "attr", "rel", "global" or "cat",
    "" for the unified head), ``confidence`` = p(type) x p(answer | type), and the
    ``grounding``: the boxes the question's phrases refer to, which support the answer."""

    question: str
    answer: str
    answer_type: str
    confidence: float
    grounding: Grounding

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "answer_type": self.answer_type,
                "confidence": round(self.confidence, 4), "boxes": self.grounding.to_json()}


def inference_runner(model: torch.nn.Module, dtype: torch.dtype, *, optimize: bool,
                     compile: bool) -> torch.nn.Module:
    """What a predictor runs: the model's inference copy for ``dtype``
    (:func:`mdetr.inference.optimize.optimize_for_inference`, compiled with ``compile``), or with
    ``optimize=False`` the model itself."""
    if compile and not optimize:
        raise ValueError("compile=True compiles the inference copy: it needs optimize=True")
    return optimize_for_inference(model, dtype=dtype, compile=compile) if optimize else model


class Predictor:
    """Runs a trained MDETR on images and captions, or on images and a list of class names.

    Images are resized so their shorter side is ``image_size`` (long side at most ``max_size``; 0 keeps the
    size), normalised as in training, padded into a batch; boxes come back in the original pixels.
    ``dtype="bfloat16"`` runs the forward pass under bf16 autocast; predictions are returned in float32.
    ``optimize`` (default) runs a copy of the model with the backbone's batch norms folded into its
    convolutions, channels-last layout and float32 linear layers on oneDNN
    (:func:`mdetr.inference.optimize.optimize_for_inference`: the same outputs up to float rounding, about
    twice as fast a backbone on CPU; for bf16 its weights are stored in bf16); the copy is taken here, so
    later changes to ``model``'s weights need a new Predictor. The text encoder's output is kept for the last
    ``text_cache_size`` distinct captions (0: none), so a caption asked about again (a server's class list,
    one question over many images) is not encoded again. ``compile`` also compiles the copy's tensor-only
    parts with ``torch.compile`` (:func:`mdetr.inference.optimize.compile_for_inference`; needs
    ``optimize`` and a C++ compiler): up to 25 % faster per call on CPU, most in bf16 (BENCHMARKS.md,
    section 9), for images of few aspect ratios (resizing gives them one short side), since the first call
    at each new batch shape (batch size and resized image size) compiles the backbone for seconds, within
    the process-wide ``torch._dynamo.config.recompile_limit`` (8 shapes by default, shared by all compiled
    models; past it the backbone runs uncompiled); in bf16 the text encoder and transformer also compile
    once more at the second caption length, then take any length.
    """

    def __init__(self, model: torch.nn.Module, *, image_size: int = 800, max_size: int = 1333,
                 device: str | torch.device = "cpu", dtype: str = "float32", optimize: bool = True,
                 compile: bool = False, text_cache_size: int = 256) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(self.device).eval()
        self._runner = inference_runner(self.model, self.dtype, optimize=optimize, compile=compile)
        self.text_cache = TextFeatureCache(text_cache_size) if text_cache_size else None
        self.processor = GroundingProcessor.for_model(model, image_size=image_size, max_size=max_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", weights: str = "model",
                        dtype: str = "float32", optimize: bool = True, compile: bool = False) -> Predictor:
        from mdetr.builder import load

        model = load(path, weights=weights, device=device)
        data = model.train_config.data
        return cls(model, image_size=data.val_size, max_size=data.max_size, device=device, dtype=dtype,
                   optimize=optimize, compile=compile)

    @property
    def image_size(self) -> int:
        return self.processor.image_size

    @property
    def max_size(self) -> int:
        return self.processor.max_size

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def _forward(self, images: torch.Tensor, masks: torch.Tensor,
                 text: list[str] | EncodedText) -> MDETROutput:
        """The model on a (B, 3, H, W) batch and (B, H, W) mask; logits and boxes returned as float32."""
        with self._autocast():
            if not isinstance(text, EncodedText):
                text = self._encode_text(list(text))
            outputs = self._runner(images.to(self.device), masks.to(self.device), text)
        outputs.pred_logits = outputs.pred_logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        return outputs

    def _encode_text(self, captions: list[str]) -> EncodedText:
        transformer = getattr(self._runner, "detr", self._runner).transformer  # segmentation wraps MDETR
        return transformer.encode_text(captions, self.device, cache=self.text_cache)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageInput], texts: Sequence[str], *, threshold: float = 0.7,
                      top_k: int | None = None, text_threshold: float = 0.1) -> list[Grounding]:
        """One :class:`Grounding` per (image, sentence) pair, run as one batch."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts")
        inputs = self.processor([open_image(im) for im in images], list(texts))
        outputs = self._forward(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
        detections = post_process_grounded_detection(
            outputs, target_sizes=inputs["target_sizes"], threshold=threshold, text_threshold=text_threshold,
            top_k=top_k, captions=list(texts))
        return [_grounding(d) for d in detections]

    def predict(self, image: ImageInput, text: str, *, threshold: float = 0.7,
                top_k: int | None = None) -> Grounding:
        """Boxes (xyxy pixels), scores and phrases for one image and one sentence."""
        return self.predict_batch([image], [text], threshold=threshold, top_k=top_k)[0]

    @torch.no_grad()
    def answer_batch(self, images: Sequence[ImageInput], questions: Sequence[str], *, threshold: float = 0.7,
                     top_k: int | None = None, text_threshold: float = 0.1) -> list[Answer]:
        """Answer one question per image (a QA model: ``model.qa_dataset`` clevr or gqa), with the boxes it
        grounds. A GQA answer's ``answer_type`` is the semantic type its type head chose."""
        from mdetr.losses.qa import answer_confidence, decode_clevr_answers, decode_gqa_answers
        from mdetr.models.heads import CLEVR_ANSWER_TYPES, clevr_attributes

        config = getattr(self.model, "config", None)
        qa_dataset = getattr(config, "qa_dataset", "")
        if qa_dataset not in ("clevr", "gqa"):
            raise ValueError("answering questions needs a QA model (model.qa_dataset=clevr or gqa); "
                             f"this model has qa_dataset={qa_dataset!r}")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        inputs = self.processor([open_image(im) for im in images], list(questions))
        outputs = self._forward(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
        if qa_dataset == "gqa":
            decoded = decode_gqa_answers(outputs.qa, config.qa_answers)
            answers = [d.answer for d in decoded]
            types = [d.answer_type for d in decoded]
            confidence = [d.confidence for d in decoded]
        else:
            answers = decode_clevr_answers(outputs.qa, clevr_attributes(config.qa_attributes))
            types = [CLEVR_ANSWER_TYPES[t] for t in outputs.qa["answer_type"].argmax(-1).tolist()]
            confidence = answer_confidence(outputs.qa).tolist()
        detections = post_process_grounded_detection(
            outputs, target_sizes=inputs["target_sizes"], threshold=threshold, text_threshold=text_threshold,
            top_k=top_k, captions=list(questions))
        return [Answer(q, a, t, c, _grounding(d))
                for q, a, t, c, d in zip(questions, answers, types, confidence, detections, strict=True)]

    def answer(self, image: ImageInput, question: str, *, threshold: float = 0.7,
               top_k: int | None = None) -> Answer:
        """The answer to one question about one image, with its supporting boxes."""
        return self.answer_batch([image], [question], threshold=threshold, top_k=top_k)[0]

    @torch.no_grad()
    def segment_batch(self, images: Sequence[ImageInput], texts: Sequence[str], *, threshold: float = 0.7,
                      mask_threshold: float = 0.5, text_threshold: float = 0.1) -> list[Segmentation]:
        """The region each (image, sentence) pair's sentence refers to (a segmentation model, PhraseCut): the
        union of the masks of the boxes scoring above ``threshold`` (official 0.7), each mask cut at
        probability ``mask_threshold``, at the original image size; with those boxes and their phrases."""
        if not getattr(getattr(self.model, "config", None), "masks", False):
            raise ValueError("segmenting needs a segmentation model (model.masks=true); this model predicts "
                             "boxes only")
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts")
        inputs = self.processor([open_image(im) for im in images], list(texts))
        outputs = self._forward(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
        unpadded = ~inputs["pixel_mask"]  # (B, H, W): an image's rows and columns start at 0
        sizes = torch.stack([unpadded[:, :, 0].sum(1), unpadded[:, 0, :].sum(1)], dim=-1)  # (B, 2) as fed
        regions = post_process_phrasecut(outputs, sizes, inputs["target_sizes"], score_threshold=threshold,
                                         mask_threshold=mask_threshold)
        detections = post_process_grounded_detection(
            outputs, target_sizes=inputs["target_sizes"], threshold=threshold, text_threshold=text_threshold,
            captions=list(texts))
        return [Segmentation(region["mask"].cpu(), _grounding(d))
                for region, d in zip(regions, detections, strict=True)]

    def segment(self, image: ImageInput, text: str, *, threshold: float = 0.7,
                mask_threshold: float = 0.5) -> Segmentation:
        """The mask of the region ``text`` refers to in one image, with its boxes."""
        return self.segment_batch([image], [text], threshold=threshold, mask_threshold=mask_threshold)[0]

    def class_prompts(self, class_names: Sequence[str], *,
                      max_tokens: int | None = None) -> list[ClassPrompt]:
        """The captions :meth:`detect` runs for these names: "name1. name2. ...", split between whole names
        to fit the text encoder (at most ``max_tokens`` tokens each when given)."""
        limit = self.processor.max_tokens
        if max_tokens is not None:
            limit = min(max_tokens, limit)
        return build_class_prompts(class_names, self.processor.tokenizer, max_tokens=limit)

    @torch.no_grad()
    def detect_batch(self, images: Sequence[ImageInput], class_names: Sequence[str], *,
                     threshold: float = 0.7, top_k: int | None = None, text_threshold: float = 0.1,
                     max_tokens: int | None = None) -> list[Grounding]:
        """Detect the named classes in each image; ``labels`` index ``class_names``.

        Each caption chunk of :meth:`class_prompts` is encoded once and run with every image; an image's
        detections from all chunks are merged best first and cut to ``top_k``.
        """
        prompts = self.class_prompts(class_names, max_tokens=max_tokens)
        pil = [open_image(im) for im in images]
        batch, mask = self.processor.preprocess_images(pil)
        sizes = torch.tensor([[im.height, im.width] for im in pil])
        per_image: list[list[tuple[dict, str]]] = [[] for _ in pil]
        for prompt in prompts:
            with self._autocast():
                text = self._encode_text([prompt.caption])
            # (B, L, D) features and (B, L) mask: one caption for every image
            shared = EncodedText(text.features.expand(len(pil), -1, -1),
                                 text.padding_mask.expand(len(pil), -1), text.tokenized)
            outputs = self._forward(batch, mask, shared)
            detections = post_process_grounded_detection(
                outputs, target_sizes=sizes, threshold=threshold, text_threshold=text_threshold, top_k=top_k,
                tokenized=text.tokenized, class_prompts=prompt)
            for found, d in zip(per_image, detections, strict=True):
                found.append((d, prompt.caption))
        return [merge_detections(found, top_k=top_k) for found in per_image]

    def detect(self, image: ImageInput, class_names: Sequence[str], *, threshold: float = 0.7,
               top_k: int | None = None, max_tokens: int | None = None) -> Grounding:
        """Boxes of the named classes in one image: ``labels`` index ``class_names``, ``phrases`` are the
        names."""
        return self.detect_batch([image], class_names, threshold=threshold, top_k=top_k,
                                 max_tokens=max_tokens)[0]


def _grounding(detections: dict, prompts: list[str] | None = None) -> Grounding:
    """A :class:`Grounding` from one image's post-processed dict; ``prompts`` for class-name detection."""
    labels = detections["labels"]
    return Grounding(detections["boxes"], detections["scores"], detections["phrases"], detections["spans"],
                     detections["token_probs"], labels if prompts is not None else None, prompts)


def merge_detections(chunks: Sequence[tuple[dict, str]], *, top_k: int | None = None) -> Grounding:
    """One image's detections from several captions (``(detections, caption)`` pairs from
    :func:`post_process_grounded_detection`) as one :class:`Grounding`: concatenated, best score first, at
    most ``top_k``. ``token_probs`` rows are zero-padded to the longest caption."""
    width = max(d["token_probs"].shape[1] for d, _ in chunks)
    scores = torch.cat([d["scores"] for d, _ in chunks])
    order = scores.argsort(descending=True, stable=True)
    if top_k is not None:
        order = order[:top_k]
    merged = {
        "scores": scores[order],
        "boxes": torch.cat([d["boxes"] for d, _ in chunks])[order],
        "labels": torch.cat([d["labels"] for d, _ in chunks])[order],
        "token_probs": torch.cat([F.pad(d["token_probs"], (0, width - d["token_probs"].shape[1]))
                                  for d, _ in chunks])[order],
    }
    for key in ("phrases", "spans"):
        values = [v for d, _ in chunks for v in d[key]]
        merged[key] = [values[i] for i in order.tolist()]
    captions = [c for d, c in chunks for _ in range(len(d["scores"]))]
    return _grounding(merged, [captions[i] for i in order.tolist()])
