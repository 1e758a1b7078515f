"""The load-test core (``mdetr.serve.loadtest``, driven by ``bench/serve_load.py``) run briefly in-process
against a real uvicorn server on loopback: no errors, every fuzzed request answered with a 4xx, and every
normal response holding the predictor's own detections for that request's image and sentence."""

import io
import os
import sys

import pytest
from PIL import Image

from mdetr.inference.predictor import Predictor
from mdetr.serve import RequestError, ServeLimits, ThreadedServer, create_app, decode_image
from mdetr.serve.loadtest import (
    LoadConfig,
    example_jobs,
    fuzz_cases,
    is_fuzz,
    memory_kib,
    png_bomb,
    run_load,
    same_detections,
    warm_up,
)

LIMITS = ServeLimits()  # the server's defaults, as `mdetr serve` and the benchmark use
CONFIG = LoadConfig(clients=2, seconds=3.0, fuzz_fraction=0.75, threshold=0.0, top_k=3)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint)


def test_load_run_has_no_errors_and_no_mixed_results(predictor):
    jobs = example_jobs()
    assert len({job.text for job in jobs}) == len(jobs) > 1
    fuzz = fuzz_cases(jobs[0].image, jobs[0].text, LIMITS)
    with ThreadedServer(create_app(predictor, LIMITS, threads=2)) as server:
        warm_up(server.url, jobs, CONFIG)
        before = memory_kib(os.getpid())
        result = run_load(server.url, jobs, fuzz, CONFIG, keep_responses=True)
        after = memory_kib(os.getpid())

    assert result.errors == 0, result.error_messages
    assert 2.9 < result.seconds < 30  # bounded: it stopped by itself soon after the deadline
    assert result.completed == result.normal + result.fuzz
    assert result.normal > 0 and len(result.responses) == result.normal == len(result.normal_latency_ms)
    # Every fuzzed request got a 4xx, and each kind was sent (the clients share one cycle through them).
    statuses = {name: dict(counts) for name, counts in result.fuzz_statuses.items()}
    assert all(400 <= status < 500 for counts in statuses.values() for status in counts), statuses
    assert sum(n for counts in statuses.values() for n in counts.values()) == result.fuzz > 0
    assert result.fuzz >= len(fuzz) and all(statuses[case.name] for case in fuzz), statuses
    # Each response is the predictor's own answer for that job's image and sentence.
    direct = {}
    for j in sorted({j for j, _ in result.responses}):
        image = Image.open(io.BytesIO(jobs[j].image)).convert("RGB")
        direct[j] = predictor.predict(image, jobs[j].text, threshold=CONFIG.threshold, top_k=CONFIG.top_k)
    for j, detections in result.responses:
        text, grounding = jobs[j].text, direct[j]
        assert len(detections) == len(grounding.scores) == CONFIG.top_k
        for det, box, score, phrase, spans in zip(detections, grounding.boxes.tolist(),
                                                  grounding.scores.tolist(), grounding.phrases,
                                                  grounding.spans, strict=True):
            assert det["box"] == pytest.approx(box, abs=0.006)
            assert det["score"] == pytest.approx(score, abs=6e-5)
            assert det["phrase"] == phrase
            assert det["span"] == [list(s) for s in spans]
            assert det["phrase"] == " ".join(text[a:b] for a, b in det["span"])  # from its own sentence
    # The comparison the benchmark makes (same_detections) tells one job's answer from another's.
    first = {j: detections for j, detections in reversed(result.responses)}
    assert len(first) > 1
    for j, detections in result.responses:
        assert all(same_detections(detections, other) == (j == k) for k, other in first.items())
    if sys.platform.startswith("linux"):
        assert before is not None and after is not None and after["VmRSS"] > 0


def test_fuzz_helpers():
    assert sum(is_fuzz(i, 0.2) for i in range(100)) == 20
    assert not any(is_fuzz(i, 0.0) for i in range(100))
    limits = ServeLimits(max_pixels=1_000_000)
    bomb = png_bomb(1001)
    assert len(bomb) < 2_000  # a few hundred bytes that decode to a million pixels
    with pytest.raises(RequestError, match="pixels") as err:
        decode_image(bomb, limits)
    assert err.value.status == 413
    with pytest.raises(ValueError, match="fuzz_fraction"):
        LoadConfig(fuzz_fraction=1.0)
