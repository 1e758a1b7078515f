"""CLEVR-like synthetic grounding data: flat 2-D shapes with referring expressions and captions.

``generate_shapes`` writes a small dataset in the MDETR annotation format (COCO-style JSON, one image entry
per (image, text) pair, ``tokens_positive`` character spans per box) that a CPU can train and evaluate on in
minutes. Each scene holds a few objects described by four attributes, as in CLEVR:

* shape: circle, square, triangle, diamond, star, hexagon (drawn upright, so square and diamond differ);
* colour: CLEVR's eight colours with CLEVR's RGB values;
* size: small or large (large is twice small, with a few percent of jitter);
* material: rubber (flat matte fill) or metal (shaded, with a specular spot and a dark rim).

Layout on disk (``split`` is ``train``, ``val`` or ``val_unseen``)::

    out_dir/images/{split}/{index:06d}.png   RGB, image_size x image_size
    out_dir/{split}.json                     MDETR/COCO annotations, file_name relative to out_dir/images
    out_dir/{split}_scenes.json              every object of every scene, like CLEVR's scenes files
    out_dir/meta.json                        generator parameters and the held-out (colour, shape) pairs

Texts, each its own image entry sharing the scene's PNG:

* ``shapes_refexp``: 2-4 referring expressions per scene with exactly one annotation each. The expression
  picks out its target uniquely: the shortest attribute description that only the target matches, or
  (when no description is unique, and otherwise with probability ``relation_fraction``, 0.3 by default) a
  description plus a spatial relation to an anchor object that is itself uniquely described ("the red
  circle left of the large blue square"). With ``relation_needed`` the words before the relation always
  match other objects too, so that only the relation tells the target apart (training texts that cannot be
  solved while ignoring the relation); a target that no such words fit gets a relation-free description.
* ``shapes_caption``: one caption per scene mentioning 2-4 disjoint groups of objects ("a large blue
  square, two yellow stars and a shiny gray circle."); every object of a group gets the group's span.

Spans (``tokens_positive``) cover the whole noun phrase of the referred object including its determiner
or count word ("the small red circle", "two yellow stars"), never the anchor phrase of a relation. Phrase
word order follows CLEVR: size, colour, material, shape. With ``annotate_anchors`` the anchor of every
relation gets its own box too, its span the anchor phrase, and every box an ``isfinal`` mark (1 referred, 0
anchor) as in CLEVR-Ref+, for a model with the is-final head.

Every annotation also has the object's outline as a COCO polygon ``segmentation`` (its vertices; a circle
as a regular 32-gon), so the segmentation model (PhraseCut recipe) trains on the same files.

Splits: ``train`` and ``val`` never contain the held-out (colour, shape) pairs of ``HELD_OUT_PAIRS``, not
even as distractors. Every ``val_unseen`` scene holds two to four held-out objects, and every
``val_unseen`` referring expression targets one of them with a description naming its colour and shape.

Each scene is drawn from its own random generator seeded by (seed, split, index), so a scene does not
depend on the order of generation or on the sizes of the other splits.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
# The RGB values of CLEVR's properties.json, so that a colour name means the same thing in both datasets.
COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SIZES: tuple[str, ...] = ("small", "large")
MATERIALS: tuple[str, ...] = ("rubber", "metal")
# Synonyms as in CLEVR's synonyms.json; the first word of each tuple is the canonical name.
MATERIAL_WORDS: dict[str, tuple[str, ...]] = {
    "rubber": ("rubber", "matte"),
    "metal": ("metal", "metallic", "shiny"),
}
# Each held-out colour and shape still occurs in train with other partners, which is what makes
# ``val_unseen`` a test of composition rather than of unseen words.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "star"),
    ("green", "hexagon"),
    ("yellow", "circle"),
    ("purple", "square"),
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "val", "val_unseen")
CATEGORIES: list[dict[str, object]] = [{"supercategory": "object", "id": 1, "name": "object"}]
# Vertices of the polygon a circle's segmentation is given as (its area is 99.4 % of the circle's).
CIRCLE_VERTICES = 32

# Half-extent of a small object as a fraction of the image side: 12.8 px at 256, so a small object's
# narrowest extent (the diamond's width, with the smallest size jitter) is still 17 px.
_SMALL_RADIUS_FRACTION = 0.05
_SIZE_SCALE = {"small": 1.0, "large": 2.0}
_SUPERSAMPLE = 3
_OPTIONAL_ATTRIBUTES = ("size", "color", "material")
# Attribute subsets added to the (always present) shape noun, shortest first.
_ATTRIBUTE_SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    subset
    for k in range(len(_OPTIONAL_ATTRIBUTES) + 1)
    for subset in itertools.combinations(_OPTIONAL_ATTRIBUTES, k)
)
_RELATION_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
_REFEXP_TEMPLATES = ("{np}", "{np}", "find {np}", "{np} in the picture", "look at {np}")
_RELATION_TEMPLATES = ("{np} {rel} {anchor}", "{np} that is {rel} {anchor}", "find {np} {rel} {anchor}")
_CAPTION_PREFIXES = ("", "", "the picture shows ", "a scene with ", "we can see ")
_NUMBER_WORDS = {
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
}
# Default probability of describing a target through a relation although attributes alone would identify
# it (``relation_fraction`` of generate_shapes).
RELATION_FRACTION = 0.3
_SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: attributes plus the geometry it is drawn with (pixels).

    ``x``, ``y`` is the centre the shape's vertices are defined around and ``radius`` its half-extent; the
    tight box (``bbox_xyxy``) follows from the vertices and can be smaller than the ``radius`` square.
    """

    shape: str
    color: str
    size: str
    material: str
    x: float
    y: float
    radius: float

    @property
    def bbox_xyxy(self) -> tuple[float, float, float, float]:
        """Tight box of the drawn shape (x0, y0, x1, y1), continuous pixel coordinates."""
        if self.shape == "circle":
            return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)
        xs, ys = zip(*shape_vertices(shape=self.shape, x=self.x, y=self.y, radius=self.radius), strict=True)
        return (min(xs), min(ys), max(xs), max(ys))

    @property
    def bbox_xywh(self) -> list[float]:
        """COCO box [x, y, w, h] of the drawn shape, rounded to 1/100 px for stable JSON."""
        x0, y0, x1, y1 = self.bbox_xyxy
        return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]

    @property
    def polygon(self) -> list[tuple[float, float]]:
        """The outline drawn (pixels): the shape's vertices, or for a circle a regular polygon of
        :data:`CIRCLE_VERTICES` vertices on it."""
        if self.shape == "circle":
            return [(self.x + self.radius * math.cos(2 * math.pi * k / CIRCLE_VERTICES),
                     self.y + self.radius * math.sin(2 * math.pi * k / CIRCLE_VERTICES))
                    for k in range(CIRCLE_VERTICES)]
        return shape_vertices(shape=self.shape, x=self.x, y=self.y, radius=self.radius)

    @property
    def segmentation(self) -> list[list[float]]:
        """COCO polygon segmentation ``[[x1, y1, x2, y2, ...]]`` of :attr:`polygon`, rounded to 1/100 px."""
        return [[round(v, 2) for point in self.polygon for v in point]]

    def attribute(self, name: str) -> str:
        return str(getattr(self, name))


