"""An inference copy of a model with the same outputs and less work.

Four rewrites, each exact up to float rounding, and a fifth, exact, for copies run under autocast:

* every frozen batch norm that directly follows a convolution is folded into that convolution's weight and
  bias (``y = conv(x) * scale + shift`` becomes one convolution), which removes two full passes over every
  feature map;
* the backbone runs in channels-last memory format, where oneDNN's CPU kernels handle the 1x1 and
  depthwise convolutions of EfficientNet and ResNet directly (in the default layout, batch-1 1x1
  convolutions fall back to a generic im2col path);
* ReLU6 activations run in place;
* float32 linear layers on the CPU run on oneDNN's matrix-multiply kernels instead of the BLAS that
  ``torch.nn.functional.linear`` calls (:func:`mdetr.ops.linear.onednn_linear_layers`);
* for a copy that runs under bf16 (or fp16) autocast, the weights and biases of the linear layers,
  attention input projections and convolutions are stored in that dtype: autocast casts them to it at
  every call anyway, so the numbers are the same and each call skips reading and converting them (about
  140M values for ResNet-101 with roberta-base).

On request (``compile=True``) the copy's tensor-only parts are also compiled by ``torch.compile`` with
inductor's ``freezing``: weights become constants, convolution weights are packed once for oneDNN and each
convolution runs fused with the ReLU and residual sum after it (:func:`compile_for_inference`).

The copy keeps the original module names, but its state dict differs (folded weights, no batch-norm
buffers): it is for running, not for saving. PyTorch's own ``torch.fx`` fusion helpers need a traceable
graph, which the backbone's data-dependent padding and feature selection are not, hence this small pass.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn

from mdetr.models.backbones.frozen_bn import FrozenBatchNorm2d
from mdetr.models.compile import COMPILE_TARGETS, compile_frozen
from mdetr.ops.linear import onednn_linear_layers

__all__ = ["cast_autocast_weights", "channels_last_backbone", "compile_for_inference",
           "fold_frozen_batchnorm", "optimize_for_inference"]

# (convolution, batch norm that follows it) child names in the backbones' blocks: EfficientNet stem and
# blocks, ResNet stem, blocks and downsample branches.
_CONV_BN_PAIRS = (("conv_stem", "bn1"), ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"),
                  ("conv_dw", "bn1"), ("conv_pw", "bn2"), ("conv1", "bn1"), ("conv2", "bn2"),
                  ("conv3", "bn3"), ("0", "1"))


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold, in place, each frozen batch norm into the convolution before it; returns how many were folded.

    Only pairs where the block's forward applies the norm directly to the convolution's output are folded
    (the child names of :data:`_CONV_BN_PAIRS`, with matching channel counts).
    """
    folded = 0
    children = dict(module.named_children())
    for conv_name, bn_name in _CONV_BN_PAIRS:
        conv, bn = children.get(conv_name), children.get(bn_name)
        if (isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d)
                and conv.out_channels == bn.num_features):
            _fold(conv, bn)
            setattr(module, bn_name, nn.Identity())
            children[bn_name] = None
            folded += 1
    for child in module.children():
        folded += fold_frozen_batchnorm(child)
    return folded


def _to_channels_last(_: nn.Module, args: tuple) -> tuple:
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest)


