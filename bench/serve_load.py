"""Benchmark: a bounded load test of ``mdetr serve`` on loopback, with fuzzed requests mixed in.

    python bench/serve_load.py --clients 4 --seconds 30 --output runs/serve_load.json

Starts the real server (``mdetr serve``, uvicorn on 127.0.0.1 and a free port, in a subprocess with
``--threads`` torch threads) on the bundled ``mdetr_lite_shapes`` model or ``--checkpoint``, warms it up,
then runs ``--clients`` concurrent clients for ``--seconds`` (the run stops by itself). Each client posts the
bundled example scenes with their sentences and, at ``--fuzz-fraction`` of its requests, a bad request (broken
multipart, wrong content type, a PNG header declaring 100000x100000, a decompression bomb, non-UTF-8 /
binary / empty / over-long text) from :mod:`mdetr.serve.loadtest`.

Reported: requests completed, throughput, latency p50/p90/p99 of the normal requests, errors (a normal request
without a 2xx or whose detections differ from the predictor's own for that image and sentence, a fuzzed
request without a 4xx, any exception) and the server's memory (VmRSS from ``/proc/<pid>/status`` after the
warm-up, in the middle and at the end of the run, sampled every second in between). The script exits 1
when there was any error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mdetr.inference.predictor import Predictor
from mdetr.serve import ServeLimits
from mdetr.serve.loadtest import (
    LoadConfig,
    MemorySampler,
    example_jobs,
    expected_detections,
    fuzz_cases,
    memory_kib,
    run_load,
    wait_until_healthy,
    warm_up,
)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def serve_subprocess(checkpoint: str, *, threads: int, host: str = "127.0.0.1",
                     log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mdetr serve CHECKPOINT`` in a child process with ``threads`` torch threads, its output going to
    ``log``; yields its base URL (once ``/health`` answers) and the process, and stops it on exit."""
    port = free_port(host)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "mdetr.cli", "serve", checkpoint, "--host", host, "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://{host}:{port}"
    try:
        wait_until_healthy(url, alive=lambda: process.poll() is None)
        yield url, process
    except RuntimeError as err:
        raise RuntimeError(f"{err}; server log ({log}):\n{log.read_text()[-3000:]}") from None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on Ctrl-C
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def environment(threads: int) -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": threads}


def mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def delta(before: int | None, after: int | None) -> str:
    return "n/a" if before is None or after is None else f"{(after - before) / 1024:+.1f} MiB"


def markdown_table(report: dict[str, Any]) -> str:
    run, memory, config = report["run"], report["memory_kib"], report["config"]
    latency = run["latency_ms"]
    rows = [
        ("clients x seconds", f"{config['clients']} x {config['seconds']:g} s (ran {run['seconds']:.1f} s)"),
        ("requests completed", f"{run['completed']} ({run['normal']} normal, {run['fuzz']} fuzzed)"),
        ("throughput", f"{run['throughput_rps']:.2f} req/s ({run['normal_rps']:.2f} normal req/s)"),
        ("latency p50 / p90 / p99 (normal)", f"{latency['p50']} / {latency['p90']} / {latency['p99']} ms"),
        ("fuzz latency p50 / p99", f"{run['fuzz_latency_ms']['p50']} / {run['fuzz_latency_ms']['p99']} ms"),
        ("fuzzed requests answered 4xx", f"{report['fuzz_4xx']} / {run['fuzz']}"),
        ("errors", f"{run['errors']} (detection mismatches: {run['mismatches']})"),
        ("server RSS after warm-up -> end", f"{mib(memory['start'])} -> {mib(memory['end'])}"
                                            f" ({delta(memory['start'], memory['end'])})"),
        ("server RSS growth, 1st / 2nd half of the run", f"{delta(memory['start'], memory['middle'])} / "
                                                        f"{delta(memory['middle'], memory['end'])}"),
        ("server RSS peak during run", mib(memory["peak_during_run"])),
        ("load average before / after", " / ".join(f"{v:.2f}" for v in (report["loadavg"]["before"][0],
                                                                        report["loadavg"]["after"][0]))),
    ]
    lines = ["| metric | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="mdetr_lite_shapes", help="checkpoint folder or bundled name")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients send requests")
    parser.add_argument("--fuzz-fraction", type=float, default=0.2, help="fraction of requests that are bad")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (server and reference)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes over the jobs before the run")
    parser.add_argument("--output", type=Path, default=Path("runs/serve_load.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    config = LoadConfig(clients=args.clients, seconds=args.seconds, fuzz_fraction=args.fuzz_fraction)
    limits = ServeLimits()  # what `mdetr serve` uses without flags
    jobs = example_jobs()
    fuzz = fuzz_cases(jobs[0].image, jobs[0].text, limits)
    # The reference answers, from the same checkpoint run directly in this process.
    expected = expected_detections(Predictor.from_checkpoint(args.checkpoint), jobs, limits, config)

    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, serve_subprocess(
            args.checkpoint, threads=args.threads, log=Path(tmp) / "server.log") as (url, proc):
        warm_up(url, jobs, config, rounds=args.warmup)
        start = memory_kib(proc.pid)
        with MemorySampler(proc.pid) as sampler:
            result = run_load(url, jobs, fuzz, config, expected=expected)
        end = memory_kib(proc.pid)
        alive = proc.poll() is None
    loadavg_after = os.getloadavg()

    run = result.summary()
    if not alive:
        run["errors"] += 1
        run["error_messages"].append("the server process exited during the run")
    rss_start = start["VmRSS"] if start else None
    rss_end = end["VmRSS"] if end else None
    report = {
        "benchmark": "serve_load", "checkpoint": args.checkpoint,
        "config": {"clients": config.clients, "seconds": config.seconds,
                   "fuzz_fraction": config.fuzz_fraction, "threads": args.threads,
                   "warmup_rounds": args.warmup, "jobs": [j.name for j in jobs],
                   "fuzz_cases": {c.name: c.expected for c in fuzz}},
        "run": run,
        "fuzz_4xx": sum(n for statuses in run["fuzz_statuses"].values()
                        for s, n in statuses.items() if 400 <= int(s) < 500),
        "memory_kib": {"start": rss_start, "end": rss_end,
                       "growth": None if rss_start is None or rss_end is None else rss_end - rss_start,
                       "middle": sampler.at(result.seconds / 2), "peak_during_run": sampler.peak_kib,
                       "samples": sampler.samples,
                       "peak_since_process_start": end.get("VmHWM") if end else None},
        "loadavg": {"before": loadavg_before, "after": loadavg_after},
        "environment": environment(args.threads),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    for message in run["error_messages"]:
        print(f"error: {message}", file=sys.stderr)
    print(f"wrote {args.output}")
    return 1 if run["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
