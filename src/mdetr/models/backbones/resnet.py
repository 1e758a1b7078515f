"""ResNet bodies (He et al. 2016) with frozen batch norm and no classification head.

Submodule names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}``,
``layer{k}.0.downsample.{0,1}``), which is what the released MDETR checkpoints store under
``backbone.0.body``. Bottleneck blocks put the stride on the 3x3 convolution ("ResNet v1.5").
"""

from __future__ import annotations

from torch import Tensor, nn

from mdetr.models.backbones.frozen_bn import FrozenBatchNorm2d

FEATURE_LEVEL_NAMES = ("layer1", "layer2", "layer3", "layer4")


def _conv3x3(in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        bias=False,
    )


def _conv1x1(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut; used by ResNet-18/34."""

    expansion = 1

    def __init__(
        self,
        *,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if dilation != 1:
            raise ValueError("BasicBlock (ResNet-18/34) does not support dilation")
        self.conv1 = _conv3x3(in_channels, planes, stride=stride)
        self.bn1 = FrozenBatchNorm2d(planes, inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = FrozenBatchNorm2d(planes, inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, planes, H / stride, W / stride)``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut  # in place, as torchvision: no new buffer, and autograd keeps neither input
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, possibly dilated), 1x1 expand by 4; used by ResNet-50/101."""

    expansion = 4

    def __init__(
        self,
        *,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = FrozenBatchNorm2d(planes, inplace=True)
        self.conv2 = _conv3x3(planes, planes, stride=stride, dilation=dilation)
        self.bn2 = FrozenBatchNorm2d(planes, inplace=True)
        self.conv3 = _conv1x1(planes, out_channels)
        self.bn3 = FrozenBatchNorm2d(out_channels, inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W) -> (B, 4 * planes, H / stride, W / stride)``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += shortcut
        return self.relu(out)


class ResNetBody(nn.Module):
    """ResNet stem and four stages, returning every stage output.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        blocks_per_stage: number of blocks in ``layer1`` .. ``layer4``.
        dilate_last_stage: keep ``layer4`` at stride 16 and dilate its 3x3 convolutions by 2 instead
            (torchvision's ``replace_stride_with_dilation=[False, False, True]``; DETR's "DC5").

    Attributes:
        channels: output channels of ``layer1`` .. ``layer4``.
        strides: output strides of ``layer1`` .. ``layer4`` relative to the input.
    """

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: tuple[int, int, int, int],
        dilate_last_stage: bool = False,
    ) -> None:
        super().__init__()
        self._in_channels = 64
        self._dilation = 1
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64, inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(block, 128, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(block, 256, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(block, 512, blocks_per_stage[3], stride=2, dilate=dilate_last_stage)
        self.channels = [planes * block.expansion for planes in (64, 128, 256, 512)]
        self.strides = [4, 8, 16, 16 if dilate_last_stage else 32]
        self._init_weights()

    def _make_stage(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        num_blocks: int,
        *,
        stride: int,
        dilate: bool = False,
    ) -> nn.Sequential:
        # As in torchvision, a dilated stage's first block keeps the previous dilation; the stride it
        # gives up is turned into dilation for the blocks after it.
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                _conv1x1(self._in_channels, out_channels, stride=stride),
                FrozenBatchNorm2d(out_channels, inplace=True),
            )
        blocks = [
            block(
                in_channels=self._in_channels,
                planes=planes,
                stride=stride,
                dilation=first_dilation,
                downsample=downsample,
            )
        ]
        self._in_channels = out_channels
        blocks += [
            block(in_channels=out_channels, planes=planes, dilation=self._dilation)
            for _ in range(1, num_blocks)
        ]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, *, levels: int = 4) -> dict[str, Tensor]:
        """Run the stem and the first ``levels`` stages.

        Args:
            x: ``(B, 3, H, W)`` images normalised with ImageNet mean and std.

        Returns:
            ``{"layer1": (B, channels[0], H/4, W/4), ..., "layer4": (B, channels[3], H/s, W/s)}`` (the first
            ``levels`` of them) with ``s = strides[3]`` (32, or 16 when the last stage is dilated); sizes are
            rounded up.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features: dict[str, Tensor] = {}
        for name in FEATURE_LEVEL_NAMES[:levels]:
            x = getattr(self, name)(x)
            features[name] = x
        return features


_RESNET_SPECS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}

RESNET_NAMES = tuple(_RESNET_SPECS)


def build_resnet_body(name: str, *, pretrained: bool = False, dilation: bool = False) -> ResNetBody:
    """Build ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` with randomly initialised weights.

    No ImageNet ResNet weights ship with this package (there is no network access to fetch them), so
    ``pretrained=True`` raises; the weights come from an MDETR checkpoint loaded afterwards.
    """
    if name not in _RESNET_SPECS:
        raise ValueError(f"unknown ResNet {name!r}; expected one of {', '.join(RESNET_NAMES)}")
    if pretrained:
        raise ValueError(
            f"no pretrained ImageNet weights for {name!r} ship with the mdetr package. Build it with "
            "pretrained=False and load the backbone weights from an MDETR checkpoint "
            "(keys 'backbone.0.body.*'), or load a torchvision ResNet state dict into it yourself."
        )
    block, blocks_per_stage = _RESNET_SPECS[name]
    if dilation and block is BasicBlock:
        raise ValueError(f"dilation=True needs a bottleneck ResNet (resnet50/resnet101), not {name!r}")
    return ResNetBody(block=block, blocks_per_stage=blocks_per_stage, dilate_last_stage=dilation)
