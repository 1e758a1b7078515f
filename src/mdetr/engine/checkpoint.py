"""Checkpoints as a folder: ``model.safetensors`` (+ ``ema.safetensors``, ``optimizer.safetensors``) and
``state.json`` with the config, the training position, the optimizer's non-tensor state, RNG states and
the SHA-256 of every tensor file.

Crash safety. A checkpoint is written into ``<name>.tmp/``; every file and the folder are fsynced; then
the previous folder (if any) is renamed to ``<name>.old/``, the new one renamed to ``<name>/`` and only
then ``<name>.old/`` deleted. A crash at any point leaves a complete checkpoint: ``<name>/`` itself, or,
when the crash falls between the two renames, ``<name>.old/``, which :func:`restore_training` falls back
to. A checkpoint whose tensors hold NaN or Inf is refused before anything is written.

Integrity. Loading a tensor file recomputes its SHA-256 and compares it with the one ``state.json``
records; a truncated or altered file is refused with a :class:`CheckpointError` naming it. (Folders
written before hashes were recorded, format version 1, load without the check.)

Testing hook: with the environment variable ``MDETR_TEST_KILL_AT`` set to ``save`` or ``swap``, the
process kills itself with SIGKILL the first time it replaces an existing checkpoint folder: ``save``
once the new folder is complete in ``<name>.tmp/`` (before any rename), ``swap`` once the previous
folder has been moved to ``<name>.old/`` (before the new one is in place). The crash-safety tests use it
to interrupt a save at an exact point; it has no other use.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import warnings
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
# Format version 2 records the SHA-256 of each tensor file in state.json under "files".
FORMAT_VERSION = 2
KILL_AT_ENV = "MDETR_TEST_KILL_AT"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the model."""


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


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, and CUDA when initialised) generator states, as JSON values."""
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": keys.tolist(),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(cached_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (older checkpoints lack the NumPy Gaussian cache)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    has_gauss, cached_gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"],
                         has_gauss, cached_gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a node with more GPUs than this one: the states of the devices present.
        for index, saved in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(saved, dtype=torch.uint8), device=index)


# ----------------------------------------------------------------------------------------------------------
# Durable, verifiable files


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's (or, on POSIX, a folder's entries') data to the disk."""
    if path.is_dir() and os.name != "posix":
        return  # folders cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``folder/name`` as safetensors, fsync it and return its SHA-256."""
    file = folder / name
    save_file(tensors, str(file))
    _fsync(file)
    return sha256_file(file)


def _write_json(file: Path, doc: dict[str, Any], *, indent: int | None = None) -> None:
    with open(file, "w") as handle:
        json.dump(doc, handle, indent=indent)
        handle.flush()
        os.fsync(handle.fileno())


