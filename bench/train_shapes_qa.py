"""Benchmark: mdetr_lite answering CLEVR-style questions about the synthetic shapes scenes on the CPU.

    python bench/train_shapes_qa.py --minutes 45 --processes 2 --threads 1 --output runs/bench_shapes_qa

Generates the scenes (if absent) and their questions (``mdetr data shapes --qa``: exist, count, compare
number, query attribute, compare attribute, with the objects each question mentions boxed), then trains the
CLEVR answer heads with ``configs/mdetr_lite_shapes_qa.yaml`` under a wall-clock budget, starting from a
grounding model (``--init``; default: the bundled ``mdetr_lite_shapes``, whose training scenes are the
default ``--data`` scenes), as the official CLEVR recipe starts QA from detection-only training.
With ``--processes N`` N data-parallel processes are started by ``torchrun``, each on ``--threads`` threads.

The best checkpoint (by val accuracy) is then evaluated on the questions of ``val`` and of ``val_unseen``
(scenes with colour-shape pairs that never occur in training), and ``results.json`` records the command,
wall time, the learning curve (answer accuracy on val after every epoch) and accuracy per question family.
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
)
from torch.utils.data import DataLoader

from mdetr.bundled import bundled_model_path
from mdetr.data.collate import collate
from mdetr.data.shapes_qa import generate_shapes_qa
from mdetr.engine.qa import evaluate_qa

ROOT = Path(__file__).resolve().parents[1]


def evaluate_split(checkpoint: Path, data_dir: Path, split: str) -> dict:
    model, dataset = load_split(checkpoint, data_dir, f"{split}_qa.json")
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate)
    return evaluate_qa(model, loader, dataset)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=45.0,
                        help="wall-clock budget the lr schedule runs on; 0 trains train.epochs epochs with "
                             "the schedule on steps (the result then does not depend on the machine's speed)")
    parser.add_argument("--output", default="runs/bench_shapes_qa")
    parser.add_argument("--questions-per-scene", type=int, default=4)
    parser.add_argument("--init", default="mdetr_lite_shapes",
                        help="grounding weights to start from: a checkpoint folder or a bundled model name; "
                             "'none' trains from the pretrained backbone and text encoder only")
    add_shapes_arguments(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    data_dir = ensure_shapes(out, args)
    if not (data_dir / "val_unseen_qa.json").exists():
        generate_shapes_qa(data_dir, seed=0, questions_per_scene=args.questions_per_scene, progress=True)
    overrides = [
        f"data.train_ann={data_dir / 'train_qa.json'}", f"data.train_images={data_dir / 'images'}",
        f"data.val_ann={data_dir / 'val_qa.json'}", f"data.val_images={data_dir / 'images'}",
        f"train.output_dir={out / 'train'}", f"train.threads={args.threads}",
    ]
    if args.minutes > 0:
        overrides.append(f"train.max_minutes={args.minutes}")
    else:
        overrides += ["train.max_minutes=0", "train.schedule_clock=steps"]
    if args.init != "none":
        init = bundled_model_path(args.init) or Path(args.init)
        overrides += [f"train.init_weights={init}", "train.init_allow_new_heads=true"]
    overrides += args.overrides
    preset = ROOT / "configs" / "mdetr_lite_shapes_qa.yaml"
    resume = out / "train" / "last" if args.resume else None
    wall = train_budgeted(preset, overrides, processes=args.processes, resume=resume)
    steps, curve = learning_curve(out / "train", "accuracy")
    best = out / "train" / "best"
    report = {
        "command": "python bench/train_shapes_qa.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "processes": args.processes, "torch": torch.__version__},
        "init": args.init,
        "train_wall_minutes": round(wall, 2),
        "epochs": len(curve),
        "steps": steps,
        "curve": curve,
        "val": evaluate_split(best, data_dir, "val"),
        "val_unseen": evaluate_split(best, data_dir, "val_unseen"),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("train_wall_minutes", "epochs", "steps", "curve")}, indent=2))
    for split in ("val", "val_unseen"):
        qa = report[split]["qa"]
        families = "  ".join(f"{k} {v * 100:.1f}" for k, v in qa.get("per_family", {}).items())
        print(f"{split}: accuracy {qa['accuracy'] * 100:.2f} over {qa['num_questions']} questions "
              f"({families})")
    return report


if __name__ == "__main__":
    main()
