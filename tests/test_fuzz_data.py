"""Property-based tests of the data pipeline: whatever the annotation file and image bytes hold, every
case ends in a sample or a typed :class:`DataError` whose message names the file and the entry.

Annotation files are drawn as mostly well-formed records with junk mixed into every field (wrong types,
NaN, huge integers, lone surrogates, duplicate and dangling ids, spans outside the caption, captions over
the token limit, degenerate and out-of-image boxes); images as valid files of many modes and formats,
truncated or bit-flipped copies of them, and random bytes. Runs are derandomized so CI is reproducible;
``MDETR_FUZZ_EXAMPLES=2000`` explores more.
"""

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mdetr.data.collate import collate
from mdetr.data.errors import DataError, take_skipped
from mdetr.data.modulated import ModulatedDetection
from mdetr.data.tokens import MAX_TOKENS
from mdetr.data.transforms import make_transforms
from mdetr.data.validate import open_image

EXAMPLES = int(os.environ.get("MDETR_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRANSFORMS = make_transforms("train", scales=[32, 40], max_size=48, crop_scales=[40], crop_min=16,
                             crop_max=48, val_size=None)
FILE_NAMES = ["a.png", "b.jpg", "c.gif", "d.bin", "missing.png"]

JUNK = st.one_of(
    st.none(), st.booleans(), st.floats(), st.text(max_size=4), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.integers(min_value=2**63 - 2, max_value=2**70), st.integers(min_value=-(10**30), max_value=-1),
)


CAPTIONS = st.one_of(
    st.sampled_from(["a red circle", "the small blue square left of a star", ""]),
    st.text(max_size=40),
    st.just("word " * 300),  # over the token limit
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
)
NUMBER = st.one_of(st.integers(-10, 60), st.floats(-10, 60))


# ----------------------------------------------------------------------------------------------------------
# Images


@st.composite
def image_files(draw):
    """(bytes, (width, height) of the valid image they started from)."""
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    kind = draw(st.sampled_from(["valid"] * 4 + ["truncated", "flipped", "random", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=300)), size
    if kind == "empty":
        return b"", size
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I", "F", "LA", "CMYK", "I;16"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    image = Image.radial_gradient("L").resize(size).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # mode not writable in that format
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    if kind == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "flipped":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data), size


# ----------------------------------------------------------------------------------------------------------
# Annotation files: a consistent file, then a few fields replaced by junk or by a typical mistake

WORDS = ["a", "red", "circle", "the", "small", "blue", "square", "left", "of", "star"]


@st.composite
def valid_files(draw, sizes):
    """An MDETR file whose entries all load: ids line up, spans cover words, boxes lie in the image."""
    images, annotations = [], []
    for image_id in range(1, draw(st.integers(1, 3)) + 1):
        name = draw(st.sampled_from(sorted(sizes)))
        width, height = sizes[name]
        words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))
        caption = " ".join(words)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height,
                       "caption": caption})
        for _ in range(draw(st.integers(1, 2))):
            start = draw(st.integers(0, len(words) - 1))
            beg = len(" ".join(words[:start])) + (1 if start else 0)
            x, y = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
            box = [x, y, draw(st.integers(1, width - x)), draw(st.integers(1, height - y))]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": box,
                                "category_id": 1, "iscrowd": 0,
                                "tokens_positive": [[beg, beg + len(words[start])]]})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]}


def mistakes(record: dict, other: dict) -> st.SearchStrategy:
    """Values a field of ``record`` might wrongly hold: junk, or a typical mistake in such files."""
    caption = record.get("caption") if isinstance(record.get("caption"), str) else ""
    return st.one_of(
        JUNK,
        CAPTIONS,  # a caption too long, with lone surrogates, empty...
        st.just(other.get("id")),  # a duplicate id
        st.lists(st.lists(st.integers(-3, len(caption) + 5), min_size=2, max_size=2), max_size=2),  # spans
        st.lists(st.one_of(NUMBER, st.just(float("nan"))), min_size=4, max_size=4),  # boxes
        st.sampled_from([[0, 0, 0, 5], [5, 5, -2, 3], [500, 500, 10, 10], [-50, -50, 10, 10]]),
        st.sampled_from(FILE_NAMES),
    )


