"""A bounded load test of the grounding API: a fixed number of clients for a fixed time, with fuzzed requests
interleaved, against a server that is already listening (``bench/serve_load.py`` starts one and reports).

Each client posts real requests (scenes and sentences) with its own ``httpx.Client`` and, at a fixed
fraction, a bad one (broken multipart, an image header declaring a huge size, a decompression bomb,
non-UTF-8 / empty / over-long text). A normal request counts as an error unless it gets a 2xx whose
detections equal the expected ones for its own image and sentence (when given); a fuzzed one unless it gets
a 4xx; any exception counts too. Needs httpx (the ``test`` extra) besides the ``serve`` extra.
"""

from __future__ import annotations

import itertools
import math
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from mdetr.inference.predictor import Predictor
from mdetr.serve.inputs import ServeLimits, decode_image
from mdetr.serve.service import response_body

ENDPOINT = "/v1/ground"
MAX_ERRORS_KEPT = 20  # error messages kept verbatim; the count is exact
BOX_TOLERANCE = 0.011  # px: the API rounds boxes to 2 decimals, so allow one rounding step either way
SCORE_TOLERANCE = 2e-4  # the API rounds scores to 4 decimals
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """A real request: one image file (as uploaded) and the sentence to ground in it."""

    name: str
    image: bytes
    text: str


@dataclass(frozen=True)
class FuzzCase:
    """A bad request: ``request`` holds ``httpx.Client.post`` keyword arguments; ``expected`` is the status
    the server is meant to answer with (any 4xx passes; a different 4xx is only reported)."""

    name: str
    request: dict[str, Any]
    expected: int


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """How hard and how long: ``clients`` threads for ``seconds``, every request a fuzz case at
    ``fuzz_fraction``; ``threshold`` / ``top_k`` are sent with every normal request when not None."""

    clients: int = 4
    seconds: float = 30.0
    fuzz_fraction: float = 0.2
    threshold: float | None = None
    top_k: int | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be at least 1, got {self.clients}")
        if not self.seconds > 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if not 0.0 <= self.fuzz_fraction < 1.0:
            raise ValueError(f"fuzz_fraction must be in [0, 1), got {self.fuzz_fraction}")


