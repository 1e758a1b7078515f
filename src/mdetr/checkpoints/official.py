"""Load and convert the checkpoints released with the official MDETR (ashkamath/mdetr, Zenodo 4721981).

A released ``.pth`` file is a pickle of ``{"model": state_dict, "model_ema": state_dict | None,
"optimizer": ..., "epoch": int, "args": argparse.Namespace}``. Its parameter names are the ones this
package's models use (``backbone.0.body.*``, ``transformer.*``, ``class_embed`` ...; PhraseCut models add
the ``detr.`` prefix of their segmentation wrapper), so loading is a strict one-to-one copy, with one
exception: ``transformer.text_encoder.embeddings.position_ids``, a constant ``arange`` buffer that the
transformers release used in training saved and current releases no longer save, is dropped.

Pickles can run arbitrary code when loaded. Files are read with ``torch.load(weights_only=True)``, which
only rebuilds tensors and plain containers, plus ``argparse.Namespace`` (the ``args`` entry), allowed for
that one call; anything else is refused before it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdetr.config import Config, ModelConfig
from mdetr.engine.checkpoint import (
    TEXT_ENCODER_DIR,
    CheckpointError,
    load_state_dict_strict,
    save_checkpoint,
)
from mdetr.registry import get_arch_config, official_archs

REPORT_FILE = "conversion_report.json"
# Constant buffers some transformers versions saved; rebuilt by the text encoder itself.
_DROPPED_SUFFIXES = ("text_encoder.embeddings.position_ids",)
# The only non-tensor class the released files pickle.
_ALLOWED_GLOBALS = [argparse.Namespace]


@dataclass
class OfficialCheckpoint:
    """What was read from an official file.

    state_dict: the model weights, keys as in the file, minus ``dropped``.
    dropped: keys removed from the file's state dict, with their shapes.
    entry: which entry the weights came from: "model", "model_ema", or "" for a bare state dict.
    args: the training run's arguments (``vars(args)``), when the file stores them.
    epoch: the training epoch stored in the file, if any.
    """

    state_dict: dict[str, Tensor]
    dropped: dict[str, list[int]] = field(default_factory=dict)
    entry: str = "model"
    args: dict[str, Any] | None = None
    epoch: int | None = None


def _safe_torch_load(path: Path) -> Any:
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5 has no scoped allow-list
        raise CheckpointError("reading official MDETR checkpoints safely needs torch >= 2.5")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
        if blocked:
            raise CheckpointError(
                f"refusing to load {path}: it pickles {blocked.group(1)}, which is neither a tensor, a plain "
                "container nor argparse.Namespace. Unpickling it could run arbitrary code, so nothing in the "
                "file was executed. Released MDETR checkpoints contain only those types; get the file from "
                "the official release (see mdetr.registry.official_release)."
            ) from None
        reason = _first_reason(err)
        raise CheckpointError(f"cannot read {path}: not a PyTorch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {_first_reason(err)}") from None


def _first_reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else err.__class__.__name__


def read_official_checkpoint(
    path: str | Path, *, ema: bool = False, prefer_ema: bool = False
) -> OfficialCheckpoint:
    """Safely read an official ``.pth`` file and return its model (or EMA) weights; ``prefer_ema`` takes
    the EMA weights when the file kept them and the model weights otherwise (the official ``--load``).

    A file holding a bare state dict (every value a tensor) is accepted too. Raises
    :class:`CheckpointError` for a missing, unreadable or unsafe file, or a missing EMA entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint not found: {path}")
    raw = _safe_torch_load(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict")
    if prefer_ema and raw.get("model_ema") is not None:
        ema = True
    entry = "model_ema" if ema else "model"
    if entry in raw:
        weights = raw[entry]
        if weights is None:
            raise CheckpointError(f"{path} has no {entry} weights ({entry} is None: the run kept no EMA)")
    elif not ema and raw and all(isinstance(v, Tensor) for v in raw.values()):
        weights, entry = raw, ""
    else:
        entries = ", ".join(map(str, raw)) or "none"
        raise CheckpointError(f"{path} has no {entry!r} entry (entries: {entries})")
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: {entry or 'the state dict'} is not a mapping of names to tensors")
    state = dict(weights)
    dropped = {k: list(state.pop(k).shape) for k in list(state) if k.endswith(_DROPPED_SUFFIXES)}
    args = raw.get("args") if entry else None
    epoch = raw.get("epoch") if entry else None
    return OfficialCheckpoint(
        state_dict=state,
        dropped=dropped,
        entry=entry,
        args=vars(args) if isinstance(args, argparse.Namespace) else None,
        epoch=epoch if isinstance(epoch, int) else None,
    )


def load_official_state_dict(path: str | Path, *, ema: bool = False) -> dict[str, Tensor]:
    """The weights of an official ``.pth`` file (``checkpoint["model"]``, or ``["model_ema"]`` with
    ``ema``), read safely, with the obsolete ``position_ids`` buffer removed."""
    return read_official_checkpoint(path, ema=ema).state_dict


def official_model_config(arch: str, *, text_encoder: str | None = None) -> ModelConfig:
    """The config of a registered architecture, ready for released weights: nothing pretrained is read
    (the checkpoint holds every weight) and, as in torch.hub, no auxiliary-layer outputs."""
    config = get_arch_config(arch, backbone_pretrained=False, text_encoder_pretrained=False, aux_loss=False)
    if text_encoder is not None:
        config.text_encoder = text_encoder
    return config


def _build(config: ModelConfig) -> nn.Module:
    from mdetr.builder import build_model  # the builder imports this module lazily; avoid a cycle

    return build_model(config)


def _load(
    path: str | Path, arch: str, *, ema: bool, text_encoder: str | None
) -> tuple[nn.Module, ModelConfig, OfficialCheckpoint]:
    config = official_model_config(arch, text_encoder=text_encoder)
    # Built first: a missing text encoder is reported before a multi-gigabyte file is read.
    model = _build(config)
    checkpoint = read_official_checkpoint(path, ema=ema)
    load_state_dict_strict(model, checkpoint.state_dict, source=path)
    return model, config, checkpoint


def load_official(
    path: str | Path,
    arch: str,
    *,
    ema: bool = False,
    text_encoder: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build ``arch`` (a torch.hub name, e.g. ``"mdetr_resnet101"``) and strictly load an official file.

    text_encoder: local folder with the text encoder's config and tokenizer files (``roberta-base`` or
        ``distilroberta-base`` as saved by transformers) when they are not in the Hugging Face cache.
    Returns the model in eval mode; any missing or unexpected key or shape mismatch raises one
    :class:`CheckpointError` listing them.
    """
    model, config, _ = _load(path, arch, ema=ema, text_encoder=text_encoder)
    model.train_config = Config(model=config)
    return model.to(device).eval()


def convert_official(
    path: str | Path,
    out_dir: str | Path,
    *,
    arch: str,
    ema: bool = False,
    text_encoder: str | None = None,
) -> Path:
    """Convert an official file into this package's checkpoint folder.

    Writes ``model.safetensors`` and ``state.json`` (the config, with nothing to download: backbone and
    text encoder are not read as pretrained), ``text_encoder/`` (the text encoder's config and tokenizer
    files, so the folder loads offline), and ``conversion_report.json`` (each tensor's name and shape,
    what was dropped, where the weights came from). Returns ``out_dir``.
    """
    path, out_dir = Path(path), Path(out_dir)
    model, config, checkpoint = _load(path, arch, ema=ema, text_encoder=text_encoder)
    # Record the architecture's own text-encoder name; the bundled files replace it when loading.
    stored = get_arch_config(arch).text_encoder if text_encoder is not None else config.text_encoder
    saved_config = Config(model=dataclasses.replace(config, text_encoder=stored))
    save_checkpoint(
        out_dir,
        model=model,
        config=saved_config.to_dict(),
        state={"converted_from": path.name, "arch": arch, "weights": checkpoint.entry or "state_dict"},
    )
    bundle = out_dir / TEXT_ENCODER_DIR
    model.tokenizer.save_pretrained(bundle)
    _text_encoder(model).config.save_pretrained(bundle)
    report = {
        "source": str(path),
        "arch": arch,
        "official": arch in official_archs(),
        "weights": checkpoint.entry or "state_dict",
        "epoch": checkpoint.epoch,
        "num_tensors": len(checkpoint.state_dict),
        "num_values": sum(t.numel() for t in checkpoint.state_dict.values()),
        # Official names are kept unchanged, so every tensor maps to the key of the same name.
        "mapped": {k: list(t.shape) for k, t in checkpoint.state_dict.items()},
        "renamed": {},
        "dropped": checkpoint.dropped,
        "text_encoder_files": text_encoder or config.text_encoder,
        "official_args": checkpoint.args,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str))
    return out_dir


def _text_encoder(model: nn.Module) -> nn.Module:
    detr = getattr(model, "detr", model)
    return detr.transformer.text_encoder
