"""Where a shapes grounding model fails: precision@1 of expressions with and without a spatial relation, and
which object the top box lands on when a relation expression is missed.

Relation expressions are split by whether the relation is needed: the words of the referred phrase before
the relation ("the circle" in "the circle left of the shiny square") match other objects of the scene too
("relation needed"), or the target alone ("relation redundant"). For the first group the report adds the
precision@1 of a uniform choice among the objects those words match: a model that reads the words but
ignores the relation scores about that.

    python bench/refexp_errors.py mdetr_lite_shapes --data runs/bench_shapes_qa/shapes --split val

Runs the model (bf16 ``Predictor`` at the checkpoint's evaluation size) on every referring expression of the
split, takes the top box (a hit: GIoU >= 0.5 with the referred box, the evaluator's criterion) and matches a
missed box to the scene's objects (``{split}_scenes.json``, IoU >= 0.5): another object of the target's
shape, an object of the shape named after the relation, another object, or no object at all. The model runs
through the ``Predictor`` (its own resizing) rather than the evaluation loader, so the totals can differ from
``mdetr evaluate`` by a few expressions.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

import torch

from mdetr.data.shapes import COLORS, MATERIAL_WORDS, SHAPES, SIZES
from mdetr.data.shapes_qa import matching, objects_from_scene
from mdetr.inference.predictor import Predictor
from mdetr.ops.boxes import box_iou, box_xywh_to_xyxy, generalized_box_iou

RELATION = re.compile(r"\b(left of|right of|above|below)\b")
# Each word of a generated phrase that names an attribute, and the attribute it names.
ATTRIBUTE_WORDS = {
    **{w: ("size", w) for w in SIZES}, **{w: ("color", w) for w in COLORS},
    **{w: ("material", m) for m, words in MATERIAL_WORDS.items() for w in words},
    **{w: ("shape", w) for w in SHAPES},
}


def phrase_filter(phrase: str) -> dict[str, str]:
    """The attribute values the words of a generated ``phrase`` name ({"color": "red", "shape": "circle"})."""
    return dict(ATTRIBUTE_WORDS[w] for w in phrase.split() if w in ATTRIBUTE_WORDS)


def _pair(a: list[float], b: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return box_xywh_to_xyxy(torch.tensor([a])), box_xywh_to_xyxy(torch.tensor([b]))


def iou_xywh(a: list[float], b: list[float]) -> float:
    return box_iou(*_pair(a, b))[0][0, 0].item()


def giou_xywh(a: list[float], b: list[float]) -> float:
    return generalized_box_iou(*_pair(a, b))[0, 0].item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder or bundled model name")
    parser.add_argument("--data", required=True,
                        help="shapes folder (with {split}.json and {split}_scenes.json)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    root = Path(args.data)
    data = json.loads((root / f"{args.split}.json").read_text())
    scene_list = json.loads((root / f"{args.split}_scenes.json").read_text())
    scenes = {s["file_name"]: s["objects"] for s in scene_list}
    shape_objects = {s["file_name"]: objects_from_scene(s) for s in scene_list}
    referred = {a["image_id"]: a["bbox"] for a in data["annotations"]}
    spans = {a["image_id"]: a["tokens_positive"][0] for a in data["annotations"]}
    predictor = Predictor.from_checkpoint(args.checkpoint, dtype="bfloat16")
    totals, hits, misses = collections.Counter(), collections.Counter(), collections.Counter()
    chance = collections.Counter()
    for image in data["images"]:
        if image["dataset_name"] != "shapes_refexp":
            continue
        text, objects, target_box = image["caption"], scenes[image["file_name"]], referred[image["id"]]
        target = max(objects, key=lambda o: iou_xywh(o["bbox"], target_box))
        (x0, y0, x1, y1), = predictor.predict(root / "images" / image["file_name"], text, threshold=0.0,
                                              top_k=1).boxes[:1].tolist()
        box = [x0, y0, x1 - x0, y1 - y0]
        relation = RELATION.search(text)
        group = "plain"
        if relation:
            begin, end = spans[image["id"]]
            candidates = len(matching(shape_objects[image["file_name"]], phrase_filter(text[begin:end])))
            group = "relation needed" if candidates > 1 else "relation redundant"
            chance[group] += 1 / candidates
        totals[group] += 1
        if giou_xywh(box, target_box) >= 0.5:
            hits[group] += 1
            continue
        if not relation:
            continue
        landed = max(objects, key=lambda o: iou_xywh(o["bbox"], box))
        if iou_xywh(landed["bbox"], box) < 0.5:
            misses["no object"] += 1
        elif landed["shape"] == target["shape"]:
            misses["another object of the target's shape"] += 1
        elif landed["shape"] in text[relation.end():]:
            misses["an object of the shape named after the relation"] += 1
        else:
            misses["another object"] += 1
    totals["relation (all)"] = totals["relation needed"] + totals["relation redundant"]
    hits["relation (all)"] = hits["relation needed"] + hits["relation redundant"]
    report = {"split": args.split,
              "precision_at_1": {g: {"expressions": totals[g], "P@1": round(100 * hits[g] / totals[g], 1)}
                                 for g in totals if totals[g]},
              "uniform_choice_P@1": {g: round(100 * chance[g] / totals[g], 1) for g in chance},
              "missed_relation_expressions": dict(misses.most_common())}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
