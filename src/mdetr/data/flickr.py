"""Flickr30k Entities: the original annotation folder and MDETR's ``final_flickr_*`` files.

The original release (Plummer et al.) is a folder with

- ``{train,val,test}.txt``: the Flickr image ids of each split, one per line;
- ``Sentences/{id}.txt``: five captions per image, one per line, with the phrase markup
  ``[/EN#18/people A man] in [/EN#19/clothing an orange hat]``: entity id 18, coarse type(s) after it
  (``/EN#7/bodyparts/people`` has two), the phrase's words up to the closing bracket. Entity id 0 marks
  "notvisual" phrases, which have no box;
- ``Annotations/{id}.xml``: the image size and one ``<object>`` per box, naming the entities it belongs to
  (``<name>``, possibly several) with a ``<bndbox>`` (``xmin ymin xmax ymax``, pixels); entities that have
  no box get an ``<object>`` with ``<nobndbox>1</nobndbox>`` and ``<scene>0|1</scene>`` instead.

MDETR turns it into COCO-style files (``final_flickr_separateGT_{split}.json`` and, with every entity's
boxes replaced by their enclosing box, ``final_flickr_mergedGT_{split}.json``): one image entry per
(image, sentence) with ``sentence_id``, ``original_img_id`` and ``tokens_positive_eval`` (the character span
of each phrase that has boxes, in sentence order), and one annotation per group of near-identical boxes
(IoU >= 0.95) of the sentence's entities, aligned to the spans of every phrase naming them.
:func:`flickr_to_mdetr` rebuilds such a file from the original folder, and :class:`FlickrDataset` reads
either for training and evaluation.

Box coordinates are kept as written in the XML, as MDETR's evaluator reads them.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mdetr.data.combine import pairwise_iou
from mdetr.data.errors import DataError
from mdetr.data.modulated import ModulatedDetection, OnError
from mdetr.data.tokens import MAX_TOKENS
from mdetr.data.transforms import Target
from mdetr.data.validate import ImageRoot, image_entry_name

PHRASE_TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other")
"""Coarse phrase types of Flickr30k Entities; recall is reported for each (paper Table 3 reports "all")."""

SPLITS = ("train", "val", "test")
GT_TYPES = {"separate": "separateGT", "merged": "mergedGT"}
CLUSTER_IOU = 0.95
"""Boxes of a sentence's entities overlapping at least this much become one annotation (as MDETR)."""

BoxXYXY = tuple[float, float, float, float]


@dataclass(frozen=True)
class FlickrPhrase:
    """One marked phrase of a sentence: its text and ``span`` (characters, end exclusive) in the plain
    sentence, the entity it refers to and its coarse types."""

    text: str
    entity_id: str
    types: tuple[str, ...]
    span: tuple[int, int]
    first_word_index: int


@dataclass(frozen=True)
class FlickrSentence:
    """A caption without markup and its phrases, in sentence order."""

    text: str
    phrases: tuple[FlickrPhrase, ...]


@dataclass
class FlickrImageBoxes:
    """The boxes of one image's XML: ``boxes`` maps an entity id to its boxes (pixel xyxy); ``nobox`` and
    ``scene`` list the entities annotated as not visible / as the whole scene."""

    width: int
    height: int
    boxes: dict[str, list[BoxXYXY]] = field(default_factory=dict)
    nobox: list[str] = field(default_factory=list)
    scene: list[str] = field(default_factory=list)


