"""Ground sentences in images: image + text in, pixel boxes, scores and phrases out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mdetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_size
from mdetr.inference.postprocess import Grounding, post_process, select_groundings

ImageInput = Image.Image | str | Path | np.ndarray


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


class Predictor:
    """Runs a trained MDETR on images and captions.

    Images are resized so their shorter side is ``image_size`` (long side at most ``max_size``; 0 keeps the
    size), normalised as in training, padded into a batch; boxes come back in the original pixels.
    """

    def __init__(self, model: torch.nn.Module, *, image_size: int = 800, max_size: int = 1333,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.max_size = max_size
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", weights: str = "model") -> Predictor:
        from mdetr.builder import load

        model = load(path, weights=weights, device=device)
        data = model.train_config.data
        return cls(model, image_size=data.val_size, max_size=data.max_size, device=device)

    def preprocess(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised, zero-padded batch and its (B, H, W) padding mask (True on padding)."""
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

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageInput], texts: Sequence[str], *, threshold: float = 0.7,
                      top_k: int | None = None) -> list[Grounding]:
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts")
        for text in texts:
            if not text or not text.strip():
                raise ValueError("the text to ground is empty")
        pil = [open_image(im) for im in images]
        batch, mask = self.preprocess(pil)
        outputs = self.model(batch.to(self.device), mask.to(self.device), list(texts))
        sizes = torch.tensor([[im.height, im.width] for im in pil])
        results = post_process(outputs, sizes)
        return [
            select_groundings({k: v.cpu() for k, v in r.items()}, text, outputs.tokenized, i,
                              threshold=threshold, top_k=top_k)
            for i, (r, text) in enumerate(zip(results, texts))
        ]

    def predict(self, image: ImageInput, text: str, *, threshold: float = 0.7, top_k: int | None = None) -> Grounding:
        """Boxes (xyxy pixels), scores and phrases for one image and one sentence."""
        return self.predict_batch([image], [text], threshold=threshold, top_k=top_k)[0]
