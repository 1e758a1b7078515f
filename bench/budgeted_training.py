"""The training part shared by the shapes benchmarks: one preset trained under a wall-clock budget, in this
process or data-parallel under ``torchrun``, and its learning curve read back from ``log.jsonl``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mdetr.builder import load
from mdetr.config import load_config
from mdetr.data.build import build_dataset
from mdetr.data.shapes import generate_shapes
from mdetr.engine.train import train


def add_shapes_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every shapes benchmark takes: the generated set's size, the training processes and
    threads, and free ``section.key=value`` overrides."""
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--num-val-unseen", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="threads per training process")
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel training processes (torchrun, gloo); each takes data.batch_size")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")


def ensure_shapes(data_dir: Path, args: argparse.Namespace) -> None:
    """Generate the shapes set (seed 0, the sizes of ``args``) into ``data_dir`` unless it is there."""
    if not (data_dir / "val_unseen_scenes.json").exists():
        generate_shapes(data_dir, seed=0, num_train=args.num_train, num_val=args.num_val,
                        num_val_unseen=args.num_val_unseen, progress=True)


def load_split(checkpoint: Path, data_dir: Path, ann_name: str) -> tuple:
    """A trained checkpoint and the evaluation dataset of ``data_dir/ann_name`` read with its config."""
    model = load(checkpoint)
    dataset = build_dataset(model.train_config.data, "val", model.tokenizer, ann_file=data_dir / ann_name,
                            image_root=data_dir / "images")
    return model, dataset


def train_budgeted(preset: Path, overrides: list[str], *, processes: int = 1) -> float:
    """Train ``preset`` with ``overrides``; returns the wall time in minutes. With ``processes`` > 1,
    ``torchrun`` starts that many data-parallel processes running the CLI (mdetr.engine.distributed)."""
    started = time.monotonic()
    if processes > 1:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={processes}", "-m", "mdetr.cli", "train", "--config", str(preset),
                        "--no-progress", *overrides], check=True)
    else:
        train(load_config(preset, overrides))
    return (time.monotonic() - started) / 60


def learning_curve(train_dir: Path, metric: str) -> tuple[int, list[dict]]:
    """The last logged step and ``[{"epoch", "minutes", metric}, ...]`` of every evaluation in a run's log."""
    log = [json.loads(line) for line in (train_dir / "log.jsonl").read_text().splitlines()]
    steps = max((r["step"] for r in log if "step" in r), default=0)
    curve = [{"epoch": r["epoch"], "minutes": round(r["minutes"], 2), metric: r[metric]}
             for r in log if r["type"] == "eval"]
    return steps, curve
