"""Backbone bodies: frozen batch norm, torchvision/timm parameter names, pretrained Lite0, padding."""

from __future__ import annotations

import math
import re
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdetr.models.backbones import (
    BACKBONE_BODY_NAMES,
    BackboneBody,
    EfficientNetLite0Classifier,
    FrozenBatchNorm2d,
    build_backbone_body,
    freeze_batch_norm,
)
from mdetr.models.backbones.efficientnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Conv2dSame,
    lite0_weights_path,
    map_lukemelas_keys,
)

CAT_CLASSES = {281, 282, 283, 285}  # tabby, tiger cat, Persian, Egyptian cat


@cache
def _body(name: str) -> nn.Module:
    return build_backbone_body(name, pretrained=name == "efficientnet_lite0")


@cache
def _lite0_source_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def _imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@cache
def _chelsea_224() -> torch.Tensor:
    """The scikit-image cat photo, resized to 224x224 and ImageNet-normalised: (1, 3, 224, 224)."""
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float() / 255  # (3, 300, 451)
    image = F.interpolate(image[None], size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return _imagenet_normalise(image)


# ---------------------------------------------------------------------------------------- frozen BN


def _random_batch_norm(channels: int, eps: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=eps)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3.0)
    bn.num_batches_tracked.fill_(17)
    return bn.eval()


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_frozen_batch_norm_matches_eval_batch_norm(eps: float) -> None:
    torch.manual_seed(0)
    bn = _random_batch_norm(8, eps)
    frozen = FrozenBatchNorm2d(8, eps=eps)
    frozen.load_state_dict(bn.state_dict())  # strict, with num_batches_tracked in it
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x))
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(frozen, name), getattr(bn, name).detach())


def test_frozen_batch_norm_has_no_parameters_and_no_counter() -> None:
    frozen = FrozenBatchNorm2d(4)
    assert list(frozen.parameters()) == []
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    # A fresh layer is the identity.
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(frozen(x), x * (1 + 1e-5) ** -0.5)


def test_freeze_batch_norm_keeps_activations_and_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        _random_batch_norm(6, 1e-3),
        nn.ReLU6(),
        nn.Sequential(nn.Conv2d(6, 6, 1), _random_batch_norm(6, 1e-5), nn.SiLU()),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    frozen = freeze_batch_norm(model)
    assert frozen is model
    assert isinstance(model[1], FrozenBatchNorm2d) and model[1].eps == 1e-3
    assert isinstance(model[2], nn.ReLU6) and isinstance(model[3][2], nn.SiLU)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected)
    assert isinstance(freeze_batch_norm(nn.BatchNorm2d(3)), FrozenBatchNorm2d)


# ------------------------------------------------------------------------------------------- ResNet

_RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def _torchvision_resnet_keys(name: str) -> set[str]:
    """The state-dict keys of torchvision's ResNet without ``fc`` and ``num_batches_tracked``."""
    bottleneck = name != "resnet18"
    bn_keys = ("weight", "bias", "running_mean", "running_var")
    keys = {"conv1.weight", *(f"bn1.{k}" for k in bn_keys)}
    for layer, num_blocks in enumerate(_RESNET_BLOCKS[name], start=1):
        for block in range(num_blocks):
            prefix = f"layer{layer}.{block}"
            for conv in range(1, 4 if bottleneck else 3):
                keys.add(f"{prefix}.conv{conv}.weight")
                keys.update(f"{prefix}.bn{conv}.{k}" for k in bn_keys)
            if block == 0 and (layer > 1 or bottleneck):
                keys.add(f"{prefix}.downsample.0.weight")
                keys.update(f"{prefix}.downsample.1.{k}" for k in bn_keys)
    return keys



def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _norm(bn: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)


