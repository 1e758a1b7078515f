"""``bench/speed_vs_official.py``'s batches larger than its captions: each image gets a caption with its own
phrases and answer, in order."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling modules by name
    try:
        yield importlib.import_module("speed_vs_official")
    finally:
        sys.path.remove(str(BENCH))


def test_captions_repeat_in_order_with_their_phrases_and_answers(bench):
    setup = bench.SETUPS["clevr"]
    sizes = [(320, 480)] * 5
    batch = bench.for_batch(setup, sizes)
    assert batch.sizes == sizes
    assert batch.captions == [setup.captions[i % 2] for i in range(5)]
    assert batch.phrases == [setup.phrases[i % 2] for i in range(5)]
    assert batch.answers == [setup.answers[i % 2] for i in range(5)]
    for caption, phrases in zip(batch.captions, batch.phrases, strict=True):  # every phrase in its caption
        assert all(phrase in caption for phrase, _ in phrases)
    assert bench.for_batch(setup, setup.sizes) is setup
    no_answers = bench.for_batch(bench.SETUPS["resnet101"], sizes[:3])
    assert no_answers.answers is None and len(no_answers.captions) == 3
