"""Named architectures, in the manner of detr's ``hubconf.py``: a name gives a full :class:`ModelConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mdetr.config import ConfigError, ModelConfig

_ARCHS: dict[str, Callable[[], ModelConfig]] = {}


def register_arch(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHS[name] = fn
        return fn

    return wrap


def available_archs() -> list[str]:
    return sorted(_ARCHS)


def get_arch_config(name: str, **overrides: object) -> ModelConfig:
    if name not in _ARCHS:
        raise ConfigError(f"unknown architecture {name!r}; available: {', '.join(available_archs())}")
    config = dataclasses.replace(_ARCHS[name](), **overrides)
    config.arch = name
    return config


@register_arch("mdetr_resnet101")
def _mdetr_resnet101() -> ModelConfig:
    """The paper's main model: ResNet-101 + RoBERTa-base, 100 queries, 6+6 layers (official hub defaults)."""
    return ModelConfig(backbone="resnet101", text_encoder="roberta-base", num_queries=100)


@register_arch("mdetr_lite")
def _mdetr_lite() -> ModelConfig:
    """A laptop-CPU MDETR: ImageNet EfficientNet-Lite0 (stride-16 features) + all-MiniLM-L6-v2.

    Both pretrained parts ship on PyPI, so the model builds with no network. The transformer is narrower
    and shallower than the paper's, sized for small images (about 256 px) and short texts.
    """
    return ModelConfig(
        backbone="efficientnet_lite0",
        backbone_level=2,
        backbone_frozen_levels=2,
        text_encoder="minilm",
        hidden_dim=256,
        nheads=8,
        enc_layers=3,
        dec_layers=3,
        dim_feedforward=1024,
        dropout=0.1,
        num_queries=16,
    )
