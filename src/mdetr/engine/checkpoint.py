"""Checkpoints as a folder: ``model.safetensors`` (+ ``ema.safetensors``, ``optimizer.safetensors``) and
``state.json`` with the config, the training position, the optimizer's non-tensor state and RNG states.

A checkpoint folder is written next to its final place and renamed into it, so a crash while saving never
leaves a half-written checkpoint where the previous good one was.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
# Optional: the text encoder's config and tokenizer files, so a converted checkpoint loads offline.
TEXT_ENCODER_DIR = "text_encoder"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, de-aliased CPU copies of the state dict (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically: into ``<path>.tmp`` then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(model_state(model), str(tmp / MODEL_FILE))
    doc: dict[str, Any] = {"format": "mdetr-checkpoint", "version": 1, "config": config, "state": state or {}}
    if ema is not None:
        save_file(model_state(ema), str(tmp / EMA_FILE))
    if optimizer is not None:
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        doc["optimizer"] = meta
    doc["rng"] = rng_state()
    with open(tmp / STATE_FILE, "w") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def read_checkpoint_doc(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not an mdetr checkpoint folder (no {STATE_FILE})")
    try:
        doc = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_file} is corrupt: {err}") from None
    if doc.get("format") != "mdetr-checkpoint":
        raise CheckpointError(f"{state_file} is not an mdetr checkpoint")
    return doc


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(module: nn.Module, tensors: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Raise one :class:`CheckpointError` listing every missing key, unexpected key and shape mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): " + _listing(
                [f"{k} {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes]))
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))


def load_state_dict_strict(module: nn.Module, tensors: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Load every tensor into ``module`` after :func:`check_state_dict` found the key sets equal."""
    check_state_dict(module, tensors, source=source)
    module.load_state_dict(tensors, strict=True)


def load_weights(module: nn.Module, file: str | Path) -> None:
    """Strictly load a safetensors state dict; a mismatch is one error listing the keys."""
    try:
        tensors = load_file(str(file))
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read {file}: {err}") from None
    load_state_dict_strict(module, tensors, source=file)


def restore_training(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, ema: nn.Module | None = None
) -> dict[str, Any]:
    """Load model (+ optimizer, EMA, RNG) from a checkpoint folder; returns its ``state`` dict."""
    path = Path(path)
    doc = read_checkpoint_doc(path)
    load_weights(model, path / MODEL_FILE)
    if ema is not None and (path / EMA_FILE).exists():
        load_weights(ema, path / EMA_FILE)
    if optimizer is not None and "optimizer" in doc:
        _restore_optimizer(optimizer, load_file(str(path / OPTIMIZER_FILE)), doc["optimizer"])
    if "rng" in doc:
        set_rng_state(doc["rng"])
    return doc.get("state", {})