@dataclass
class LoadResult:
    """What one run saw. ``responses`` holds ``(job index, detections)`` per successful normal request when
    the run was asked to keep them."""

    seconds: float = 0.0
    completed: int = 0
    normal: int = 0
    fuzz: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    normal_latency_ms: list[float] = field(default_factory=list)
    fuzz_latency_ms: list[float] = field(default_factory=list)
    fuzz_statuses: dict[str, Counter[int]] = field(default_factory=dict)
    fuzz_unexpected: Counter[str] = field(default_factory=Counter)
    mismatches: int = 0
    responses: list[tuple[int, list[dict]]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The JSON-ready numbers (latencies as p50/p90/p99/mean/max in ms)."""
        return {
            "seconds": round(self.seconds, 2), "completed": self.completed, "normal": self.normal,
            "fuzz": self.fuzz, "throughput_rps": round(self.throughput, 2),
            "normal_rps": round(self.normal / self.seconds, 2) if self.seconds > 0 else 0.0,
            "latency_ms": latency_stats(self.normal_latency_ms),
            "fuzz_latency_ms": latency_stats(self.fuzz_latency_ms),
            "errors": self.errors, "mismatches": self.mismatches, "error_messages": self.error_messages,
            "fuzz_statuses": {name: {str(s): n for s, n in sorted(c.items())}
                              for name, c in sorted(self.fuzz_statuses.items())},
            "fuzz_other_4xx": dict(self.fuzz_unexpected),
        }


def latency_stats(values_ms: Sequence[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    values = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1),
            "mean": round(float(values.mean()), 1), "max": round(float(values.max()), 1)}


# --- requests -----------------------------------------------------------------------------------------------


def example_jobs() -> list[Job]:
    """Every (scene, sentence) pair of the bundled example scenes."""
    from mdetr.bundled import example_scenes

    return [Job(f"{entry['image'].name}: {text}", Path(entry["image"]).read_bytes(), text)
            for entry in example_scenes() for text in entry["texts"]]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, idat: bytes) -> bytes:
    """A PNG with this header (IHDR) and this compressed pixel stream (IDAT), in one chunk each."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG declaring ``width`` x ``height`` with no pixel data behind the header."""
    return png_file(width, height, idat=zlib.compress(b""))


def png_bomb(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of ``side`` x ``side`` white pixels: a few KiB that decode to ``side**2``
    pixels (3 bytes each once converted to RGB). Compressed row by row, so the raw image is never held."""
    row = b"\x00" + b"\xff" * math.ceil(side / 8)  # filter type 0, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_file(side, side, bit_depth=1, color_type=0, idat=idat)


def form(image: bytes | None, **fields: str | bytes) -> dict[str, Any]:
    """``httpx`` arguments for a multipart body: an ``image`` file (when given) and plain fields."""
    files: dict[str, tuple[str | None, bytes] | tuple[str, bytes, str]] = {}
    if image is not None:
        files["image"] = ("upload.png", image, "image/png")
    for name, value in fields.items():
        files[name] = (None, value.encode() if isinstance(value, str) else value)
    return {"files": files}


def fuzz_cases(image: bytes, text: str, limits: ServeLimits) -> list[FuzzCase]:
    """The bad requests, built around one good ``image`` and ``text`` so each has exactly one fault."""
    bomb_side = math.isqrt(limits.max_pixels) + 1  # just over the pixel limit, far over in memory
    multipart = {"content-type": "multipart/form-data; boundary=loadtest"}
    return [
        FuzzCase("no image file", form(None, text=text), 400),
        FuzzCase("garbage multipart body", {"content": b"\x00garbage, not multipart\xff" * 8,
                                            "headers": multipart}, 400),
        FuzzCase("wrong content type (JSON)", {"json": {"text": text}}, 415),
        FuzzCase("not an image", form(b"GIF89a but not really an image", text=text), 400),
        FuzzCase("huge declared dimensions", form(png_header_only(100_000, 100_000), text=text), 413),
        FuzzCase("decompression bomb", form(png_bomb(bomb_side), text=text), 413),
        FuzzCase("non-UTF-8 text", form(image, text=b"caf\xe9 \xff\xfe circle"), 400),
        FuzzCase("binary text", form(image, text=b"a red\x00\x01\x02 circle"), 400),
        FuzzCase("empty text", form(image, text=""), 400),
        FuzzCase("over-long text", form(image, text="a" * (limits.max_text_chars + 1)), 413),
    ]


def job_fields(config: LoadConfig) -> dict[str, str]:
    fields = {}
    if config.threshold is not None:
        fields["threshold"] = repr(config.threshold)
    if config.top_k is not None:
        fields["top_k"] = str(config.top_k)
    return fields


def expected_detections(predictor: Predictor, jobs: Sequence[Job], limits: ServeLimits,
                        config: LoadConfig) -> list[list[dict]]:
    """What the API should answer for each job: the predictor run directly on the image as the server decodes
    it, with the score cut and box cap the request carries, shaped as the server shapes it."""
    threshold = limits.threshold if config.threshold is None else config.threshold
    expected = []
    for job in jobs:
        image = decode_image(job.image, limits)
        grounding = predictor.predict(image, job.text, threshold=threshold, top_k=config.top_k)
        expected.append(response_body(image.width, image.height, grounding)["detections"])
    return expected


def same_detections(got: list[dict], expected: list[dict]) -> bool:
    """Equal up to the API's rounding: same phrases, spans and labels in order, boxes and scores close."""
    if len(got) != len(expected):
        return False
    for a, b in zip(got, expected, strict=True):
        if a.get("phrase") != b["phrase"] or a.get("label") != b.get("label"):
            return False
        if [list(s) for s in a.get("span", [])] != [list(s) for s in b["span"]]:
            return False
        if abs(a.get("score", math.inf) - b["score"]) > SCORE_TOLERANCE:
            return False
        box = a.get("box", [])
        if len(box) != 4 or any(abs(x - y) > BOX_TOLERANCE for x, y in zip(box, b["box"], strict=True)):
            return False
    return True


# --- running ------------------------------------------------------------------------------------------------


def is_fuzz(index: int, fraction: float) -> bool:
    """Whether a client's ``index``-th request is a fuzz case: exactly ``fraction`` of them, spread evenly."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


class _Recorder:
    """The shared tallies, updated under a lock by the client threads."""

    def __init__(self, result: LoadResult) -> None:
        self.result = result
        self.lock = threading.Lock()

    def error(self, message: str) -> None:
        with self.lock:
            self.result.errors += 1
            if len(self.result.error_messages) < MAX_ERRORS_KEPT:
                self.result.error_messages.append(message)


def run_load(base_url: str, jobs: Sequence[Job], fuzz: Sequence[FuzzCase], config: LoadConfig, *,
             expected: Sequence[list[dict]] | None = None, keep_responses: bool = False) -> LoadResult:
    """Run ``config.clients`` clients against ``base_url`` until ``config.seconds`` have passed (requests
    already sent are awaited, none is started after the deadline) and tally what came back.

    The clients take the next job (or fuzz case) in turn from one shared cycle, so every job and case is
    sent about equally often whatever the number of clients. With ``expected`` (one detection list per
    job), a normal response whose detections differ from its own job's counts as an error (``mismatches``).
    """
    if not jobs:
        raise ValueError("run_load needs at least one job")
    if config.fuzz_fraction > 0 and not fuzz:
        raise ValueError("fuzz_fraction > 0 needs at least one fuzz case")
    result = LoadResult(fuzz_statuses={case.name: Counter() for case in fuzz})
    recorder = _Recorder(result)
    fields = job_fields(config)
    start = time.perf_counter()
    deadline = start + config.seconds

    job_order, case_order = itertools.cycle(range(len(jobs))), itertools.cycle(fuzz)

    def take(order: Iterator[T]) -> T:
        with recorder.lock:
            return next(order)

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=config.timeout) as http:
            for index in itertools.count():
                if time.perf_counter() >= deadline:
                    return
                if is_fuzz(index, config.fuzz_fraction):
                    _send_fuzz(http, take(case_order), recorder)
                else:
                    j = take(job_order)
                    _send_job(http, j, jobs[j], fields, recorder, expected, keep_responses)

    threads = [threading.Thread(target=client, name=f"load-client-{c}", daemon=True)
               for c in range(config.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - start
    return result


def _send_job(http: httpx.Client, j: int, job: Job, fields: dict[str, str], recorder: _Recorder,
              expected: Sequence[list[dict]] | None, keep: bool) -> None:
    result = recorder.result
    began = time.perf_counter()
    try:
        response = http.post(ENDPOINT, **form(job.image, text=job.text, **fields))
        body = response.json() if response.is_success else None
    except Exception as err:  # noqa: BLE001 - every failure is tallied, none stops the run
        recorder.error(f"normal {job.name!r}: {type(err).__name__}: {err}")
        return
    elapsed = (time.perf_counter() - began) * 1000
    with recorder.lock:
        result.completed += 1
        result.normal += 1
    if body is None:
        recorder.error(f"normal {job.name!r}: HTTP {response.status_code}: {response.text[:200]}")
        return
    detections = body.get("detections") if isinstance(body, dict) else None
    if not isinstance(detections, list):
        recorder.error(f"normal {job.name!r}: no detections in the response")
        return
    if expected is not None and not same_detections(detections, expected[j]):
        with recorder.lock:
            result.mismatches += 1
        recorder.error(f"normal {job.name!r}: detections differ from the predictor's: {detections}")
        return
    with recorder.lock:
        result.normal_latency_ms.append(elapsed)
        if keep:
            result.responses.append((j, detections))


def _send_fuzz(http: httpx.Client, case: FuzzCase, recorder: _Recorder) -> None:
    result = recorder.result
    began = time.perf_counter()
    try:
        response = http.post(ENDPOINT, **case.request)
    except Exception as err:  # noqa: BLE001
        recorder.error(f"fuzz {case.name!r}: {type(err).__name__}: {err}")
        return
    elapsed = (time.perf_counter() - began) * 1000
    status = response.status_code
    with recorder.lock:
        result.completed += 1
        result.fuzz += 1
        result.fuzz_latency_ms.append(elapsed)
        result.fuzz_statuses[case.name][status] += 1
        if 400 <= status < 500 and status != case.expected:
            result.fuzz_unexpected[case.name] += 1
    if not 400 <= status < 500:
        recorder.error(f"fuzz {case.name!r}: HTTP {status} (wanted a 4xx): {response.text[:200]}")


def warm_up(base_url: str, jobs: Sequence[Job], config: LoadConfig, *, rounds: int = 1) -> None:
    """Send every job ``rounds`` times, one at a time, failing loudly on anything but a 2xx."""
    fields = job_fields(config)
    with httpx.Client(base_url=base_url, timeout=config.timeout) as http:
        for _ in range(rounds):
            for job in jobs:
                response = http.post(ENDPOINT, **form(job.image, text=job.text, **fields))
                if not response.is_success:
                    raise RuntimeError(f"warm-up request {job.name!r} got HTTP {response.status_code}: "
                                       f"{response.text[:200]}")


def wait_until_healthy(base_url: str, *, timeout: float = 180.0, alive: Any = None) -> dict:
    """Poll ``GET /health`` until it answers 200 (its JSON is returned); ``alive()`` returning False (a
    server process that exited) stops the wait early."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5.0)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        if alive is not None and not alive():
            raise RuntimeError(f"the server at {base_url} exited before answering /health")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {base_url} did not answer /health within {timeout:g} s")
        time.sleep(0.2)


# --- memory -------------------------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int] | None:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of a process in KiB, from
    ``/proc/<pid>/status``; None where there is no such file (not Linux, or the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values if "VmRSS" in values else None


class MemorySampler:
    """Samples a process's ``VmRSS`` every ``interval`` seconds from a daemon thread, between entering and
    leaving: :attr:`samples` holds ``(seconds since start, KiB)``, :attr:`peak_kib` the largest (unlike
    ``VmHWM``, which counts from the process's start)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @property
    def peak_kib(self) -> int | None:
        return max((kib for _, kib in self.samples), default=None)

    def at(self, seconds: float) -> int | None:
        """The sample taken closest to ``seconds`` after the start."""
        return min(self.samples, key=lambda s: abs(s[0] - seconds))[1] if self.samples else None

    def _run(self) -> None:
        start = time.perf_counter()
        while True:
            memory = memory_kib(self.pid)
            if memory is not None:
                self.samples.append((round(time.perf_counter() - start, 2), memory["VmRSS"]))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
