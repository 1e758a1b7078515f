"""Image + target transforms of MDETR (Pillow and torch only).

Every transform is a callable ``(image, target) -> (image, target)``. Until :class:`ToTensor` the image is
a ``PIL.Image``; afterwards a FloatTensor ``[3, H, W]``. ``target`` is a dict whose per-box entries stay
aligned with ``boxes`` whenever a transform drops boxes:

- ``boxes``: FloatTensor ``[N, 4]``, **pixel xyxy** until :class:`Normalize`, which turns it into
  **normalised cxcywh** relative to the transformed image;
- ``labels`` LongTensor ``[N]``, ``area`` FloatTensor ``[N]``, ``iscrowd`` LongTensor ``[N]``,
  ``positive_map`` BoolTensor ``[N, 256]``, ``isfinal`` FloatTensor ``[N]``, ``masks`` BoolTensor
  ``[N, H, W]`` (all optional);
- ``tokens_positive``: list of N span lists (optional). The official crop forgets to filter it, so a box
  dropped on a crop's last attempt left spans and boxes misaligned; here it is filtered with the boxes.

Grounding data gets no horizontal flip: flipping the image would make "left" and "right" in the caption
wrong (the official code only flips plain detection data, ``cautious=False``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mdetr.ops.boxes import box_xyxy_to_cxcywh

Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PER_BOX_TENSORS = ("boxes", "labels", "area", "iscrowd", "positive_map", "isfinal", "masks")
PER_BOX_LISTS = ("tokens_positive",)


def _image_size(image: Image.Image | Tensor) -> tuple[int, int]:
    """(width, height) of a PIL image or a ``[C, H, W]`` tensor."""
    if isinstance(image, Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


def keep_boxes(target: Target, keep: Tensor) -> Target:
    """A copy of ``target`` keeping only the boxes where the BoolTensor ``keep`` ``[N]`` is True."""
    target = dict(target)
    for key in PER_BOX_TENSORS:
        if key in target:
            target[key] = target[key][keep]
    indices = torch.nonzero(keep).flatten().tolist()
    for key in PER_BOX_LISTS:
        if key in target:
            target[key] = [target[key][i] for i in indices]
    return target


def resized_size(width: int, height: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side set to ``size`` and the longer at most ``max_size``.

    Same arithmetic as the official ``resize``: when the longer side would exceed ``max_size``, the short
    side becomes ``round(max_size * short / long)``; the long side is then ``int(size * long / short)``
    (truncated, so a 640x480 image at 800 becomes 1066x800).
    """
    short, long = min(width, height), max(width, height)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(
    image: Image.Image, target: Target | None, size: int, max_size: int | None = None
) -> tuple[Image.Image, Target | None]:
    """Resize so the shorter side is ``size`` (see :func:`resized_size`); scales boxes, area and masks."""
    old_w, old_h = image.size
    new_w, new_h = resized_size(old_w, old_h, size, max_size)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    if target is None:
        return image, None
    ratio_w, ratio_h = new_w / old_w, new_h / old_h
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    if "masks" in target and target["masks"].numel():
        # nearest on a float copy, then threshold: masks stay binary
        masks = F.interpolate(target["masks"][:, None].float(), size=(new_h, new_w), mode="nearest")
        target["masks"] = masks[:, 0] > 0.5
    elif "masks" in target:
        target["masks"] = target["masks"].new_zeros((0, new_h, new_w))
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


def crop(
    image: Image.Image, target: Target, top: int, left: int, height: int, width: int
) -> tuple[Image.Image, Target]:
    """Crop the region ``[left, left + width) x [top, top + height)``.

    Boxes are shifted and clipped to the crop, ``area`` becomes the clipped box area, and boxes left with
    zero area are dropped together with all their per-box fields.
    """
    image = image.crop((left, top, left + width, top + height))
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    if "masks" in target:
        target["masks"] = target["masks"][:, top : top + height, left : left + width]
    if "boxes" not in target:
        return image, target
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    boxes = boxes.reshape(-1, 2, 2)
    boxes = torch.min(boxes, torch.tensor([width, height], dtype=boxes.dtype)).clamp(min=0)
    target["boxes"] = boxes.reshape(-1, 4)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    return image, keep_boxes(target, keep)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"{type(self).__name__}([{inner}\n])"