def shape_vertices(*, shape: str, x: float, y: float, radius: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a non-circle shape centred at (x, y) with half-extent ``radius``."""
    r = radius
    if shape == "square":
        # Slightly smaller than the radius square so a square does not look heavier than a circle.
        s = 0.88 * r
        unit = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "diamond":
        # Narrower than tall, so it never reads as a rotated square.
        unit = [(0.0, -r), (0.72 * r, 0.0), (0.0, r), (-0.72 * r, 0.0)]
    elif shape == "triangle":
        unit = [(0.0, -r), (r, 0.8 * r), (-r, 0.8 * r)]
    elif shape == "star":
        unit = []
        for k in range(10):
            rho = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            unit.append((rho * math.cos(angle), rho * math.sin(angle)))
    elif shape == "hexagon":
        unit = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
    else:
        raise ValueError(f"shape_vertices has no polygon for shape {shape!r}; known shapes: {SHAPES}.")
    return [(x + dx, y + dy) for dx, dy in unit]


# --------------------------------------------------------------------------------------------- layout


def sample_scene(
    rng: np.random.Generator,
    *,
    image_size: int,
    min_objects: int,
    max_objects: int,
    held_out: bool,
) -> list[ShapeObject]:
    """Sample a non-overlapping scene of ``min_objects``..``max_objects`` objects.

    With ``held_out=False`` no object has a (colour, shape) pair of ``HELD_OUT_PAIRS``; with ``held_out=True``
    two to four objects (fewer only if the scene is smaller) have distinct held-out pairs and the rest
    have the other pairs.
    Boxes of different objects keep a gap of at least 2 px (stricter than an IoU limit), so every drawn
    shape is fully visible and its box is the tight box of its pixels.
    """
    held = set(HELD_OUT_PAIRS)
    allowed_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]
    base_radius = _SMALL_RADIUS_FRACTION * image_size
    for _ in range(100):
        n = int(rng.integers(min_objects, max_objects + 1))
        num_held = int(rng.integers(min(2, n), min(4, n) + 1)) if held_out else 0
        # Distinct held-out pairs: each such object is then named by its colour and shape alone, so every
        # one of them can be the target of a referring expression.
        pairs = [
            HELD_OUT_PAIRS[int(i)] for i in rng.choice(len(HELD_OUT_PAIRS), size=num_held, replace=False)
        ]
        pairs += [allowed_pairs[int(i)] for i in rng.integers(len(allowed_pairs), size=n - num_held)]
        # Held-out objects are placed first, while the image is still empty, so they are never dropped.
        objects = _place_objects(rng, pairs=pairs, image_size=image_size, base_radius=base_radius)
        placed_held = sum((o.color, o.shape) in held for o in objects)
        if len(objects) >= min_objects and placed_held == num_held:
            return [objects[int(i)] for i in rng.permutation(len(objects))]
    raise ValueError(
        f"Could not place {min_objects} non-overlapping objects in a {image_size} px image; "
        "lower min_objects or raise image_size."
    )


def _place_objects(
    rng: np.random.Generator,
    *,
    pairs: Sequence[tuple[str, str]],
    image_size: int,
    base_radius: float,
) -> list[ShapeObject]:
    gap = max(2.0, 0.01 * image_size)
    margin = 2.0
    objects: list[ShapeObject] = []
    boxes = np.zeros((0, 4))
    for color, shape in pairs:
        size = SIZES[int(rng.integers(len(SIZES)))]
        material = MATERIALS[int(rng.integers(len(MATERIALS)))]
        radius = base_radius * _SIZE_SCALE[size] * float(rng.uniform(0.92, 1.08))
        low, high = radius + margin, image_size - radius - margin
        if high <= low:
            continue
        # Candidates are tried in one vectorised batch; the first free one wins.
        centres = rng.uniform(low, high, size=(64, 2))
        candidate = ShapeObject(shape, color, size, material, 0.0, 0.0, radius)
        x0, y0, x1, y1 = candidate.bbox_xyxy
        cand = np.stack(
            [centres[:, 0] + x0, centres[:, 1] + y0, centres[:, 0] + x1, centres[:, 1] + y1], axis=1
        )
        separated = (
            (cand[:, None, 2] + gap <= boxes[None, :, 0])
            | (boxes[None, :, 2] + gap <= cand[:, None, 0])
            | (cand[:, None, 3] + gap <= boxes[None, :, 1])
            | (boxes[None, :, 3] + gap <= cand[:, None, 1])
        ).all(axis=1)  # (64,)
        free = np.flatnonzero(separated)
        if free.size == 0:
            continue  # the scene is too crowded for this object; drop it
        cx, cy = (float(v) for v in centres[free[0]])
        objects.append(
            ShapeObject(shape, color, size, material, round(cx, 3), round(cy, 3), round(radius, 3))
        )
        boxes = np.concatenate([boxes, cand[free[0]][None]], axis=0)
    return objects


# ------------------------------------------------------------------------------------------ rendering


def render_scene(objects: Sequence[ShapeObject], *, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``objects`` on a light, slightly textured background; returns an RGB image.

    The background consumes ``rng`` identically whatever the objects, so two calls with equally seeded
    generators differ exactly where objects are drawn. Shapes are rendered at 3x and box-filtered down.
    """
    canvas = _background(image_size, rng).astype(np.float32)  # (S, S, 3)
    for obj in objects:
        premultiplied, coverage, (px0, py0) = _render_object(obj, image_size=image_size)
        h, w = coverage.shape
        region = canvas[py0 : py0 + h, px0 : px0 + w]
        region *= 1.0 - coverage[:, :, None]
        region += premultiplied
    return Image.fromarray((canvas + 0.5).astype(np.uint8))


def _background(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S, 3) uint8 light neutral background: a tinted level, a linear gradient and low-frequency noise.

    No per-pixel grain: it would make every PNG four times larger and slower to write.
    """
    level = rng.uniform(198.0, 226.0)
    tint = np.rint(rng.uniform(-4.0, 4.0, size=3)).astype(np.int16)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    amplitude = rng.uniform(6.0, 14.0)
    coords = ((np.arange(image_size) + 0.5) / image_size - 0.5).astype(np.float32)
    blotches = Image.fromarray(rng.normal(0.0, 3.0, size=(8, 8)).astype(np.float32), mode="F")
    gray = np.asarray(blotches.resize((image_size, image_size), Image.Resampling.BICUBIC)) + np.float32(level)
    gray = gray + np.float32(amplitude * math.cos(angle)) * coords[None, :]
    gray = gray + np.float32(amplitude * math.sin(angle)) * coords[:, None]
    rgb = np.rint(gray).astype(np.int16)[:, :, None] + tint[None, None, :]  # (S, S, 3)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _render_object(obj: ShapeObject, *, image_size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Anti-aliased patch of one object: premultiplied colour (h, w, 3) in [0, 255], coverage (h, w) in
    [0, 1], and the patch's top-left pixel in the image."""
    ss = _SUPERSAMPLE
    x0, y0, x1, y1 = obj.bbox_xyxy
    px0, py0 = max(0, math.floor(x0) - 1), max(0, math.floor(y0) - 1)
    px1, py1 = min(image_size, math.ceil(x1) + 1), min(image_size, math.ceil(y1) + 1)
    h, w = py1 - py0, px1 - px0

    def to_patch(x: float, y: float) -> tuple[float, float]:
        # Supersampled pixel k has its centre at continuous coordinate (k + 0.5) / ss.
        return ((x - px0) * ss - 0.5, (y - py0) * ss - 0.5)

    metal = obj.material == "metal"
    mask = Image.new("L", (w * ss, h * ss), 0)
    rim = Image.new("L", (w * ss, h * ss), 0)
    rim_width = max(2, round(0.09 * obj.radius * ss))
    if obj.shape == "circle":
        corners = [*to_patch(x0, y0), *to_patch(x1, y1)]
        ImageDraw.Draw(mask).ellipse(corners, fill=255)
        if metal:
            ImageDraw.Draw(rim).ellipse(corners, outline=255, width=rim_width)
    else:
        points = [
            to_patch(x, y) for x, y in shape_vertices(shape=obj.shape, x=obj.x, y=obj.y, radius=obj.radius)
        ]
        ImageDraw.Draw(mask).polygon(points, fill=255)
        if metal:
            # Pillow draws wide polygon outlines inside the polygon, so the rim never grows the box.
            ImageDraw.Draw(rim).polygon(points, outline=255, width=rim_width)

    # Image.reduce is the box filter over ss x ss blocks, an order of magnitude faster than numpy's.
    coverage = np.asarray(mask.reduce(ss), dtype=np.float32) * np.float32(1.0 / 255.0)  # (h, w)
    base = np.asarray(COLORS[obj.color], dtype=np.float32)
    if not metal:
        return coverage[:, :, None] * base, coverage, (px0, py0)
    # The shading varies slowly, so it is evaluated at pixel resolution; only the edges need supersampling.
    rim_coverage = np.asarray(rim.reduce(ss), dtype=np.float32) * np.float32(1.0 / 255.0)
    shading = _metal_shading(obj, base, origin=(px0, py0), size=(w, h))
    premultiplied = shading * (coverage - rim_coverage)[:, :, None] + (0.35 * base) * rim_coverage[:, :, None]
    return premultiplied, coverage, (px0, py0)


def _metal_shading(
    obj: ShapeObject, base: np.ndarray, *, origin: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """(H, W, 3) float32 shaded fill in [0, 255]: brighter towards an upper-left light, a white specular
    spot."""
    hx, hy = obj.x - 0.35 * obj.radius, obj.y - 0.4 * obj.radius
    dx = (origin[0] - hx + np.arange(size[0], dtype=np.float32) + 0.5) / obj.radius
    dy = (origin[1] - hy + np.arange(size[1], dtype=np.float32) + 0.5) / obj.radius
    dist2 = dx[None, :] ** 2 + dy[:, None] ** 2  # (H, W), squared distance to the light in radii
    shade = np.minimum(np.maximum(1.2 - 0.5 * np.sqrt(dist2), 0.55), 1.2)
    specular = 0.85 * np.exp(dist2 * np.float32(-1.0 / 0.09))
    # Blend the shaded colour towards white at the specular spot; the result stays within [0, 255].
    rgb = base[None, None, :] * (shade * (1.0 - specular))[:, :, None] + (255.0 * specular)[:, :, None]
    return np.minimum(rgb, 255.0)


# ----------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class GroundedText:
    """A text with the objects it refers to: ``groups[k] = (span, object indices)``, span [beg, end).

    ``anchors`` lists, in the same form, the objects the text mentions without referring to them: the
    anchor of a spatial relation ("the blue square" in "the red circle left of the blue square").
    """

    text: str
    groups: tuple[tuple[tuple[int, int], tuple[int, ...]], ...]
    anchors: tuple[tuple[tuple[int, int], tuple[int, ...]], ...] = ()


class _SceneIndex:
    """Which objects match each attribute description of a scene (descriptions always include the shape)."""

    def __init__(self, objects: Sequence[ShapeObject]) -> None:
        self.objects = objects
        self._members: dict[tuple[str, ...], dict[tuple[str, ...], list[int]]] = {}
        for subset in _ATTRIBUTE_SUBSETS:
            table: dict[tuple[str, ...], list[int]] = defaultdict(list)
            for i, obj in enumerate(objects):
                table[self._key(obj, subset)].append(i)
            self._members[subset] = table

    @staticmethod
    def _key(obj: ShapeObject, subset: tuple[str, ...]) -> tuple[str, ...]:
        return (*(obj.attribute(a) for a in subset), obj.shape)

    def matching(self, target: int, subset: tuple[str, ...]) -> list[int]:
        """Indices of the objects sharing the target's shape and its values of ``subset``."""
        return self._members[subset][self._key(self.objects[target], subset)]

    def unique_subsets(self, target: int, *, require_color: bool) -> list[tuple[str, ...]]:
        """The shortest attribute subsets that describe only the target (empty if none does)."""
        for k in range(len(_OPTIONAL_ATTRIBUTES) + 1):
            found = [
                s
                for s in _ATTRIBUTE_SUBSETS
                if len(s) == k and (not require_color or "color" in s) and len(self.matching(target, s)) == 1
            ]
            if found:
                return found
        return []


def relation_holds(target: ShapeObject, anchor: ShapeObject, relation: str, *, margin: float) -> bool:
    """Whether ``target`` is ``relation`` ("left of", ...) ``anchor``, centres apart by more than ``margin``.

    Image coordinates: "above" means a smaller centre y.
    """
    if relation == "left of":
        return target.x < anchor.x - margin
    if relation == "right of":
        return target.x > anchor.x + margin
    if relation == "above":
        return target.y < anchor.y - margin
    if relation == "below":
        return target.y > anchor.y + margin
    raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATIONS}.")


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _phrase_words(obj: ShapeObject, subset: Iterable[str], rng: np.random.Generator, *, plural: bool) -> str:
    """Attribute words in CLEVR order (size, colour, material) followed by the shape noun."""
    subset = set(subset)
    words = []
    if "size" in subset:
        words.append(obj.size)
    if "color" in subset:
        words.append(obj.color)
    if "material" in subset:
        words.append(_choice(rng, MATERIAL_WORDS[obj.material]))
    words.append(obj.shape + ("s" if plural else ""))
    return " ".join(words)


def make_referring_expression(
    objects: Sequence[ShapeObject],
    target: int,
    rng: np.random.Generator,
    *,
    relation_margin: float,
    require_color: bool = False,
    index: _SceneIndex | None = None,
    relation_fraction: float = RELATION_FRACTION,
    relation_needed: bool = False,
) -> GroundedText | None:
    """An expression that refers to ``objects[target]`` only, or None if the scene does not allow one.

    Without a relation the description (shape plus the fewest attributes) matches the target alone. With a
    relation the anchor's description matches the anchor alone, the target is ``relation`` the anchor by more
    than ``relation_margin`` px, and no other object matching the target's description is ``relation`` the
    anchor at all (margin 0), so the reading does not depend on the margin. A relation is used when no
    description alone is unique, and otherwise with probability ``relation_fraction``. The target's own
    description is the shortest that works; with ``relation_needed`` only descriptions that other objects
    match too are tried, so the relation is never redundant. ``index`` only caches the scene's attribute
    tables across calls for the same ``objects``.
    """
    index = index or _SceneIndex(objects)
    unique = index.unique_subsets(target, require_color=require_color)
    if not unique or rng.random() < relation_fraction:
        relational = _relational_description(
            index, target, rng, relation_margin=relation_margin, require_color=require_color,
            relation_needed=relation_needed,
        )
        if relational is not None:
            return relational
    if not unique:
        return None
    subset = unique[int(rng.integers(len(unique)))]
    determiner = _choice(rng, ("the", "the", "the", "a"))
    noun_phrase = f"{determiner} {_phrase_words(objects[target], subset, rng, plural=False)}"
    template = _choice(rng, _REFEXP_TEMPLATES)
    begin = template.index("{np}")
    text = template.format(np=noun_phrase)
    return GroundedText(text, (((begin, begin + len(noun_phrase)), (target,)),))


def _relational_description(
    index: _SceneIndex,
    target: int,
    rng: np.random.Generator,
    *,
    relation_margin: float,
    require_color: bool,
    relation_needed: bool = False,
) -> GroundedText | None:
    objects = index.objects
    anchors = [(a, index.unique_subsets(a, require_color=False)) for a in rng.permutation(len(objects))]
    anchors = [(int(a), subsets) for a, subsets in anchors if a != target and subsets]
    subsets = [s for s in _ATTRIBUTE_SUBSETS if not require_color or "color" in s]
    # Shortest target descriptions first, in random order within a length.
    order = sorted(range(len(subsets)), key=lambda k: (len(subsets[k]), rng.random()))
    for k in order:
        subset = subsets[k]
        others = [o for o in index.matching(target, subset) if o != target]
        if relation_needed and not others:
            continue
        for anchor, anchor_subsets in anchors:
            for r in rng.permutation(len(RELATIONS)):
                relation = RELATIONS[int(r)]
                if not relation_holds(objects[target], objects[anchor], relation, margin=relation_margin):
                    continue
                if any(relation_holds(objects[o], objects[anchor], relation, margin=0.0) for o in others):
                    continue
                anchor_subset = anchor_subsets[int(rng.integers(len(anchor_subsets)))]
                noun_phrase = f"the {_phrase_words(objects[target], subset, rng, plural=False)}"
                anchor_phrase = f"the {_phrase_words(objects[anchor], anchor_subset, rng, plural=False)}"
                template = _choice(rng, _RELATION_TEMPLATES)
                begin = template.index("{np}")
                text = template.format(
                    np=noun_phrase, rel=_choice(rng, _RELATION_WORDS[relation]), anchor=anchor_phrase
                )
                anchor_begin = len(text) - len(anchor_phrase)  # every relation template ends with it
                return GroundedText(text, (((begin, begin + len(noun_phrase)), (target,)),),
                                    anchors=(((anchor_begin, len(text)), (anchor,)),))
    return None


def make_caption(
    objects: Sequence[ShapeObject],
    rng: np.random.Generator,
    *,
    preferred: Sequence[int] = (),
    index: _SceneIndex | None = None,
) -> GroundedText:
    """A caption mentioning 2-4 disjoint groups of objects (fewer if the scene is smaller).

    A group is every object matching its description, and its count word is exact: "two yellow stars" means
    the scene holds exactly two yellow stars. Objects in ``preferred`` are mentioned first. ``index`` only
    caches the scene's attribute tables across calls for the same ``objects``.
    """
    index = index or _SceneIndex(objects)
    num_groups = int(rng.integers(min(2, len(objects)), min(4, len(objects)) + 1))
    rest = [int(i) for i in rng.permutation(len(objects)) if int(i) not in preferred]
    covered: set[int] = set()
    mentions: list[tuple[str, tuple[int, ...]]] = []
    for seed_object in [*preferred, *rest]:
        if len(mentions) == num_groups:
            break
        if seed_object in covered:
            continue
        # Colour-bearing descriptions are favoured; the full description always works because an object
        # identical to an uncovered one cannot have been covered.
        order = sorted(_ATTRIBUTE_SUBSETS, key=lambda s: rng.random() + (0.0 if "color" in s else 0.6))
        for subset in order:
            group = index.matching(seed_object, subset)
            if covered.isdisjoint(group):
                break
        count = len(group)
        words = _phrase_words(objects[seed_object], subset, rng, plural=count > 1)
        determiner = _NUMBER_WORDS[count] if count > 1 else _choice(rng, ("a", "a", "a", "one"))
        mentions.append((f"{determiner} {words}", tuple(group)))
        covered.update(group)

    text = _choice(rng, _CAPTION_PREFIXES)
    groups = []
    for k, (mention, members) in enumerate(mentions):
        if k > 0:
            text += " and " if k == len(mentions) - 1 else ", "
        groups.append(((len(text), len(text) + len(mention)), members))
        text += mention
    return GroundedText(text + ".", tuple(groups))


# ------------------------------------------------------------------------------------------ the driver


@dataclass(frozen=True)
class _Scene:
    objects: list[ShapeObject]
    image: Image.Image
    refexps: list[GroundedText]
    caption: GroundedText


def _scene_rngs(seed: int, split: str, index: int) -> list[np.random.Generator]:
    """Independent layout, rendering and text generators for one scene, from (seed, split, index)."""
    children = np.random.SeedSequence([seed, _SPLIT_CODES[split], index]).spawn(3)
    return [np.random.default_rng(child) for child in children]


def _make_scene(
    *, seed: int, split: str, index: int, image_size: int, min_objects: int, max_objects: int,
    relation_fraction: float = RELATION_FRACTION,
    relation_needed: bool = False,
) -> _Scene:
    layout_rng, render_rng, text_rng = _scene_rngs(seed, split, index)
    held_out = split == "val_unseen"
    objects = sample_scene(
        layout_rng, image_size=image_size, min_objects=min_objects, max_objects=max_objects, held_out=held_out
    )
    image = render_scene(objects, image_size=image_size, rng=render_rng)
    scene_index = _SceneIndex(objects)
    if held_out:
        held = set(HELD_OUT_PAIRS)
        candidates = [i for i, o in enumerate(objects) if (o.color, o.shape) in held]
    else:
        candidates = list(range(len(objects)))
    wanted = int(text_rng.integers(2, 5))
    refexps: list[GroundedText] = []
    for target in text_rng.permutation(candidates):
        if len(refexps) == wanted:
            break
        refexp = make_referring_expression(
            objects,
            int(target),
            text_rng,
            relation_margin=relation_margin(image_size),
            require_color=held_out,
            index=scene_index,
            relation_fraction=relation_fraction,
            relation_needed=relation_needed,
        )
        if refexp is not None:
            refexps.append(refexp)
    preferred = [int(i) for i in text_rng.permutation(candidates)] if held_out else []
    caption = make_caption(objects, text_rng, preferred=preferred, index=scene_index)
    return _Scene(objects, image, refexps, caption)


def relation_margin(image_size: int) -> float:
    """How far apart (px) centres must be for a generated relation: one small-object half-extent."""
    return _SMALL_RADIUS_FRACTION * image_size


def _object_record(obj: ShapeObject) -> dict[str, object]:
    return {"shape": obj.shape, "color": obj.color, "size": obj.size, "material": obj.material}


class _SplitWriter:
    """Accumulates one split's COCO-style entries; ids count from 1 in scene order. With
    ``annotate_anchors`` the anchors of relations get boxes too, and every box an ``isfinal`` mark (1 for the
    referred objects, 0 for anchors), as in CLEVR-Ref+."""

    def __init__(self, split: str, image_size: int, *, annotate_anchors: bool = False) -> None:
        self.split = split
        self.image_size = image_size
        self.annotate_anchors = annotate_anchors
        self.images: list[dict[str, object]] = []
        self.annotations: list[dict[str, object]] = []
        self.scenes: list[dict[str, object]] = []

    def add(self, index: int, scene: _Scene) -> None:
        file_name = f"{self.split}/{index:06d}.png"
        self.scenes.append(
            {
                "index": index,
                "file_name": file_name,
                "objects": [
                    {**_object_record(o), "bbox": o.bbox_xywh, "x": o.x, "y": o.y, "radius": o.radius}
                    for o in scene.objects
                ],
            }
        )
        texts = [("shapes_refexp", t) for t in scene.refexps] + [("shapes_caption", scene.caption)]
        for dataset_name, grounded in texts:
            image_id = len(self.images) + 1
            self.images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "height": self.image_size,
                    "width": self.image_size,
                    "caption": grounded.text,
                    "dataset_name": dataset_name,
                    "tokens_negative": [],
                    "original_id": index,
                    "tokens_positive_eval": [[list(span)] for span, _ in grounded.groups],
                }
            )
            mentions = [(group, True) for group in grounded.groups]
            if self.annotate_anchors:
                mentions += [(group, False) for group in grounded.anchors]
            for (span, members), referred in mentions:
                for member in members:
                    obj = scene.objects[member]
                    bbox = obj.bbox_xywh
                    self.annotations.append(
                        {
                            "id": len(self.annotations) + 1,
                            "image_id": image_id,
                            "bbox": bbox,
                            "area": round(bbox[2] * bbox[3], 2),
                            "iscrowd": 0,
                            "category_id": 1,
                            "tokens_positive": [list(span)],
                            **_object_record(obj),
                            "segmentation": obj.segmentation,
                            **({"isfinal": int(referred)} if self.annotate_anchors else {}),
                        }
                    )

    def annotation_json(self, seed: int) -> dict[str, object]:
        return {
            "info": {
                "description": f"mdetr synthetic shapes, split {self.split}",
                "version": "1.0",
                "seed": seed,
            },
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": CATEGORIES,
        }


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")


