"""Checks of MDETR annotation files, shared by :func:`validate_annotations` and the datasets.

Each check is written once here. :func:`validate_annotations` runs them all and lists every problem of a
file; :class:`mdetr.data.modulated.ModulatedDetection` runs the same ones at construction so that a bad
file fails at once (or, under ``on_error="skip"``, loses exactly the entries these checks reject) rather
than hours into training.

The annotation format is COCO-like (see :mod:`mdetr.data.modulated`): ``images`` entries carry a
``caption``; ``annotations`` carry a COCO ``bbox`` ``[x, y, w, h]`` in pixels and the caption's character
spans ``tokens_positive`` (``tokens`` in the CLEVR files), end exclusive.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mdetr.data.errors import DataError, Problem, record_skipped
from mdetr.data.tokens import MAX_TOKENS, caption_length_message, token_char_ranges, token_coverage

REQUIRED_KEYS = ("images", "annotations")

ImageRoot = str | os.PathLike | Mapping[str, "str | os.PathLike"]


def image_entry_name(entry: Any, position: int | None = None) -> str:
    """How problems name an image entry: ``"image id 12"`` (or its position when it has no id)."""
    if isinstance(entry, dict) and "id" in entry:
        return f"image id {entry['id']}"
    return f"image entry #{position}"


def annotation_entry_name(annotation: Any, position: int | None = None) -> str:
    """How problems name an annotation: ``"annotation id 40 (image id 12)"``."""
    if isinstance(annotation, dict) and "id" in annotation:
        return f"annotation id {annotation['id']} (image id {annotation.get('image_id')})"
    return f"annotation #{position}"


# ----------------------------------------------------------------------------------------------------------
# File structure and ids


def read_annotation_file(ann_file: str | os.PathLike) -> tuple[dict | None, list[Problem]]:
    """Load the JSON; ``(None, problems)`` when it cannot be used at all (unreadable, no images list...)."""
    file = str(ann_file)
    try:
        with open(ann_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        return None, [Problem(file, None, f"cannot read the file ({error.strerror or error})")]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, [Problem(file, None, f"the file is not valid JSON ({error})")]
    if not isinstance(data, dict):
        return None, [Problem(file, None, f"the top level is a {type(data).__name__}, not a JSON object")]
    problems = [
        Problem(file, None, f"the top-level key {key!r} is missing")
        for key in REQUIRED_KEYS
        if key not in data
    ]
    problems += [
        Problem(file, None, f"the top-level key {key!r} is not a list")
        for key in REQUIRED_KEYS
        if key in data and not isinstance(data[key], list)
    ]
    if "categories" not in data:
        # pycocotools' loadRes copies the categories, so COCO-style evaluation needs the key
        problems.append(Problem(file, None, "the top-level key 'categories' is missing", "warning"))
    return (None if any(p.severity == "error" for p in problems) else data), problems


@dataclass
class AnnotationIndex:
    """Image entries with unique ids (file order) and their annotations, indexed once by image id."""

    images: list[dict] = field(default_factory=list)
    annotations: dict[Any, list[dict]] = field(default_factory=dict)


def index_annotations(data: dict, file: str) -> tuple[AnnotationIndex, list[Problem]]:
    """Index annotations by image id; report entries without ids, duplicate ids and unknown image ids.

    The first of several entries sharing an id is kept in the index, later ones are left out.
    """
    index = AnnotationIndex()
    problems: list[Problem] = []
    for position, entry in enumerate(data["images"]):
        name = image_entry_name(entry, position)
        if not isinstance(entry, dict) or "id" not in entry:
            problems.append(Problem(file, name, "the image entry has no 'id'"))
        elif not _is_id(entry["id"]):
            message = f"the image id {entry['id']!r} is not a non-negative integer"
            problems.append(Problem(file, name, message))
        elif entry["id"] in index.annotations:
            problems.append(Problem(file, name, "the image id is used by an earlier image entry too"))
        else:
            index.images.append(entry)
            index.annotations[entry["id"]] = []
    seen: set[Any] = set()
    for position, annotation in enumerate(data["annotations"]):
        name = annotation_entry_name(annotation, position)
        if not isinstance(annotation, dict) or "id" not in annotation:
            problems.append(Problem(file, name, "the annotation has no 'id'"))
        elif not _is_id(annotation["id"]):
            message = f"the annotation id {annotation['id']!r} is not a non-negative integer"
            problems.append(Problem(file, name, message))
        elif annotation["id"] in seen:
            problems.append(Problem(file, name, "the annotation id is used by an earlier annotation too"))
        elif not _is_id(annotation.get("image_id")) or annotation["image_id"] not in index.annotations:
            seen.add(annotation["id"])
            problems.append(
                Problem(
                    file,
                    name,
                    f"the annotation points to image id {annotation.get('image_id')}, "
                    "which has no image entry",
                )
            )
        else:
            seen.add(annotation["id"])
            index.annotations[annotation["image_id"]].append(annotation)
    return index, problems


# ----------------------------------------------------------------------------------------------------------
# Image entries and annotations


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Ids and category ids become int64 tensors and COCO evaluator keys.
_INT64_MAX = 2**63 - 1


def _is_id(value: Any) -> bool:
    """A usable id: a non-negative integer that fits in int64 (not a bool, string or float)."""
    return _is_int(value) and 0 <= value <= _INT64_MAX


def is_text(value: Any) -> bool:
    """A string the tokenizer can take: no lone surrogates (JSON allows them as escapes, UTF-8 does not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) with a finite float value; JSON also allows NaN, Infinity and ints
    too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def check_image_entry(
    entry: dict, file: str, *, num_tokens: int | None, max_tokens: int = MAX_TOKENS
) -> list[Problem]:
    """Caption present (a string) and short enough, ``height``/``width`` positive ints, ``file_name`` set.

    ``num_tokens`` is the caption's token count, special tokens included (None when it is not a string);
    it must fit in the ``max_tokens - 1`` token slots of a positive map.
    """
    name = image_entry_name(entry)
    problems: list[Problem] = []
    if "caption" not in entry:
        problems.append(Problem(file, name, "the image entry has no 'caption'"))
    elif not isinstance(entry["caption"], str):
        problems.append(Problem(file, name, "the caption is not a string"))
    elif not is_text(entry["caption"]):
        problems.append(Problem(file, name, "the caption is not valid Unicode (it holds a lone surrogate)"))
    elif num_tokens is not None:
        message = caption_length_message(num_tokens, max_tokens - 1)
        if message is not None:
            problems.append(Problem(file, name, message))
    for key in ("height", "width"):
        if not _is_int(entry.get(key)) or entry[key] <= 0:
            problems.append(Problem(file, name, f"'{key}' is missing or not a positive integer"))
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        problems.append(Problem(file, name, "the image entry has no 'file_name'"))
    return problems


