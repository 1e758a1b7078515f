"""``torch.compile`` for the parts of a model whose forward takes tensors only.

MDETR's whole forward takes caption strings, on which ``torch.compile`` would specialise and recompile for
every new batch, so training (``train.compile``) and inference (``optimize_for_inference(compile=True)``)
compile the backbone, the text encoder and the transformer's encoder and decoder one by one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE_TARGETS", "compile_frozen", "compile_submodules"]

# Submodule names across the architectures: MDETR and SMCA (``transformer.*``) and the detection
# transformers with a top-level encoder and decoder.
COMPILE_TARGETS = ("backbone", "transformer.text_encoder", "transformer.encoder", "transformer.decoder",
                   "encoder", "decoder")


def compile_submodules(model: nn.Module, *, names: Iterable[str] = COMPILE_TARGETS,
                       **options: Any) -> list[str]:
    """``torch.compile`` the named submodules that ``model`` has, in place (``nn.Module.compile``: the
    state-dict keys stay the same); returns the names compiled. ``options`` go to ``torch.compile``."""
    modules = _named_submodules(model, names)
    for module in modules.values():
        module.compile(**options)
    return list(modules)


def compile_frozen(model: nn.Module, *, names: Iterable[str] = COMPILE_TARGETS,
                   dynamic: bool | None = False) -> list[str]:
    """``torch.compile`` the forward of the named submodules that ``model`` has, in place, with inductor's
    ``freezing``; returns the names compiled. For inference copies only: the compiler then treats weights
    as constants (on the CPU it packs convolution and linear weights once for oneDNN and fuses each
    convolution with the element-wise operations after it), so later changes to them are not seen, and
    it applies only where autograd is off. ``dynamic`` goes to ``torch.compile``: the default, static
    shapes, compiles each new input shape anew (up to ``torch._dynamo.config.recompile_limit`` graphs per
    forward in the process, past which the part runs uncompiled); ``None`` turns shapes dynamic at the
    first change.

    ``freezing`` is read when a graph is compiled, which is at a call (the first one, and the first at a
    new input size), and ``torch.compile``'s ``options`` do not reach that pass; so each call runs under
    ``torch._inductor.config.patch(freezing=True)`` rather than setting the global flag, which would
    change every other compilation in the process."""
    from torch._inductor import config as inductor_config

    modules = _named_submodules(model, names)
    for module in modules.values():
        compiled = torch.compile(module.forward, dynamic=dynamic)

        def forward(*args: Any, _compiled=compiled, **kwargs: Any) -> Any:
            with inductor_config.patch(freezing=True):
                return _compiled(*args, **kwargs)

        module.forward = forward
    return list(modules)


def _named_submodules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            continue
    return found
