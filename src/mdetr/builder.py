"""One builder returns the model, the criterion and the weights of its losses (as detr's ``build``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor, nn

from mdetr.config import Config, ConfigError, LossConfig, ModelConfig
from mdetr.engine.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    PACK_FORMAT,
    TEXT_ENCODER_DIR,
    load_pack,
    load_state_dict_strict,
    load_weights,
    model_state,
    read_checkpoint_doc,
    read_tensors,
)
from mdetr.losses.criterion import build_criterion, weight_dict
from mdetr.models.mdetr import MDETR
from mdetr.models.segmentation import MDETRSegmentation
from mdetr.registry import official_archs


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes: :class:`MDETR`, or :class:`MDETRSegmentation` when ``masks`` is set."""
    detr = MDETR(config)
    return MDETRSegmentation(detr=detr, freeze_detector=config.freeze_detector) if config.masks else detr


def build(config: Config) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """Model, criterion and loss weights (aux layers included) of a grounding config.

    A QA model (``model.qa_dataset=clevr`` or ``gqa``) gets :class:`~mdetr.losses.qa.QASetCriterion`: the
    detection losses plus the official CLEVR or GQA answer losses, or the answer losses alone with
    ``loss.detection_losses=false``. A GQA model trains with its answer vocabularies in
    ``model.qa_answers`` (:class:`mdetr.engine.gqa.GQATask` fills them from the data). The CLEVR-Ref+
    is-final head (``model.predict_final``) adds its BCE to the detection losses. A segmentation model
    (``model.masks``) gets :class:`~mdetr.losses.masks.SegmentationCriterion`: the detection losses plus the
    mask focal and dice losses.
    """
    model_config = config.model
    if model_config.qa_dataset == "gqa" and not model_config.qa_answers:
        raise ConfigError("training GQA answer heads needs their answer vocabularies in model.qa_answers "
                          "(mdetr train builds them from data.train_ann)")
    model = build_model(model_config)
    criterion: nn.Module = build_criterion(config.loss, num_token_slots=model_config.num_token_slots)
    weights = weight_dict(
        config.loss,
        num_aux=model_config.dec_layers - 1 if model_config.aux_loss else 0,
        contrastive_align=model_config.contrastive_align,
        isfinal=model_config.predict_final,
    )
    if model_config.qa_dataset:
        criterion, weights = _with_answer_losses(config, criterion, weights)
    if model_config.masks:
        from mdetr.losses.masks import SegmentationCriterion, mask_weight_dict

        criterion = SegmentationCriterion(criterion, alpha=config.loss.focal_alpha,
                                          gamma=config.loss.focal_gamma)
        weights.update(mask_weight_dict(mask_coef=config.loss.mask_coef, dice_coef=config.loss.dice_coef))
    return model, criterion, weights


def _with_answer_losses(config: Config, detection: nn.Module,
                        weights: dict[str, float]) -> tuple[nn.Module, dict[str, float]]:
    """The QA criterion and weights: answer losses added to the detection ones, or alone."""
    from mdetr.losses.qa import (
        ClevrQACriterion,
        GQAQACriterion,
        QASetCriterion,
        gqa_weight_dict,
        qa_weight_dict,
    )
    from mdetr.models.heads import clevr_attributes

    model_config = config.model
    if model_config.qa_dataset == "clevr":
        qa: nn.Module = ClevrQACriterion(clevr_attributes(model_config.qa_attributes))
        qa_weights = qa_weight_dict(config.loss.qa_loss_coef)
    else:
        qa = GQAQACriterion(model_config.qa_answers)
        qa_weights = gqa_weight_dict(config.loss.qa_loss_coef, split_qa_heads=model_config.split_qa_heads)
    if not config.loss.detection_losses:
        return QASetCriterion(None, qa), qa_weights
    return QASetCriterion(detection, qa), {**weights, **qa_weights}


def load_config_from_checkpoint(path: str | Path) -> Config:
    return Config.from_dict(read_checkpoint_doc(path)["config"], source=f"{path}/state.json")


