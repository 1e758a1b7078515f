"""CLEVR-style questions and answers about the synthetic shapes scenes (MDETR Section 4.4 on shapes).

:func:`generate_shapes_qa` reads the scenes that :func:`mdetr.data.shapes.generate_shapes` wrote
(``{split}_scenes.json``) and writes ``{split}_qa.json`` next to them, in the MDETR CLEVR format: one image
entry per question, sharing the scene's PNG, with the question as ``caption``, its ``answer``, its family as
``question_type``, and one annotation per object the question mentions, whose ``tokens_positive`` are the
spans of the phrases that mention it. So the detection losses still apply to QA training.

The five families of the CLEVR paper's breakdown (MDETR Table 1):

* ``exist``: "are there any red circles?" -> yes / no; boxes: the matching objects;
* ``count``: "how many large things are there?" -> "0" .. "10"; boxes: the counted objects;
* ``compare_number``: "are there more red things than stars?" (more / fewer / same number) -> yes / no;
  boxes: both sets, each with its own phrase;
* ``query_attribute``: "what color is the large star?" (color / shape / size / material) -> an attribute
  word; box: the object, described uniquely without the queried attribute;
* ``compare_attribute``: "is the red circle the same size as the blue star?" -> yes / no; boxes: both
  objects, each described uniquely without the compared attribute.

:func:`export_gqa_format` and :func:`export_clevr_format` also write the questions in the original GQA
(questions, scene graphs, JPEG images) and CLEVR v1.0 (questions with programs) layouts, so the GQA and
CLEVR readers and tasks run end to end on the shapes scenes.

Every yes / no template is answer-balanced, as CLEVR's generator balances each template's answers by
rejection sampling: for every exist question, every comparison (more / fewer / same number) and every
compared attribute, the generator asks for the answer that template has had less often so far in the
split, and draws questions until one has it. Without it the words would give most answers away (two
objects share a size or a material about half the time but a colour one time in eight, so "the same
colour?" would mostly be "no" and "the same size?" mostly "yes"), and a model could score well without
comparing anything.

Every entry also carries ``program``: the filters (attribute -> value, canonical words) and the family's
parameters, from which the answer follows by brute force over the scene's objects (:func:`answer_program`).
Attribute answers come from :data:`SHAPES_QA_ATTRIBUTES` (CLEVR's answer list with the shapes set's six
shapes in place of cube / sphere / cylinder): a model trained on it sets ``model.qa_attributes`` to it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mdetr.data.shapes import COLORS, MATERIAL_WORDS, MATERIALS, SHAPES, SIZES, SPLITS, ShapeObject

FAMILIES: tuple[str, ...] = ("count", "exist", "compare_number", "query_attribute", "compare_attribute")
"""The question families, in the order of the CLEVR accuracy table."""
SHAPES_QA_ATTRIBUTES: tuple[str, ...] = (*SIZES, *COLORS, *SHAPES, *MATERIALS)
"""The attribute answers, ordered as CLEVR's (sizes, colours, shapes, materials)."""
ATTRIBUTES: tuple[str, ...] = ("size", "color", "material", "shape")
DATASET_NAME = "shapes_qa"

_ATTRIBUTE_NOUNS = {"size": "size", "color": "color", "material": "material", "shape": "shape"}
_COUNT_TEMPLATES = ("how many {pl} are there?", "what number of {pl} are there?",
                    "how many {pl} are in the picture?")
_EXIST_TEMPLATES = ("are there any {pl}?", "is there {sg}?", "are any {pl} visible?")
_COMPARE_NUMBER_TEMPLATES = {
    "more": ("are there more {a} than {b}?",),
    "fewer": ("are there fewer {a} than {b}?",),
    "equal": ("are there the same number of {a} and {b}?",
              "is the number of {a} the same as the number of {b}?"),
}
_QUERY_TEMPLATES = {
    "color": ("what color is {x}?", "what is the color of {x}?"),
    "shape": ("what shape is {x}?", "what is the shape of {x}?"),
    "size": ("what size is {x}?", "how big is {x}?"),
    "material": ("what material is {x}?", "what is {x} made of?"),
}
_COMPARE_ATTRIBUTE_TEMPLATES = ("is {x} the same {attr} as {y}?", "does {x} have the same {attr} as {y}?",
                                "are {x} and {y} the same {attr}?")