def _non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _refuse_non_finite(path: Path, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Raise before anything is written when a tensor to be saved holds NaN or Inf."""
    bad = [f"{part}: {key}" for part, tensors in parts.items() for key in _non_finite_keys(tensors)]
    if bad:
        raise CheckpointError(
            f"refusing to write the checkpoint {path}: {len(bad)} tensor(s) hold NaN or Inf "
            f"({_listing(bad)}); the previous checkpoint there, if any, is kept"
        )


def _fresh_temp_folder(path: Path) -> Path:
    """``<path>.tmp``, emptied: a leftover is an unfinished save, never a good checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _test_kill_point(point: str) -> None:
    """SIGKILL this process at ``point`` when :data:`KILL_AT_ENV` asks for it (tests only)."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _commit_folder(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path`` so that a crash at any moment leaves a good checkpoint.

    The previous ``path`` is moved to ``<path>.old`` and deleted only once ``tmp`` is in its place. A
    ``<path>.old`` left by an earlier crash while ``path`` is missing is the last good checkpoint, so it
    is kept until the new one is in place.
    """
    _fsync(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        _test_kill_point("save")
        if old.exists():
            shutil.rmtree(old)  # path is complete, so an older copy is not needed
        path.rename(old)
        _fsync(path.parent)
        _test_kill_point("swap")
    tmp.rename(path)
    _fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)
        _fsync(path.parent)


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically and durably (see the module docstring).

    Raises :class:`CheckpointError` without writing anything when the model, EMA or optimizer tensors
    hold NaN or Inf.
    """
    path = Path(path)
    parts = {"model": model_state(model)}
    if ema is not None:
        parts["ema"] = model_state(ema)
    meta = None
    if optimizer is not None:
        parts["optimizer"], meta = _optimizer_tensors(optimizer)
    _refuse_non_finite(path, parts)
    files = {"model": MODEL_FILE, "ema": EMA_FILE, "optimizer": OPTIMIZER_FILE}
    tmp = _fresh_temp_folder(path)
    hashes = {files[part]: _write_tensors(tmp, files[part], tensors) for part, tensors in parts.items()}
    doc: dict[str, Any] = {"format": "mdetr-checkpoint", "version": FORMAT_VERSION, "config": config,
                           "state": state or {}, "files": hashes, "rng": rng_state()}
    if meta is not None:
        doc["optimizer"] = meta
    _write_json(tmp / STATE_FILE, doc)
    _commit_folder(tmp, path)
    return path


def read_checkpoint_doc(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint or pack folder, checked to be one."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not an mdetr checkpoint folder (no {STATE_FILE})")
    try:
        doc = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_file} is corrupt: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") not in ("mdetr-checkpoint", "mdetr-pack"):
        raise CheckpointError(f"{state_file} is not an mdetr checkpoint")
    if doc.get("version", 1) >= 2 and not isinstance(doc.get("files"), dict):
        raise CheckpointError(f"{state_file} is corrupt: it records no 'files' hashes")
    _upgrade_config(doc.get("config"))
    return doc


def _upgrade_config(config: Any) -> None:
    """Give options added since a checkpoint was written the value that reproduces how it was trained."""
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and "smca_modulate_answers" not in model:
        model["smca_modulate_answers"] = True  # before the option, answer queries attended through the prior


def read_tensors(file: str | Path, doc: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Load a tensor file of a checkpoint folder after checking its SHA-256 against ``state.json``.

    ``doc`` is the folder's ``state.json`` (read from next to ``file`` when None). Raises
    :class:`CheckpointError` naming the file when it is missing, unreadable, not recorded, or its bytes
    differ from what was written.
    """
    file = Path(file)
    if doc is None and (file.parent / STATE_FILE).is_file():
        doc = read_checkpoint_doc(file.parent)
    if doc is not None and doc.get("version", 1) >= 2:
        expected = doc["files"].get(file.name)
        if expected is None:
            raise CheckpointError(f"{file} is not one of the files its {STATE_FILE} records "
                                  f"({', '.join(doc['files']) or 'none'})")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: {STATE_FILE} records it, so the checkpoint is "
                                  "incomplete")
        actual = sha256_file(file)
        if actual != expected:
            raise CheckpointError(
                f"{file} is corrupt: its SHA-256 is {actual[:16]}... but {STATE_FILE} records "
                f"{expected[:16]}... (the file was truncated or changed after it was written)"
            )
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read {file}: {err}") from None


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


def load_state_dict_strict(
    module: nn.Module, tensors: dict[str, torch.Tensor], *, source: str | Path
) -> None:
    """Load every tensor into ``module`` after :func:`check_state_dict` found the key sets equal."""
    check_state_dict(module, tensors, source=source)
    module.load_state_dict(tensors, strict=True)


def load_weights(module: nn.Module, file: str | Path, doc: dict[str, Any] | None = None) -> None:
    """Strictly load a safetensors state dict, hash-checked (:func:`read_tensors`); a mismatch is one
    error listing the keys."""
    load_state_dict_strict(module, read_tensors(file, doc), source=file)


