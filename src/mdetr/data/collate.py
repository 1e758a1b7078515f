"""Padding images of different sizes into one batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mdetr.data.errors import Problem, take_skipped


def pad_images(images: Sequence[Tensor], *, size_divisibility: int = 1) -> tuple[Tensor, Tensor]:
    """Zero-pad ``[3, H_i, W_i]`` images at the bottom and right to a common size.

    Returns ``images`` FloatTensor ``[B, 3, H_max, W_max]`` and ``masks`` BoolTensor ``[B, H_max, W_max]``,
    True on padding. With ``size_divisibility > 1`` the padded size is rounded up to a multiple of it (the
    backbone's stride, for instance).
    """
    if not images:
        raise ValueError("pad_images needs at least one image")
    channels = images[0].shape[0]
    if any(image.dim() != 3 or image.shape[0] != channels for image in images):
        raise ValueError("pad_images expects [C, H, W] images with the same number of channels")
    height = max(int(image.shape[1]) for image in images)
    width = max(int(image.shape[2]) for image in images)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    first = images[0]
    padded = first.new_zeros((len(images), channels, height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for index, image in enumerate(images):
        h, w = image.shape[1:]
        padded[index, :, :h, :w] = image
        masks[index, :h, :w] = False
    return padded, masks


def _move(value: Any, device: torch.device | str, non_blocking: bool) -> Any:
    return value.to(device, non_blocking=non_blocking) if isinstance(value, Tensor) else value


@dataclass
class Batch:
    """A padded batch.

    - ``images``: FloatTensor ``[B, 3, H_max, W_max]``, normalised, zero-padded at the bottom and right;
    - ``masks``: BoolTensor ``[B, H_max, W_max]``, True on padding;
    - ``captions``: the B captions (``targets[i]["caption"]``);
    - ``targets``: the B target dicts of :class:`~mdetr.data.modulated.ModulatedDetection`, boxes in
      normalised cxcywh relative to each image's own (unpadded) ``size``.

    - ``skipped``: why samples were dropped while this batch was loaded (``on_error="skip"``), so the
      training loop can report them even when a DataLoader worker loaded them.

    ``len(batch)`` is B, which is 0 when every sample of the batch was skipped (see :func:`collate`).
    """

    images: Tensor
    masks: Tensor
    captions: list[str]
    targets: list[dict[str, Any]]
    skipped: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with ``images``, ``masks`` and every tensor value of the targets on ``device``."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
            captions=list(self.captions),
            targets=[{k: _move(v, device, non_blocking) for k, v in t.items()} for t in self.targets],
            skipped=list(self.skipped),
        )

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return Batch(
            images=self.images.pin_memory(),
            masks=self.masks.pin_memory(),
            captions=self.captions,
            targets=[
                {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in t.items()}
                for t in self.targets
            ],
            skipped=self.skipped,
        )


def collate(samples: Sequence[tuple[Tensor, dict[str, Any]] | None], *, size_divisibility: int = 1) -> Batch:
    """Batch ``(image, target)`` samples; ``None`` samples (skipped by the dataset) are dropped.

    Use as ``DataLoader(..., collate_fn=collate)``, or ``functools.partial(collate, size_divisibility=32)``.
    The problems of the skipped samples (:func:`mdetr.data.errors.take_skipped`) ride in ``skipped``.
    When every sample is None the batch is empty (``len(batch) == 0``, images ``[0, 3, 0, 0]``): the
    training loop should skip it.
    """
    kept = [sample for sample in samples if sample is not None]
    skipped = take_skipped()  # recorded by the dataset in this process while it loaded these samples
    if not kept:
        return Batch(
            images=torch.zeros((0, 3, 0, 0)),
            masks=torch.zeros((0, 0, 0), dtype=torch.bool),
            captions=[],
            targets=[],
            skipped=skipped,
        )
    images, masks = pad_images([image for image, _ in kept], size_divisibility=size_divisibility)
    targets = [target for _, target in kept]
    return Batch(images=images, masks=masks, captions=[t["caption"] for t in targets], targets=targets,
                 skipped=skipped)
