"""Convolutional backbone bodies: images in, four feature levels out.

Every body is an ``nn.Module`` that maps ``(B, 3, H, W)`` images, normalised with the ImageNet mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), to
``{"layer1": ..., "layer2": ..., "layer3": ..., "layer4": ...}`` at strides ``body.strides`` with
``body.channels`` channels. All batch norms are frozen. Parameter names carry no prefix of their own,
so inside the detector (``backbone.0.body``) they line up with the official MDETR checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from mdetr.models.backbones.efficientnet import (
    EFFICIENTNET_NAMES,
    EfficientNetBody,
    EfficientNetConfig,
    EfficientNetLite0Classifier,
    StageSpec,
    build_efficientnet_body,
)
from mdetr.models.backbones.frozen_bn import FrozenBatchNorm2d, freeze_batch_norm
from mdetr.models.backbones.resnet import RESNET_NAMES, ResNetBody, build_resnet_body

__all__ = [
    "BACKBONE_BODY_NAMES",
    "BackboneBody",
    "EfficientNetBody",
    "EfficientNetConfig",
    "EfficientNetLite0Classifier",
    "FrozenBatchNorm2d",
    "ResNetBody",
    "StageSpec",
    "build_backbone_body",
    "freeze_batch_norm",
]

BACKBONE_BODY_NAMES: tuple[str, ...] = RESNET_NAMES + EFFICIENTNET_NAMES


@runtime_checkable
class BackboneBody(Protocol):
    """What the detector relies on; ``ResNetBody`` and ``EfficientNetBody`` are ``nn.Module`` s with it.

    Attributes:
        channels: channels of ``layer1`` .. ``layer4``.
        strides: strides of ``layer1`` .. ``layer4`` relative to the input image.
    """

    channels: list[int]
    strides: list[int]

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """``(B, 3, H, W)`` ImageNet-normalised images -> ``{"layer{i}": (B, channels[i-1], H_i, W_i)}``
        with ``H_i = ceil(H / strides[i-1])``."""
        ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


def build_backbone_body(name: str, *, pretrained: bool = True, dilation: bool = False) -> BackboneBody:
    """Build a backbone body by name.

    Args:
        name: one of ``BACKBONE_BODY_NAMES``: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``,
            ``efficientnet_lite0``, ``tf_efficientnet_b3_ns``, ``tf_efficientnet_b5_ns``.
        pretrained: load ImageNet weights. Only ``efficientnet_lite0`` has weights shipped with the
            package; for the others this raises ``ValueError`` (build with ``pretrained=False`` and load
            an MDETR checkpoint instead).
        dilation: replace the stride of the last ResNet stage by dilation (``layer4`` at stride 16).
            Only for ``resnet50`` / ``resnet101``.

    Returns:
        An ``nn.Module`` satisfying ``BackboneBody``.
    """
    if name in RESNET_NAMES:
        return build_resnet_body(name, pretrained=pretrained, dilation=dilation)
    if name in EFFICIENTNET_NAMES:
        if dilation:
            raise ValueError(f"dilation=True is only supported for ResNet-50/101 bodies, not {name!r}")
        return build_efficientnet_body(name, pretrained=pretrained)
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONE_BODY_NAMES)}")
