"""Benchmark: train mdetr_lite on generated shapes on the CPU and report precision@1 on val and val_unseen.

    python bench/train_shapes.py --minutes 60 --output runs/bench_shapes
    python bench/train_shapes.py --minutes 60 --processes 2 --threads 1 ...   # data-parallel, under torchrun

Generates the data (if absent), trains with configs/mdetr_lite_shapes.yaml under a wall-clock budget
(with ``--processes N``, N data-parallel processes started by ``torchrun``, each on ``--threads`` threads),
evaluates the best checkpoint on ``val`` and ``val_unseen`` and writes ``results.json`` with the learning
curve (precision@1 on val after every epoch) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from budgeted_training import (  # bench/, beside this script
    add_shapes_arguments,
    ensure_shapes,
    learning_curve,
    load_split,
    train_budgeted,
    training_split,
)
from torch.utils.data import DataLoader

from mdetr.data.collate import collate
from mdetr.data.shapes import RELATION_FRACTION
from mdetr.engine.evaluate import evaluate
from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator

ROOT = Path(__file__).resolve().parents[1]


def evaluate_split(checkpoint: Path, data_dir: Path, split: str) -> dict:
    model, dataset = load_split(checkpoint, data_dir, f"{split}.json")
    evaluators = {"refexp": RefExpEvaluator(dataset.ground_truth, dataset_names=["shapes_refexp"]),
                  "box_ap": CocoBoxEvaluator(dataset.ground_truth)}
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate)
    return evaluate(model, loader, evaluators)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--output", default="runs/bench_shapes")
    parser.add_argument("--relation-fraction", type=float, default=RELATION_FRACTION,
                        help="train on texts generated with this relation fraction (mdetr data shapes "
                             "--relation-fraction) for the same training scenes; val keeps the default 0.3")
    parser.add_argument("--relation-needed", action="store_true",
                        help="train on texts generated with mdetr data shapes --relation-needed (relations "
                             "that the target's description alone does not make redundant); val unchanged")
    parser.add_argument("--annotate-anchors", action="store_true",
                        help="train on texts generated with mdetr data shapes --annotate-anchors (the anchor "
                             "of every relation boxed too, every box marked is-final or not) with the "
                             "is-final head (model.predict_final=true), ranking boxes by the referring score")
    add_shapes_arguments(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    data_dir = ensure_shapes(out, args)
    train_dir = training_split(data_dir, args.relation_fraction, args.relation_needed, args.annotate_anchors)
    overrides = [
        *(["model.predict_final=true"] if args.annotate_anchors else []),
        f"data.train_ann={train_dir / 'train.json'}", f"data.train_images={train_dir / 'images'}",
        f"data.val_ann={data_dir / 'val.json'}", f"data.val_images={data_dir / 'images'}",
        f"train.output_dir={out / 'train'}", f"train.max_minutes={args.minutes}",
        f"train.threads={args.threads}",
        *args.overrides,
    ]
    preset = ROOT / "configs" / "mdetr_lite_shapes.yaml"
    resume = out / "train" / "last" if args.resume else None
    wall = train_budgeted(preset, overrides, processes=args.processes, resume=resume)
    steps, curve = learning_curve(out / "train", "P@1")
    best = out / "train" / "best"
    report = {
        "command": "python bench/train_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "processes": args.processes, "torch": torch.__version__},
        "train_wall_minutes": round(wall, 2),
        "epochs": len(curve),
        "steps": steps,
        "curve": curve,
        "val": evaluate_split(best, data_dir, "val"),
        "val_unseen": evaluate_split(best, data_dir, "val_unseen"),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("train_wall_minutes", "epochs", "curve")}, indent=2))
    for split in ("val", "val_unseen"):
        r = report[split]["refexp"]["overall"]
        print(f"{split}: P@1 {r['P@1']:.4f}  P@5 {r['P@5']:.4f}  AP50 {report[split]['box_ap']['AP50']:.4f}")
    return report


if __name__ == "__main__":
    main()
