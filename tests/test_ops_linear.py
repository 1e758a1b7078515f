"""oneDNN's linear (mdetr.ops.linear) computes F.linear and its gradients, and steps aside where it must."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdetr.models.transformer import MultiheadAttention
from mdetr.ops.linear import OneDNNLinear, onednn_linear, onednn_linear_available, onednn_linear_layers

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="PyTorch built without oneDNN")


def _ran(op_name: str, fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.name == op_name for event in prof.events())


def _cases(generator: torch.Generator):
    # weights scaled as initialisations scale them (outputs of order 1), so 1e-5 is a few float32 ulps
    weight, bias = torch.randn(48, 256, generator=generator) / 16, torch.randn(48, generator=generator)
    sliced = torch.randn(3 * 48, 256, generator=generator)[48:96] / 16  # as the attention's projections
    inputs = [torch.randn(2, 37, 256, generator=generator),                  # (B, N, D) rows
              torch.randn(37, 2, 256, generator=generator).transpose(0, 1),  # a non-contiguous view
              torch.randn(5, 256, generator=generator)]
    for x in inputs:
        for w, b in ((weight, bias), (weight, None), (sliced, bias)):
            yield x, w, b


def test_forward_is_the_linear_function_on_onednn() -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x, w, b in _cases(generator):
            torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        x, w, b = next(_cases(generator))
        assert _ran("mkldnn::_linear_pointwise", lambda: onednn_linear(x, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own bf16 linear
            assert not _ran("mkldnn::_linear_pointwise", lambda: onednn_linear(x, w, b))
        x64, w64, b64 = x.double(), w.double(), b.double()
        assert not _ran("mkldnn::_linear_pointwise", lambda: onednn_linear(x64, w64, b64))


def test_gradients_are_the_linear_functions_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    for x, w, b in _cases(generator):
        for wanted in ("x", "w", "b", "all"):
            leaves = {name: t.detach().clone().requires_grad_(wanted in (name, "all"))
                      for name, t in (("x", x), ("w", w), ("b", b)) if t is not None}
            if not any(t.requires_grad for t in leaves.values()):
                continue
            upstream = torch.randn(*x.shape[:-1], w.shape[0], generator=generator)
            ours = onednn_linear(leaves["x"], leaves["w"], leaves.get("b"))
            assert ours.grad_fn is not None and "OneDNN" in type(ours.grad_fn).__name__
            grads = torch.autograd.grad(ours, [t for t in leaves.values() if t.requires_grad], upstream)
            expected_out = F.linear(leaves["x"], leaves["w"], leaves.get("b"))
            expected = torch.autograd.grad(expected_out, [t for t in leaves.values() if t.requires_grad],
                                           upstream)
            for got, want in zip(grads, expected, strict=True):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_layers_keep_their_names_and_train_to_the_same_weights() -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    attention = MultiheadAttention(16, 4)
    model = nn.ModuleDict({"mlp": reference, "attention": attention})
    routed = copy.deepcopy(model)
    assert onednn_linear_layers(routed) == 4  # two Linear, the attention's output projection, its inputs
    assert onednn_linear_layers(routed) == 0  # already routed
    assert isinstance(routed["mlp"][0], OneDNNLinear) and routed["attention"].project is onednn_linear
    assert list(routed.state_dict()) == list(model.state_dict())
    x = torch.randn(3, 5, 16)
    for m in (model, routed):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            (m["mlp"](m["attention"](x, x, x)).square().mean()).backward()
            optimizer.step()
    for (name, a), (_, b) in zip(model.state_dict().items(), routed.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_under_torch_compile_the_compiler_keeps_its_own_linear() -> None:
    layer = nn.Linear(16, 8)
    onednn_linear_layers(layer)
    compiled = torch.compile(layer, backend="eager")  # dynamo traces; the eager backend runs the graph
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert _ran("mkldnn::_linear_pointwise", lambda: layer(x))
        assert not _ran("mkldnn::_linear_pointwise", lambda: compiled(x))
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_second_derivatives_are_refused_rather_than_wrong() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(8, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(onednn_linear(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_the_availability_probe_does_not_depend_on_the_default_dtype() -> None:
    onednn_linear_available.cache_clear()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert onednn_linear_available()
    finally:
        torch.set_default_dtype(previous)
        onednn_linear_available.cache_clear()
    assert onednn_linear_available()
