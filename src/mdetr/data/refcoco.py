"""RefCOCO, RefCOCO+ and RefCOCOg: MDETR's ``finetune_*`` files and the original ``refer`` release.

MDETR's files (``finetune_{refcoco,refcoco+,refcocog}_{split}.json``) are read as they are by
:class:`~mdetr.data.modulated.ModulatedDetection`: one image entry per referring expression, with exactly one
annotation (the referred object), ``dataset_name`` naming the dataset, images from COCO ``train2014``.

The original release (``refer``; Yu et al. / Mao et al.) is a folder per dataset holding

- ``refs(unc).p`` (RefCOCO, RefCOCO+; UNC splits ``train/val/testA/testB``) or ``refs(umd).p`` (RefCOCOg,
  UMD splits ``train/val/test``; ``refs(google).p`` has ``train/val`` only): a pickled list of refs, each
  ``{"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids", "sentences":
  [{"sent_id", "sent", "raw", "tokens"}]}``, the file name being
  ``COCO_train2014_{image_id:012d}_{ann_id}.jpg``;
- ``instances.json``: the COCO ``train2014`` images and annotations the refs point to (``bbox`` COCO xywh).

:func:`refer_to_mdetr` converts one split into MDETR's format: one entry per sentence, caption = ``sent``.
MDETR aligns each box to the root noun phrase found by a dependency parser; without one, the box is
aligned to the whole expression here (``tokens_positive = [[0, len(caption)]]``). Precision@k does not
depend on the spans (boxes are ranked by 1 - P(no object)), only training supervision does.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from mdetr.data.errors import DataError

SPLITS = {
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
}
"""The splits of each dataset (RefCOCOg: the UMD partition)."""
REFS_FILES = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}
EVAL_SPLITS = {name: tuple(s for s in splits if s != "train") for name, splits in SPLITS.items()}
"""The columns of the paper's Table 2 for each dataset."""


def check_split(dataset: str, split: str) -> None:
    """``ValueError`` unless ``dataset`` is one of the three and ``split`` one of its splits."""
    if dataset not in SPLITS:
        raise ValueError(f"dataset must be one of {', '.join(SPLITS)}, got {dataset!r}")
    if split not in SPLITS[dataset]:
        raise ValueError(f"{dataset} has the splits {', '.join(SPLITS[dataset])}, not {split!r}")


