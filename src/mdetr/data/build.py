"""Datasets and transforms from a :class:`~mdetr.config.DataConfig` (the one place that reads it)."""

from __future__ import annotations

from pathlib import Path

from mdetr.config import DataConfig
from mdetr.data.modulated import ModulatedDetection
from mdetr.data.transforms import Compose, make_transforms


def build_transforms(data: DataConfig, split: str) -> Compose:
    return make_transforms(
        "train" if split == "train" else "val", scales=data.scales, max_size=data.max_size,
        crop_scales=data.crop_scales, crop_min=data.crop_min, crop_max=data.crop_max,
        val_size=data.val_size or None,
    )


def build_dataset(data: DataConfig, split: str, tokenizer: object, *, ann_file: str | Path | None = None,
                  image_root: str | Path | None = None) -> ModulatedDetection:
    """The train or val set named in ``data`` (or another file given explicitly) with the split's transforms."""
    if ann_file is None:
        ann_file, image_root = (data.train_ann, data.train_images) if split == "train" else (data.val_ann, data.val_images)
    return ModulatedDetection(ann_file, image_root, tokenizer=tokenizer, transforms=build_transforms(data, split),
                              on_error=data.on_error)
