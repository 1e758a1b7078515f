"""float32 linear layers on oneDNN's CPU kernels, forward and backward.

PyTorch's CPU float32 ``linear`` and ``matmul`` call its BLAS (MKL in the x86 wheels), which on AMD
processors takes its AVX2 code path: about 200 GFLOP/s on two Zen 5 cores, against 330-450 GFLOP/s for
oneDNN's AVX-512 kernels on the layer shapes of these models (``bench/linear_kernels.py``, BENCHMARKS.md
section 9). PyTorch reaches oneDNN's linear only through the operator ``mkldnn::_linear_pointwise``, which
has no autograd formula; :func:`onednn_linear` uses it for the forward pass and, through a small
``autograd.Function``, for the two matrix products of the backward pass. The result is ``F.linear``'s up to
float rounding (another summation order). Everywhere the operator does not apply (other devices and dtypes,
autocast, code being compiled by ``torch.compile``, a build without oneDNN) it is ``F.linear`` itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OneDNNLinear", "onednn_linear", "onednn_linear_available", "onednn_linear_layers"]


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear operator and it computes ``F.linear``."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
               for shape in ((2, 3, 16), (8, 16), (8,)))
    try:
        return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except RuntimeError:
        return False


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` on oneDNN; ``weight`` may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _onednn(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @torch.autograd.function.once_differentiable  # the operator has no derivative of its own
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (M, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (M, out) @ (out, in)
            grad_x = _onednn(rows, weight.t(), None).reshape(x.shape)
        if ctx.needs_input_grad[1]:  # (out, M) @ (M, in)
            grad_weight = _onednn(rows.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(dim=0)
        return grad_x, grad_weight, grad_bias


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN's kernels for float32 CPU tensors outside autocast (with a
    backward pass on oneDNN too when a gradient is wanted), on ``F.linear`` otherwise."""
    # Under torch.compile the compiler chooses the kernels (inductor cannot lower this operator with a
    # weight that is not pre-packed).
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and onednn_linear_available()):
        return F.linear(x, weight, bias)
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    return _OneDNNLinearFunction.apply(x, weight, bias) if wants_grad else _onednn(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`onednn_linear`: the same parameters and state dict."""

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias)


def onednn_linear_layers(model: nn.Module) -> int:
    """Route, in place, ``model``'s linear layers through :func:`onednn_linear`: every ``nn.Linear``
    becomes an :class:`OneDNNLinear` and the input projections of
    :class:`mdetr.models.transformer.MultiheadAttention` use it; returns how many modules changed. Checkpoint
    keys stay the same; outputs change by float rounding only."""
    from mdetr.models.transformer import MultiheadAttention

    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            changed += 1
        elif isinstance(module, MultiheadAttention) and module.project is not onednn_linear:
            module.project = onednn_linear
            changed += 1
    return changed