YES_NO_FAMILIES: tuple[str, ...] = ("exist", "compare_number", "compare_attribute")
"""The families answered yes or no, whose answers are balanced per template."""
COMPARISONS: tuple[str, ...] = ("more", "fewer", "equal")
_TEMPLATE_PARAMETERS = {"compare_number": COMPARISONS, "query_attribute": ATTRIBUTES,
                        "compare_attribute": ATTRIBUTES}
"""The families with a template parameter (comparison or attribute), and its values."""
_SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}

Filter = dict[str, str]
Group = tuple[tuple[int, int], tuple[int, ...]]


def objects_from_scene(scene: dict[str, Any]) -> list[ShapeObject]:
    """The :class:`ShapeObject` list of one record of ``{split}_scenes.json``."""
    return [ShapeObject(o["shape"], o["color"], o["size"], o["material"], float(o["x"]), float(o["y"]),
                        float(o["radius"])) for o in scene["objects"]]


def matching(objects: Sequence[ShapeObject], filt: Filter) -> tuple[int, ...]:
    """Indices of the objects whose attributes have every value of ``filt``."""
    return tuple(i for i, o in enumerate(objects) if all(o.attribute(a) == v for a, v in filt.items()))


def answer_program(objects: Sequence[ShapeObject], program: dict[str, Any]) -> str:
    """The answer to a question's ``program`` over the scene's objects (brute force, no text involved)."""
    family = program["family"]
    sets = [matching(objects, f) for f in program["filters"]]
    if family == "count":
        return str(len(sets[0]))
    if family == "exist":
        return "yes" if sets[0] else "no"
    if family == "compare_number":
        a, b = len(sets[0]), len(sets[1])
        holds = {"more": a > b, "fewer": a < b, "equal": a == b}[program["comparison"]]
        return "yes" if holds else "no"
    if any(len(s) != 1 for s in sets):
        raise ValueError(f"the program {program} does not single out one object per filter")
    attribute = program["attribute"]
    if family == "query_attribute":
        return objects[sets[0][0]].attribute(attribute)
    if family == "compare_attribute":
        same = objects[sets[0][0]].attribute(attribute) == objects[sets[1][0]].attribute(attribute)
        return "yes" if same else "no"
    raise ValueError(f"unknown question family {family!r}; known: {', '.join(FAMILIES)}")


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _phrase(filt: Filter, rng: np.random.Generator, *, plural: bool) -> str:
    """Words in CLEVR order (size, colour, material, shape), "thing" / "object" when no shape is named."""
    words = [filt["size"]] if "size" in filt else []
    if "color" in filt:
        words.append(filt["color"])
    if "material" in filt:
        words.append(_choice(rng, MATERIAL_WORDS[filt["material"]]))
    noun = filt.get("shape") or _choice(rng, ("thing", "object"))
    words.append(noun + ("s" if plural else ""))
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _filter_of(obj: ShapeObject, attributes: Sequence[str]) -> Filter:
    return {a: obj.attribute(a) for a in attributes}


def _random_filter(objects: Sequence[ShapeObject], rng: np.random.Generator, *, from_scene: bool) -> Filter:
    """One or two attribute constraints, read off a scene object or (``from_scene`` False) drawn at random."""
    names = [ATTRIBUTES[int(i)] for i in rng.choice(len(ATTRIBUTES), size=int(rng.integers(1, 3)),
                                                   replace=False)]
    if from_scene:
        return _filter_of(_choice(rng, objects), names)
    values = {"size": SIZES, "color": tuple(COLORS), "material": MATERIALS, "shape": SHAPES}
    return {a: _choice(rng, values[a]) for a in names}


def _unique_filter(objects: Sequence[ShapeObject], target: int, rng: np.random.Generator, *,
                   without: str) -> Filter | None:
    """The shortest description (1 to 3 attributes, never ``without``) that matches ``target`` alone."""
    allowed = [a for a in ATTRIBUTES if a != without]
    for k in range(1, len(allowed) + 1):
        found = [s for s in itertools.combinations(allowed, k)
                 if matching(objects, _filter_of(objects[target], s)) == (target,)]
        if found:
            return _filter_of(objects[target], _choice(rng, found))
    return None


