"""Batch normalisation with fixed statistics and affine parameters.

Detection batches hold one or two large images per device, far too few for batch statistics, so every
backbone normalisation layer keeps its ImageNet statistics and affine parameters as buffers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """``BatchNorm2d`` in permanent eval mode, with no trainable parameters.

    ``y = x * scale + shift`` with ``scale = weight * rsqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, per channel.

    Buffers ``weight``, ``bias``, ``running_mean`` and ``running_var`` (each ``(C,)``) keep the names of
    ``nn.BatchNorm2d`` so BatchNorm state dicts load directly; their ``num_batches_tracked`` entry is
    dropped on load.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance; 1e-5 matches torchvision ResNets, TensorFlow-trained EfficientNets
            used 1e-3.
        inplace: overwrite the input instead of allocating the output (the same two operations, so the
            same numbers). For a norm applied to a convolution's fresh output, as in this package's
            backbones: autograd needs neither that output nor the input of the scaling.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.inplace = inplace
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints saved from nn.BatchNorm2d carry a step counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` of shape ``(B, C, H, W)``; the output has the same shape and dtype."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        scale, shift = scale.view(1, -1, 1, 1).to(x.dtype), shift.view(1, -1, 1, 1).to(x.dtype)
        if self.inplace:
            return x.mul_(scale).add_(shift)
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (", inplace=True" if self.inplace else "")


def _frozen_copy(batch_norm: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(batch_norm.num_features, eps=batch_norm.eps)
    source_tensor = next(iter([*batch_norm.parameters(), *batch_norm.buffers()]), None)
    if source_tensor is not None:
        frozen = frozen.to(source_tensor.device)
    with torch.no_grad():
        if batch_norm.affine:
            frozen.weight.copy_(batch_norm.weight)
            frozen.bias.copy_(batch_norm.bias)
        if batch_norm.track_running_stats:
            frozen.running_mean.copy_(batch_norm.running_mean)
            frozen.running_var.copy_(batch_norm.running_var)
    return frozen


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (itself included) by a ``FrozenBatchNorm2d``.

    Statistics, affine parameters and ``eps`` are copied. The tree is modified in place; the return
    value is ``module`` itself, or the new frozen layer if ``module`` is a BatchNorm. Activations are
    separate modules in this package, so they are left untouched.
    """
    if isinstance(module, nn.BatchNorm2d):
        return _frozen_copy(module)
    for name, child in module.named_children():
        replacement = freeze_batch_norm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
