"""What bf16 changes in a trained model's predictions: the Predictor in float32 and in bf16 on the same
images and referring expressions, compared query by query.

    python bench/bf16_agreement.py mdetr_lite_shapes --ann runs/shapes_valonly/val.json \\
        --images runs/shapes_valonly/images --output runs/bf16_agreement.json

Both runs are what users get from ``Predictor.from_checkpoint(..., dtype=...)`` (the inference copy; for
bf16, bf16 autocast over bf16-stored weights) at the checkpoint's evaluation size, on the same resized
batches. Every expression of ``--dataset-name`` in the annotation file (COCO-style refexp: images with a
``caption``, the referred box in their first annotation) is run once per dtype, and for each query of
each expression the script compares the two predictions directly:

- scores (``1 - p(no object)``): absolute difference over all queries, and for each dtype's top query;
- boxes: the largest absolute coordinate difference, in pixels of the original image, over the queries
  float32 scores above ``--confident`` (the boxes a user sees) and for float32's top query;
- the top query: whether bf16 picks the same one, whether its box overlaps float32's top box (IoU >= 0.5),
  and precision@1 of each (a hit: GIoU >= 0.5 with the referred box, the refexp evaluator's criterion),
  with the expressions that go from hit to miss and back.

With ``--compile`` the bf16 Predictor is ``compile=True``'s (``torch.compile`` with frozen weights, the
fused and packed oneDNN kernels), still against the float32 Predictor as users get it by default.

``mdetr evaluate --amp bf16`` gives the dataset metrics through the evaluation loader (BENCHMARKS.md,
section 7); this script runs the Predictor's own resizing, so its precision@1 can differ from that by a
few expressions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mdetr.inference.postprocess import post_process
from mdetr.inference.predictor import Predictor, open_image
from mdetr.ops.boxes import box_iou, box_xywh_to_xyxy, generalized_box_iou


def expressions(annotations: dict, dataset_name: str) -> list[tuple[str, str, list[float]]]:
    """(file name, caption, referred xywh box) for every image entry of ``dataset_name``; each must have
    exactly one annotation, the referred box (as ``RefExpEvaluator`` requires)."""
    referred: dict[int, list[list[float]]] = {}
    for ann in annotations["annotations"]:
        referred.setdefault(ann["image_id"], []).append(ann["bbox"])
    found = []
    for image in annotations["images"]:
        if image.get("dataset_name") != dataset_name:
            continue
        boxes = referred.get(image["id"], [])
        if len(boxes) != 1:
            raise ValueError(f"image entry {image['id']} ({image['file_name']}) has {len(boxes)} "
                             "annotations; a referring expression has exactly one")
        found.append((image["file_name"], image["caption"], boxes[0]))
    return found


def quantiles(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    q = torch.quantile(values, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"median": q[0].item(), "p90": q[1].item(), "p99": q[2].item(), "max": values.max().item(),
            "mean": values.mean().item()}


@torch.no_grad()
def compare(predictors: dict[str, Predictor], items: list[tuple[str, str, list[float]]], root: Path, *,
            batch_size: int, confident: float) -> dict:
    score_all, score_top, box_confident, box_top = [], [], [], []
    same_query = overlap = 0
    hits = {name: 0 for name in predictors}
    flips = {"hit_to_miss": 0, "miss_to_hit": 0}
    processor = predictors["float32"].processor
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        inputs = processor([open_image(root / f) for f, _, _ in chunk], [c for _, c, _ in chunk])
        results = {}
        for name, predictor in predictors.items():
            outputs = predictor._forward(inputs["pixel_values"], inputs["pixel_mask"], inputs["captions"])
            results[name] = post_process(outputs, inputs["target_sizes"])
        for i, (_, _, target) in enumerate(chunk):
            full, half = results["float32"][i], results["bfloat16"][i]
            score_all.append((full["scores"] - half["scores"]).abs())
            top_full, top_half = int(full["scores"].argmax()), int(half["scores"].argmax())
            score_top.append((full["scores"][top_full] - half["scores"][top_full]).abs().view(1))
            box_diff = (full["boxes"] - half["boxes"]).abs().amax(dim=-1)  # (Q,) largest coordinate
            box_confident.append(box_diff[full["scores"] > confident])
            box_top.append(box_diff[top_full].view(1))
            same_query += top_full == top_half
            overlap += box_iou(full["boxes"][top_full][None], half["boxes"][top_half][None])[0][0, 0] >= 0.5
            referred = box_xywh_to_xyxy(torch.tensor([target], dtype=torch.float32))
            hit = {name: bool(generalized_box_iou(results[name][i]["boxes"][top][None], referred)[0, 0]
                              >= 0.5) for name, top in (("float32", top_full), ("bfloat16", top_half))}
            for name in hits:
                hits[name] += hit[name]
            flips["hit_to_miss"] += hit["float32"] and not hit["bfloat16"]
            flips["miss_to_hit"] += hit["bfloat16"] and not hit["float32"]
    n = len(items)
    return {
        "expressions": n,
        "precision_at_1": {name: 100 * h / n for name, h in hits.items()},
        "top_query": {"same": int(same_query), "boxes_overlap_iou_0.5": int(overlap), **flips},
        "score_abs_diff": {"all_queries": quantiles(torch.cat(score_all)),
                           "float32_top_query": quantiles(torch.cat(score_top))},
        "box_max_abs_diff_px": {f"queries_scored_above_{confident:g}": quantiles(torch.cat(box_confident)),
                                "float32_top_query": quantiles(torch.cat(box_top)),
                                "confident_queries": sum(len(b) for b in box_confident)},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder or bundled model name")
    parser.add_argument("--ann", type=Path, required=True, help="COCO-style refexp annotation file")
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--dataset-name", default="shapes_refexp",
                        help="the images' dataset_name to keep (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--confident", type=float, default=0.5,
                        help="box differences are taken over queries float32 scores above this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="compile the bf16 Predictor")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    items = expressions(json.loads(args.ann.read_text()), args.dataset_name)
    if not items:
        parser.error(f"{args.ann}: no image entry with dataset_name {args.dataset_name!r}")
    predictors = {"float32": Predictor.from_checkpoint(args.checkpoint, dtype="float32"),
                  "bfloat16": Predictor.from_checkpoint(args.checkpoint, dtype="bfloat16",
                                                        compile=args.compile)}
    started = time.perf_counter()
    report = {"checkpoint": args.checkpoint, "annotations": str(args.ann),
              "image_size": predictors["float32"].image_size, "torch": torch.__version__,
              "bf16_compiled": args.compile,
              **compare(predictors, items, args.images, batch_size=args.batch_size, confident=args.confident),
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