def _fill(template: str, **phrases: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """The template with its ``{name}`` slots filled, and each slot's character span in the result."""
    text, spans, rest = "", {}, template
    while "{" in rest:
        before, _, after = rest.partition("{")
        name, _, rest = after.partition("}")
        text += before
        spans[name] = (len(text), len(text) + len(phrases[name]))
        text += phrases[name]
    return text + rest, spans


def make_question(objects: Sequence[ShapeObject], family: str, rng: np.random.Generator, *,
                  answer: str | None = None, template: str | None = None,
                  tries: int = 30) -> tuple[str, dict[str, Any], tuple[Group, ...]] | None:
    """(question, program, groups) of one family for a scene, or None when the scene allows none.

    ``groups`` pairs each mentioned phrase's character span with the objects it refers to. ``template`` is
    the comparison of ``compare_number`` or the attribute of ``query_attribute`` / ``compare_attribute``
    (drawn when None). For the yes / no families, ``answer`` ("yes" / "no") asks for a question with that
    answer: up to ``tries`` questions of the template are drawn until one has it (None if none does).
    """
    if answer not in (None, "yes", "no"):
        raise ValueError(f"answer must be 'yes', 'no' or None, got {answer!r}")
    if family in ("count", "exist"):
        for _ in range(tries if family == "exist" else 1):
            from_scene = family == "count" or (rng.random() < 0.5 if answer is None else answer == "yes")
            filt = _random_filter(objects, rng, from_scene=from_scene)
            members = matching(objects, filt)
            if family == "exist" and answer is not None and bool(members) != (answer == "yes"):
                continue
            plural = _phrase(filt, rng, plural=True)
            words = _choice(rng, _COUNT_TEMPLATES if family == "count" else _EXIST_TEMPLATES)
            text, spans = _fill(words, pl=plural, sg=_article(_phrase(filt, rng, plural=False)))
            span = spans.get("pl") or spans["sg"]
            return text, {"family": family, "filters": [filt]}, ((span, members),)
        return None
    if family == "compare_number":
        comparison = template or _choice(rng, _TEMPLATE_PARAMETERS[family])
        for _ in range(tries):
            first = _random_filter(objects, rng, from_scene=True)
            second = _random_filter(objects, rng, from_scene=True)
            if first == second:
                continue
            program = {"family": family, "filters": [first, second], "comparison": comparison}
            if answer is not None and answer_program(objects, program) != answer:
                continue
            text, spans = _fill(_choice(rng, _COMPARE_NUMBER_TEMPLATES[comparison]),
                                a=_phrase(first, rng, plural=True), b=_phrase(second, rng, plural=True))
            return text, program, ((spans["a"], matching(objects, first)),
                                   (spans["b"], matching(objects, second)))
        return None
    if family == "query_attribute":
        attribute = template or _choice(rng, _TEMPLATE_PARAMETERS[family])
        for target in rng.permutation(len(objects)):
            filt = _unique_filter(objects, int(target), rng, without=attribute)
            if filt is not None:
                text, spans = _fill(_choice(rng, _QUERY_TEMPLATES[attribute]),
                                    x="the " + _phrase(filt, rng, plural=False))
                program = {"family": family, "filters": [filt], "attribute": attribute}
                return text, program, ((spans["x"], (int(target),)),)
        return None
    if family == "compare_attribute":
        attribute = template or _choice(rng, _TEMPLATE_PARAMETERS[family])
        for first in rng.permutation(len(objects)):
            first = int(first)
            value = objects[first].attribute(attribute)
            pool = [i for i in range(len(objects)) if i != first
                    and (answer is None or (objects[i].attribute(attribute) == value) == (answer == "yes"))]
            for second in rng.permutation(pool):
                second = int(second)
                x = _unique_filter(objects, first, rng, without=attribute)
                y = _unique_filter(objects, second, rng, without=attribute)
                if x is None or y is None:
                    continue
                text, spans = _fill(_choice(rng, _COMPARE_ATTRIBUTE_TEMPLATES),
                                    x="the " + _phrase(x, rng, plural=False),
                                    y="the " + _phrase(y, rng, plural=False),
                                    attr=_ATTRIBUTE_NOUNS[attribute])
                program = {"family": family, "filters": [x, y], "attribute": attribute}
                return text, program, ((spans["x"], (first,)), (spans["y"], (second,)))
        return None
    raise ValueError(f"unknown question family {family!r}; known: {', '.join(FAMILIES)}")


def scene_questions(objects: Sequence[ShapeObject], rng: np.random.Generator, *, count: int,
                    answers: dict[tuple[str, str], dict[str, int]] | None = None,
                    ) -> list[tuple[str, str, dict[str, Any], tuple[Group, ...]]]:
    """Up to ``count`` distinct (question, answer, program, groups) for a scene, families drawn evenly.

    ``answers`` counts the yes / no answers given so far per template, ``(family, comparison or
    attribute)`` (``(family, "")`` for exist), across the scenes of a split; each yes / no question asks
    for the answer its template has had less often (even odds on a tie), and the count is updated. Alone,
    a scene draws each answer at even odds.
    """
    answers = {} if answers is None else answers
    found: list[tuple[str, str, dict[str, Any], tuple[Group, ...]]] = []
    seen: set[str] = set()
    for _ in range(8 * count):
        if len(found) == count:
            break
        family = _choice(rng, FAMILIES)
        template = _choice(rng, _TEMPLATE_PARAMETERS[family]) if family in _TEMPLATE_PARAMETERS else None
        wanted = None
        if family in YES_NO_FAMILIES:
            tally = answers.setdefault((family, template or ""), {"yes": 0, "no": 0})
            wanted = (_choice(rng, ("yes", "no")) if tally["yes"] == tally["no"]
                      else min(tally, key=tally.__getitem__))
        made = make_question(objects, family, rng, answer=wanted, template=template)
        if made is None or made[0] in seen:
            continue
        text, program, groups = made
        seen.add(text)
        answer = answer_program(objects, program)
        if wanted is not None:
            answers[family, template or ""][answer] += 1
        found.append((text, answer, program, groups))
    return found


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The question generator of one scene, independent of the layout / rendering / caption ones."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index, 0x51A]))


def _qa_json(split: str, scenes: list[dict[str, Any]], *, seed: int, image_size: int,
             questions_per_scene: int, progress: bool) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    answers: dict[tuple[str, str], dict[str, int]] = {}  # yes / no per template, balanced over the split
    for scene in tqdm(scenes, desc=f"shapes qa {split}", disable=not progress):
        objects = objects_from_scene(scene)
        rng = _scene_rng(seed, split, int(scene["index"]))
        for text, answer, program, groups in scene_questions(objects, rng, count=questions_per_scene,
                                                             answers=answers):
            image_id = len(images) + 1
            images.append({
                "id": image_id, "file_name": scene["file_name"], "height": image_size, "width": image_size,
                "caption": text, "dataset_name": DATASET_NAME, "tokens_negative": [],
                "original_id": int(scene["index"]), "questionId": image_id, "answer": answer,
                "question_type": program["family"], "program": program,
            })
            spans_of: dict[int, list[list[int]]] = {}
            for span, members in groups:
                for member in members:
                    spans_of.setdefault(member, []).append(list(span))
            for member in sorted(spans_of):
                record = scene["objects"][member]
                bbox = record["bbox"]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0, "category_id": 1,
                    "tokens_positive": spans_of[member], "object_index": member,
                    **{a: record[a] for a in ATTRIBUTES},
                })
    return {
        "info": {"description": f"mdetr synthetic shapes questions, split {split}", "version": "1.0",
                 "seed": seed, "families": list(FAMILIES), "attributes": list(SHAPES_QA_ATTRIBUTES)},
        "licenses": [], "images": images, "annotations": annotations,
        "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
    }