def optimize_for_inference(model: nn.Module, *, dtype: torch.dtype = torch.float32,
                           compile: bool = False) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose CNN backbone has folded batch norms, channels-last layout
    and in-place activations, and whose linear layers run on oneDNN in float32 inference (each change exact
    up to float rounding). With a ``dtype`` other than float32 the copy is for running under autocast to
    that dtype, and only there: its linear and convolution weights are stored in it
    (:func:`cast_autocast_weights`). Models without the ``backbone[0].body`` layout of MDETR get no
    backbone rewrite. ``compile``: see :func:`compile_for_inference` (the first calls are slow)."""
    fast = copy.deepcopy(model).eval()
    body = _backbone_body(fast)
    if body is not None:
        fold_frozen_batchnorm(body)
        channels_last_backbone(fast)
        for module in body.modules():
            if isinstance(module, nn.ReLU6):
                module.inplace = True
    if dtype == torch.float32:
        onednn_linear_layers(fast)
    else:  # under autocast the linear layers run in dtype, where oneDNN's linear does not apply
        cast_autocast_weights(fast, dtype)
    if compile:
        compile_for_inference(fast, dtype=dtype)
    return fast


def compile_for_inference(model: nn.Module, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """``torch.compile``, in place, the tensor-only parts of an inference copy, with inductor's
    ``freezing`` (:func:`mdetr.models.compile.compile_frozen`: weights are treated as constants, packed once
    for oneDNN, and each convolution runs fused with the element-wise operations after it); returns the
    names compiled (under ``detr.`` for a segmentation model). Needs a C++ compiler on the CPU; the copy's
    weights must not change afterwards; no-grad inference only (``freezing`` applies where autograd is
    off).

    The backbone is compiled with static shapes (inductor's freezing pass fails on the dynamic-shape graph
    of a backbone whose padding depends on the input size, EfficientNet's TensorFlow "same", in torch
    2.13): each new image batch shape compiles anew, for seconds, within the process-wide
    ``torch._dynamo.config.recompile_limit``. Under autocast the text encoder and the transformer's
    encoder and decoder are compiled too, and there shapes become dynamic at the first change (the second
    caption length compiles once more, later ones reuse it). In float32 they stay eager: compiled in place
    of the oneDNN linear layers of :mod:`mdetr.ops.linear` they made a ResNet-101 copy slower
    (BENCHMARKS.md, section 9)."""
    detr = getattr(model, "detr", None)  # MDETRSegmentation wraps the detector
    prefix, root = ("detr.", detr) if isinstance(detr, nn.Module) else ("", model)
    names = compile_frozen(root, names=("backbone",))
    if dtype != torch.float32:
        names += compile_frozen(root, names=[n for n in COMPILE_TARGETS if n != "backbone"], dynamic=None)
    return [prefix + name for name in names]


def cast_autocast_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store, in place, in ``dtype`` the weight and bias of every ``nn.Linear`` and ``nn.Conv2d`` of
    ``model`` and the input projections of :class:`mdetr.models.transformer.MultiheadAttention`; returns
    how many modules were cast. Under ``torch.autocast(..., dtype)`` these run in ``dtype`` with their
    parameters cast at every call, so the outputs do not change; outside autocast the model would mix
    dtypes and fail. Embeddings and the parameters of norms stay float32."""
    from mdetr.models.transformer import MultiheadAttention

    cast = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            params = (module.weight, module.bias)
        elif isinstance(module, MultiheadAttention):
            params = (module.in_proj_weight, module.in_proj_bias)
        else:
            continue
        for param in params:
            if param is not None and param.is_floating_point():
                param.data = param.data.to(dtype)
        cast += 1
    return cast


def channels_last_backbone(model: nn.Module, *, weights: bool = True) -> bool:
    """Run ``model``'s CNN backbone in channels-last memory format, in place: the images it is given and,
    with ``weights``, its convolution weights (the activations follow the input's layout either way). For
    training keep ``weights=False``: parameters, gradients and optimizer state then stay contiguous, which
    PyTorch's fused AdamW needs (it mixes up tensors of different layouts). False when the model has no
    MDETR backbone body."""
    body = _backbone_body(model)
    if body is None:
        return False
    if weights:
        body.to(memory_format=torch.channels_last)
    else:
        # Every convolution fed channels-last activations, the backbone's and the input projection after it.
        for param in model.parameters():
            if param.requires_grad and param.dim() == 4:
                param.register_hook(functools.partial(_strided_like, param))
    body.register_forward_pre_hook(_to_channels_last)
    return True


def _strided_like(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` with ``param``'s strides. A 1x1 convolution's weight gradient from channels-last
    activations comes back with other strides on its size-1 dimensions: the same memory, but DDP compares
    strides (and warns at every run) and the fused optimizer wants one layout for parameter and gradient."""
    return grad if grad.stride() == param.stride() else grad.clone(memory_format=torch.contiguous_format)


def _backbone_body(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, "backbone", None)
    if backbone is None and hasattr(model, "detr"):  # MDETRSegmentation wraps the detector
        backbone = getattr(model.detr, "backbone", None)
    try:
        body = backbone[0].body
    except (TypeError, IndexError, AttributeError):
        return None
    return body if isinstance(body, nn.Module) else None