def enclosing_box(boxes: Sequence[BoxXYXY]) -> BoxXYXY:
    """The smallest box holding all of ``boxes`` (the MERGED-BOXES protocol's ground truth)."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


# ----------------------------------------------------------------------------------------------------------
# Sentences/*.txt


def _phrase_tag(word: str, file: str, entry: str) -> tuple[str, tuple[str, ...]]:
    """``"[/EN#18/people"`` -> ``("18", ("people",))``."""
    parts = word[1:].split("/")
    if len(parts) < 2 or not parts[1].startswith("EN#") or not parts[1][3:]:
        raise DataError(f"malformed phrase tag {word!r} (expected [/EN#<id>/<type>)", file=file, entry=entry)
    return parts[1][3:], tuple(t for t in parts[2:] if t)


def parse_sentence(line: str, *, file: str = "<sentence>", entry: str = "sentence 0") -> FlickrSentence:
    """Strip the phrase markup of one Sentences line; phrases get character spans in the plain text.

    Words are separated by single spaces in the plain text (the markup's tokenisation is kept). Raises
    :class:`DataError` naming ``file`` and ``entry`` for a malformed tag, a phrase with no words, or a
    bracket that is never closed.
    """
    words: list[str] = []
    phrases: list[FlickrPhrase] = []
    open_tag: tuple[str, tuple[str, ...], int] | None = None  # entity, types, first word index
    for word in line.split():
        if open_tag is None and word.startswith("["):
            open_tag = (*_phrase_tag(word, file, entry), len(words))
            continue
        closes = open_tag is not None and word.endswith("]")
        words.append(word[:-1] if closes else word)
        if closes:
            entity, types, first = open_tag
            if not words[-1]:
                words.pop()
            if len(words) == first:
                raise DataError(f"the phrase of entity {entity} has no words", file=file, entry=entry)
            phrases.append(_phrase(words, first, entity, types))
            open_tag = None
    if open_tag is not None:
        raise DataError(
            f"the phrase of entity {open_tag[0]} is never closed with ']'", file=file, entry=entry
        )
    return FlickrSentence(" ".join(words), tuple(phrases))


def _phrase(words: list[str], first: int, entity: str, types: tuple[str, ...]) -> FlickrPhrase:
    """The phrase made of ``words[first:]``, with its span in ``" ".join(words)``."""
    start = sum(len(w) + 1 for w in words[:first])
    text = " ".join(words[first:])
    return FlickrPhrase(text, entity, types, (start, start + len(text)), first)


def read_sentences(path: str | os.PathLike) -> list[FlickrSentence]:
    """Every caption of a ``Sentences/{id}.txt`` file, in file order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("the sentence file does not exist", file=str(path))
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [parse_sentence(line, file=str(path), entry=f"sentence {i}") for i, line in enumerate(lines)]


# ----------------------------------------------------------------------------------------------------------
# Annotations/*.xml


def _int_field(element: ElementTree.Element, tag: str, file: str, entry: str) -> int:
    child = element.find(tag)
    if child is None or child.text is None:
        raise DataError(f"<{tag}> is missing", file=file, entry=entry)
    try:
        return int(float(child.text))
    except ValueError:
        raise DataError(f"<{tag}> is not a number: {child.text!r}", file=file, entry=entry) from None


def read_annotation_xml(path: str | os.PathLike) -> FlickrImageBoxes:
    """The image size and per-entity boxes of an ``Annotations/{id}.xml`` file."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise DataError("the annotation file does not exist", file=file)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise DataError(f"the file is not valid XML ({error})", file=file) from None
    size = root.find("size")
    if size is None:
        raise DataError("<size> is missing", file=file)
    result = FlickrImageBoxes(
        width=_int_field(size, "width", file, "<size>"), height=_int_field(size, "height", file, "<size>")
    )
    for position, obj in enumerate(root.findall("object")):
        entry = f"object #{position}"
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        if not names:
            raise DataError("the object has no <name>", file=file, entry=entry)
        box = obj.find("bndbox")
        if box is not None:
            xyxy = tuple(float(_int_field(box, tag, file, entry)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            if xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
                raise DataError(
                    f"the box {list(xyxy)} has no area", file=file, entry=f"{entry} (entity {names[0]})"
                )
            for name in names:
                result.boxes.setdefault(name, []).append(xyxy)  # type: ignore[arg-type]
            continue
        flags = {tag: obj.find(tag) for tag in ("nobndbox", "scene")}
        for tag, element in flags.items():
            if element is not None and (element.text or "0").strip() not in ("", "0"):
                getattr(result, "nobox" if tag == "nobndbox" else "scene").extend(names)
    return result


# ----------------------------------------------------------------------------------------------------------
# The original folder


class FlickrEntities:
    """The original Flickr30k Entities folder (``{split}.txt``, ``Annotations/``, ``Sentences/``)."""

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        ids_file = self.root / f"{split}.txt"
        if not self.root.is_dir():
            raise DataError("the Flickr30k Entities folder does not exist", file=str(self.root))
        if not ids_file.is_file():
            raise DataError(f"the split file {split}.txt is missing", file=str(ids_file))
        self.image_ids = [line.strip() for line in ids_file.read_text().split("\n") if line.strip()]

    def boxes(self, image_id: str) -> FlickrImageBoxes:
        return read_annotation_xml(self.root / "Annotations" / f"{image_id}.xml")

    def sentences(self, image_id: str) -> list[FlickrSentence]:
        return read_sentences(self.root / "Sentences" / f"{image_id}.txt")


def _union_find_clusters(boxes: list[BoxXYXY], threshold: float) -> list[list[int]]:
    """Groups of box indices linked by IoU >= threshold (transitively), each in index order."""
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    ious = pairwise_iou(boxes, boxes).tolist()
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if ious[i][j] >= threshold:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def sentence_annotations(
    sentence: FlickrSentence, boxes: dict[str, list[BoxXYXY]], *, merge_boxes: bool = False
) -> list[dict[str, Any]]:
    """MDETR annotations of one sentence: its entities' boxes grouped at IoU >= 0.95, each group aligned to
    the spans of every phrase naming one of its entities (bbox: the group's last box, COCO xywh)."""
    spans_of: dict[str, list[list[int]]] = {}
    for phrase in sentence.phrases:
        if phrase.entity_id in boxes:
            spans_of.setdefault(phrase.entity_id, []).append(list(phrase.span))
    flat: list[tuple[str, BoxXYXY]] = []
    for entity in spans_of:
        entity_boxes = [enclosing_box(boxes[entity])] if merge_boxes else boxes[entity]
        flat += [(entity, box) for box in entity_boxes]
    annotations = []
    for group in _union_find_clusters([box for _, box in flat], CLUSTER_IOU):
        entities = list(dict.fromkeys(flat[i][0] for i in group))
        x0, y0, x1, y1 = flat[group[-1]][1]
        spans = sorted({tuple(s) for e in entities for s in spans_of[e]})
        annotations.append(
            {
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
                "category_id": 1,
                "tokens_positive": [list(s) for s in spans],
            }
        )
    return annotations


def flickr_to_mdetr(
    root: str | os.PathLike, split: str, *, merge_boxes: bool = False, image_ids: Sequence[str] | None = None
) -> dict[str, Any]:
    """An MDETR-format dict (as ``final_flickr_{separate|merged}GT_{split}.json``) from the original folder.

    One image entry per (image, sentence) with ``file_name`` ``{id}.jpg``, ``caption``, ``sentence_id``,
    ``original_img_id``, ``tokens_positive_eval`` (spans of the phrases that have boxes), ``dataset_name``
    ``"flickr"``; annotations from :func:`sentence_annotations`. Sentences whose phrases all lack boxes
    are kept, with no annotation and no evaluation phrase. ``image_ids`` restricts the conversion to some
    images of the split.
    """
    entities = FlickrEntities(root, split)
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id in image_ids if image_ids is not None else entities.image_ids:
        xml = entities.boxes(image_id)
        for sentence_id, sentence in enumerate(entities.sentences(image_id)):
            entry_id = len(images)
            images.append(
                {
                    "file_name": f"{image_id}.jpg",
                    "height": xml.height,
                    "width": xml.width,
                    "id": entry_id,
                    "caption": sentence.text,
                    "dataset_name": "flickr",
                    "tokens_negative": [[0, len(sentence.text)]],
                    "sentence_id": sentence_id,
                    "original_img_id": _as_int(image_id),
                    "tokens_positive_eval": [
                        [list(p.span)] for p in sentence.phrases if p.entity_id in xml.boxes
                    ],
                }
            )
            for annotation in sentence_annotations(sentence, xml.boxes, merge_boxes=merge_boxes):
                annotations.append({**annotation, "image_id": entry_id, "id": len(annotations)})
    categories = [{"supercategory": "object", "id": 1, "name": "object"}]
    return {
        "info": {"description": f"Flickr30k Entities {split}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _as_int(image_id: str) -> int | str:
    return int(image_id) if image_id.isdigit() else image_id


def flickr_ann_file(ann_dir: str | os.PathLike, split: str, gt_type: str = "separate") -> Path:
    """Path of MDETR's file for a split: ``final_flickr_{separateGT|mergedGT}_{split}.json``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if gt_type not in GT_TYPES:
        raise ValueError(f"gt_type must be 'separate' or 'merged', got {gt_type!r}")
    return Path(ann_dir) / f"final_flickr_{GT_TYPES[gt_type]}_{split}.json"


# ----------------------------------------------------------------------------------------------------------
# Dataset


class FlickrDataset(ModulatedDetection):
    """:class:`ModulatedDetection` over an MDETR Flickr file, checking and passing on the evaluation fields.

    Every entry must carry ``sentence_id``, ``original_img_id`` and ``tokens_positive_eval`` (a list of
    phrases, each a non-empty list of non-empty ``[beg, end)`` spans inside the caption); a missing field or
    an empty phrase raises :class:`DataError` naming the file and the entry. Targets additionally hold
    ``tokens_positive_eval`` (list of phrases, each a list of ``(beg, end)``).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: ImageRoot,
        *,
        tokenizer: Any,
        transforms: Callable[[Image.Image, Target], tuple[Any, Target]] | None = None,
        max_tokens: int = MAX_TOKENS,
        on_error: OnError = "fail",
    ) -> None:
        super().__init__(
            ann_file,
            image_root,
            tokenizer=tokenizer,
            transforms=transforms,
            max_tokens=max_tokens,
            on_error=on_error,
        )
        for entry, _, _ in self._samples:
            check_flickr_entry(entry, self.file)
        self.entries = {entry["id"]: entry for entry, _, _ in self._samples}

    def _target(self, entry: dict, annotations: list[dict], image_size: tuple[int, int]) -> Target:
        target = super()._target(entry, annotations, image_size)
        target["tokens_positive_eval"] = [
            [(int(b), int(e)) for b, e in phrase] for phrase in entry["tokens_positive_eval"]
        ]
        return target


def check_flickr_entry(entry: dict, file: str) -> None:
    """Raise :class:`DataError` unless the entry has the Flickr evaluation fields, with usable phrases."""
    name = image_entry_name(entry)
    for key in ("sentence_id", "original_img_id", "tokens_positive_eval"):
        if key not in entry:
            raise DataError(
                f"the entry has no {key!r} (not a Flickr30k Entities file?)", file=file, entry=name
            )
    caption = entry.get("caption", "")
    phrases = entry["tokens_positive_eval"]
    if not isinstance(phrases, list):
        raise DataError("'tokens_positive_eval' is not a list", file=file, entry=name)
    for index, spans in enumerate(phrases):
        if not isinstance(spans, list) or not spans:
            raise DataError(f"phrase {index} of 'tokens_positive_eval' is empty", file=file, entry=name)
        for span in spans:
            ok = isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)
            if not ok or not 0 <= span[0] < span[1] <= len(caption):
                raise DataError(
                    f"phrase {index} has the span {span!r}, which is empty or outside the caption "
                    f"({len(caption)} characters)",
                    file=file,
                    entry=name,
                )
