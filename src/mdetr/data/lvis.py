"""LVIS v1 for few-shot detection with MDETR (paper Section 3.2.1, Table 6).

An LVIS v1 file (``lvis_v1_{train,val}.json``, or MDETR's ``lvis_v1_minival.json``) is COCO-like, with
the federated-annotation fields:

- ``images[i]``: ``id``, ``height``, ``width``, ``coco_url`` (``http://images.cocodataset.org/train2017/x.jpg``),
  ``neg_category_ids`` (categories verified absent from the image) and ``not_exhaustive_category_ids``
  (categories present but not every instance boxed);
- ``annotations[j]``: ``id``, ``image_id``, ``category_id``, ``bbox`` (COCO xywh, pixels), ``area``;
- ``categories[k]``: ``id``, ``name`` (``"bow_(weapon)"``), ``frequency`` (``r``are / ``c``ommon /
  ``f``requent, by the number of training images), ``image_count``.

MDETR trains on it as grounding data (:func:`lvis_to_modulated`): for each image, one entry per *positive*
category (caption = the cleaned class name, every box of that category aligned to the whole caption) and one
per *negative* category with no box, which teaches the model to answer "nothing" for absent classes. The 1%
and 10% subsets keep that fraction of the training images, chosen by :func:`balanced_subset` so that even
the 1% set holds positive and negative examples of the rarest categories.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mdetr.data.errors import DataError

SUBSETS = {1: 0.01, 10: 0.1, 100: 1.0}
"""The paper's training subsets, percent of the images -> fraction."""
FREQUENCIES = ("r", "c", "f")
_NEGATIVE_EVERY = 10  # one pick in ten targets a category's negative images, the rest positives
_IMAGE_KEYS = ("id", "height", "width", "neg_category_ids", "not_exhaustive_category_ids")


def clean_name(name: str) -> str:
    """The text query for an LVIS class: ``"bow_(weapon)"`` -> ``"bow"``, ``"flip-flop_(sandal)"`` ->
    ``"flip-flop"``, ``"ice_cream"`` -> ``"ice cream"`` (parentheses dropped, underscores to spaces)."""
    name = re.sub(r"\(.*\)", "", name).replace("_", " ")
    return re.sub(r"\s+", " ", name).strip()


def lvis_file_name(image: dict) -> str:
    """Where an image lives under the COCO 2017 root: ``train2017/x.jpg`` from ``coco_url`` (else
    ``file_name``)."""
    url = image.get("coco_url")
    if url:
        return "/".join(str(url).split("/")[-2:])
    return str(image.get("file_name", ""))


def read_lvis(path: str | os.PathLike) -> dict[str, Any]:
    """Load an LVIS v1 JSON and check what the conversion and the evaluator rely on.

    Raises :class:`DataError` naming the file and the entry for a missing field, an annotation of an unknown
    image or category, a negative or not-exhaustive category id that is not a category, or a category both
    negative and annotated in one image.
    """
    file = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("the LVIS annotation file does not exist", file=file) from None
    except json.JSONDecodeError as error:
        raise DataError(f"the file is not valid JSON ({error})", file=file) from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DataError(f"the top-level key {key!r} is missing or not a list", file=file)
    categories = _check_categories(data["categories"], file)
    images = _check_images(data["images"], categories, file)
    positives = _check_annotations(data["annotations"], images, categories, file)
    for image_id, category_id in positives:
        if category_id in images[image_id]["neg_category_ids"]:
            raise DataError(
                f"category {category_id} is listed in neg_category_ids but the image has boxes of it",
                file=file,
                entry=f"image id {image_id}",
            )
    return data


