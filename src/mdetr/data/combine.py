"""Combine grounding datasets into MDETR's pre-training file (paper Section 3; ``final_mixed_train.json``).

Each input is an MDETR-format file with one image entry per (image, caption). Per image, the captions are
merged into fewer, longer sentences: two captions *conflict* when one of their boxes overlaps one of the
other's by IoU > 0.5 (they probably talk about the same object, and one sentence must not align two
phrases to one box by accident), and a greedy graph colouring puts non-conflicting captions together while
keeping each merged sentence under 250 characters. Captions of one colour are joined in order, each ending
with "." (unless it ends with "." or "?"), separated by a space; every span is shifted by the offset of its
caption. Files given as ``keep`` are copied without merging (MDETR trains on Flickr30k's captions as they
are, next to the merged ones). Every image of the downstream validation and test files given as
``exclude`` is left out of both, so the pre-trained model never sees an image it will be evaluated on.

Images are identified by their data source (the entry's ``data_source``, or the one given for its input
file) and the base name of their ``file_name``; the MDETR files name COCO images ``COCO_train2014_*.jpg``
and Visual Genome / GQA images ``{id}.jpg``. An exclusion file given with a source removes only that
source's images; without one, every image of that base name (downstream files seldom carry a source, and
COCO names are unique). A VG image that is also a COCO image is not mapped to its COCO name here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdetr.data.errors import DataError
from mdetr.data.validate import annotation_spans, image_entry_name, index_annotations, read_annotation_file
from mdetr.ops.boxes import box_iou

MAX_CHARS = 250
"""Merged sentences stay strictly shorter than this many characters (MDETR's limit)."""
CONFLICT_IOU = 0.5
"""Two captions conflict when boxes of theirs overlap by more than this IoU."""

BoxXYXY = tuple[float, float, float, float]


def pairwise_iou(boxes1: Sequence[Sequence[float]], boxes2: Sequence[Sequence[float]]) -> torch.Tensor:
    """(N, M) plain IoU between two lists of pixel xyxy boxes (float64; empty lists give empty tensors)."""
    a = torch.tensor([list(b) for b in boxes1], dtype=torch.float64).reshape(-1, 4)
    b = torch.tensor([list(b) for b in boxes2], dtype=torch.float64).reshape(-1, 4)
    return box_iou(a, b)[0]


@dataclass
class Datapoint:
    """One (image, caption) entry of an input file with its annotations; ``file`` is where it came from."""

    entry: dict
    annotations: list[dict]
    file: str
    source: str

    @property
    def caption(self) -> str:
        return self.entry["caption"]

    @property
    def boxes_xyxy(self) -> list[BoxXYXY]:
        return [
            (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
            for a in self.annotations
        ]


@dataclass
class CombineReport:
    """What :func:`combine` did: counts of input datapoints and images, what exclusion removed, outputs."""

    input_datapoints: int = 0
    input_images: int = 0
    excluded_datapoints: int = 0
    excluded_images: int = 0
    output_datapoints: int = 0
    excluded_names: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return (
            f"{self.input_datapoints} captions on {self.input_images} images; excluded "
            f"{self.excluded_datapoints} captions on {self.excluded_images} images of the evaluation sets; "
            f"wrote {self.output_datapoints} merged captions"
        )


# ----------------------------------------------------------------------------------------------------------
# Graph colouring


def conflict_graph(datapoints: Sequence[Datapoint], *, iou_threshold: float = CONFLICT_IOU) -> list[set[int]]:
    """Adjacency sets: ``i`` and ``j`` are linked when some box of one overlaps some box of the other by
    IoU > ``iou_threshold``."""
    adjacency: list[set[int]] = [set() for _ in datapoints]
    boxes = [d.boxes_xyxy for d in datapoints]
    for i in range(len(datapoints)):
        for j in range(i + 1, len(datapoints)):
            if boxes[i] and boxes[j] and float(pairwise_iou(boxes[i], boxes[j]).max()) > iou_threshold:
                adjacency[i].add(j)
                adjacency[j].add(i)
    return adjacency


def caption_piece(caption: str) -> str:
    """The caption as it appears in a merged sentence: ending with "." unless it ends with "." or "?"."""
    return caption if caption.endswith((".", "?")) else caption + "."


def colour_captions(
    adjacency: Sequence[set[int]], lengths: Sequence[int], *, max_chars: int = MAX_CHARS
) -> list[int]:
    """Greedy colouring: captions in descending degree order (ties in input order) get the smallest colour
    that no coloured neighbour has and whose merged sentence stays under ``max_chars`` with them; a new
    colour when none does. ``lengths`` are the caption pieces' lengths (see :func:`caption_piece`).

    Returns the colour of each caption. A proper colouring is guaranteed (checked before returning).
    """
    order = sorted(range(len(adjacency)), key=lambda i: -len(adjacency[i]))
    colours = [-1] * len(adjacency)
    sizes: list[int] = []  # merged-sentence length of each colour so far
    for node in order:
        taken = {colours[j] for j in adjacency[node] if colours[j] >= 0}
        choice = next(
            (c for c, size in enumerate(sizes) if c not in taken and size + 1 + lengths[node] < max_chars),
            None,
        )
        if choice is None:
            choice = len(sizes)
            sizes.append(lengths[node])
        else:
            sizes[choice] += 1 + lengths[node]
        colours[node] = choice
    for node, neighbours in enumerate(adjacency):
        if any(colours[node] == colours[j] for j in neighbours):
            raise AssertionError(f"caption {node} shares its colour with a conflicting caption")
    return colours


def merge_datapoints(group: Sequence[Datapoint]) -> tuple[dict, list[dict]]:
    """One entry and its annotations from captions of one colour (in the given order), spans shifted."""
    pieces, offsets, start = [], [], 0
    for datapoint in group:
        piece = caption_piece(datapoint.caption)
        pieces.append(piece)
        offsets.append(start)
        start += len(piece) + 1
    first = group[0].entry
    entry: dict[str, Any] = {
        "file_name": first["file_name"],
        "height": first["height"],
        "width": first["width"],
        "caption": " ".join(pieces),
        "dataset_name": "mixed",
        "original_id": -1,
        "tokens_negative": [
            [b + off, e + off]
            for d, off in zip(group, offsets, strict=True)
            for b, e in d.entry.get("tokens_negative", [])
        ],
    }
    if group[0].source:
        entry["data_source"] = group[0].source
    annotations = []
    for datapoint, offset in zip(group, offsets, strict=True):
        for annotation in datapoint.annotations:
            shifted = {
                k: v
                for k, v in annotation.items()
                if k not in ("id", "image_id", "tokens", "tokens_positive")
            }
            shifted["tokens_positive"] = [[b + offset, e + offset] for b, e in annotation_spans(annotation)]
            annotations.append(shifted)
    return entry, annotations


# ----------------------------------------------------------------------------------------------------------
# Files


def image_name(entry: dict) -> str:
    """An entry's image base name: from ``file_name``, else from ``coco_url`` (LVIS files)."""
    name = entry.get("file_name") or entry.get("coco_url") or ""
    return os.path.basename(str(name))


FileSpec = str | os.PathLike | tuple[str | os.PathLike, str]
"""An input file, or ``(file, data_source)`` giving its entries a source (``"coco"``, ``"vg"``...)."""


def _spec(item: FileSpec) -> tuple[str, str]:
    return (str(item[0]), item[1]) if isinstance(item, tuple) else (str(item), "")


def excluded_images(files: Sequence[FileSpec]) -> set[tuple[str, str]]:
    """``(source, base name)`` of every image of the given annotation files (MDETR, COCO or LVIS JSON);
    source ``""`` (a file given without one) excludes the name from every source."""
    keys: set[tuple[str, str]] = set()
    for item in files:
        file, source = _spec(item)
        data, problems = read_annotation_file(file)
        if data is None:
            raise next(p for p in problems if p.severity == "error").to_error()
        for position, entry in enumerate(data["images"]):
            name = image_name(entry) if isinstance(entry, dict) else ""
            if not name:
                raise DataError(
                    "the image entry has no 'file_name' or 'coco_url' to exclude it by",
                    file=file,
                    entry=image_entry_name(entry, position),
                )
            keys.add((source, name))
    return keys


def is_excluded(key: tuple[str, str], excluded: set[tuple[str, str]]) -> bool:
    """Whether an image ``(source, base name)`` is one of the excluded ones."""
    return ("", key[1]) in excluded or key in excluded


def read_datapoints(file: str | os.PathLike, *, source: str = "") -> list[Datapoint]:
    """Every entry of an MDETR-format file with its annotations; bad ids or missing fields stop with a
    :class:`DataError` naming the file and the entry."""
    data, problems = read_annotation_file(file)
    if data is None:
        raise next(p for p in problems if p.severity == "error").to_error()
    index, problems = index_annotations(data, str(file))
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise errors[0].to_error()
    datapoints = []
    for entry in index.images:
        for key in ("caption", "file_name", "height", "width"):
            if key not in entry:
                raise DataError(f"the entry has no {key!r}", file=str(file), entry=image_entry_name(entry))
        if not str(entry["caption"]).strip():
            raise DataError("the caption is empty", file=str(file), entry=image_entry_name(entry))
        datapoints.append(
            Datapoint(entry, index.annotations[entry["id"]], str(file), str(entry.get("data_source", source)))
        )
    return datapoints


def _group_by_image(datapoints: Sequence[Datapoint]) -> dict[tuple[str, str], list[Datapoint]]:
    """Datapoints per (source, image base name), checking that they agree on the image size."""
    groups: dict[tuple[str, str], list[Datapoint]] = {}
    for datapoint in datapoints:
        key = (datapoint.source, image_name(datapoint.entry))
        group = groups.setdefault(key, [])
        if group and (group[0].entry["height"], group[0].entry["width"]) != (
            datapoint.entry["height"],
            datapoint.entry["width"],
        ):
            other = group[0]
            raise DataError(
                f"the image {key[1]} is {datapoint.entry['width']}x{datapoint.entry['height']} here but "
                f"{other.entry['width']}x{other.entry['height']} in {other.file}, "
                f"{image_entry_name(other.entry)}",
                file=datapoint.file,
                entry=image_entry_name(datapoint.entry),
            )
        group.append(datapoint)
    return groups


class _Writer:
    """Collects output entries and annotations with new sequential ids."""

    def __init__(self, prefix_sources: bool) -> None:
        self.prefix_sources = prefix_sources
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, entry: dict, annotations: list[dict]) -> None:
        entry = dict(entry, id=len(self.images))
        if self.prefix_sources and entry.get("data_source"):
            entry["file_name"] = f"{entry['data_source']}/{entry['file_name']}"
        self.images.append(entry)
        for annotation in annotations:
            self.annotations.append({**annotation, "image_id": entry["id"], "id": len(self.annotations)})

    def dataset(self) -> dict[str, Any]:
        return {
            "info": {"description": "combined grounding captions"},
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": [],
        }


def combine_datapoints(
    datapoints: Sequence[Datapoint],
    *,
    keep: Sequence[Datapoint] = (),
    excluded: set[tuple[str, str]] | None = None,
    max_chars: int = MAX_CHARS,
    conflict_iou: float = CONFLICT_IOU,
    prefix_sources: bool = False,
) -> tuple[dict, CombineReport]:
    """The combined MDETR-format dict (new sequential ids, ``categories`` empty) and a report.

    ``datapoints`` are merged per image; ``keep`` are copied as they are (MDETR keeps Flickr30k's captions
    separate from the merged ones). Images in ``excluded`` are dropped from both. ``prefix_sources`` writes
    ``file_name`` as ``{data_source}/{file_name}``, for one image root holding a folder per source.
    """
    excluded = excluded or set()
    report = CombineReport(input_datapoints=len(datapoints) + len(keep))
    writer = _Writer(prefix_sources)
    groups = _group_by_image(datapoints)
    report.input_images = len(groups)
    for key, group in groups.items():
        if is_excluded(key, excluded):
            report.excluded_images += 1
            report.excluded_datapoints += len(group)
            report.excluded_names.add(key[1])
            continue
        adjacency = conflict_graph(group, iou_threshold=conflict_iou)
        colours = colour_captions(
            adjacency, [len(caption_piece(d.caption)) for d in group], max_chars=max_chars
        )
        for colour in sorted(set(colours)):
            writer.add(*merge_datapoints([d for d, c in zip(group, colours, strict=True) if c == colour]))
    for key, group in _group_by_image(keep).items():
        if is_excluded(key, excluded):
            report.excluded_images += 1
            report.excluded_datapoints += len(group)
            report.excluded_names.add(key[1])
            continue
        for datapoint in group:
            entry = {k: v for k, v in datapoint.entry.items() if k != "id"}
            if datapoint.source:
                entry["data_source"] = datapoint.source
            writer.add(
                entry,
                [{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in datapoint.annotations],
            )
    report.output_datapoints = len(writer.images)
    return writer.dataset(), report


def combine(
    inputs: Sequence[FileSpec],
    output: str | os.PathLike,
    *,
    keep: Sequence[FileSpec] = (),
    exclude: Sequence[FileSpec] = (),
    max_chars: int = MAX_CHARS,
    conflict_iou: float = CONFLICT_IOU,
    prefix_sources: bool = False,
) -> CombineReport:
    """Read the files, combine them (see :func:`combine_datapoints`) and write ``output`` (JSON)."""
    merged = [d for item in inputs for d in read_datapoints(_spec(item)[0], source=_spec(item)[1])]
    kept = [d for item in keep for d in read_datapoints(_spec(item)[0], source=_spec(item)[1])]
    combined, report = combine_datapoints(
        merged,
        keep=kept,
        excluded=excluded_images(exclude),
        max_chars=max_chars,
        conflict_iou=conflict_iou,
        prefix_sources=prefix_sources,
    )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(combined))
    return report