def generate_shapes_qa(out_dir: str | Path, *, seed: int = 0, questions_per_scene: int = 4,
                       splits: Sequence[str] = SPLITS, progress: bool = False) -> dict[str, Path]:
    """Write ``{split}_qa.json`` for every split whose ``{split}_scenes.json`` is in ``out_dir``.

    Returns ``{split: path}``. The same scenes, seed and count give byte-identical files.
    """
    out_dir = Path(out_dir)
    if questions_per_scene < 1:
        raise ValueError(f"questions_per_scene must be at least 1, got {questions_per_scene}")
    meta_file = out_dir / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: generate the scenes first "
                                f"(mdetr data shapes {out_dir})")
    image_size = int(json.loads(meta_file.read_text(encoding="utf-8"))["image_size"])
    for split in splits:  # every split checked before any file is rewritten
        scenes_file = out_dir / f"{split}_scenes.json"
        if not scenes_file.is_file():
            raise FileNotFoundError(f"{scenes_file} not found: generate the scenes first "
                                    f"(mdetr data shapes {out_dir})")
    paths: dict[str, Path] = {}
    for split in splits:
        scenes = json.loads((out_dir / f"{split}_scenes.json").read_text(encoding="utf-8"))
        payload = _qa_json(split, scenes, seed=seed, image_size=image_size,
                           questions_per_scene=questions_per_scene, progress=progress)
        paths[split] = out_dir / f"{split}_qa.json"
        paths[split].write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------- the original formats

