"""Benchmark: how fast the SMCA decoder converges compared with DETR's, on the synthetic shapes set (CPU).

    python bench/smca_convergence.py --output runs/smca_convergence --epochs 6 --minutes 60
    python bench/smca_convergence.py --smoke --output runs/smca_smoke      # a one-step check of the script

Trains every variant with the same data, schedule, number of steps and wall-clock cap (``--minutes`` per
variant), one after the other on the same threads, and evaluates after every epoch:

* detection (``task: detection``, COCO categories = the six shapes, focal loss, 2/5/2 costs): the DETR
  decoder against the SMCA decoder variants of SMCA Table 2 picked with ``--detection-variants`` (default:
  ``detr smca``; also ``smca_fixed smca_single smca_shared smca_multiscale smca_grid``), scored by COCO
  AP50 (AP too);
* grounding (mdetr_lite, ``configs/mdetr_lite_shapes.yaml``): ``model.decoder`` detr against smca (and
  ``smca_grid``, picked with ``--grounding-variants``), scored by precision@1 on the referring expressions.

Writes ``results.json`` (every curve: step, minutes, metric after each epoch), ``results.md`` (a markdown
table per task, with the step at which each SMCA variant first reaches the DETR decoder's final score and
that step as a fraction of DETR's steps; the claim to check is <= 1/3) and one PNG plot per task.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from mdetr.config import load_config
from mdetr.data.shapes import export_detection, generate_shapes
from mdetr.engine.train import train

ROOT = Path(__file__).resolve().parents[1]

# Decoder settings of each variant (SMCA Table 2 rows, plus the multi-scale model of Table 3).
# Every SMCA setting is spelled out, so the preset's own model section cannot change a variant.
_SMCA = ["model.decoder=smca", "model.smca_scale=independent", "model.smca_multi_head=true",
         "model.smca_reference=learned", "model.smca_multiscale=false"]
DETECTION_VARIANTS: dict[str, list[str]] = {
    "detr": ["model.decoder=detr", "model.smca_reference=learned", "model.smca_multiscale=false"],
    "smca": _SMCA,
    "smca_fixed": [*_SMCA, "model.smca_scale=fixed"],
    "smca_single": [*_SMCA, "model.smca_scale=single"],
    "smca_shared": [*_SMCA, "model.smca_multi_head=false"],
    "smca_grid": [*_SMCA, "model.smca_reference=grid"],
    "smca_multiscale": [*_SMCA, "model.smca_multiscale=true", "model.enc_layers=3",
                        "model.smca_encoder=intra-multi-intra"],
}
GROUNDING_VARIANTS: dict[str, list[str]] = {
    "detr": DETECTION_VARIANTS["detr"],
    "smca": _SMCA,
    "smca_grid": [*_SMCA, "model.smca_reference=grid"],
}
METRIC = {"detection": "AP50", "grounding": "P@1"}


def detection_overrides(data: Path, args: argparse.Namespace) -> list[str]:
    """The shared detection recipe: mdetr_lite's EfficientNet-Lite0 (ImageNet, stride 16) under a small
    transformer, 30 queries (a scene has at most 10 objects), the training transforms of the shapes recipe."""
    return [
        "model.arch=mdetr_lite", "model.hidden_dim=128", "model.nheads=8", "model.enc_layers=3",
        "model.dec_layers=3", "model.dim_feedforward=512", "model.dropout=0.0",
        f"model.num_queries={args.queries}",
        f"data.train_ann={data / 'train_detection_shape.json'}", f"data.train_images={data / 'images'}",
        f"data.val_ann={data / 'val_detection_shape.json'}", f"data.val_images={data / 'images'}",
        "train.lr_text_encoder=0.0",
    ]


def grounding_overrides(data: Path) -> list[str]:
    return [f"data.train_ann={data / 'train.json'}", f"data.train_images={data / 'images'}",
            f"data.val_ann={data / 'val.json'}", f"data.val_images={data / 'images'}"]


def common_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    return [f"train.epochs={args.epochs}", f"train.max_minutes={args.minutes}",
            f"train.threads={args.threads}",
            f"train.output_dir={out}", "train.eval_every=1", "train.overwrite=true", "train.schedule=step",
            "train.schedule_clock=steps",
            f"train.lr_drop={max(1, args.epochs - 1)}", f"train.seed={args.seed}", *args.overrides]


def run_variant(task: str, name: str, overrides: list[str], out: Path) -> dict:
    """Train one variant; its curve is read back from the run's log."""
    preset = ROOT / "configs" / "mdetr_lite_shapes.yaml"
    config = load_config(preset, overrides, task=task)
    started = time.monotonic()
    result = train(config, progress=False,
                   echo=lambda message: print(f"[{task} {name}] {message}", flush=True))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    metric = METRIC[task]
    curve = []
    for record in (r for r in log if r["type"] == "eval"):
        point = {"epoch": record["epoch"], "step": record["step"], "minutes": round(record["minutes"], 2)}
        point[metric] = (record["metrics"]["box_ap"]["AP50"] if task == "detection"
                         else record["metrics"]["refexp"]["overall"]["P@1"])
        if task == "detection":
            point["AP"] = record["metrics"]["box_ap"]["AP"]
        curve.append(point)
    return {"variant": name, "overrides": overrides, "steps": result.steps, "epochs": result.epochs_done,
            "wall_minutes": round((time.monotonic() - started) / 60, 2), "curve": curve}