def _check_categories(categories: list, file: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for position, category in enumerate(categories):
        missing = [
            k for k in ("id", "name", "frequency") if not isinstance(category, dict) or k not in category
        ]
        if missing:
            raise DataError(
                f"the category has no {', '.join(map(repr, missing))}",
                file=file,
                entry=f"category #{position}",
            )
        if category["frequency"] not in FREQUENCIES:
            raise DataError(
                f"frequency must be 'r', 'c' or 'f', got {category['frequency']!r}",
                file=file,
                entry=f"category id {category['id']}",
            )
        if not clean_name(category["name"]):
            raise DataError(
                f"the name {category['name']!r} is empty once cleaned",
                file=file,
                entry=f"category id {category['id']}",
            )
        out[category["id"]] = category
    return out


def _check_images(images: list, categories: dict[int, dict], file: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for position, image in enumerate(images):
        missing = [k for k in _IMAGE_KEYS if not isinstance(image, dict) or k not in image]
        if missing:
            raise DataError(
                f"the image has no {', '.join(map(repr, missing))} (not an LVIS v1 file?)",
                file=file,
                entry=f"image id {image.get('id')}"
                if isinstance(image, dict) and "id" in image
                else f"image #{position}",
            )
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            unknown = [c for c in image[key] if c not in categories]
            if unknown:
                raise DataError(
                    f"{key} lists {unknown[:3]}, which are not categories",
                    file=file,
                    entry=f"image id {image['id']}",
                )
        out[image["id"]] = image
    return out


def _check_annotations(
    annotations: list, images: dict[int, dict], categories: dict[int, dict], file: str
) -> set[tuple[int, int]]:
    positives: set[tuple[int, int]] = set()
    for position, annotation in enumerate(annotations):
        name = (
            f"annotation id {annotation.get('id')}"
            if isinstance(annotation, dict)
            else f"annotation #{position}"
        )
        missing = [
            k
            for k in ("id", "image_id", "category_id", "bbox")
            if not isinstance(annotation, dict) or k not in annotation
        ]
        if missing:
            raise DataError(f"the annotation has no {', '.join(map(repr, missing))}", file=file, entry=name)
        if annotation["image_id"] not in images:
            raise DataError(
                f"image_id {annotation['image_id']} is not an image of the file", file=file, entry=name
            )
        if annotation["category_id"] not in categories:
            raise DataError(
                f"category_id {annotation['category_id']} is not a category", file=file, entry=name
            )
        positives.add((annotation["image_id"], annotation["category_id"]))
    return positives


# ----------------------------------------------------------------------------------------------------------
# Balanced subsets


def balanced_subset(data: dict[str, Any], fraction: float, *, seed: int = 42) -> set[int]:
    """Image ids of a ``fraction`` of the images, sampled so that every category is represented.

    ``int(fraction * #images)`` images are picked one at a time. Nine picks in ten go to the category with
    the fewest positive images picked so far (exhaustively annotated ones counted; ties: the rarest
    category in the full set first), one in ten to the category with the fewest *negative* images picked;
    the pick is a random unpicked image where the category is positive (resp. listed in
    ``neg_category_ids``). Categories with no image left are skipped. ``fraction`` 1 keeps every image.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    all_ids = [im["id"] for im in data["images"]]
    if fraction == 1:
        return set(all_ids)
    rng = random.Random(seed)
    positive_images, negative_images, image_positives, image_negatives = _category_index(data)
    # ties between equal counts go to the rarest category (fewest training images, then smallest id)
    rarity = {
        c["id"]: (c.get("image_count", len(positive_images.get(c["id"], ()))), c["id"])
        for c in data["categories"]
    }
    counts = {"pos": dict.fromkeys(rarity, 0), "neg": dict.fromkeys(rarity, 0)}
    exhausted: dict[str, set[int]] = {"pos": set(), "neg": set()}
    chosen: set[int] = set()
    for pick in range(int(len(all_ids) * fraction)):
        kind = "neg" if pick % _NEGATIVE_EVERY == 0 else "pos"
        pool = negative_images if kind == "neg" else positive_images
        candidates = _least_represented_pool(counts[kind], rarity, pool, chosen, exhausted[kind])
        if not candidates:
            kind = "pos" if kind == "neg" else "neg"
            pool = negative_images if kind == "neg" else positive_images
            candidates = _least_represented_pool(counts[kind], rarity, pool, chosen, exhausted[kind])
        if not candidates:
            break
        image_id = rng.choice(sorted(candidates))
        chosen.add(image_id)
        for category in image_positives.get(image_id, ()):
            counts["pos"][category] += 1
        for category in image_negatives.get(image_id, ()):
            counts["neg"][category] += 1
    return chosen


def _category_index(
    data: dict[str, Any],
) -> tuple[dict[int, set[int]], dict[int, set[int]], dict[int, set[int]], dict[int, set[int]]]:
    """category -> positive images, category -> negative images, image -> positive / negative categories.

    A positive counts only where the category is exhaustively annotated, except for categories that are
    never exhaustive anywhere, which would otherwise have no positive image at all.
    """
    not_exhaustive = {im["id"]: set(im["not_exhaustive_category_ids"]) for im in data["images"]}
    exhaustive_pairs = {
        (a["image_id"], a["category_id"])
        for a in data["annotations"]
        if a["category_id"] not in not_exhaustive[a["image_id"]]
    }
    every_pair = {(a["image_id"], a["category_id"]) for a in data["annotations"]}
    covered = {c for _, c in exhaustive_pairs}
    pairs = exhaustive_pairs | {(i, c) for i, c in every_pair if c not in covered}
    positive_images: dict[int, set[int]] = {}
    image_positives: dict[int, set[int]] = {}
    for image_id, category in pairs:
        positive_images.setdefault(category, set()).add(image_id)
        image_positives.setdefault(image_id, set()).add(category)
    negative_images: dict[int, set[int]] = {}
    image_negatives: dict[int, set[int]] = {}
    for image in data["images"]:
        for category in image["neg_category_ids"]:
            negative_images.setdefault(category, set()).add(image["id"])
            image_negatives.setdefault(image["id"], set()).add(category)
    return positive_images, negative_images, image_positives, image_negatives


def _least_represented_pool(
    counts: dict[int, int],
    rarity: dict[int, tuple[int, int]],
    pool: dict[int, set[int]],
    chosen: set[int],
    exhausted: set[int],
) -> set[int]:
    """Unpicked images of the least represented category that still has some (marking empty ones)."""
    for category in sorted(counts, key=lambda c: (counts[c], rarity[c])):
        if category in exhausted:
            continue
        candidates = pool.get(category, set()) - chosen
        if candidates:
            return candidates
        exhausted.add(category)
    return set()


# ----------------------------------------------------------------------------------------------------------
# MDETR training format


def lvis_to_modulated(data: dict[str, Any], *, image_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """MDETR-format entries (as ``finetune_lvis*_{split}.json``) for the given images (default: all).

    Per image, in category-id order: one entry per positive category (``caption`` its cleaned name, one
    annotation per box with ``tokens_positive [[0, len]]`` and ``category_id`` 1), then one entry per
    negative category with no annotation. Entries keep ``original_id`` (LVIS image id), ``coco_url``,
    ``file_name`` (``train2017/x.jpg``) and ``category_id`` (the LVIS category the caption names).
    """
    names = {c["id"]: clean_name(c["name"]) for c in data["categories"]}
    keep = None if image_ids is None else set(image_ids)
    boxes: dict[int, dict[int, list[dict]]] = {}
    for annotation in data["annotations"]:
        if keep is None or annotation["image_id"] in keep:
            boxes.setdefault(annotation["image_id"], {}).setdefault(annotation["category_id"], []).append(
                annotation
            )
    images, annotations = [], []
    for image in sorted(data["images"], key=lambda im: im["id"]):
        if keep is not None and image["id"] not in keep:
            continue
        per_category = boxes.get(image["id"], {})
        for category in sorted(per_category) + sorted(image["neg_category_ids"]):
            caption = names[category]
            entry_id = len(images)
            images.append(
                {
                    "file_name": lvis_file_name(image),
                    "height": image["height"],
                    "width": image["width"],
                    "id": entry_id,
                    "original_id": image["id"],
                    "coco_url": image.get("coco_url", ""),
                    "caption": caption,
                    "tokens_negative": [[0, len(caption)]],
                    "dataset_name": "lvis",
                    "category_id": category,
                }
            )
            for annotation in per_category.get(category, []):
                x, y, w, h = annotation["bbox"]
                annotations.append(
                    {
                        "area": annotation.get("area", w * h),
                        "iscrowd": 0,
                        "category_id": 1,
                        "bbox": [x, y, w, h],
                        "tokens_positive": [[0, len(caption)]],
                        "image_id": entry_id,
                        "id": len(annotations),
                    }
                )
    return {
        "info": {"description": "LVIS v1 as grounding data"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
    }


def lvis_subset_to_modulated(path: str | os.PathLike, subset: int = 100, *, seed: int = 42) -> dict[str, Any]:
    """Read an LVIS file and convert its ``subset`` percent (1, 10 or 100) balanced subset."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(map(str, SUBSETS))} (percent), got {subset}")
    data = read_lvis(path)
    return lvis_to_modulated(data, image_ids=balanced_subset(data, SUBSETS[subset], seed=seed))
