"""Tests for the synthetic shapes dataset generator (mdetr.data.shapes).

The checks re-derive meaning from the written files with an independent parser of the texts, so they
test what a model would be trained on, not the generator's internals.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdetr.data import shapes
from mdetr.data.shapes import HELD_OUT_PAIRS, ShapeObject, generate_shapes, render_scene, sample_scene

IMAGE_SIZE = 128
COUNTS = {"num_train": 30, "num_val": 6, "num_val_unseen": 20}

# The vocabulary the texts may use, written out here rather than imported so the parser is independent.
SIZE_WORDS = {"small": "small", "large": "large"}
COLOR_WORDS = {c: c for c in ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")}
MATERIAL_WORDS = {
    "rubber": "rubber",
    "matte": "rubber",
    "metal": "metal",
    "metallic": "metal",
    "shiny": "metal",
}
SHAPE_WORDS = {s: s for s in ("circle", "square", "triangle", "diamond", "star", "hexagon")}
SHAPE_WORDS.update({s + "s": s for s in list(SHAPE_WORDS)})
NUMBER_WORDS = {"a": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7}
IMAGE_FIELDS = {
    "id",
    "file_name",
    "height",
    "width",
    "caption",
    "dataset_name",
    "tokens_negative",
    "original_id",
}
RELATION_RE = re.compile(r"\b(?:to the )?(left of|right of|above|below)\b")


def parse_phrase(text: str) -> dict[str, str]:
    """Attributes named in ``text``; each attribute at most once, a shape always."""
    attrs: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        for name, table in (
            ("size", SIZE_WORDS),
            ("color", COLOR_WORDS),
            ("material", MATERIAL_WORDS),
            ("shape", SHAPE_WORDS),
        ):
            if word in table:
                assert name not in attrs, f"{name} named twice in {text!r}"
                attrs[name] = table[word]
    assert "shape" in attrs, f"no shape noun in {text!r}"
    return attrs


def matches(obj: dict, attrs: dict[str, str]) -> bool:
    return all(obj[k] == v for k, v in attrs.items())


def strictly(relation: str, target: dict, anchor: dict) -> bool:
    return {
        "left of": target["x"] < anchor["x"],
        "right of": target["x"] > anchor["x"],
        "above": target["y"] < anchor["y"],
        "below": target["y"] > anchor["y"],
    }[relation]


def load(out: Path, split: str) -> tuple[dict, list[dict], dict[int, list[dict]]]:
    data = json.loads((out / f"{split}.json").read_text())
    scenes = json.loads((out / f"{split}_scenes.json").read_text())
    anns: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    return data, scenes, anns


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("shapes")
    paths = generate_shapes(out, seed=3, image_size=IMAGE_SIZE, **COUNTS)
    return out, paths


def test_file_layout_and_schema(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, paths = dataset
    assert set(paths) == {"train", "val", "val_unseen"}
    meta = json.loads((out / "meta.json").read_text())
    assert [tuple(p) for p in meta["held_out_pairs"]] == list(HELD_OUT_PAIRS)
    assert meta["image_size"] == IMAGE_SIZE and meta["seed"] == 3
    for split, path in paths.items():
        assert path == out / f"{split}.json"
        data, scenes, anns = load(out, split)
        assert list(data) == ["info", "licenses", "images", "annotations", "categories"]
        assert data["categories"] == [{"supercategory": "object", "id": 1, "name": "object"}]
        pngs = sorted((out / "images" / split).glob("*.png"))
        assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(COUNTS[f"num_{split}"])]
        with Image.open(pngs[0]) as image:
            assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)

        image_ids = [im["id"] for im in data["images"]]
        assert len(set(image_ids)) == len(image_ids)
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for im in data["images"]:
            assert IMAGE_FIELDS <= set(im)
            assert im["file_name"] == f"{split}/{im['original_id']:06d}.png"
            assert (out / "images" / im["file_name"]).is_file()
            assert im["height"] == im["width"] == IMAGE_SIZE
            assert im["dataset_name"] in {"shapes_refexp", "shapes_caption"}
            assert im["tokens_negative"] == [] and 0 < len(im["caption"]) < 250
            assert scenes[im["original_id"]]["file_name"] == im["file_name"]
            image_anns = anns.get(im["id"], [])
            if im["dataset_name"] == "shapes_refexp":
                assert len(image_anns) == 1
            else:
                num_groups = len({tuple(map(tuple, a["tokens_positive"])) for a in image_anns})
                assert min(2, len(scenes[im["original_id"]]["objects"])) <= num_groups <= 4
        for ann in data["annotations"]:
            assert {"id", "image_id", "bbox", "area", "iscrowd", "category_id", "tokens_positive"} <= set(ann)
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1
            assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3], abs=0.01)
            assert {"shape", "color", "size", "material"} <= set(ann)

        # Every scene: one caption and two to four referring expressions.
        per_scene: dict[int, list[str]] = {}
        for im in data["images"]:
            per_scene.setdefault(im["original_id"], []).append(im["dataset_name"])
        assert sorted(per_scene) == list(range(COUNTS[f"num_{split}"]))
        for names in per_scene.values():
            assert names.count("shapes_caption") == 1
            assert 1 <= names.count("shapes_refexp") <= 4
        refexps_per_scene = [names.count("shapes_refexp") for names in per_scene.values()]
        assert np.mean(refexps_per_scene) >= 2.0


def test_scene_geometry(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, _ = dataset
    for split in ("train", "val", "val_unseen"):
        _, scenes, _ = load(out, split)
        for scene in scenes:
            objects = scene["objects"]
            assert 3 <= len(objects) <= 10
            boxes = []
            for o in objects:
                rebuilt = ShapeObject(
                    o["shape"], o["color"], o["size"], o["material"], o["x"], o["y"], o["radius"]
                )
                assert rebuilt.bbox_xywh == o["bbox"]
                x, y, w, h = o["bbox"]
                assert 0 <= x and 0 <= y and x + w <= IMAGE_SIZE and y + h <= IMAGE_SIZE
                boxes.append((x, y, x + w, y + h))
            for a, b in itertools.combinations(boxes, 2):
                overlap_w = min(a[2], b[2]) - max(a[0], b[0])
                overlap_h = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_w <= 0 or overlap_h <= 0, "objects overlap"


def test_sizes_are_distinct_and_visible() -> None:
    for shape in shapes.SHAPES:
        small = ShapeObject(shape, "red", "small", "rubber", 128.0, 128.0, 0.05 * 256 * 0.92)
        large = ShapeObject(shape, "red", "large", "rubber", 128.0, 128.0, 2 * 0.05 * 256 * 0.92)
        assert min(small.bbox_xywh[2:]) >= 16, shape
        assert large.bbox_xywh[2] == pytest.approx(2 * small.bbox_xywh[2], abs=0.02)


def test_same_seed_is_byte_identical_and_scenes_do_not_depend_on_counts(
    dataset: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    out, _ = dataset
    again = tmp_path / "again"
    generate_shapes(again, seed=3, image_size=IMAGE_SIZE, **COUNTS)
    for name in ("train.json", "val.json", "val_unseen.json", "train_scenes.json", "meta.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    for png in (out / "images").rglob("*.png"):
        twin = again / "images" / png.relative_to(out / "images")
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(twin)))

    # Fewer scenes: the first ones are the same scenes, because each is seeded by (seed, split, index).
    fewer = tmp_path / "fewer"
    generate_shapes(fewer, seed=3, image_size=IMAGE_SIZE, num_train=2, num_val=0, num_val_unseen=2)
    for split in ("train", "val_unseen"):
        big = json.loads((out / f"{split}_scenes.json").read_text())[:2]
        assert json.loads((fewer / f"{split}_scenes.json").read_text()) == big
        for i in range(2):
            a = np.asarray(Image.open(out / "images" / split / f"{i:06d}.png"))
            assert np.array_equal(a, np.asarray(Image.open(fewer / "images" / split / f"{i:06d}.png")))


def test_different_seed_differs(tmp_path: Path) -> None:
    small = {"image_size": IMAGE_SIZE, "num_train": 2, "num_val": 0, "num_val_unseen": 0}
    generate_shapes(tmp_path / "a", seed=3, **small)
    generate_shapes(tmp_path / "b", seed=4, **small)
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "b" / "train.json").read_bytes()
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "a" / "images" / "train" / f"{i:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / "images" / "train" / f"{i:06d}.png"))
        assert not np.array_equal(a, b)


def test_spans_name_their_objects(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, _ = dataset
    for split in ("train", "val", "val_unseen"):
        data, _, anns = load(out, split)
        for im in data["images"]:
            caption = im["caption"]
            for ann in anns.get(im["id"], []):
                assert ann["tokens_positive"]
                for begin, end in ann["tokens_positive"]:
                    assert 0 <= begin < end <= len(caption)
                    phrase = caption[begin:end]
                    assert phrase == phrase.strip()
                    assert ann["shape"] in phrase
                    # Every attribute the phrase names is the object's own, the colour included.
                    attrs = parse_phrase(phrase)
                    assert matches(ann, attrs), (caption, phrase, ann)
                    if im["dataset_name"] == "shapes_refexp":
                        assert phrase.split()[0] in {"the", "a"}


def test_referring_expressions_are_unambiguous(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, _ = dataset
    margin = shapes.relation_margin(IMAGE_SIZE)
    num_relational = 0
    for split in ("train", "val", "val_unseen"):
        data, scenes, anns = load(out, split)
        for im in data["images"]:
            if im["dataset_name"] != "shapes_refexp":
                continue
            caption = im["caption"]
            objects = scenes[im["original_id"]]["objects"]
            (ann,) = anns[im["id"]]
            relation = RELATION_RE.search(caption)
            if relation is None:
                found = [o for o in objects if matches(o, parse_phrase(caption))]
            else:
                num_relational += 1
                target_text, anchor_text = caption[: relation.start()], caption[relation.end() :]
                (anchor,) = [o for o in objects if matches(o, parse_phrase(anchor_text))]
                found = [
                    o
                    for o in objects
                    if matches(o, parse_phrase(target_text)) and strictly(relation.group(1), o, anchor)
                ]
                assert len(found) == 1, caption
                # The generated relation holds by a clear margin, not by a pixel.
                axis = "x" if relation.group(1) in {"left of", "right of"} else "y"
                assert abs(found[0][axis] - anchor[axis]) > margin
                # The span is the target's phrase, never the anchor's.
                (span,) = ann["tokens_positive"]
                assert span[1] <= relation.start()
            assert len(found) == 1, caption
            assert found[0]["bbox"] == ann["bbox"]
            assert all(found[0][k] == ann[k] for k in ("shape", "color", "size", "material"))
    assert num_relational >= 5


def test_caption_groups_are_complete_and_counted(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, _ = dataset
    data, scenes, anns = load(out, "train")
    for im in data["images"]:
        if im["dataset_name"] != "shapes_caption":
            continue
        objects = scenes[im["original_id"]]["objects"]
        groups: dict[tuple[int, int], list[list[float]]] = {}
        for ann in anns[im["id"]]:
            ((begin, end),) = ann["tokens_positive"]
            groups.setdefault((begin, end), []).append(ann["bbox"])
        mentioned: list[list[float]] = []
        for (begin, end), boxes in groups.items():
            phrase = im["caption"][begin:end]
            expected = [o["bbox"] for o in objects if matches(o, parse_phrase(phrase))]
            assert sorted(boxes) == sorted(expected), phrase
            assert NUMBER_WORDS[phrase.split()[0]] == len(boxes), phrase
            mentioned += boxes
        assert len(mentioned) == len({tuple(b) for b in mentioned}), "groups must be disjoint"


def test_held_out_pairs_only_in_val_unseen(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, _ = dataset
    held = set(HELD_OUT_PAIRS)
    assert 4 <= len(held) <= 6
    for split in ("train", "val"):
        data, scenes, _ = load(out, split)
        assert all((a["color"], a["shape"]) not in held for a in data["annotations"])
        assert all((o["color"], o["shape"]) not in held for s in scenes for o in s["objects"])
    # Many more layouts than the fixture renders: not even a distractor may use a held-out pair.
    for i in range(300):
        objects = sample_scene(
            np.random.default_rng(i), image_size=256, min_objects=3, max_objects=10, held_out=False
        )
        assert all((o.color, o.shape) not in held for o in objects)

    data, scenes, anns = load(out, "val_unseen")
    for scene in scenes:
        assert sum((o["color"], o["shape"]) in held for o in scene["objects"]) >= 2
    for im in data["images"]:
        if im["dataset_name"] != "shapes_refexp":
            continue
        (ann,) = anns[im["id"]]
        assert (ann["color"], ann["shape"]) in held
        ((begin, end),) = ann["tokens_positive"]
        attrs = parse_phrase(im["caption"][begin:end])
        assert attrs["color"] == ann["color"] and attrs["shape"] == ann["shape"]


@pytest.mark.parametrize("material", ["rubber", "metal"])
@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "diamond", "star", "hexagon"])
def test_drawn_pixels_fill_the_box(shape: str, material: str) -> None:
    size = 96
    obj = ShapeObject(shape, "gray", "large", material, 47.3, 51.6, 0.1 * size)
    background = np.asarray(render_scene([], image_size=size, rng=np.random.default_rng(7)), dtype=int)
    drawn = np.asarray(render_scene([obj], image_size=size, rng=np.random.default_rng(7)), dtype=int)
    ys, xs = np.nonzero(np.abs(drawn - background).max(axis=2) > 0)
    x, y, w, h = obj.bbox_xywh
    # Pixel i covers [i, i + 1): nothing is drawn outside the box (one pixel of anti-aliasing slack) ...
    assert xs.min() >= math.floor(x) - 1 and xs.max() <= math.ceil(x + w)
    assert ys.min() >= math.floor(y) - 1 and ys.max() <= math.ceil(y + h)
    # ... and the box is tight: the drawing reaches each side (thin star tips may fade by a pixel).
    assert xs.min() <= x + 1 and xs.max() >= x + w - 2
    assert ys.min() <= y + 1 and ys.max() >= y + h - 2
    # Centre pixel: a flat fill has the CLEVR colour, metal is shaded differently.
    centre = drawn[round(obj.y + 0.2 * obj.radius), round(obj.x + 0.2 * obj.radius)]
    if material == "rubber":
        assert centre.tolist() == list(shapes.COLORS["gray"])
    else:
        assert centre.tolist() != list(shapes.COLORS["gray"])


def test_generated_scene_pixels_lie_in_boxes(dataset: tuple[Path, dict[str, Path]]) -> None:
    out, _ = dataset
    _, scenes, _ = load(out, "val_unseen")
    for scene in scenes[:3]:
        objects = [
            ShapeObject(o["shape"], o["color"], o["size"], o["material"], o["x"], o["y"], o["radius"])
            for o in scene["objects"]
        ]
        background = np.asarray(
            render_scene([], image_size=IMAGE_SIZE, rng=np.random.default_rng(0)), dtype=int
        )
        drawn = np.asarray(
            render_scene(objects, image_size=IMAGE_SIZE, rng=np.random.default_rng(0)), dtype=int
        )
        changed = np.abs(drawn - background).max(axis=2) > 0
        inside = np.zeros_like(changed)
        for o in objects:
            x, y, w, h = o.bbox_xywh
            box = changed[math.floor(y) : math.ceil(y + h), math.floor(x) : math.ceil(x + w)]
            assert box.mean() > 0.3, "each box is mostly covered by its shape"
            rows = slice(max(0, math.floor(y) - 1), math.ceil(y + h) + 1)
            inside[rows, max(0, math.floor(x) - 1) : math.ceil(x + w) + 1] = True
        assert not (changed & ~inside).any()


def _refexp_targets(out: Path, split: str) -> list[tuple[str, list[dict], int]]:
    """(text, scene objects, index of the referred object) of every referring expression of a split."""
    data, scenes, anns = load(out, split)
    objects = {scene["file_name"]: scene["objects"] for scene in scenes}
    found = []
    for image in data["images"]:
        if image["dataset_name"] != "shapes_refexp":
            continue
        scene = objects[image["file_name"]]
        (ann,) = anns[image["id"]]
        target = next(i for i, o in enumerate(scene) if o["bbox"] == ann["bbox"])
        found.append((image["caption"], scene, target))
    return found


def test_relation_fraction_changes_only_the_texts(tmp_path: Path) -> None:
    counts = {"num_train": 24, "num_val": 0, "num_val_unseen": 0}
    generate_shapes(tmp_path / "never", seed=3, image_size=IMAGE_SIZE, relation_fraction=0.0, **counts)
    generate_shapes(tmp_path / "always", seed=3, image_size=IMAGE_SIZE, relation_fraction=1.0, **counts)
    never, always = tmp_path / "never", tmp_path / "always"
    assert (never / "train_scenes.json").read_bytes() == (always / "train_scenes.json").read_bytes()
    for png in (never / "images" / "train").glob("*.png"):
        assert np.array_equal(np.asarray(Image.open(png)),
                              np.asarray(Image.open(always / "images" / "train" / png.name)))
    assert json.loads((always / "meta.json").read_text())["relation_fraction"] == 1.0
    relational = {}
    for name, out in (("never", never), ("always", always)):
        refexps = _refexp_targets(out, "train")
        relational[name] = [(text, scene, t) for text, scene, t in refexps if RELATION_RE.search(text)]
        assert refexps
    # Fraction 0: a relation only where no attribute combination singles the object out.
    for text, scene, target in relational["never"]:
        others = [o for i, o in enumerate(scene) if i != target]
        keys = ("shape", "color", "size", "material")
        for n in range(1, len(keys) + 1):
            for subset in itertools.combinations(keys, n):
                assert any(all(o[k] == scene[target][k] for k in subset) for o in others), text
    # Fraction 1: a relation wherever the scene has one to offer, so most expressions use one.
    assert len(relational["always"]) > 2 * max(1, len(relational["never"]))
    with pytest.raises(ValueError, match="relation_fraction"):
        generate_shapes(tmp_path / "bad", num_train=1, num_val=0, num_val_unseen=0, relation_fraction=1.5)


def test_relation_needed_describes_targets_by_shared_words(tmp_path: Path) -> None:
    counts = {"num_train": 40, "num_val": 0, "num_val_unseen": 0}
    generate_shapes(tmp_path / "default", seed=3, image_size=IMAGE_SIZE, relation_fraction=0.5, **counts)
    generate_shapes(tmp_path / "needed", seed=3, image_size=IMAGE_SIZE, relation_fraction=0.5,
                    relation_needed=True, **counts)
    default, needed = tmp_path / "default", tmp_path / "needed"
    assert (default / "train_scenes.json").read_bytes() == (needed / "train_scenes.json").read_bytes()
    assert json.loads((needed / "meta.json").read_text())["relation_needed"] is True
    candidates = {}
    for name, out in (("default", default), ("needed", needed)):
        candidates[name] = []
        for text, scene, _ in _refexp_targets(out, "train"):
            if relation := RELATION_RE.search(text):
                words = parse_phrase(text[: relation.start()])
                candidates[name].append(sum(matches(o, words) for o in scene))
    # Without the option some relations are redundant (the words before them fit the target alone); with
    # it every relation picks among several objects that the words before it fit.
    assert min(candidates["default"]) == 1
    assert min(candidates["needed"]) >= 2 and len(candidates["needed"]) >= 10


def test_annotated_anchors_box_the_object_the_anchor_phrase_names(tmp_path: Path) -> None:
    counts = {"num_train": 30, "num_val": 0, "num_val_unseen": 0}
    generate_shapes(tmp_path / "plain", seed=3, image_size=IMAGE_SIZE, relation_fraction=0.5, **counts)
    generate_shapes(tmp_path / "anchors", seed=3, image_size=IMAGE_SIZE, relation_fraction=0.5,
                    annotate_anchors=True, **counts)
    plain, plain_scenes, plain_anns = load(tmp_path / "plain", "train")
    data, scenes, anns = load(tmp_path / "anchors", "train")
    assert json.loads((tmp_path / "anchors" / "meta.json").read_text())["annotate_anchors"] is True
    assert scenes == plain_scenes and data["images"] == plain["images"]  # same scenes and texts
    assert all("isfinal" not in a for a in plain["annotations"])
    objects = {scene["file_name"]: scene["objects"] for scene in scenes}
    anchored = 0
    for image in data["images"]:
        boxes = anns[image["id"]]
        referred = [a for a in boxes if a["isfinal"] == 1]
        strip = [{k: v for k, v in a.items() if k not in ("id", "isfinal")} for a in referred]
        assert strip == [{k: v for k, v in a.items() if k != "id"} for a in plain_anns[image["id"]]]
        anchors = [a for a in boxes if a["isfinal"] == 0]
        assert len(boxes) == len(referred) + len(anchors)
        relation = RELATION_RE.search(image["caption"])
        if image["dataset_name"] != "shapes_refexp" or relation is None:
            assert not anchors, image["caption"]
            continue
        (anchor,), (target,) = anchors, referred
        (begin, end), = anchor["tokens_positive"]
        assert end == len(image["caption"]) and begin > relation.end()
        # The anchor phrase fits exactly one object of the scene, and it is the boxed one, in the relation.
        scene = objects[image["file_name"]]
        named = [o for o in scene if matches(o, parse_phrase(image["caption"][begin:end]))]
        assert len(named) == 1 and named[0]["bbox"] == anchor["bbox"]
        target_object = next(o for o in scene if o["bbox"] == target["bbox"])
        assert strictly(relation.group(1), target_object, named[0])
        anchored += 1
    assert anchored >= 10


def test_invalid_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_objects"):
        generate_shapes(tmp_path, num_train=1, num_val=0, num_val_unseen=0, min_objects=5, max_objects=3)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(tmp_path, num_train=1, num_val=0, num_val_unseen=0, image_size=16)
