"""Evaluators: each accumulates predictions with ``update()`` and reports metrics with ``summarize()``."""

from typing import Any

from mdetr.eval.coco import CocoBoxEvaluator, load_ground_truth
from mdetr.eval.flickr import FlickrEvaluator, FlickrGroundTruth
from mdetr.eval.refexp import RefExpEvaluator

__all__ = ["CocoBoxEvaluator", "FlickrEvaluator", "FlickrGroundTruth", "LvisEvaluator", "RefExpEvaluator",
           "load_ground_truth"]


def __getattr__(name: str) -> Any:
    # The LVIS evaluator pulls in the model code (class-name inference); import it only when asked for.
    if name == "LvisEvaluator":
        from mdetr.eval.lvis import LvisEvaluator

        return LvisEvaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