@st.composite
def annotation_files(draw, sizes):
    if draw(st.integers(0, 15)) == 0:  # not an MDETR file at all
        return draw(st.one_of(JUNK, st.fixed_dictionaries({"images": JUNK}), st.just({"annotations": []})))
    data = draw(valid_files(sizes))
    for _ in range(draw(st.integers(0, 3))):
        records = draw(st.sampled_from(["images", "annotations"]))
        record = draw(st.sampled_from(data[records]))
        key = draw(st.sampled_from([*record, "tokens", "isfinal", "area", "data_source", "answer"]))
        if draw(st.integers(0, 5)) == 0:
            record.pop(key, None)
        else:
            record[key] = draw(mistakes(record, draw(st.sampled_from(data[records]))))
    if draw(st.integers(0, 5)) == 0:  # an extra record that is junk through and through
        data[draw(st.sampled_from(["images", "annotations"]))].append(draw(JUNK))
    return data


# ----------------------------------------------------------------------------------------------------------
# Properties


def _assert_names(error: DataError, file_prefix: str) -> None:
    """The error is typed and its one sentence names the file (and the entry, when there is one)."""
    text = str(error)
    assert isinstance(error, DataError) and error.file.startswith(file_prefix) and text.startswith(error.file)
    if error.entry is not None:
        assert text.startswith(f"{error.file}, {error.entry}: ")
        assert error.entry.startswith(("image id ", "image entry #", "annotation id ", "annotation #"))


def _assert_sample(sample) -> None:
    image, target = sample
    assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
    assert bool(torch.isfinite(image).all())
    boxes, n = target["boxes"], len(target["tokens_positive"])
    assert boxes.shape == (n, 4) and bool(torch.isfinite(boxes).all())
    assert bool((boxes >= 0).all()) and bool((boxes <= 1).all())  # normalised cxcywh inside the image
    assert target["positive_map"].shape == (n, MAX_TOKENS) and bool(target["positive_map"].any(dim=1).all())
    assert list(target["size"]) == list(image.shape[1:])


def _run_pipeline(ann_file: Path, root: Path, tokenizer, policy: str) -> None:
    try:
        dataset = ModulatedDetection(ann_file, root, tokenizer=tokenizer, transforms=TRANSFORMS,
                                     on_error=policy)
    except DataError as error:
        _assert_names(error, str(ann_file))
        event(f"{policy}: the file is refused")
        return
    assert all(str(problem).startswith(str(ann_file)) for problem in dataset.problems)
    samples = []
    for index in range(len(dataset)):
        try:
            sample = dataset[index]
        except DataError as error:
            assert policy == "fail"
            _assert_names(error, str(root))
            assert error.entry is not None
            event(f"{policy}: an image is refused")
            continue
        if sample is None:
            assert policy == "skip"
            _assert_names(dataset.problems[-1].to_error(), str(root))
            event(f"{policy}: an image is skipped")
            continue
        _assert_sample(sample)
        samples.append(sample)
        event(f"{policy}: a sample")
    batch = collate([*samples, None])
    assert len(batch) == len(samples)
    assert len(batch.skipped) == len(dataset) - len(samples) if policy == "skip" else not batch.skipped


@FUZZ
@given(data=st.data())
def test_random_annotations_and_image_bytes_end_in_a_sample_or_a_data_error(tokenizer, data):
    files = {name: data.draw(image_files(), label=name) for name in FILE_NAMES[:-1]}
    sizes = {name: size for name, (_, size) in files.items()}
    document = data.draw(annotation_files(sizes), label="annotations")
    take_skipped()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped samples and decompression warnings
        root = Path(folder) / "images"
        root.mkdir()
        for name, (content, _) in files.items():
            (root / name).write_bytes(content)
        ann_file = Path(folder) / "ann.json"
        ann_file.write_text(json.dumps(document))  # NaN and lone surrogates survive the round trip
        for policy in ("fail", "skip"):
            _run_pipeline(ann_file, root, tokenizer, policy)
    take_skipped()


@settings(FUZZ, max_examples=3 * EXAMPLES)
@given(image=image_files(), claimed=st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_image_bytes_decode_or_raise_a_data_error(image, claimed):
    content, size = image
    entry = {"id": 7, "width": (claimed or size)[0], "height": (claimed or size)[1]}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "image.bin"
        path.write_bytes(content)
        try:
            decoded = open_image(path, entry)
        except DataError as error:
            assert error.file == str(path) and error.entry == "image id 7"
            assert str(error).startswith(f"{path}, image id 7: ")
        else:
            assert decoded.mode == "RGB" and decoded.size == (entry["width"], entry["height"])
