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
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mdetr.builder import load
from mdetr.config import load_config
from mdetr.data.collate import collate
from mdetr.data.build import build_dataset
from mdetr.data.shapes import generate_shapes
from mdetr.engine.evaluate import evaluate
from mdetr.engine.train import train
from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator

ROOT = Path(__file__).resolve().parents[1]


def evaluate_split(checkpoint: Path, data_dir: Path, split: str) -> dict:
    model = load(checkpoint)
    dataset = build_dataset(model.train_config.data, "val", model.tokenizer, ann_file=data_dir / f"{split}.json",
                            image_root=data_dir / "images")
    evaluators = {"refexp": RefExpEvaluator(dataset.ground_truth, dataset_names=["shapes_refexp"]),
                  "box_ap": CocoBoxEvaluator(dataset.ground_truth)}
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate)
    return evaluate(model, loader, evaluators)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--output", default="runs/bench_shapes")
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--num-val-unseen", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="threads per training process")
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel training processes (torchrun, gloo); each takes data.batch_size")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    data_dir = out / "shapes"
    if not (data_dir / "val_unseen.json").exists():
        generate_shapes(data_dir, seed=0, num_train=args.num_train, num_val=args.num_val,
                        num_val_unseen=args.num_val_unseen, progress=True)
    overrides = [
        f"data.train_ann={data_dir / 'train.json'}", f"data.train_images={data_dir / 'images'}",
        f"data.val_ann={data_dir / 'val.json'}", f"data.val_images={data_dir / 'images'}",
        f"train.output_dir={out / 'train'}", f"train.max_minutes={args.minutes}", f"train.threads={args.threads}",
        *args.overrides,
    ]
    preset = ROOT / "configs" / "mdetr_lite_shapes.yaml"
    started = time.monotonic()
    if args.processes > 1:
        # torchrun starts the processes; the CLI trains data-parallel under it (mdetr.engine.distributed).
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={args.processes}", "-m", "mdetr.cli", "train", "--config", str(preset),
                        "--no-progress", *overrides], check=True)
    else:
        train(load_config(preset, overrides))
    wall = (time.monotonic() - started) / 60
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    steps = max((r["step"] for r in log if "step" in r), default=0)
    epochs = sum(1 for r in log if r["type"] == "eval")
    curve = [{"epoch": r["epoch"], "minutes": round(r["minutes"], 2), "P@1": r["P@1"]} for r in log if r["type"] == "eval"]
    best = out / "train" / "best"
    report = {
        "command": "python bench/train_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "processes": args.processes, "torch": torch.__version__},
        "train_wall_minutes": round(wall, 2),
        "epochs": epochs,
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