# GQA (semantic, structural) type of each family in the GQA-format export, so that every GQA answer head has
# questions: existence is an object question ("obj"), a comparison of two groups stands for the relation
# questions ("rel"), counts are the "global" ones (GQA has no counting), attributes "attr", and a queried
# shape is a category ("cat").
GQA_TYPES_OF_FAMILY = {"exist": ("obj", "verify"), "count": ("global", "query"),
                       "compare_number": ("rel", "logical"), "compare_attribute": ("attr", "compare"),
                       "query_attribute": ("attr", "query")}
_COMPARISON_FUNCTIONS = {"more": "greater_than", "fewer": "less_than", "equal": "equal_integer"}


def _qa_files(out_dir: Path, splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    files = {}
    for split in splits:
        path = out_dir / f"{split}_qa.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: generate the questions first "
                                    f"(mdetr data shapes {out_dir} --qa)")
        files[split] = json.loads(path.read_text(encoding="utf-8"))
    return files


def _word_range(caption: str, span: Sequence[int]) -> str:
    """GQA's annotation key (``"i"`` or ``"i:j"``, words i..j-1) of the words a character span covers."""
    from mdetr.data.gqa import word_spans

    words = [k for k, (beg, end) in enumerate(word_spans(caption)) if beg < span[1] and span[0] < end]
    return str(words[0]) if len(words) == 1 else f"{words[0]}:{words[-1] + 1}"


def _gqa_types(entry: dict[str, Any]) -> tuple[str, str]:
    program = entry["program"]
    semantic, structural = GQA_TYPES_OF_FAMILY[program["family"]]
    if program["family"] == "query_attribute" and program["attribute"] == "shape":
        semantic = "cat"
    return semantic, structural