def generate_shapes(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_train: int,
    num_val: int,
    num_val_unseen: int,
    image_size: int = 256,
    min_objects: int = 3,
    max_objects: int = 10,
    relation_fraction: float = RELATION_FRACTION,
    relation_needed: bool = False,
    annotate_anchors: bool = False,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the shapes dataset under ``out_dir`` and return ``{split: path of split.json}``.

    The same arguments give byte-identical JSON and pixel-identical PNGs. See the module docstring for the
    layout, the texts and the held-out pairs. ``relation_fraction``: how often an object that attributes
    alone identify is still referred to through a spatial relation (objects that attributes cannot
    identify always are). ``relation_needed``: describe the target of a relation only by words that other
    objects match too, so that the relation is needed to tell it apart. Both change only
    the texts: the scenes and images do not depend on them. ``annotate_anchors``: the same texts, with a box
    for the anchor of every relation (its span the anchor phrase) and an ``isfinal`` mark on every box, 1 for
    the referred objects and 0 for anchors, the CLEVR-Ref+ layout (for a model with the is-final head,
    ``model.predict_final``).
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"Need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}.")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 px so small shapes stay visible, got {image_size}.")
    if min(num_train, num_val, num_val_unseen) < 0:
        raise ValueError("Scene counts must be non-negative.")
    if not 0.0 <= relation_fraction <= 1.0:
        raise ValueError(f"relation_fraction must be between 0 and 1, got {relation_fraction}.")
    out_dir = Path(out_dir)
    counts = {"train": num_train, "val": num_val, "val_unseen": num_val_unseen}
    paths: dict[str, Path] = {}
    for split, count in counts.items():
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        writer = _SplitWriter(split, image_size, annotate_anchors=annotate_anchors)
        for index in tqdm(range(count), desc=f"shapes {split}", disable=not progress):
            scene = _make_scene(
                seed=seed,
                split=split,
                index=index,
                image_size=image_size,
                min_objects=min_objects,
                max_objects=max_objects,
                relation_fraction=relation_fraction,
                relation_needed=relation_needed,
            )
            # zlib level 3 writes about twice as fast as the default 6 for files about 30% larger.
            scene.image.save(image_dir / f"{index:06d}.png", compress_level=3)
            writer.add(index, scene)
        paths[split] = out_dir / f"{split}.json"
        _write_json(paths[split], writer.annotation_json(seed))
        _write_json(out_dir / f"{split}_scenes.json", writer.scenes)
    meta = {
        "generator": "mdetr.data.shapes",
        "seed": seed,
        "image_size": image_size,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "num_scenes": counts,
        "shapes": list(SHAPES),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "sizes": list(SIZES),
        "materials": {name: list(words) for name, words in MATERIAL_WORDS.items()},
        "relations": list(RELATIONS),
        "relation_margin_px": relation_margin(image_size),
        "relation_fraction": relation_fraction,
        "relation_needed": relation_needed,
        "annotate_anchors": annotate_anchors,
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "tokens_positive": "the referred noun phrase including its determiner or count word",
    }
    _write_json(out_dir / "meta.json", meta)
    return paths