def annotation_spans(annotation: dict) -> Any:
    """The annotation's character spans: ``tokens_positive``, or ``tokens`` in the CLEVR files."""
    if "tokens_positive" in annotation:
        return annotation["tokens_positive"]
    return annotation.get("tokens")


def clamped_box_xyxy(bbox: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> pixel ``(x0, y0, x1, y1)`` clamped to a ``width`` x ``height`` image."""
    x, y, w, h = (float(v) for v in bbox)
    return (
        min(max(x, 0.0), width),
        min(max(y, 0.0), height),
        min(max(x + w, 0.0), width),
        min(max(y + h, 0.0), height),
    )


def _check_spans(
    spans: Any, caption: str | None, coverage: bytes | None, file: str, name: str
) -> list[Problem]:
    if spans is None:
        return [Problem(file, name, "the annotation has neither 'tokens_positive' nor 'tokens'")]
    if not isinstance(spans, list) or not all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(v) for v in s) for s in spans
    ):
        return [Problem(file, name, "the spans are not a list of [beg, end] integer pairs")]
    if not spans:
        return [Problem(file, name, "the box has no span, so no token of the caption refers to it")]
    if caption is None:
        return []  # the image entry's own problem is reported once, there
    problems = [
        Problem(
            file,
            name,
            f"span [{beg}, {end}) lies outside the caption ({len(caption)} characters) or is empty",
        )
        for beg, end in spans
        if not 0 <= beg < end <= len(caption)
    ]
    if problems or coverage is None:
        return problems
    if not any(b"\x01" in coverage[beg:end] for beg, end in spans):
        text = " / ".join(repr(caption[beg:end]) for beg, end in spans)
        return [Problem(file, name, f"the span(s) {text} cover no token of the caption")]
    return []


def _check_box(bbox: Any, entry: dict, file: str, name: str) -> list[Problem]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(is_finite_number(v) for v in bbox):
        return [Problem(file, name, "'bbox' is missing or not four finite numbers [x, y, w, h]")]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return [Problem(file, name, f"the box [x, y, w, h] = {list(bbox)} has zero or negative size")]
    width, height = entry.get("width"), entry.get("height")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        return []  # reported on the image entry
    x0, y0, x1, y1 = clamped_box_xyxy(bbox, width, height)
    if x1 <= x0 or y1 <= y0:
        return [
            Problem(
                file, name, f"the box [x, y, w, h] = {list(bbox)} lies outside the {width}x{height} image"
            )
        ]
    # COCO boxes often overshoot by a rounding error; more than a pixel is worth a look
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        return [
            Problem(
                file,
                name,
                f"the box [x, y, w, h] = {list(bbox)} reaches past the {width}x{height} "
                "image; it is clamped when loaded",
                "warning",
            )
        ]
    return []


def check_annotation(
    annotation: dict, entry: dict, file: str, *, token_coverage: bytes | None = None
) -> list[Problem]:
    """Spans inside the caption and covering a token, a usable box, an integer ``category_id``.

    ``token_coverage`` marks the caption's characters that lie inside a token
    (:func:`mdetr.data.tokens.token_coverage`), None to skip the token check. Crowd
    annotations (``iscrowd`` 1) are ignored by the datasets and not checked.
    """
    if annotation.get("iscrowd", 0):
        return []
    name = annotation_entry_name(annotation)
    caption = entry.get("caption") if is_text(entry.get("caption")) else None
    problems = _check_spans(annotation_spans(annotation), caption, token_coverage, file, name)
    problems += _check_box(annotation.get("bbox"), entry, file, name)
    if not _is_id(annotation.get("category_id")):
        problems.append(Problem(file, name, "'category_id' is missing or not a non-negative integer"))
    if "isfinal" in annotation and not is_finite_number(annotation["isfinal"]) \
            and not isinstance(annotation["isfinal"], bool):
        problems.append(Problem(file, name, f"'isfinal' is {annotation['isfinal']!r}, not a number"))
    return problems


@dataclass
class EntryReport:
    """The problems of one image entry, and of each of its annotations."""

    entry: dict
    problems: list[Problem]
    annotations: list[tuple[dict, list[Problem]]]


def check_entries(
    index: AnnotationIndex, file: str, *, tokenizer: Any, max_tokens: int = MAX_TOKENS, chunk_size: int = 512
) -> Iterator[EntryReport]:
    """Run the entry and annotation checks over every indexed image entry, in file order.

    Captions are tokenized in chunks (one batched call of the fast tokenizer each), so checking a file of
    a hundred thousand captions takes seconds, and only one chunk of tokenizations is held at a time.
    """
    for start in range(0, len(index.images), chunk_size):
        chunk = index.images[start : start + chunk_size]
        captions = [e.get("caption") for e in chunk]
        texts = [c for c in captions if is_text(c)]
        encodings = iter(tokenizer(texts, truncation=False).encodings if texts else [])
        for entry, caption in zip(chunk, captions, strict=True):
            encoding = next(encodings) if is_text(caption) else None
            num_tokens = len(encoding) if encoding is not None else None
            # computed once per caption, shared by all its annotations
            coverage = None
            if encoding is not None:
                coverage = token_coverage(token_char_ranges(encoding, caption), len(caption))
            problems = check_image_entry(entry, file, num_tokens=num_tokens, max_tokens=max_tokens)
            annotations = [
                (annotation, check_annotation(annotation, entry, file, token_coverage=coverage))
                for annotation in index.annotations[entry["id"]]
            ]
            yield EntryReport(entry=entry, problems=problems, annotations=annotations)


# ----------------------------------------------------------------------------------------------------------
# Image files


def resolve_image_path(entry: dict, image_root: ImageRoot, file: str) -> Path:
    """Path of an entry's image: ``image_root / file_name``, the root picked by ``data_source`` if a mapping.

    Raises :class:`DataError` when ``image_root`` is a mapping and the entry's ``data_source`` is missing
    or not one of its keys.
    """
    root = image_root
    if isinstance(image_root, Mapping):
        source = entry.get("data_source")
        if not isinstance(source, str) or source not in image_root:
            raise DataError(
                f"data_source {source!r} has no image folder (known: {sorted(image_root)})",
                file=file,
                entry=image_entry_name(entry),
            )
        root = image_root[source]
    return Path(root) / str(entry.get("file_name", ""))


def image_size_message(image: Image.Image, entry: dict) -> str | None:
    """A problem message when the image's real size differs from the entry's ``width`` x ``height``."""
    width, height = image.size
    if (width, height) == (entry.get("width"), entry.get("height")):
        return None
    return (
        f"the image is {width}x{height} but the annotation file says "
        f"{entry.get('width')}x{entry.get('height')}"
    )


def open_image(path: Path, entry: dict, *, decode: bool = True) -> Image.Image:
    """Open an entry's image, decoded to RGB (or only checked, ``decode=False``), and check its size.

    Raises :class:`DataError` naming the image path and the entry when the file is missing, cannot be
    decoded, or its size differs from the entry's ``width`` x ``height`` (the boxes would not fit it).
    The size is compared from the header, before any pixel is decoded, so a file claiming a huge size
    (a decompression bomb) is refused without allocating it.
    """
    name = image_entry_name(entry)
    try:
        exists = path.is_file()
    except (OSError, ValueError) as error:  # a NUL byte or an over-long name
        raise DataError(f"the file name is not a usable path ({error})", file=str(path), entry=name) from None
    if not exists:
        raise DataError("the image file does not exist", file=str(path), entry=name)
    try:
        with Image.open(path) as handle:
            message = image_size_message(handle, entry)
            if message is not None:
                raise DataError(message, file=str(path), entry=name)
            if decode:
                image = handle.convert("RGB")
            else:
                image = handle
                handle.verify()
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure on untrusted bytes means "unreadable"
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise DataError(f"the image cannot be read ({reason})", file=str(path), entry=name) from error
    return image


def check_image_file(entry: dict, image_root: ImageRoot, file: str) -> list[Problem]:
    """Problems with an entry's image file: unknown data source, missing, unreadable, wrong size."""
    try:
        open_image(resolve_image_path(entry, image_root, file), entry, decode=False)
    except DataError as error:
        return [error.problem]
    return []


# ----------------------------------------------------------------------------------------------------------


def validate_annotations(
    ann_file: str | os.PathLike,
    image_root: ImageRoot | None = None,
    *,
    tokenizer: Any,
    max_tokens: int = MAX_TOKENS,
    check_images: bool = True,
) -> list[Problem]:
    """Every problem of an MDETR annotation file (and its images), errors and warnings, in file order.

    Checks: the JSON is readable with ``images`` and ``annotations`` lists; image and annotation ids are
    present and unique; annotations point to existing image entries; captions exist and fit in
    ``max_tokens - 1`` tokens (special tokens included); spans lie inside their caption and cover at least
    one token of ``tokenizer`` (a fast tokenizer); boxes are four finite numbers with positive size inside
    the image (reaching past the border is a warning: it is clamped); ``category_id`` is an integer. With
    ``image_root`` (a folder, or a mapping ``data_source -> folder``) and ``check_images``, each image file
    must exist, decode, and have the entry's ``width`` x ``height``.
    """
    file = str(ann_file)
    data, problems = read_annotation_file(ann_file)
    if data is None:
        return problems
    index, index_problems = index_annotations(data, file)
    problems += index_problems
    for report in check_entries(index, file, tokenizer=tokenizer, max_tokens=max_tokens):
        problems += report.problems
        for _, annotation_problems in report.annotations:
            problems += annotation_problems
        has_file_name = isinstance(report.entry.get("file_name"), str) and report.entry["file_name"]
        if image_root is not None and check_images and has_file_name:
            problems += check_image_file(report.entry, image_root, file)
    return problems


def keep_problems(problems: Sequence[Problem], into: list[Problem], *, on_error: str) -> None:
    """Apply a dataset's bad-data policy to what checking an entry found: under ``"fail"`` raise the first
    error; otherwise (and for warnings) add them to ``into``."""
    if on_error == "fail":
        for problem in problems:
            if problem.severity == "error":
                raise problem.to_error()
    into.extend(problems)


def open_image_or_skip(
    path: Path, entry: dict, problems: list[Problem], *, on_error: str
) -> Image.Image | None:
    """:func:`open_image` under a bad-data policy: ``"fail"`` raises its :class:`DataError`; ``"skip"``
    records the problem (in ``problems`` and for the run's end report) and returns None."""
    try:
        return open_image(path, entry)
    except DataError as error:
        if on_error == "fail":
            raise
        problems.append(error.problem)
        record_skipped(error.problem)
        warnings.warn(f"skipping a sample: {error}", stacklevel=3)
        return None
