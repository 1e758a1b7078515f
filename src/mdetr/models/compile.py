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
    convolution with the element-wise operations after it), so they must not change after the first call
    (the results would be undefined), and it applies only where autograd is off. A compiled module cannot
    be deep-copied or pickled (its compiled code holds the original's weights): copy the model before
    compiling. ``dynamic`` goes to ``torch.compile``: the default, static shapes, compiles each new input
    shape anew; ``None`` turns shapes dynamic at the first change. ``torch._dynamo.config.recompile_limit``
    (8 by default) bounds the graphs of one forward function in the process, shared by every compiled
    model that runs it; past it, calls run uncompiled.

    ``freezing`` is read when a graph is compiled, which is at a call (the first one, and the first at a
    new input shape), and ``torch.compile``'s ``options`` do not reach that pass; so each call runs under
    ``torch._inductor.config.patch(freezing=True)`` rather than setting the global flag, which would
    change every other compilation in the process."""
    modules = _named_submodules(model, names)
    for module in modules.values():
        module.forward = _FrozenForward(torch.compile(module.forward, dynamic=dynamic))
    return list(modules)


class _FrozenForward:
    """A compiled forward run with inductor's ``freezing`` on (see :func:`compile_frozen`)."""

    def __init__(self, compiled: Any) -> None:
        from torch._inductor import config as inductor_config  # imported here, once, not with the package

        self.compiled = compiled
        self.config = inductor_config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError("a compiled inference copy cannot be copied: its compiled code holds the original's "
                        "weights. Copy the model first, then compile the copy")

    def __reduce__(self) -> Any:
        raise TypeError("a compiled inference copy cannot be pickled or saved: save the model it was made "
                        "from")


def _named_submodules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            continue
    return found
