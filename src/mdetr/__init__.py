"""mdetr: text-modulated object detection (MDETR) with a CPU-friendly, offline-first toolkit.

    >>> import mdetr
    >>> predictor = mdetr.Predictor.from_checkpoint("runs/demo/train/best")
    >>> grounding = predictor.predict("scene.png", "the small red circle left of the blue square")
    >>> grounding.boxes, grounding.scores, grounding.phrases
"""

from mdetr.builder import build, build_model, load
from mdetr.config import Config, ConfigError, load_config
from mdetr.inference.predictor import Predictor
from mdetr.registry import available_archs, get_arch_config, official_archs

__all__ = ["Config", "ConfigError", "Predictor", "available_archs", "build", "build_model", "get_arch_config",
           "load", "load_config", "official_archs"]