class RandomResize:
    """Resize the shorter side to a size drawn uniformly from ``sizes``, the longer side capped."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region of width and height in ``[min_size, max_size]`` (capped by the image).

    With ``respect_boxes`` (always used for grounding data) up to ``max_tries`` crops are drawn until one
    keeps every box (boxes may be clipped, none may vanish). If none does, the image is returned uncropped:
    the official code accepts the last try even when it drops boxes, which silently removes phrases' boxes
    from the target; keeping the image whole is the safer way to honour ``respect_boxes``.
    """

    def __init__(
        self, min_size: int, max_size: int, *, respect_boxes: bool = True, max_tries: int = 100
    ) -> None:
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} is larger than max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size
        self.respect_boxes = respect_boxes
        self.max_tries = max_tries

    def _draw(self, image_w: int, image_h: int) -> tuple[int, int, int, int]:
        # an image smaller than min_size is kept whole along that side
        crop_w = random.randint(min(self.min_size, image_w), min(image_w, self.max_size))
        crop_h = random.randint(min(self.min_size, image_h), min(image_h, self.max_size))
        top = random.randint(0, image_h - crop_h)
        left = random.randint(0, image_w - crop_w)
        return top, left, crop_h, crop_w

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        image_w, image_h = image.size
        num_boxes = len(target["boxes"]) if "boxes" in target else 0
        for _ in range(self.max_tries):
            result = crop(image, target, *self._draw(image_w, image_h))
            kept = len(result[1]["boxes"]) if "boxes" in result[1] else 0
            if not self.respect_boxes or kept == num_boxes:
                return result
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size}, "
            f"respect_boxes={self.respect_boxes})"
        )


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p},\n  {self.first!r},\n  {self.second!r})"


class ToTensor:
    """PIL image -> FloatTensor ``[3, H, W]`` with values in [0, 1] (the image is converted to RGB)."""

    def __call__(self, image: Image.Image, target: Target) -> tuple[Tensor, Target]:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return tensor, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """Standardise the image channels and turn boxes into normalised cxcywh.

    Input: FloatTensor ``[3, H, W]`` in [0, 1] and pixel-xyxy ``boxes``. Output: ``(image - mean) / std``
    and ``boxes`` as (cx, cy, w, h) divided by the image's (W, H), which is what the model predicts.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
        image = (image - mean) / std
        if target is None or "boxes" not in target:
            return image, target
        height, width = image.shape[-2:]
        target = dict(target)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"].float()) / scale
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


@dataclass(frozen=True)
class TransformPreset:
    """Arguments of :func:`make_transforms` (pass them with ``**dataclasses.asdict(preset)``)."""

    scales: tuple[int, ...]
    max_size: int
    crop_scales: tuple[int, ...]
    crop_min: int
    crop_max: int
    val_size: int | None


OFFICIAL = TransformPreset(
    scales=tuple(range(480, 801, 32)),  # 480, 512, ..., 800
    max_size=1333,
    crop_scales=(400, 500, 600),
    crop_min=384,
    crop_max=1333,
    val_size=800,
)
"""MDETR's grounding preset (``make_coco_transforms`` with ``cautious=True``): val at 800, long side 1333."""

CLEVR = TransformPreset(
    scales=tuple(range(256, 385, 32)),  # 256, 288, ..., 384
    max_size=512,
    crop_scales=(320, 352, 384),
    crop_min=256,
    crop_max=512,
    val_size=None,
)
"""Small-image preset (``make_clevr_transforms``): CLEVR's native 480x320 images are not resized at val."""

PRESETS: dict[str, TransformPreset] = {"official": OFFICIAL, "clevr": CLEVR}


def make_transforms(
    split: str,
    *,
    scales: Sequence[int],
    max_size: int,
    crop_scales: Sequence[int],
    crop_min: int,
    crop_max: int,
    val_size: int | None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Transforms for ``split`` ("train", or "val" / "test" for evaluation).

    train: with p = 0.5 either ``RandomResize(scales, max_size)``, or ``RandomResize(crop_scales)`` ->
    ``RandomSizeCrop(crop_min, crop_max, respect_boxes=True)`` -> ``RandomResize(scales, max_size)``; then
    ToTensor and Normalize. val/test: ``RandomResize([val_size], max_size)`` (skipped when ``val_size`` is
    None), ToTensor, Normalize. Presets: ``make_transforms("train", **asdict(PRESETS["official"]))``.
    """
    finish = [ToTensor(), Normalize(mean, std)]
    if split == "train":
        plain = RandomResize(scales, max_size)
        cropped = Compose(
            [
                RandomResize(crop_scales),
                RandomSizeCrop(crop_min, crop_max, respect_boxes=True),
                RandomResize(scales, max_size),
            ]
        )
        return Compose([RandomSelect(plain, cropped), *finish])
    if split in ("val", "test"):
        resize_step = [] if val_size is None else [RandomResize([val_size], max_size)]
        return Compose([*resize_step, *finish])
    raise ValueError(f"unknown split {split!r}: expected 'train', 'val' or 'test'")
