"""Detections from the SMCA object detector: pixel boxes, scores and category ids; a predictor for images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mdetr.inference.postprocess import Grounding, pixel_boxes
from mdetr.inference.predictor import DTYPES, ImageInput, inference_runner, open_image
from mdetr.inference.processor import GroundingProcessor
from mdetr.models.detector import DetectionOutput

# COCO scores at most 100 detections per image (COCOeval maxDets).
DEFAULT_TOP_K = 100


@torch.no_grad()
def post_process_detection(outputs: DetectionOutput, target_sizes: Tensor, *,
                           top_k: int = DEFAULT_TOP_K) -> list[dict[str, Tensor]]:
    """The ``top_k`` best (query, category) pairs of each image, as the SMCA / Deformable DETR post-processor.

    A query may appear with several categories. target_sizes: (B, 2) (height, width) to scale boxes to.
    Returns per image ``scores`` (K,) sigmoid probabilities, best first; ``labels`` (K,) int64 category ids;
    ``boxes`` (K, 4) xyxy in pixels of ``target_sizes``; K = min(top_k, Q * C).
    """
    prob = outputs.pred_logits.float().sigmoid()  # (B, Q, C)
    batch, _, num_classes = prob.shape
    scores, flat = prob.flatten(1).topk(min(top_k, prob[0].numel()), dim=1)  # (B, K)
    queries, labels = flat // num_classes, flat % num_classes
    boxes = outputs.pred_boxes.gather(1, queries[..., None].expand(-1, -1, 4))  # (B, K, 4)
    boxes = pixel_boxes(boxes, target_sizes)
    return [{"scores": scores[b], "labels": labels[b], "boxes": boxes[b]} for b in range(batch)]


class DetectionPredictor:
    """Runs a trained detector on images: resizing, normalising and padding as in evaluation, boxes back in
    the original pixels, each named by the category names stored in the model's config. As
    :class:`~mdetr.inference.predictor.Predictor` does, it runs the model's inference copy
    (:func:`mdetr.inference.optimize.optimize_for_inference`: the same outputs up to float rounding) unless
    ``optimize=False``, and ``compile`` compiles that copy."""

    def __init__(self, model: torch.nn.Module, *, image_size: int = 800, max_size: int = 1333,
                 device: str | torch.device = "cpu", dtype: str = "float32", optimize: bool = True,
                 compile: bool = False) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(self.device).eval()
        self._runner = inference_runner(self.model, self.dtype, optimize=optimize, compile=compile)
        # Only the image half of the grounding processor is used: a detector reads no text.
        self.processor = GroundingProcessor(None, image_size=image_size, max_size=max_size)
        names = list(model.config.class_names) or [str(i) for i in range(model.config.num_classes)]
        self.class_names = names
        # Category ids without a name are gaps in the id range (COCO's 91 ids hold 80 categories): never
        # predicted.
        self._unused = torch.tensor([not name for name in names], device=self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", weights: str = "model",
                        dtype: str = "float32", optimize: bool = True,
                        compile: bool = False) -> DetectionPredictor:
        from mdetr.engine.detection import load_detector

        model = load_detector(path, weights=weights, device=device)
        data = model.train_config.data
        return cls(model, image_size=data.val_size, max_size=data.max_size, device=device, dtype=dtype,
                   optimize=optimize, compile=compile)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageInput], *, threshold: float = 0.3,
                      top_k: int | None = None) -> list[Grounding]:
        """Per image the detections with probability > threshold, best first (at most top_k): a
        :class:`Grounding` whose ``labels`` are category ids and ``phrases`` their names (no spans or token
        probabilities: there is no text)."""
        pil = [open_image(im) for im in images]
        batch, mask = self.processor.preprocess_images(pil)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            outputs = self._runner(batch.to(self.device), mask.to(self.device))
        outputs.pred_logits = outputs.pred_logits.float().masked_fill(self._unused, float("-inf"))
        sizes = torch.tensor([[im.height, im.width] for im in pil], device=self.device)
        results = post_process_detection(outputs, sizes, top_k=top_k or DEFAULT_TOP_K)
        groundings = []
        for result in results:
            keep = result["scores"] > threshold
            labels = result["labels"][keep].cpu()
            groundings.append(Grounding(
                boxes=result["boxes"][keep].cpu(), scores=result["scores"][keep].cpu(),
                phrases=[self.class_names[i] for i in labels.tolist()], spans=[[] for _ in labels.tolist()],
                token_probs=torch.zeros(len(labels), 0), labels=labels,
            ))
        return groundings

    def predict(self, image: ImageInput, *, threshold: float = 0.3, top_k: int | None = None) -> Grounding:
        """Boxes (xyxy pixels), scores, category ids and names for one image."""
        return self.predict_batch([image], threshold=threshold, top_k=top_k)[0]
