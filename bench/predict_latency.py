"""Benchmark: mdetr_lite predictor latency and throughput on the CPU, PyTorch float32 vs bf16 autocast vs
onnxruntime.

    python bench/predict_latency.py --threads 2 --output runs/predict_latency.json

Every timed call is a whole prediction: resizing and normalising the images, tokenizing the sentence, the
forward pass and post-processing to pixel boxes, scores and phrases. For each backend, short side and batch
size the script runs ``--warmup`` untimed calls, then ``--runs`` timed ones, and reports the median and 90th
percentile latency per call and the throughput (batch / median latency). The ONNX model is exported once
(dynamic image size and text length) unless ``--onnx`` names an exported file; its largest absolute
difference from PyTorch float32 on the benchmark batch is recorded beside its timings. The PyTorch backends
run the Predictor as users get it (backbone batch norms folded, channels-last: mdetr.inference.optimize);
``float32_plain`` runs the unmodified model for comparison; ``float32_compiled`` and ``bfloat16_compiled``
the Predictor with ``compile=True`` (``torch.compile`` with frozen weights), whose compilation happens in
the warm-up calls: each row records how long its first call took.

Beside the timings stand the model's FLOPs per image at each size (counted by
``torch.utils.flop_counter.FlopCounterMode`` on one forward pass: matrix multiplies, convolutions and
attention, 2 FLOPs per multiply-add) and the machine's measured matrix-multiply rate (a square GEMM in
float32 and bf16 on the same threads), so that each row says what fraction of the hardware's rate it
reaches. ``--flops-only`` measures just these two.

The default model is ``mdetr_lite`` with its pretrained parts and an untrained transformer: latency does not
depend on the weights. ``--checkpoint`` times a trained model instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mdetr.builder import build_model, load
from mdetr.inference.export import OnnxGroundingModel, export_onnx
from mdetr.inference.predictor import Predictor, open_image
from mdetr.inference.processor import GroundingProcessor, post_process_grounded_detection
from mdetr.ops.allocator import keep_freed_memory
from mdetr.registry import get_arch_config

CAPTION = "the small red circle left of the blue square"
# "float32_plain": the model as trained, without the inference rewrites of mdetr.inference.optimize
# (folded batch norms, channels-last backbone) that the Predictor applies by default; "*_compiled": the
# Predictor's copy also compiled (Predictor(compile=True)).
BACKENDS = ("float32", "bfloat16", "onnx", "float32_plain", "float32_compiled", "bfloat16_compiled")

PredictFn = Callable[[list[Image.Image], list[str]], list]


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture: a colour gradient with a few filled rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        array[y0: y0 + rng.integers(20, 120), x0: x0 + rng.integers(20, 120)] = rng.integers(0, 256, 3)
    return Image.fromarray(array.astype(np.uint8), "RGB")


def build_benchmark_model(checkpoint: str | None) -> torch.nn.Module:
    if checkpoint is not None:
        return load(checkpoint)
    return build_model(get_arch_config("mdetr_lite")).eval()


def torch_predictor(model: torch.nn.Module, size: int, backend: str, threshold: float) -> PredictFn:
    dtype, _, variant = backend.partition("_")
    if variant == "compiled":  # fresh compile caches: earlier rows' graphs would count against the
        torch._dynamo.reset()  # recompile limit, past which this row would time uncompiled code
    predictor = Predictor(model, image_size=size, max_size=2 * size, dtype=dtype, optimize=variant != "plain",
                          compile=variant == "compiled")
    return lambda images, texts: predictor.predict_batch(images, texts, threshold=threshold)


def onnx_predictor(onnx_model: OnnxGroundingModel, processor: GroundingProcessor,
                   threshold: float) -> PredictFn:
    """The same steps as :meth:`Predictor.predict_batch` with onnxruntime running the model."""

    def predict(images: list[Image.Image], texts: list[str]) -> list:
        inputs = processor([open_image(im) for im in images], texts)
        outputs = onnx_model(inputs["pixel_values"], inputs["pixel_mask"], inputs["tokenized"])
        return post_process_grounded_detection(outputs, target_sizes=inputs["target_sizes"],
                                               threshold=threshold, captions=texts)

    return predict


def time_calls(predict: PredictFn, images: list[Image.Image], texts: list[str], *, warmup: int,
               runs: int) -> tuple[list[float], float]:
    """Wall-clock seconds of ``runs`` calls after ``warmup`` untimed ones, and of the first call."""
    start = time.perf_counter()
    predict(images, texts)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        predict(images, texts)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(images, texts)
        times.append(time.perf_counter() - start)
    return times, first


def summarise(times: list[float], batch: int) -> dict[str, float]:
    median = statistics.median(times)
    return {"median_ms": median * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3,
            "mean_ms": statistics.fmean(times) * 1e3, "images_per_s": batch / median, "runs": len(times)}


@torch.no_grad()
def onnx_agreement(model: torch.nn.Module, onnx_model: OnnxGroundingModel, processor: GroundingProcessor,
                   image: Image.Image) -> dict[str, float]:
    """Largest absolute difference of logits and boxes between onnxruntime and PyTorch float32."""
    inputs = processor([image], [CAPTION])
    expected = model(inputs["pixel_values"], inputs["pixel_mask"], [CAPTION])
    actual = onnx_model(inputs["pixel_values"], inputs["pixel_mask"], inputs["tokenized"])
    return {name: float((getattr(actual, name) - getattr(expected, name)).abs().max())
            for name in ("pred_logits", "pred_boxes")}


def model_flops(model: torch.nn.Module, image: Image.Image, size: int) -> int:
    """FLOPs of one forward pass on one image resized to short side ``size`` (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    processor = GroundingProcessor.for_model(model, image_size=size, max_size=2 * size)
    inputs = processor([image], [CAPTION])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(inputs["pixel_values"], inputs["pixel_mask"], [CAPTION])
    return int(counter.get_total_flops())


def matmul_rate(dtype: torch.dtype, *, n: int = 2048, repeats: int = 10) -> float:
    """The best of ``repeats`` timed n x n x n matrix multiplies on the current threads, in GFLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine() -> dict[str, object]:
    import onnxruntime

    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| backend | short side (px) | batch | median (ms) | p90 (ms) | images/s | of matmul rate |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['short_side']} | {r['batch']} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['images_per_s']:.2f} | "
                     f"{100 * r['fraction_of_matmul_rate']:.0f} % |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint",
                        help="checkpoint folder or bundled model (default: untrained mdetr_lite)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="short sides to time")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--runs", type=int, default=30, help="timed calls per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (at least one is made)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and onnxruntime")
    parser.add_argument("--image-size", default="640x480", help="source picture WIDTHxHEIGHT before resizing")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="mdetr.ops.allocator.keep_freed_memory() first, as the mdetr command does")
    parser.add_argument("--onnx", help="an exported model to time (default: export the model first)")
    parser.add_argument("--output", default="runs/predict_latency.json", help="JSON file to write")
    parser.add_argument("--flops-only", action="store_true",
                        help="only count the model's FLOPs and measure the matrix-multiply rate")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or min(args.batch_sizes) < 1 or min(args.sizes) < 32:
        parser.error("--runs and --batch-sizes must be at least 1, --warmup at least 0, --sizes at least 32")
    try:
        args.width, args.height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        parser.error(f"--image-size must look like 640x480, got {args.image_size!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: not applied (no glibc, or the allocator is set by the "
                         "environment)")
    model = build_benchmark_model(args.checkpoint)
    image = scene(args.width, args.height)
    flops = {size: model_flops(model, image, size) for size in args.sizes}
    rates = {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)}
    for size in args.sizes:
        print(f"{size}px: {flops[size] / 1e9:.2f} GFLOP per image; at the float32 matmul rate "
              f"({rates['float32']:.0f} GFLOP/s) {flops[size] / rates['float32'] / 1e6:.1f} ms, at bf16's "
              f"({rates['bfloat16']:.0f} GFLOP/s) {flops[size] / rates['bfloat16'] / 1e6:.1f} ms",
              file=sys.stderr)
    if args.flops_only:
        args.backends = []
    onnx_model, export_s, workdir = None, None, None
    if "onnx" in args.backends:
        path = args.onnx
        if path is None:
            workdir = tempfile.TemporaryDirectory()
            path = str(Path(workdir.name) / "mdetr.onnx")
            start = time.perf_counter()
            export_onnx(model, path)
            export_s = time.perf_counter() - start
            print(f"exported {path} in {export_s:.0f} s", file=sys.stderr)
        onnx_model = OnnxGroundingModel(path, threads=args.threads)
    rows, agreement = [], {}
    for size in args.sizes:
        if onnx_model is not None:
            processor = onnx_model.processor(image_size=size, max_size=2 * size)
            agreement[size] = onnx_agreement(model, onnx_model, processor, image)
        for backend in args.backends:
            if backend == "onnx":
                predict = onnx_predictor(onnx_model, processor, args.threshold)
            else:
                predict = torch_predictor(model, size, backend, args.threshold)
            for batch in args.batch_sizes:
                times, first = time_calls(predict, [image] * batch, [CAPTION] * batch,
                                          warmup=max(args.warmup, 1), runs=args.runs)
                row = {"backend": backend, "short_side": size, "batch": batch, **summarise(times, batch),
                       "first_call_s": round(first, 3)}
                # Fraction of the matrix-multiply rate of the precision the backend computes in.
                rate = rates["bfloat16" if backend.startswith("bfloat16") else "float32"]
                row["fraction_of_matmul_rate"] = flops[size] * row["images_per_s"] / (rate * 1e9)
                rows.append(row)
                print(f"{backend:>8} {size:4d}px batch {batch}: median {row['median_ms']:.1f} ms, "
                      f"p90 {row['p90_ms']:.1f} ms, {row['images_per_s']:.2f} images/s", file=sys.stderr)
    if workdir is not None:
        workdir.cleanup()
    report = {
        "machine": machine(), "threads": args.threads, "keep_freed_memory": args.keep_freed_memory,
        "model": args.checkpoint or "mdetr_lite (untrained)",
        "source_image": [args.width, args.height], "caption": CAPTION, "warmup": args.warmup,
        "onnx_export_s": export_s, "onnx_max_abs_diff": agreement, "gflop_per_image": {
            size: round(f / 1e9, 3) for size, f in flops.items()},
        "matmul_gflop_per_s": {k: round(v, 1) for k, v in rates.items()}, "results": rows,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown_table(rows))
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
