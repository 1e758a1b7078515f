"""float32 linear layers on the CPU: the BLAS behind ``torch.nn.functional.linear`` against oneDNN's kernel.

    .venv/bin/python bench/linear_kernels.py --threads 2 --output runs/linear_kernels.json

PyTorch's float32 ``linear`` calls its BLAS (MKL in the x86 wheels); the Predictor's inference copy calls
oneDNN's linear instead (:func:`mdetr.ops.linear.onednn_linear`). This times both, in alternation,
on the layer shapes of the models (rows x input width -> output width): the transformer encoder over one
ResNet-101 batch of two 512x680 images (742 tokens, width 256, feed-forward 2048), the decoder's 2 x 100
queries, and a RoBERTa-base layer over two 19-token captions. It prints GFLOP/s (2 FLOPs per
multiply-add, median of ``--repeats`` timed calls after 3 untimed ones), the speed-up, and the largest
difference between the two results relative to the largest output value.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mdetr.ops.linear import onednn_linear_available

SHAPES = [  # (rows, in, out, where)
    (742, 256, 256, "encoder attention projection"),
    (742, 256, 2048, "encoder feed-forward in"),
    (742, 2048, 256, "encoder feed-forward out"),
    (200, 256, 256, "decoder attention projection"),
    (200, 256, 2048, "decoder feed-forward in"),
    (38, 768, 768, "RoBERTa-base attention projection"),
    (38, 768, 3072, "RoBERTa-base feed-forward in"),
    (38, 3072, 768, "RoBERTa-base feed-forward out"),
    (2048, 2048, 2048, "square, for reference"),
]


def median_seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("runs/linear_kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not onednn_linear_available():
        raise SystemExit("oneDNN's linear operator is not available in this PyTorch build")
    onednn = torch.ops.mkldnn._linear_pointwise
    generator = torch.Generator().manual_seed(0)
    rows = []
    print("| layer | rows x in -> out | BLAS GFLOP/s | oneDNN GFLOP/s | x | relative diff |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for m, k, n, where in SHAPES:
            x = torch.randn(m, k, generator=generator)
            w, b = torch.randn(n, k, generator=generator) / k**0.5, torch.randn(n, generator=generator)
            blas_s, onednn_s = [], []
            blas_call = functools.partial(F.linear, x, w, b)
            onednn_call = functools.partial(onednn, x, w, b, "none", [], "")
            for _ in range(2):  # alternate, so both see the same machine state
                blas_s.append(median_seconds(blas_call, args.repeats // 2))
                onednn_s.append(median_seconds(onednn_call, args.repeats // 2))
            expected = F.linear(x, w, b)
            diff = float((onednn(x, w, b, "none", [], "") - expected).abs().max() / expected.abs().max())
            flops = 2 * m * k * n
            row = {"layer": where, "rows": m, "in": k, "out": n, "blas_gflops": flops / min(blas_s) / 1e9,
                   "onednn_gflops": flops / min(onednn_s) / 1e9, "relative_diff": diff}
            row["speedup"] = row["onednn_gflops"] / row["blas_gflops"]
            rows.append(row)
            print(f"| {where} | {m} x {k} -> {n} | {row['blas_gflops']:.0f} | {row['onednn_gflops']:.0f} | "
                  f"{row['speedup']:.2f} | {diff:.1e} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"torch": torch.__version__, "cpu": platform.processor() or "unknown",
                                       "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
