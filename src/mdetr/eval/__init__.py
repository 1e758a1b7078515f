"""Evaluators: each accumulates predictions with ``update()`` and reports metrics with ``summarize()``."""

from mdetr.eval.coco import CocoBoxEvaluator, load_ground_truth
from mdetr.eval.refexp import RefExpEvaluator

__all__ = ["CocoBoxEvaluator", "RefExpEvaluator", "load_ground_truth"]
