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
from mdetr.data.shapes import RELATION_FRACTION, generate_shapes
from mdetr.engine.train import train


def add_shapes_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every shapes benchmark takes: the generated set's size, the training processes and
    threads, and free ``section.key=value`` overrides."""
    parser.add_argument("--data", default=None,
                        help="a shapes folder to reuse (default: OUTPUT/shapes, generated if absent)")
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--num-val-unseen", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2, help="threads per training process")
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel training processes (torchrun, gloo); each takes data.batch_size")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its last checkpoint (same command otherwise)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")


def ensure_shapes(out: Path, args: argparse.Namespace) -> Path:
    """The shapes folder of ``args.data`` (default ``out/shapes``), generated (seed 0, the sizes of ``args``)
    unless it is there."""
    data_dir = Path(args.data) if args.data else out / "shapes"
    if not (data_dir / "val_unseen_scenes.json").exists():
        generate_shapes(data_dir, seed=0, num_train=args.num_train, num_val=args.num_val,
                        num_val_unseen=args.num_val_unseen, progress=True)
    return data_dir


def training_split(data_dir: Path, relation_fraction: float, relation_needed: bool = False,
                   annotate_anchors: bool = False) -> Path:
    """The folder whose ``train.json`` and ``images/train`` to train on: ``data_dir`` itself, or, for another
    ``relation_fraction``, with ``relation_needed`` or with ``annotate_anchors``, the same training scenes
    (same seed and count, so the same images) with texts generated so, in a sibling folder (generated unless
    it is there). The val splits always come from ``data_dir``, so results stay comparable."""
    if relation_fraction == RELATION_FRACTION and not relation_needed and not annotate_anchors:
        return data_dir
    meta = json.loads((data_dir / "meta.json").read_text())
    suffix = ("_needed" if relation_needed else "") + ("_anchors" if annotate_anchors else "")
    folder = data_dir.with_name(f"{data_dir.name}_train_relations{relation_fraction:g}{suffix}")
    if not (folder / "train_scenes.json").exists():
        generate_shapes(folder, seed=meta["seed"], num_train=meta["num_scenes"]["train"], num_val=0,
                        num_val_unseen=0, image_size=meta["image_size"], min_objects=meta["min_objects"],
                        max_objects=meta["max_objects"], relation_fraction=relation_fraction,
                        relation_needed=relation_needed, annotate_anchors=annotate_anchors, progress=True)
    return folder


def load_split(checkpoint: Path, data_dir: Path, ann_name: str) -> tuple:
    """A trained checkpoint and the evaluation dataset of ``data_dir/ann_name`` read with its config."""
    model = load(checkpoint)
    dataset = build_dataset(model.train_config.data, "val", model.tokenizer, ann_file=data_dir / ann_name,
                            image_root=data_dir / "images")
    return model, dataset


def train_budgeted(preset: Path, overrides: list[str], *, processes: int = 1,
                   resume: Path | None = None) -> float:
    """Train ``preset`` with ``overrides`` (continuing from the ``resume`` checkpoint folder, a run's
    ``last/``, when given); returns the wall time in minutes. With ``processes`` > 1, ``torchrun`` starts
    that many data-parallel processes running the CLI (mdetr.engine.distributed)."""
    started = time.monotonic()
    if processes > 1:
        resume_args = ["--resume", str(resume)] if resume is not None else []
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={processes}", "-m", "mdetr.cli", "train", "--config", str(preset),
                        "--no-progress", *resume_args, *overrides], check=True)
    else:
        train(load_config(preset, overrides), resume=resume)
    return (time.monotonic() - started) / 60


def learning_curve(train_dir: Path, metric: str) -> tuple[int, list[dict]]:
    """The last logged step and ``[{"epoch", "minutes", metric}, ...]`` of every evaluation in a run's log."""
    log = [json.loads(line) for line in (train_dir / "log.jsonl").read_text().splitlines()]
    steps = max((r["step"] for r in log if "step" in r), default=0)
    curve = [{"epoch": r["epoch"], "minutes": round(r["minutes"], 2), metric: r[metric]}
             for r in log if r["type"] == "eval"]
    return steps, curve