def _resnet_by_hand(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ResNet forward written out of place from the modules' weights: the in-place norms and residual
    sums of the package must give the same numbers and gradients."""
    x = F.max_pool2d(F.relu(_norm(body.bn1, _conv(body.conv1, x))), 3, 2, 1)
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in stage:
            shortcut = x if block.downsample is None else _norm(block.downsample[1],
                                                                 _conv(block.downsample[0], x))
            convs = [m for n, m in block.named_children() if n.startswith("conv")]
            norms = [m for n, m in block.named_children() if n.startswith("bn")]
            out = x
            for i, (conv, bn) in enumerate(zip(convs, norms, strict=True)):
                out = _norm(bn, _conv(conv, out))
                out = F.relu(out + shortcut) if i == len(convs) - 1 else F.relu(out)
            x = out
    return x


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_in_place_norms_and_sums_give_the_out_of_place_numbers_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    body = build_backbone_body(name, pretrained=False)
    with torch.no_grad():  # statistics away from the identity, so every norm does something
        for bn in (m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.2)
            bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 2.0)
    assert all(m.inplace for m in body.modules() if isinstance(m, FrozenBatchNorm2d))
    images = torch.randn(2, 3, 64, 80)
    inputs = [images.clone().requires_grad_(), images.clone().requires_grad_()]
    ours = body(inputs[0])["layer4"]
    expected = _resnet_by_hand(body, inputs[1])
    assert torch.equal(ours, expected)
    weights = [p for p in body.parameters()]
    grad_ours = torch.autograd.grad(ours.square().sum(), [inputs[0], *weights])
    grad_expected = torch.autograd.grad(expected.square().sum(), [inputs[1], *weights])
    for a, b in zip(grad_ours, grad_expected, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(inputs[0].detach(), images)  # the caller's images are never overwritten


def test_in_place_frozen_batch_norm_is_the_same_operation() -> None:
    torch.manual_seed(0)
    bn = _random_batch_norm(8, 1e-3)
    inplace, plain = FrozenBatchNorm2d(8, eps=1e-3, inplace=True), FrozenBatchNorm2d(8, eps=1e-3)
    inplace.load_state_dict(bn.state_dict())
    plain.load_state_dict(bn.state_dict())
    x = torch.randn(2, 8, 5, 7)
    expected = plain(x)
    assert not torch.equal(expected, x)
    buffer = x.clone()
    assert inplace(buffer) is buffer and torch.equal(buffer, expected)
    assert "inplace=True" in repr(inplace) and "inplace" not in repr(plain)

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101"])
def test_resnet_state_dict_uses_torchvision_names(name: str) -> None:
    state = _body(name).state_dict()
    assert set(state) == _torchvision_resnet_keys(name)
    blocks = {re.match(r"layer\d\.\d+", key)[0] for key in state if key.startswith("layer")}
    assert len(blocks) == sum(_RESNET_BLOCKS[name])
    if name == "resnet101":
        assert state["layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)
        assert state["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    if name == "resnet18":
        assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    # Only convolutions are trainable; every normalisation is frozen.
    modules_with_parameters = [m for m in _body(name).modules() if list(m.parameters(recurse=False))]
    assert all(isinstance(m, nn.Conv2d) for m in modules_with_parameters)


def test_bottleneck_strides_on_the_3x3_convolution() -> None:
    block = _body("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", [64, 128, 256, 512]),
        ("resnet50", [256, 512, 1024, 2048]),
        ("resnet101", [256, 512, 1024, 2048]),
    ],
)
def test_resnet_levels(name: str, channels: list[int]) -> None:
    body = _body(name)
    assert isinstance(body, BackboneBody)
    assert body.channels == channels and body.strides == [4, 8, 16, 32]
    with torch.no_grad():
        features = body(torch.randn(2, 3, 64, 96))
    assert list(features) == ["layer1", "layer2", "layer3", "layer4"]
    for feature, c, s in zip(features.values(), channels, body.strides, strict=True):
        assert feature.shape == (2, c, 64 // s, 96 // s)


def test_resnet_dilation_keeps_last_stage_at_stride_16() -> None:
    body = build_backbone_body("resnet50", pretrained=False, dilation=True)
    assert body.strides == [4, 8, 16, 16]
    assert body.layer4[0].conv2.dilation == (1, 1) and body.layer4[1].conv2.dilation == (2, 2)
    assert set(body.state_dict()) == _torchvision_resnet_keys("resnet50")
    with torch.no_grad():
        features = body(torch.randn(1, 3, 64, 96))
    assert features["layer4"].shape == (1, 2048, 4, 6)
    with pytest.raises(ValueError, match="dilation"):
        build_backbone_body("resnet18", pretrained=False, dilation=True)


def test_resnet_pretrained_is_refused_with_a_way_out() -> None:
    with pytest.raises(ValueError, match="pretrained=False"):
        build_backbone_body("resnet101")


def test_unknown_backbone_and_efficientnet_dilation_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone_body("resnet152", pretrained=False)
    with pytest.raises(ValueError, match="dilation"):
        build_backbone_body("efficientnet_lite0", pretrained=False, dilation=True)


# --------------------------------------------------------------------------------- EfficientNet-Lite0


def test_lite0_every_package_tensor_is_mapped_once() -> None:
    source = _lite0_source_state_dict()
    body = _body("efficientnet_lite0")
    mapping = map_lukemelas_keys(source, stage_repeats=[len(stage) for stage in body.blocks])
    counters = [key for key in source if key.endswith("num_batches_tracked")]
    head = [key for key in source if key.split(".")[0] in ("_conv_head", "_bn1", "_fc")]
    assert (len(source), len(counters), len(head)) == (296, 49, 8)
    # Everything but the step counters is mapped, to distinct names.
    assert set(mapping) == set(source) - set(counters)
    assert len(set(mapping.values())) == len(mapping)
    body_mapping = {k: v.removeprefix("body.") for k, v in mapping.items() if k not in head}
    assert len(body_mapping) == 240
    body_state = body.state_dict()
    assert set(body_mapping.values()) == set(body_state)
    for source_key, target_key in body_mapping.items():
        assert torch.equal(body_state[target_key], source[source_key]), source_key
    # A few names fixed by timm's layout: stage 0 is depthwise-separable, the rest inverted residuals.
    assert mapping["_blocks.0._project_conv.weight"] == "body.blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.7._expand_conv.weight"] == "body.blocks.3.2.conv_pw.weight"
    assert mapping["_blocks.15._project_conv.weight"] == "body.blocks.6.0.conv_pwl.weight"
    assert mapping["_bn1.running_var"] == "bn_head.running_var"


def test_lite0_levels_and_tf_same_padding() -> None:
    body = _body("efficientnet_lite0")
    assert isinstance(body, BackboneBody)
    assert body.channels == [24, 40, 112, 320] and body.strides == [4, 8, 16, 32]
    assert [len(stage) for stage in body.blocks] == [1, 2, 2, 3, 3, 4, 1]
    assert not any(key.endswith("num_batches_tracked") or "se." in key for key in body.state_dict())
    with torch.no_grad():
        features = body(torch.randn(1, 3, 65, 97))
    for feature, c, s in zip(features.values(), body.channels, body.strides, strict=True):
        assert feature.shape == (1, c, math.ceil(65 / s), math.ceil(97 / s))


def test_lite0_converts_imagenet_normalisation_to_tensorflow_scaling() -> None:
    body = _body("efficientnet_lite0")
    pixels = torch.rand(1, 3, 4, 4)
    converted = _imagenet_normalise(pixels) * body.input_scale + body.input_shift
    torch.testing.assert_close(converted, (255 * pixels - 127) / 128)
    assert "input_scale" not in body.state_dict()


def test_pretrained_lite0_recognises_a_cat() -> None:
    classifier = EfficientNetLite0Classifier(pretrained=True).eval()
    with torch.no_grad():
        logits = classifier(_chelsea_224())[0]
    assert int(logits.argmax()) in CAT_CLASSES
    assert logits.softmax(-1)[list(CAT_CLASSES)].sum() > 0.8
    # Logits of the lukemelas/EfficientNet-PyTorch reference implementation of these weights (TF "SAME"
    # padding, BN eps 1e-3, inputs scaled to (p - 127) / 128) on this image: symmetric padding or another
    # normalisation moves them by more than the tolerance.
    reference = {281: 8.1345, 282: 8.3612, 283: 1.2859, 285: 10.5240}
    for class_id, value in reference.items():
        assert abs(logits[class_id].item() - value) < 0.05, class_id


def test_random_lite0_does_not_recognise_a_cat() -> None:
    torch.manual_seed(0)
    classifier = EfficientNetLite0Classifier(pretrained=False).eval()
    with torch.no_grad():
        probabilities = classifier(_chelsea_224())[0].softmax(-1)
    assert int(probabilities.argmax()) not in CAT_CLASSES
    assert probabilities[list(CAT_CLASSES)].sum() < 0.1


# ----------------------------------------------------------------------------------------- B3 / B5


@pytest.mark.parametrize(
    ("name", "channels", "stem", "repeats", "num_params"),
    [
        ("tf_efficientnet_b3_ns", [32, 48, 136, 384], 40, [2, 3, 3, 5, 5, 6, 2], 10_103_336),
        ("tf_efficientnet_b5_ns", [40, 64, 176, 512], 48, [3, 5, 5, 7, 7, 9, 3], 27_288_112),
    ],
)
def test_efficientnet_b3_b5_architecture(
    name: str, channels: list[int], stem: int, repeats: list[int], num_params: int
) -> None:
    body = _body(name)
    assert body.channels == channels and body.strides == [4, 8, 16, 32]
    assert [len(stage) for stage in body.blocks] == repeats
    state = body.state_dict()
    assert state["conv_stem.weight"].shape == (stem, 3, 3, 3)
    # SE width is a quarter of the block input (the stem), not of the expanded width.
    assert state["blocks.0.0.se.conv_reduce.weight"].shape == (stem // 4, stem, 1, 1)
    assert {
        "blocks.1.0.conv_pw.weight",
        "blocks.1.0.bn1.weight",
        "blocks.1.0.conv_dw.weight",
        "blocks.1.0.se.conv_expand.bias",
        "blocks.1.0.conv_pwl.weight",
        "blocks.1.0.bn3.running_var",
    } <= set(state)
    # Parameters plus frozen BN affine terms equal timm's tf_efficientnet_b3/b5 minus the head.
    bn_affine = sum(2 * m.num_features for m in body.modules() if isinstance(m, FrozenBatchNorm2d))
    assert sum(p.numel() for p in body.parameters()) + bn_affine == num_params


@pytest.mark.parametrize("name", ["tf_efficientnet_b3_ns", "tf_efficientnet_b5_ns"])
def test_efficientnet_same_padding_sizes(name: str) -> None:
    body = _body(name)
    with torch.no_grad():
        features = body(torch.randn(1, 3, 65, 97))
    for feature, c, s in zip(features.values(), body.channels, body.strides, strict=True):
        assert feature.shape == (1, c, math.ceil(65 / s), math.ceil(97 / s))
    with pytest.raises(ValueError, match="pretrained=False"):
        build_backbone_body(name, pretrained=True)


def test_conv2d_same_pads_like_tensorflow() -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(2, 3, 3, stride=2)
    x = torch.randn(1, 2, 6, 7)
    # Even size: one pixel of padding in total, on the bottom/right; odd size: one on each side.
    expected = F.conv2d(F.pad(x, [1, 1, 0, 1]), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)
    assert conv(x).shape[-2:] == (3, 4)


def _same_by_padded_copy(conv: Conv2dSame, x: torch.Tensor) -> torch.Tensor:
    """TensorFlow "SAME" the direct way: pad a copy of x (total // 2 before, the rest after), convolve."""
    pads = []
    for size, kernel, stride in zip(x.shape[-2:], conv.kernel_size, conv.stride, strict=True):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    (top, bottom), (left, right) = pads[:2], pads[2:]
    return F.conv2d(F.pad(x, [left, right, top, bottom]), conv.weight, conv.bias, conv.stride, 0, 1,
                    conv.groups)


@pytest.mark.parametrize("kernel, groups", [(3, 1), (3, 4), (5, 4)])  # dense, depthwise 3x3 and 5x5
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_same_without_a_padded_copy_is_bit_identical(kernel, groups, channels_last) -> None:
    """Every parity of height and width against padding a copy: outputs and input gradients bit for bit,
    weight gradients (a sum over batch and positions, in another order) to float rounding."""
    torch.manual_seed(kernel + groups)
    conv = Conv2dSame(4, 8 if groups == 1 else 4, kernel, stride=2, groups=groups)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    for height, width in [(16, 16), (15, 16), (16, 17), (15, 17), (2, 3)]:
        x = torch.randn(2, 4, height, width)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, expected = conv(x_a), _same_by_padded_copy(conv, x_b)
        assert torch.equal(got, expected), (height, width)
        weight_grads = []
        for out, inp in ((got, x_a), (expected, x_b)):
            grad_out = torch.linspace(-1, 1, out.numel()).view_as(out)
            weight_grads.append(torch.autograd.grad(out, (inp, conv.weight), grad_out))
        assert torch.equal(weight_grads[0][0], weight_grads[1][0])  # input gradient
        torch.testing.assert_close(weight_grads[0][1], weight_grads[1][1], rtol=1e-5, atol=1e-5)


def test_every_named_body_has_the_uniform_interface() -> None:
    assert set(BACKBONE_BODY_NAMES) == {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "efficientnet_lite0",
        "tf_efficientnet_b3_ns",
        "tf_efficientnet_b5_ns",
    }
    body = build_backbone_body("resnet34", pretrained=False)
    assert body.channels == [64, 128, 256, 512]
    assert isinstance(body, nn.Module) and isinstance(body, BackboneBody)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_gradients_reach_the_stem_and_statistics_stay_fixed(name: str) -> None:
    body = build_backbone_body(name, pretrained=False).train()
    statistics = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    features = body(torch.randn(2, 3, 32, 32))
    sum(feature.square().mean() for feature in features.values()).backward()
    stem = body.conv1 if name == "resnet18" else body.conv_stem
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    for key, value in body.state_dict().items():
        if key in statistics:
            assert torch.equal(value, statistics[key]), key


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_bodies_stop_after_the_levels_asked_for(name: str, levels: int) -> None:
    body = _body(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        full = body(x)
        part = body(x, levels=levels)
    assert list(part) == list(full)[:levels]
    for key, value in part.items():
        assert torch.equal(value, full[key]), key