def export_gqa_format(out_dir: str | Path, *, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """The shapes questions in the original GQA layout, under ``out_dir/gqa``: ``questions/{split}_balanced_
    questions.json``, ``sceneGraphs/{split}_sceneGraphs.json`` and ``images/{imageId}.jpg`` (JPEG copies).

    Question ids are ``{split index}{entry id:06d}``, image ids ``{split}_{scene index:06d}``; each question's
    ``annotations.question`` maps the words of every phrase to the objects it mentions, and the semantic and
    structural types follow :data:`GQA_TYPES_OF_FAMILY`. GQA's annotations map a word range to one object,
    so a phrase naming several objects (a plural, as in "how many red things") keeps only one of them.
    Returns ``{split: questions file}``.
    """
    out_dir, root = Path(out_dir), Path(out_dir) / "gqa"
    for folder in ("questions", "sceneGraphs", "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, data in _qa_files(out_dir, splits).items():
        scene_list = json.loads((out_dir / f"{split}_scenes.json").read_text(encoding="utf-8"))
        scenes = {s["index"]: s for s in scene_list}
        boxes: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            boxes.setdefault(ann["image_id"], []).append(ann)
        questions, graphs = {}, {}
        for entry in data["images"]:
            scene = scenes[entry["original_id"]]
            image_id = f"{split}_{scene['index']:06d}"
            if image_id not in graphs:
                graphs[image_id] = _scene_graph(scene, entry["width"], entry["height"])
                _jpeg_copy(out_dir / "images" / scene["file_name"], root / "images" / f"{image_id}.jpg")
            semantic, structural = _gqa_types(entry)
            mentions = {_word_range(entry["caption"], span): str(ann["object_index"])
                        for ann in boxes.get(entry["id"], []) for span in ann["tokens_positive"]}
            questions[f"{_SPLIT_CODES[split]}{entry['id']:06d}"] = {
                "imageId": image_id, "question": entry["caption"], "answer": entry["answer"],
                "isBalanced": True, "annotations": {"question": mentions, "answer": {}, "fullAnswer": {}},
                "types": {"semantic": semantic, "structural": structural,
                          "detailed": entry["program"]["family"]},
            }
        paths[split] = root / "questions" / f"{split}_balanced_questions.json"
        paths[split].write_text(json.dumps(questions), encoding="utf-8")
        (root / "sceneGraphs" / f"{split}_sceneGraphs.json").write_text(json.dumps(graphs), encoding="utf-8")
    return paths


def _scene_graph(scene: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    objects = {}
    for k, obj in enumerate(scene["objects"]):
        x, y, w, h = obj["bbox"]
        objects[str(k)] = {"name": obj["shape"], "x": round(x), "y": round(y), "w": max(1, round(w)),
                           "h": max(1, round(h)), "attributes": [obj["size"], obj["color"], obj["material"]],
                           "relations": []}
    return {"width": width, "height": height, "objects": objects}


def _jpeg_copy(source: Path, target: Path) -> None:
    if not target.is_file():
        from PIL import Image

        with Image.open(source) as image:
            image.convert("RGB").save(target, quality=95)


def _clevr_program(program: dict[str, Any]) -> list[dict[str, Any]]:
    """A CLEVR v1.0 program (``scene`` -> ``filter_*`` ... -> the family's final function) for a shapes
    question's program."""
    nodes: list[dict[str, Any]] = []

    def add(function: str, inputs: list[int], values: Sequence[str] = ()) -> int:
        nodes.append({"function": function, "inputs": inputs, "value_inputs": list(values)})
        return len(nodes) - 1

    def select(filt: dict[str, str]) -> int:
        node = add("scene", [])
        for attribute, value in filt.items():
            node = add(f"filter_{attribute}", [node], [value])
        return node

    family = program["family"]
    sets = [select(f) for f in program["filters"]]
    if family in ("count", "exist"):
        add(family, [sets[0]])
    elif family == "compare_number":
        counts = [add("count", [s]) for s in sets]
        add(_COMPARISON_FUNCTIONS[program["comparison"]], counts)
    elif family == "query_attribute":
        add(f"query_{program['attribute']}", [add("unique", [sets[0]])])
    else:
        add(f"equal_{program['attribute']}", [add("unique", [s]) for s in sets])
    return nodes


def export_clevr_format(out_dir: str | Path, *, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """The shapes questions in the CLEVR v1.0 layout: ``out_dir/clevr/CLEVR_{split}_questions.json``, whose
    ``image_filename`` is relative to ``out_dir/images/{split}`` (CLEVR's ``images/{split}``) and whose
    programs end in the family's CLEVR function (:func:`mdetr.data.clevr.clevr_question_family` finds the
    family again). ``question_family_index`` is the family's index in :data:`FAMILIES`. Returns
    ``{split: questions file}``."""
    out_dir = Path(out_dir)
    (out_dir / "clevr").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, data in _qa_files(out_dir, splits).items():
        questions = [{
            "image_index": entry["original_id"], "image_filename": Path(entry["file_name"]).name,
            "split": split, "question": entry["caption"], "answer": entry["answer"],
            "question_index": position,
            "question_family_index": FAMILIES.index(entry["program"]["family"]),
            "program": _clevr_program(entry["program"]),
        } for position, entry in enumerate(data["images"])]
        paths[split] = out_dir / "clevr" / f"CLEVR_{split}_questions.json"
        info = {"split": split, "version": "1.0"}
        paths[split].write_text(json.dumps({"info": info, "questions": questions}), encoding="utf-8")
    return paths


__all__ = ["FAMILIES", "GQA_TYPES_OF_FAMILY", "SHAPES_QA_ATTRIBUTES", "answer_program", "export_clevr_format",
           "export_gqa_format", "generate_shapes_qa", "make_question", "matching", "objects_from_scene",
           "scene_questions"]
