"""One builder returns the model, the criterion and the weights of its losses (as detr's ``build``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mdetr.config import Config, LossConfig, ModelConfig
from mdetr.engine.checkpoint import MODEL_FILE, load_weights, read_checkpoint_doc
from mdetr.losses.criterion import SetCriterion, build_criterion, weight_dict
from mdetr.models.mdetr import MDETR


def build_model(config: ModelConfig) -> MDETR:
    return MDETR(config)


def build(config: Config) -> tuple[MDETR, SetCriterion, dict[str, float]]:
    model = build_model(config.model)
    criterion = build_criterion(config.loss, num_token_slots=config.model.num_token_slots)
    weights = weight_dict(
        config.loss,
        num_aux=config.model.dec_layers - 1 if config.model.aux_loss else 0,
        contrastive_align=config.model.contrastive_align,
    )
    return model, criterion, weights


def load_config_from_checkpoint(path: str | Path) -> Config:
    return Config.from_dict(read_checkpoint_doc(path)["config"], source=f"{path}/state.json")


def load(path: str | Path, *, weights: str = "model", device: str = "cpu") -> MDETR:
    """Build a model from a checkpoint folder written by ``mdetr train`` and load its weights.

    weights: "model", or "ema" for the moving-average weights when the run kept them.
    """
    path = Path(path)
    config = load_config_from_checkpoint(path)
    # The checkpoint holds every weight, so nothing pretrained needs to be read first.
    model_config = dataclasses.replace(config.model, backbone_pretrained=False, text_encoder_pretrained=False)
    model = build_model(model_config)
    file = path / (MODEL_FILE if weights == "model" else "ema.safetensors")
    load_weights(model, file)
    model.config = config.model
    model.train_config = config
    return model.to(device).eval()


__all__ = ["build", "build_model", "load", "LossConfig"]