def refexp_ann_file(ann_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    """Path of MDETR's file for a dataset split: ``finetune_{dataset}_{split}.json``."""
    check_split(dataset, split)
    return Path(ann_dir) / f"finetune_{dataset}_{split}.json"


def read_refs(path: str | os.PathLike) -> list[dict]:
    """The refs list of a ``refs(*).p`` pickle, checked for the fields the conversion uses.

    The file is a pickle of plain lists and dicts: it is read with an unpickler that refuses every class,
    so a tampered file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("the refs file does not exist", file=str(path))
    try:
        with open(path, "rb") as handle:
            refs = _PlainUnpickler(handle, encoding="latin1").load()  # latin1: Python 2 pickles
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"the file is not a refs pickle ({error})", file=str(path)) from None
    if not isinstance(refs, list):
        raise DataError(f"the pickle holds a {type(refs).__name__}, not a list of refs", file=str(path))
    for position, ref in enumerate(refs):
        missing = [
            k
            for k in ("ref_id", "ann_id", "image_id", "split", "sentences")
            if not isinstance(ref, dict) or k not in ref
        ]
        if missing:
            raise DataError(
                f"the ref has no {', '.join(repr(k) for k in missing)}",
                file=str(path),
                entry=f"ref #{position}",
            )
    return refs


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - refuse every global
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: refs files hold plain data only")


def _read_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict], list[dict], dict]:
    if not path.is_file():
        raise DataError("the COCO instances file does not exist", file=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"the file is not valid JSON ({error})", file=str(path)) from None
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"the top-level key {key!r} is missing or not a list", file=str(path))
    images = {im["id"]: im for im in data["images"]}
    annotations = {ann["id"]: ann for ann in data["annotations"]}
    return images, annotations, data.get("categories", []), data


def coco_file_name(ref: dict, image: dict) -> str:
    """The COCO image's file name: the instances entry's, else the ref's without its ``_{ann_id}`` tail."""
    if image.get("file_name"):
        return str(image["file_name"])
    stem, _, _ = str(ref.get("file_name", "")).rpartition("_")
    return f"{stem}.jpg"


def refer_to_mdetr(
    root: str | os.PathLike,
    dataset: str,
    split: str,
    *,
    instances: str | os.PathLike | None = None,
    refs_file: str | None = None,
    text: str = "sent",
) -> dict[str, Any]:
    """An MDETR-format dict (as ``finetune_{dataset}_{split}.json``) from the original ``refer`` release.

    root: the folder holding ``{dataset}/{refs file}`` and ``{dataset}/instances.json``.
    instances: another COCO instances file (e.g. ``instances_train2014.json``) instead of the folder's.
    refs_file: e.g. ``"refs(google).p"``; default: UNC for RefCOCO/RefCOCO+, UMD for RefCOCOg.
    text: the sentence field used as caption, ``"sent"`` (MDETR) or ``"raw"``.

    Raises :class:`DataError` naming the file and the ref or sentence for a ref whose annotation or image
    is not in the instances file, an annotation of another image than the ref's, or an empty sentence.
    """
    check_split(dataset, split)
    if text not in ("sent", "raw"):
        raise ValueError(f"text must be 'sent' or 'raw', got {text!r}")
    folder = Path(root) / dataset
    refs_path = folder / (refs_file or REFS_FILES[dataset])
    refs = read_refs(refs_path)
    images, annotations, categories, _ = _read_instances(
        Path(instances) if instances else folder / "instances.json"
    )
    out_images: list[dict] = []
    out_annotations: list[dict] = []
    for ref in refs:
        if ref["split"] != split:
            continue
        entry = f"ref_id {ref['ref_id']}"
        annotation, image = _ref_targets(ref, annotations, images, str(refs_path), entry)
        for position, sentence in enumerate(ref["sentences"]):
            sentence = sentence if isinstance(sentence, dict) else {}
            caption = str(sentence.get(text, "")).strip()
            if not caption:
                name = f"{entry}, sentence {sentence.get('sent_id', position)}"
                raise DataError(f"the sentence's {text!r} is empty", file=str(refs_path), entry=name)
            entry_id = len(out_images)
            out_images.append(
                {
                    "file_name": coco_file_name(ref, image),
                    "height": image["height"],
                    "width": image["width"],
                    "id": entry_id,
                    "original_id": ref["image_id"],
                    "caption": caption,
                    "dataset_name": dataset,
                    "tokens_negative": [],
                    "ref_id": ref["ref_id"],
                    "sent_id": sentence.get("sent_id", position),
                }
            )
            out_annotations.append(
                {
                    "area": annotation.get("area", annotation["bbox"][2] * annotation["bbox"][3]),
                    "iscrowd": annotation.get("iscrowd", 0),
                    "image_id": entry_id,
                    "id": len(out_annotations),
                    "category_id": ref.get("category_id", annotation.get("category_id", 1)),
                    "bbox": list(annotation["bbox"]),
                    "original_id": ref["ann_id"],
                    "tokens_positive": [[0, len(caption)]],
                }
            )
    if not out_images:
        raise DataError(f"no ref belongs to the split {split!r}", file=str(refs_path))
    return {
        "info": {"description": f"{dataset} {split} ({refs_path.name})"},
        "licenses": [],
        "images": out_images,
        "annotations": out_annotations,
        "categories": categories,
    }


def _ref_targets(
    ref: dict, annotations: dict[int, dict], images: dict[int, dict], file: str, entry: str
) -> tuple[dict, dict]:
    """The COCO annotation and image a ref points to, checked against each other."""
    annotation = annotations.get(ref["ann_id"])
    if annotation is None:
        raise DataError(f"ann_id {ref['ann_id']} is not in the instances file", file=file, entry=entry)
    if annotation.get("image_id") != ref["image_id"]:
        raise DataError(
            f"ann_id {ref['ann_id']} belongs to image {annotation.get('image_id')}, but the ref "
            f"names image {ref['image_id']}",
            file=file,
            entry=entry,
        )
    image = images.get(ref["image_id"])
    if image is None:
        raise DataError(f"image_id {ref['image_id']} is not in the instances file", file=file, entry=entry)
    return annotation, image
