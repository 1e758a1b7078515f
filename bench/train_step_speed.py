"""Benchmark: training-step throughput and peak memory of mdetr_lite, float32 against bf16 / fp16 autocast.

    python bench/train_step_speed.py --threads 2 --output runs/train_step_speed.json

A timed step is the training loop's own optimisation step (:func:`mdetr.engine.train.accumulate_gradients`,
gradient clipping at 0.1, one AdamW step) on a batch of ``--batch-size`` synthetic shapes scenes resized to
``--size`` px and their captions, as ``mdetr train`` runs it with configs/mdetr_lite_shapes.yaml. Batches are
loaded and collated before timing, so data loading is not part of the number. Each setting runs
``--warmup`` untimed steps, then ``--steps`` timed ones, and reports the median and 90th percentile time per
step and the throughput (batch / median).

Every setting runs in a fresh Python process, so its peak memory is its own: the process's peak resident
set size (``getrusage``) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU, with the resident size
after building the model and before the first step for comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mdetr.config import load_config
from mdetr.data.build import build_dataset
from mdetr.data.collate import Batch, collate
from mdetr.data.shapes import generate_shapes
from mdetr.engine.distributed import DistributedContext
from mdetr.engine.optim import build_optimizer
from mdetr.engine.train import GroundingTask, accumulate_gradients, seed_everything
from mdetr.inference.optimize import channels_last_backbone
from mdetr.ops.linear import onednn_linear_layers

ROOT = Path(__file__).resolve().parents[1]
AMP = ("none", "bf16", "fp16")


def resident_mb() -> float:
    """The current resident set size (Linux /proc), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_resident_mb() -> float:
    """The process's peak resident set size so far (``ru_maxrss`` is in KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batches(config, tokenizer, *, batch_size: int, count: int, folder: Path) -> list[Batch]:
    """``count`` batches of generated shapes scenes, evaluation transforms (short side data.val_size)."""
    generate_shapes(folder, seed=0, num_train=max(8, batch_size * count // 2), num_val=1, num_val_unseen=1)
    dataset = build_dataset(config.data, "val", tokenizer, ann_file=folder / "train.json",
                            image_root=folder / "images")
    order = [i % len(dataset) for i in range(batch_size * count)]
    return [collate([dataset[i] for i in order[b * batch_size: (b + 1) * batch_size]]) for b in range(count)]


def run_setting(args: argparse.Namespace, amp: str) -> dict:
    """Time one amp setting in this process (see the module docstring)."""
    torch.set_num_threads(args.threads)
    overrides = [f"train.amp={amp}", f"data.batch_size={args.batch_size}", f"data.val_size={args.size}",
                 f"train.device={args.device}", *args.overrides]
    config = load_config(args.config, overrides)
    seed_everything(0)
    task = GroundingTask()
    model, criterion, weights = task.build(config)
    device = torch.device(args.device)
    model.to(device).train()
    if config.train.channels_last:  # as mdetr train
        channels_last_backbone(model, weights=False)
    if config.train.onednn_linear:
        onednn_linear_layers(model)
    if config.train.cache_text_features:  # as mdetr train; the batches repeat, so warm-up fills the cache
        model.transformer.cache_text_features()
    optimizer = build_optimizer(model, config.train)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ctx = DistributedContext(device=device)
    with tempfile.TemporaryDirectory() as folder:
        batches = [b.to(device) for b in make_batches(config, model.tokenizer, batch_size=args.batch_size,
                                                      count=4, folder=Path(folder))]
    rss_before = resident_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(task, model, criterion, weights, [batches[i % len(batches)]], ctx=ctx,
                             amp=amp, scaler=scaler)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    result = {"amp": amp, "batch": args.batch_size, "size": args.size, "device": args.device,
              "threads": args.threads, "steps": args.steps, "median_s": median,
              "p90_s": statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else median,
              "images_per_s": args.batch_size / median, "rss_after_build_mb": rss_before,
              "peak_rss_mb": peak_resident_mb()}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def markdown_table(rows: list[dict]) -> str:
    lines = ["| amp | batch | size (px) | median step (s) | p90 (s) | images/s | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = r.get("peak_cuda_mb", r["peak_rss_mb"])
        lines.append(f"| {r['amp']} | {r['batch']} | {r['size']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | "
                     f"{r['images_per_s']:.2f} | {memory:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "mdetr_lite_shapes.yaml"),
                        help="YAML preset of the model and the loss (its data paths are not used)")
    parser.add_argument("--amp", nargs="+", choices=AMP, default=["none", "bf16"], help="settings to time")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=160, help="short side of the images (px)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="runs/train_step_speed.json", help="JSON file to write")
    # Internal: time one setting in this process and print its JSON (main runs one such process each).
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.single:
        result = run_setting(args, args.amp[0])
        print(json.dumps(result))
        return [result]
    rows = []
    for amp in args.amp:
        command = [sys.executable, __file__, "--single", "--amp", amp, "--batch-size", str(args.batch_size),
                   "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--device", args.device, "--config", args.config,
                   *args.overrides]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"amp={amp} failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"amp={amp}: {rows[-1]['images_per_s']:.2f} images/s", file=sys.stderr)
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "processor": platform.processor() or platform.machine()},
              "results": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
