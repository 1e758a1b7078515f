"""Question files of the original GQA and CLEVR releases, read as MDETR-format datasets.

The original releases give questions without image sizes (GQA's scene graphs have them, but only for the
train and val images) and, for CLEVR, without boxes. :class:`QuestionFileDataset` converts such a file to
the MDETR format when it is read (:mod:`mdetr.data.gqa`, :mod:`mdetr.data.clevr` write the conversion),
taking each image's size from its file header, so the rest of the pipeline (transforms, collate,
evaluation) sees an ordinary :class:`~mdetr.data.modulated.ModulatedDetection`.

:func:`question_file_format` tells the formats apart from the first bytes of a file, without parsing it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mdetr.data.errors import DataError, Problem
from mdetr.data.modulated import ModulatedDetection
from mdetr.data.validate import ImageRoot

ImageSize = Callable[[str], "tuple[int, int] | None"]
"""file_name -> (width, height), or None when the image cannot be read."""

_HEAD_BYTES = 1 << 16
_MDETR_KEYS = {"info", "images", "annotations", "categories", "licenses", "questions"}
_FIRST_KEY = re.compile(r'\s*\{\s*"((?:[^"\\]|\\.)*)"\s*:\s*\{')


def question_file_format(path: str | os.PathLike) -> str:
    """``"gqa"`` (``{questionId: {"imageId", "question", ...}}``), ``"clevr"`` (``{"questions": [...]}``:
    CLEVR v1.0, CoGenT and CLEVR-Humans question files) or ``"mdetr"`` (anything else), from the file's
    first 64 KiB."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(_HEAD_BYTES)
    first = _FIRST_KEY.match(head)
    if first and first.group(1) not in _MDETR_KEYS and '"imageId"' in head:
        return "gqa"
    questions = re.search(r'"questions"\s*:\s*\[', head)
    images = re.search(r'"images"\s*:\s*\[', head)
    if questions and (images is None or images.start() > questions.start()):
        return "clevr"
    return "mdetr"


def header_image_sizes(image_root: ImageRoot) -> ImageSize:
    """Image sizes read from the file headers under ``image_root`` (no pixel is decoded), cached."""
    cache: dict[str, tuple[int, int] | None] = {}

    def size(file_name: str) -> tuple[int, int] | None:
        if file_name not in cache:
            try:
                with Image.open(Path(image_root) / file_name) as image:
                    cache[file_name] = image.size
            except (OSError, UnidentifiedImageError):
                cache[file_name] = None
        return cache[file_name]

    return size


def load_json(path: str | os.PathLike) -> tuple[Any | None, list[Problem]]:
    """The parsed file, or None with the problem that made it unusable."""
    file = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle), []
    except OSError as error:
        return None, [Problem(file, None, f"cannot read the file ({error.strerror or error})")]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, [Problem(file, None, f"the file is not valid JSON ({error})")]


def unsized_entry_problems(data: dict, file: str) -> list[Problem]:
    """A problem per converted entry whose image size could not be read (its image is missing or broken);
    those entries are dropped from ``data`` so the remaining ones load."""
    problems, kept = [], []
    for entry in data["images"]:
        if entry.get("width") and entry.get("height"):
            kept.append(entry)
        else:
            problems.append(Problem(file, f"image id {entry['id']}",
                                    f"cannot read the image {entry['file_name']!r} to learn its size"))
    dropped = {e["id"] for e in data["images"]} - {e["id"] for e in kept}
    data["images"] = kept
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in dropped]
    return problems


class QuestionFileDataset(ModulatedDetection):
    """A :class:`ModulatedDetection` over a file in another format, converted when it is read.

    Subclasses implement :meth:`convert` (the parsed file -> an MDETR-format dict); entries whose image
    cannot be read for its size are reported (under ``on_error="fail"`` the first one raises) and left out.
    """

    def __init__(self, ann_file: str | os.PathLike, image_root: ImageRoot, **kwargs: Any) -> None:
        self._image_root_for_sizes = image_root
        super().__init__(ann_file, image_root, **kwargs)

    def convert(self, data: Any, image_size: ImageSize) -> dict:
        raise NotImplementedError

    def _read_annotations(self, ann_file: str | os.PathLike) -> tuple[dict | None, list[Problem]]:
        raw, problems = load_json(ann_file)
        if raw is None:
            return None, problems
        try:
            data = self.convert(raw, header_image_sizes(self._image_root_for_sizes))
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            problem = Problem(str(ann_file), None, f"the file does not have the expected layout ({error})")
            return None, [problem]
        return data, unsized_entry_problems(data, str(ann_file))