def resolve_checkpoint(path: str | Path) -> Path:
    """``path``, or ``<path>.old`` when a save replacing ``path`` was interrupted between its renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not (path / STATE_FILE).is_file() and (old / STATE_FILE).is_file():
        warnings.warn(f"{path} is missing: the save that was replacing it was interrupted; using the "
                      f"previous checkpoint {old}", stacklevel=2)
        return old
    return path


def restore_training(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
) -> dict[str, Any]:
    """Load model (+ optimizer, EMA, RNG) from a checkpoint folder; returns its ``state`` dict.

    Every tensor file is checked against its recorded hash before anything is loaded into ``model``,
    ``optimizer`` or ``ema``, so a corrupt checkpoint leaves them untouched. A folder whose replacement
    was interrupted is found at ``<path>.old`` (:func:`resolve_checkpoint`).
    """
    path = resolve_checkpoint(path)
    doc = read_checkpoint_doc(path)
    recorded = doc.get("files", {})
    model_tensors = read_tensors(path / MODEL_FILE, doc)
    ema_tensors = None
    if ema is not None and (EMA_FILE in recorded or (path / EMA_FILE).exists()):
        ema_tensors = read_tensors(path / EMA_FILE, doc)
    optimizer_tensors = None
    if optimizer is not None and "optimizer" in doc:
        optimizer_tensors = read_tensors(path / OPTIMIZER_FILE, doc)
    load_state_dict_strict(model, model_tensors, source=path / MODEL_FILE)
    if ema_tensors is not None:
        load_state_dict_strict(ema, ema_tensors, source=path / EMA_FILE)
    if optimizer_tensors is not None:
        _restore_optimizer(optimizer, optimizer_tensors, doc["optimizer"])
    if "rng" in doc:
        set_rng_state(doc["rng"])
    return doc.get("state", {})


PACK_FORMAT = "mdetr-pack"


def save_pack(path: str | Path, *, model: nn.Module, base: nn.Module, config: dict[str, Any],
              dtype: torch.dtype = torch.float16, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a small inference-only checkpoint: only the tensors that differ from ``base``.

    ``base`` is the same architecture built from its pretrained parts alone (ImageNet backbone, text
    encoder from its package); what training left untouched (frozen text encoder and backbone levels) is
    rebuilt from there on load instead of being stored. Floating tensors are stored in ``dtype``. Written
    like :func:`save_checkpoint`: atomically, fsynced, hashed, refused when a tensor is not finite.
    Returns a summary (kept and omitted key counts, bytes).
    """
    path = Path(path)
    ours, theirs = model_state(model), model_state(base)
    if set(ours) != set(theirs):
        raise CheckpointError("save_pack: the base model does not have the same parameters as the model")
    kept = {k: v.to(dtype) if v.is_floating_point() else v
            for k, v in ours.items() if v.shape != theirs[k].shape or not torch.equal(v, theirs[k])}
    _refuse_non_finite(path, {"model": kept})
    omitted = sorted(set(ours) - set(kept))
    tmp = _fresh_temp_folder(path)
    hashes = {MODEL_FILE: _write_tensors(tmp, MODEL_FILE, kept)}
    doc = {"format": PACK_FORMAT, "version": FORMAT_VERSION, "config": config,
           "dtype": str(dtype).removeprefix("torch."), "from_pretrained": omitted, "card": card or {},
           "files": hashes}
    _write_json(tmp / STATE_FILE, doc, indent=1)
    _commit_folder(tmp, path)
    return {"kept": len(kept), "omitted": len(omitted), "bytes": (path / MODEL_FILE).stat().st_size}


def load_pack(module: nn.Module, path: str | Path, doc: dict[str, Any]) -> None:
    """Load a :func:`save_pack` folder into ``module``, which must be built with its pretrained parts.

    The stored tensors and the ``from_pretrained`` keys together must be exactly the model's keys.
    """
    file = Path(path) / MODEL_FILE
    tensors = read_tensors(file, doc)
    current = module.state_dict()
    full = {k: current[k] for k in doc["from_pretrained"] if k in current}
    full.update({k: v.to(current[k].dtype) if k in current else v for k, v in tensors.items()})
    load_state_dict_strict(module, full, source=file)