def load(
    path: str | Path,
    *,
    weights: str = "model",
    device: str = "cpu",
    arch: str | None = None,
    text_encoder: str | None = None,
) -> nn.Module:
    """Build a model and load its weights, from either checkpoint format.

    path: a checkpoint folder written by ``mdetr train``, ``mdetr convert`` or ``mdetr pack``; the name of a
        model bundled with the package (``"mdetr_lite_shapes"``); or an official MDETR
        ``.pth`` file, which needs ``arch`` (its torch.hub name, e.g. ``"mdetr_resnet101_refcoco"``).
    weights: "model", or "ema" for the moving-average weights when the run kept them.
    text_encoder: a local folder with the text encoder's config and tokenizer files, replacing the one the
        config names (e.g. when ``roberta-base`` is not in the Hugging Face cache).
    """
    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    path = Path(path)
    if not path.exists() and arch is None:
        from mdetr.bundled import bundled_model_path

        path = bundled_model_path(str(path)) or path
    if not path.is_dir() and (path.is_file() or arch is not None or path.suffix in (".pth", ".pt")):
        if arch is None:
            raise ConfigError(f"{path} is a file: an official MDETR checkpoint needs arch=<hub name> "
                              f"(one of {', '.join(official_archs())})")
        from mdetr.checkpoints.official import load_official

        return load_official(path, arch, ema=weights == "ema", text_encoder=text_encoder, device=device)
    if arch is not None:
        raise ConfigError(f"arch={arch!r} applies to official .pth files; {path} is a checkpoint folder "
                          "whose config names its architecture")
    doc = read_checkpoint_doc(path)
    config = Config.from_dict(doc["config"], source=f"{path}/state.json")
    packed = doc["format"] == PACK_FORMAT
    if packed and weights != "model":
        raise ConfigError(
            f"{path} is a packed inference checkpoint: it holds one set of weights, not '{weights}'"
        )
    # A full checkpoint holds every weight, so nothing pretrained needs to be read first; a pack stores only
    # what training changed and takes the rest from the pretrained parts.
    model_config = dataclasses.replace(
        config.model, backbone_pretrained=packed, text_encoder_pretrained=packed
    )
    bundled = path / TEXT_ENCODER_DIR
    if text_encoder is not None:
        model_config.text_encoder = text_encoder
    elif bundled.is_dir():
        model_config.text_encoder = str(bundled)
    model = build_model(model_config)
    if packed:
        load_pack(model, path, doc)
    else:
        load_weights(model, path / (MODEL_FILE if weights == "model" else EMA_FILE))
    model.config = config.model
    model.train_config = config
    return model.to(device).eval()


def initialise_from(model: nn.Module, source: str | Path, *, allow_new_heads: bool = False) -> list[str]:
    """Copy every weight of ``source`` into ``model``: the start of a fine-tuning run.

    source: an official MDETR ``.pth`` file (the official key layout is the model's own; its EMA weights
        when it has them, as the official ``--load``), a checkpoint folder of ``mdetr train`` or
        ``mdetr convert`` (its model weights, not the EMA), a pack, or a bundled model name.
    allow_new_heads: the model may have parameters the source lacks (e.g. QA queries and answer heads added
        to a detection model); they keep their initialisation and their names are returned. Unexpected keys
        and shape mismatches are errors either way.

    A segmentation model (:class:`MDETRSegmentation`) also starts from a detector's weights (the second
    stage of the PhraseCut recipe): they go into its ``detr``, and the detector's contrastive-alignment
    projections, which the segmentation model does not have, are left out. The mask branch is then new.

    Anything that does not fit is one :class:`CheckpointError` listing the keys.
    """
    path = Path(source)
    if not path.exists():
        from mdetr.bundled import bundled_model_path

        path = bundled_model_path(str(path)) or path
    if path.is_file():
        from mdetr.checkpoints.official import read_official_checkpoint

        tensors = read_official_checkpoint(path, prefer_ema=True).state_dict
    else:
        doc = read_checkpoint_doc(path)
        if doc["format"] == PACK_FORMAT:  # only what training changed: rebuild it on its pretrained parts
            tensors = model_state(load(path))
        else:
            tensors = read_tensors(path / MODEL_FILE, doc)
    if isinstance(model, MDETRSegmentation):
        tensors = detector_weights_for_segmentation(tensors)
    new = sorted(set(model.state_dict()) - set(tensors)) if allow_new_heads else []
    if new:
        current = model.state_dict()
        tensors = {**tensors, **{k: current[k] for k in new}}
    load_state_dict_strict(model, tensors, source=path)
    return new


# Heads of a detector that the segmentation model does not have (it predicts no alignment embeddings).
_DETECTOR_ONLY_PREFIXES = ("contrastive_align_projection_image.", "contrastive_align_projection_text.")


def detector_weights_for_segmentation(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detector's state dict (MDETR keys) as the ``detr.*`` part of a segmentation model's; a segmentation
    state dict (it already has ``detr.*`` keys) is returned unchanged."""
    if any(k.startswith("detr.") for k in tensors):
        return tensors
    return {f"detr.{k}": v for k, v in tensors.items() if not k.startswith(_DETECTOR_ONLY_PREFIXES)}


__all__ = ["build", "build_model", "detector_weights_for_segmentation", "initialise_from", "load",
           "LossConfig"]