# ------------------------------------------------------------------------------------ detection export

DETECTION_SCHEMES: tuple[str, ...] = ("shape", "shape_color")


def detection_categories(scheme: str) -> list[dict[str, object]]:
    """COCO categories of a detection export: ``"shape"`` gives the six shapes (ids 1-6, in ``SHAPES``
    order); ``"shape_color"`` every (colour, shape) pair named like "red circle" (ids 1-48, colour-major in
    ``COLORS`` order), the held-out pairs included although ``train`` never shows them."""
    if scheme == "shape":
        names = list(SHAPES)
    elif scheme == "shape_color":
        names = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
    else:
        raise ValueError(f"unknown detection scheme {scheme!r}; expected one of {DETECTION_SCHEMES}")
    return [{"supercategory": "shape", "id": i, "name": name} for i, name in enumerate(names, start=1)]


def _detection_json(scenes: list[dict], *, scheme: str, image_size: int, split: str, source: Path) -> dict:
    categories = detection_categories(scheme)
    ids = {str(c["name"]): int(c["id"]) for c in categories}  # type: ignore[call-overload]
    images, annotations = [], []
    for scene in scenes:
        image_id = int(scene["index"]) + 1
        images.append({"id": image_id, "file_name": scene["file_name"], "height": image_size,
                       "width": image_size})
        for k, obj in enumerate(scene["objects"]):
            name = obj["shape"] if scheme == "shape" else f"{obj['color']} {obj['shape']}"
            if name not in ids:
                raise ValueError(
                    f"{source}: scene {scene['index']}, object {k}: unknown shape or colour {name!r}"
                )
            bbox = obj["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": bbox,
                                "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0, "category_id": ids[name]})
    info = {"description": f"mdetr synthetic shapes, split {split}, detection by {scheme}", "version": "1.0"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def export_detection(out_dir: str | Path, *, scheme: str = "shape",
                     splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """Write a plain COCO detection file per split of a generated shapes set and return their paths.

    Reads ``out_dir/{split}_scenes.json`` (every object of every scene, not only the referred ones) and
    writes ``out_dir/{split}_detection_{scheme}.json``: one image entry per scene (id = scene index + 1,
    ``file_name`` relative to ``out_dir/images`` as in the grounding files), one annotation per object with
    its tight box and its category (see :func:`detection_categories`).
    """
    detection_categories(scheme)  # reject an unknown scheme before reading anything
    out_dir = Path(out_dir)
    meta_file = out_dir / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: generate the shapes set first (mdetr data shapes)")
    image_size = int(json.loads(meta_file.read_text(encoding="utf-8"))["image_size"])
    paths: dict[str, Path] = {}
    for split in splits:
        source = out_dir / f"{split}_scenes.json"
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found: the shapes set in {out_dir} has no {split} split")
        scenes = json.loads(source.read_text(encoding="utf-8"))
        paths[split] = out_dir / f"{split}_detection_{scheme}.json"
        _write_json(paths[split], _detection_json(scenes, scheme=scheme, image_size=image_size, split=split,
                                                  source=source))
    return paths