def steps_to_reach(curve: list[dict], metric: str, target: float) -> int | None:
    """The first evaluated step whose score is at least ``target`` (None if never)."""
    return next((p["step"] for p in curve if p[metric] >= target), None)


def markdown(task: str, runs: list[dict]) -> str:
    metric = METRIC[task]
    baseline = next((r for r in runs if r["variant"] == "detr"), None)
    target = baseline["curve"][-1][metric] if baseline and baseline["curve"] else None
    epochs = max(len(r["curve"]) for r in runs)
    header = f"| {task} variant | " + " | ".join(f"ep {i + 1}" for i in range(epochs))
    header += f" | steps | minutes | steps to DETR's final {metric} | fraction of DETR's steps |"
    lines = [header, "|" + "---|" * (epochs + 5)]
    for run in runs:
        scores = [f"{p[metric] * 100:.1f}" for p in run["curve"]] + ["-"] * (epochs - len(run["curve"]))
        reached = steps_to_reach(run["curve"], metric, target) if target is not None else None
        fraction = f"{reached / baseline['steps']:.2f}" if reached and baseline and baseline["steps"] else "-"
        reached_text = reached if reached is not None else "not reached"
        lines.append(f"| {run['variant']} | " + " | ".join(scores)
                     + f" | {run['steps']} | {run['wall_minutes']} | {reached_text} | {fraction} |")
    return "\n".join(lines)


def plot(task: str, runs: list[dict], path: Path) -> None:
    """Learning curves (score against training step) of every variant of a task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = METRIC[task]
    figure, axis = plt.subplots(figsize=(6, 4))
    for run in runs:
        axis.plot([p["step"] for p in run["curve"]], [p[metric] * 100 for p in run["curve"]], marker="o",
                  label=run["variant"])
    axis.set_xlabel("training step")
    axis.set_ylabel(f"{metric} (%)")
    axis.set_title(f"shapes {task}: DETR vs SMCA decoder")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def prepare_data(out: Path, args: argparse.Namespace) -> Path:
    data = out / "shapes"
    if not (data / "val_detection_shape.json").exists():
        generate_shapes(data, seed=0, num_train=args.num_train, num_val=args.num_val, num_val_unseen=0,
                        image_size=args.image_size, progress=True)
        export_detection(data, scheme="shape", splits=("train", "val"))
    return data


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/smca_convergence")
    parser.add_argument("--tasks", nargs="+", choices=["detection", "grounding"],
                        default=["detection", "grounding"])
    parser.add_argument("--detection-variants", nargs="+", choices=list(DETECTION_VARIANTS),
                        default=["detr", "smca"])
    parser.add_argument("--grounding-variants", nargs="+", choices=list(GROUNDING_VARIANTS),
                        default=["detr", "smca"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap per variant")
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--queries", type=int, default=30, help="detection queries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data, one epoch per variant: checks the script")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every variant")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_train, args.num_val, args.image_size, args.epochs = 8, 2, 128, 1
        args.overrides = [*args.overrides, "data.batch_size=8", "data.scales=[128]", "data.max_size=128",
                          "data.crop_scales=[128]", "data.crop_min=96", "data.crop_max=128",
                          "data.num_workers=0"]

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    data = prepare_data(out, args)
    command = "python bench/smca_convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict = {"command": command,
                    "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                "torch": torch.__version__}, "tasks": {}}
    sections = []
    for task in args.tasks:
        variants = ({v: DETECTION_VARIANTS[v] for v in args.detection_variants} if task == "detection"
                    else {v: GROUNDING_VARIANTS[v] for v in args.grounding_variants})
        base = detection_overrides(data, args) if task == "detection" else grounding_overrides(data)
        runs = []
        for name, settings in variants.items():
            run_dir = out / task / name
            overrides = [*base, *settings, *common_overrides(args, run_dir)]
            runs.append(run_variant(task, name, overrides, run_dir))
        report["tasks"][task] = runs
        plot(task, runs, out / f"{task}_curves.png")
        sections.append(markdown(task, runs) + f"\n\n![{task} learning curves]({task}_curves.png)")
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text("\n\n".join(sections) + "\n")
    print("\n\n".join(sections))
    return report


if __name__ == "__main__":
    main()
