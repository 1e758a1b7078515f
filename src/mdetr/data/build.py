"""Datasets and transforms from a :class:`~mdetr.config.DataConfig` (the one place that reads it)."""

from __future__ import annotations

from pathlib import Path

from mdetr.config import DataConfig
from mdetr.data.modulated import ModulatedDetection
from mdetr.data.phrasecut import PhraseCutDataset, is_refer_file
from mdetr.data.transforms import Compose, make_transforms


def build_transforms(data: DataConfig, split: str) -> Compose:
    return make_transforms(
        "train" if split == "train" else "val", scales=data.scales, max_size=data.max_size,
        crop_scales=data.crop_scales, crop_min=data.crop_min, crop_max=data.crop_max,
        val_size=data.val_size or None,
    )


def build_dataset(data: DataConfig, split: str, tokenizer: object, *, ann_file: str | Path | None = None,
                  image_root: str | Path | None = None) -> ModulatedDetection:
    """The train or val set named in ``data`` (or another file given explicitly) with the split's transforms.

    A file of the original PhraseCut release (``refer_{split}.json``) is read as
    :class:`~mdetr.data.phrasecut.PhraseCutDataset` (converted when it is read; boxes only); a question file
    of the original GQA or CLEVR-family releases as :class:`~mdetr.data.gqa.GQAQuestions` or
    :class:`~mdetr.data.clevr.ClevrQuestions`.
    """
    if ann_file is None:
        ann_file, image_root = (
            (data.train_ann, data.train_images) if split == "train" else (data.val_ann, data.val_images)
        )
    transforms = build_transforms(data, split)
    if is_refer_file(ann_file):
        return PhraseCutDataset(ann_file, image_root, tokenizer=tokenizer, transforms=transforms, masks=False,
                                on_error=data.on_error)
    from mdetr.data.questions import question_file_format

    file_format = question_file_format(ann_file) if Path(ann_file).is_file() else "mdetr"
    if file_format != "mdetr":
        from mdetr.data.clevr import ClevrQuestions
        from mdetr.data.gqa import GQAQuestions

        cls = GQAQuestions if file_format == "gqa" else ClevrQuestions
        return cls(ann_file, image_root, tokenizer=tokenizer, transforms=transforms, on_error=data.on_error)
    return ModulatedDetection(ann_file, image_root, tokenizer=tokenizer, transforms=transforms,
                              on_error=data.on_error)
