"""Typed configuration for models, losses, data and training.

Configs are dataclasses; YAML files and ``key=value`` overrides are converted to them once, at the edge
(:func:`load_config`). Unknown keys and contradictory options raise :class:`ConfigError` with a sentence a
user can act on. Checkpoints store :meth:`Config.to_dict`, never parsed command-line arguments.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or contradicts another one."""


@dataclass
class ModelConfig:
    """Architecture of an MDETR model (defaults are the official ``main.py`` ones)."""

    arch: str = "custom"
    backbone: str = "resnet101"
    backbone_pretrained: bool = True
    # Which of the four backbone levels (strides 4, 8, 16, 32) feeds the transformer; MDETR uses the last.
    backbone_level: int = 3
    # Freeze the stem and the first this-many levels of the backbone (official: 1 for ResNet, i.e. stem and
    # layer1; 0 for EfficientNet). -1 freezes the whole backbone.
    backbone_frozen_levels: int = 1
    dilation: bool = False
    text_encoder: str = "roberta-base"
    text_encoder_pretrained: bool = True
    freeze_text_encoder: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    # Token slots of the soft-token head; the last slot is "no object" (MDETR: 255 tokens + 1).
    num_token_slots: int = 256
    contrastive_align: bool = True
    contrastive_hdim: int = 64
    aux_loss: bool = True
    # Question answering (MDETR Section 4.4): "" (none), "gqa" or "clevr". Extra learned queries are appended
    # after the object queries and answer heads read them (see mdetr.models.heads.answer_head_specs).
    qa_dataset: str = ""
    # GQA: one query and head per answer type (the released models) or a single 1853-way head.
    split_qa_heads: bool = True
    # CLEVR QA: the attribute answers, one class of the answer_attr head each ([] is CLEVR's 15: small,
    # large, 8 colours, cube, sphere, cylinder, rubber, metal; the shapes QA set names its own shapes).
    qa_attributes: list[str] = field(default_factory=list)
    # GQA: the answers of each answer head, answer type (obj, attr, rel, global, cat) -> list, or
    # {"all": [...]} for the single head; class i of a head is answer i. Empty: the released checkpoints'
    # head sizes. GQA training fills it from the training data (mdetr.data.gqa.build_answer_vocab) or from
    # train.init_weights.
    qa_answers: dict[str, list[str]] = field(default_factory=dict)
    # The decoder layer whose QA query states the answer heads read (negative: from the last). 0, the first
    # layer, is what the released GQA/CLEVR models were trained with; there the QA queries meet the image
    # and text once and never see what the object queries found (layer 0's self-attention runs before any
    # query has content). -1, the last layer, lets them read the objects first (BENCHMARKS.md, section 8).
    qa_decoder_layer: int = 0
    # Add the image tokens' 2-D sine positions to the tokens themselves once, at the cross encoder's input
    # (as ViT does), so attention *values* say where a token is. The official model adds positions to queries
    # and keys only: a text token that attends to an object then learns what it is but not where, which is
    # what a spatial relation ("left of the blue square") needs. False: the official, released behaviour.
    image_position_in_values: bool = False
    # CLEVR-Ref+: a per-query logit saying whether the box is in the final referred set.
    predict_final: bool = False
    # PhraseCut segmentation: wrap the detector with the attention-map + small-FPN mask head.
    masks: bool = False
    # With masks: train the mask head alone on a frozen detector (the official second stage,
    # --frozen_weights).
    freeze_detector: bool = False
    # Decoder: "detr" (the official one) or "smca" (spatially modulated co-attention, SMCA Section 3.3;
    # see mdetr.models.smca). The smca_* fields only apply to "smca": scale is "fixed", "single" or
    # "independent" (SMCA Table 2), multi_head gives each head its own centre offset and scales (Eq. 6),
    # beta is the bandwidth of the Gaussian-like prior in feature cells squared (Eq. 4).
    decoder: str = "detr"
    smca_scale: str = "independent"
    smca_multi_head: bool = True
    smca_beta: float = 8.0
    # "learned": reference centres from the query embeddings alone (SMCA Eq. 3); "grid": the same plus a
    # learned per-query offset that starts each query on a regular grid over the image.
    smca_reference: str = "learned"
    # With a QA model: whether the answer queries attend through the spatial prior too. False: only the
    # object queries are modulated; an answer query predicts no box to centre the prior on and must see the
    # whole image to count or compare (BENCHMARKS.md, section 8). Checkpoints written before this option
    # existed load with True, the behaviour they were trained with.
    smca_modulate_answers: bool = False
    # The number of decoder cross-attention heads that attend without the prior (the last ones; 0: SMCA).
    # The prior keeps an object query's attention near its box; a free head lets it read the rest of the
    # image, e.g. the object a spatial relation names ("left of the blue square"). Grounding model only.
    smca_free_heads: int = 0
    # SMCA multi-scale encoding (SMCA Section 3.3; detection model only): features at strides 16, 32, 64
    # pass the blocks of smca_encoder, written as in the paper ("2intra-multi-2intra": two intra-scale
    # blocks with weights shared across scales, one block over all scales together, two intra-scale
    # blocks); the decoder then weights the scales per query (scale-selection attention, Eq. 7-9).
    # enc_layers must equal the number of blocks.
    smca_multiscale: bool = False
    smca_encoder: str = "2intra-multi-2intra"
    # Detection model (task: detection): one sigmoid logit per category id 0..num_classes-1 (COCO: 91);
    # 0 takes the largest category id of the training annotations plus one. class_names[i] names category
    # id i ("" for unused ids); filled from the training annotations, so predictions can be named.
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.decoder not in ("detr", "smca"):
            raise ConfigError(f"model.decoder must be 'detr' or 'smca', got {self.decoder!r}")
        self._validate_multiscale()
        if self.smca_scale not in ("fixed", "single", "independent"):
            raise ConfigError(
                f"model.smca_scale must be 'fixed', 'single' or 'independent', got {self.smca_scale!r}"
            )
        if self.smca_reference not in ("learned", "grid"):
            raise ConfigError(
                f"model.smca_reference must be 'learned' or 'grid', got {self.smca_reference!r}"
            )
        if self.smca_beta <= 0:
            raise ConfigError(f"model.smca_beta must be positive, got {self.smca_beta}")
        if not 0 <= self.smca_free_heads <= self.nheads:
            raise ConfigError(f"model.smca_free_heads must be in 0..model.nheads ({self.nheads}), "
                              f"got {self.smca_free_heads}")
        if self.num_classes < 0:
            raise ConfigError(
                f"model.num_classes must be 0 (from the data) or positive, got {self.num_classes}"
            )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"model.class_names has {len(self.class_names)} names but model.num_classes is "
                              f"{self.num_classes}; give one name per category id 0..num_classes-1")
        if self.hidden_dim % self.nheads:
            raise ConfigError(
                f"model.hidden_dim ({self.hidden_dim}) must be divisible by model.nheads ({self.nheads})"
            )
        if not 0 <= self.backbone_level <= 3:
            raise ConfigError(
                f"model.backbone_level must be 0..3 (strides 4, 8, 16, 32), got {self.backbone_level}"
            )
        if not -1 <= self.backbone_frozen_levels <= 4:
            raise ConfigError(
                f"model.backbone_frozen_levels must be -1..4, got {self.backbone_frozen_levels}"
            )
        if self.num_queries < 1 or self.dec_layers < 1:
            raise ConfigError("model.num_queries and model.dec_layers must be at least 1")
        if self.num_token_slots < 2:
            raise ConfigError("model.num_token_slots must be at least 2 (tokens plus the no-object slot)")
        if self.qa_dataset not in ("", "gqa", "clevr"):
            raise ConfigError(f"model.qa_dataset must be '', 'gqa' or 'clevr', got {self.qa_dataset!r}")
        if self.qa_dataset == "clevr" and not self.split_qa_heads:
            raise ConfigError(
                "model.qa_dataset=clevr needs model.split_qa_heads=true (CLEVR has no single answer head)"
            )
        if self.qa_answers:
            self._validate_qa_answers()
        if not -self.dec_layers <= self.qa_decoder_layer < self.dec_layers:
            raise ConfigError(
                f"model.qa_decoder_layer must index one of the {self.dec_layers} decoder layers "
                f"({-self.dec_layers}..{self.dec_layers - 1}), got {self.qa_decoder_layer}"
            )
        if self.qa_attributes:
            if self.qa_dataset != "clevr":
                raise ConfigError("model.qa_attributes is the attribute vocabulary of model.qa_dataset="
                                  f"clevr; it has no meaning for qa_dataset={self.qa_dataset!r}")
            clashes = sorted({a for a in self.qa_attributes if a in ("yes", "no") or a.isdigit()})
            repeated = sorted({a for a in self.qa_attributes if self.qa_attributes.count(a) > 1})
            if clashes or repeated:
                found = "repeated " + ", ".join(repeated) if repeated else ", ".join(clashes)
                raise ConfigError("model.qa_attributes must be distinct words other than yes / no / "
                                  f"numbers, got {found}")
        if self.masks and (self.qa_dataset or self.predict_final or self.contrastive_align):
            raise ConfigError(
                "model.masks=true builds the PhraseCut segmentation model, which predicts boxes and masks "
                "only: set model.qa_dataset='', model.predict_final=false and model.contrastive_align=false"
            )
        if self.freeze_detector and not self.masks:
            raise ConfigError("model.freeze_detector=true leaves only the mask head to train: it needs "
                              "model.masks=true")
        if self.masks and (self.hidden_dim % 128 or (self.hidden_dim + self.nheads) % 8):
            # The mask head's GroupNorm(8) layers run at widths D + heads and D/2 .. D/16.
            raise ConfigError(
                f"model.masks=true needs model.hidden_dim a multiple of 128 and hidden_dim + nheads a "
                f"multiple of 8, got hidden_dim={self.hidden_dim}, nheads={self.nheads}"
            )

    def _validate_qa_answers(self) -> None:
        if self.qa_dataset != "gqa":
            raise ConfigError("model.qa_answers is the answer vocabulary of model.qa_dataset=gqa; it has no "
                              f"meaning for qa_dataset={self.qa_dataset!r}")
        expected = {"obj", "attr", "rel", "global", "cat"} if self.split_qa_heads else {"all"}
        if not isinstance(self.qa_answers, dict) or set(self.qa_answers) != expected:
            keys = sorted(self.qa_answers) if isinstance(self.qa_answers, dict) else self.qa_answers
            raise ConfigError(f"model.qa_answers must map {', '.join(sorted(expected))} to answer lists "
                              f"(split_qa_heads={self.split_qa_heads}), got {keys}")
        for key, answers in self.qa_answers.items():
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ConfigError(f"model.qa_answers[{key!r}] must be a non-empty list of answer strings")
            if len(set(answers)) != len(answers):
                raise ConfigError(f"model.qa_answers[{key!r}] repeats an answer")

    def _validate_multiscale(self) -> None:
        blocks = encoder_layout_blocks(self.smca_encoder)  # raises on a malformed layout
        if not self.smca_multiscale:
            return
        if self.decoder != "smca":
            raise ConfigError(
                "model.smca_multiscale=true needs model.decoder=smca (scale-selection attention "
                "is part of the SMCA decoder)"
            )
        if self.enc_layers != len(blocks):
            raise ConfigError(f"model.smca_encoder={self.smca_encoder!r} has {len(blocks)} blocks but "
                              f"model.enc_layers is {self.enc_layers}; set model.enc_layers={len(blocks)}")
        if self.dilation:
            raise ConfigError("model.smca_multiscale=true needs the stride-32 backbone level: set "
                              "model.dilation=false")


def encoder_layout_blocks(spec: str) -> list[str]:
    """The blocks of a multi-scale encoder layout in the SMCA paper's notation, in order.

    ``"2intra-multi-2intra"`` -> ``["intra", "intra", "multi", "intra", "intra"]``; ``"5intra"``,
    ``"3multi"``. Case and spaces do not matter.
    """
    blocks: list[str] = []
    for part in spec.lower().replace(" ", "").split("-"):
        count, kind = part.rstrip("abcdefghijklmnopqrstuvwxyz"), part.lstrip("0123456789")
        if kind not in ("intra", "multi") or (count and not count.isdigit()) or count == "0" or \
                len(count) + len(kind) != len(part):
            raise ConfigError(f"model.smca_encoder must be blocks like '2intra-multi-2intra' (a count, then "
                              f"'intra' or 'multi', joined by '-'), got {spec!r}")
        blocks += [kind] * (int(count) if count else 1)
    return blocks


@dataclass
class LossConfig:
    """Matcher costs and loss coefficients (MDETR paper 2.2.2; official defaults)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    ce_coef: float = 1.0
    bbox_coef: float = 5.0
    giou_coef: float = 2.0
    contrastive_align_coef: float = 1.0
    eos_coef: float = 0.1
    temperature: float = 0.07
    # QA (model.qa_dataset): weight of the answer-type loss (official --qa_loss_coef); the CLEVR per-type
    # answer losses (binary, attribute, count) have weight 1, as in the official weight dict.
    qa_loss_coef: float = 1.0
    # QA: false trains the answer heads alone, without the box losses (official --no_detection: the second,
    # balanced-split GQA stage and CLEVR-Humans, whose questions have no boxes).
    detection_losses: bool = True
    # CLEVR-Ref+ (model.predict_final): weight of the is-final BCE on the matched boxes (official: 1).
    isfinal_coef: float = 1.0
    # "multi_hot": the official code's target (1 on every positive token, after its collate binarises the
    # map); "uniform": the paper's description (uniform distribution over the span's tokens).
    soft_token_target: str = "multi_hot"
    # Detection (task: detection): sigmoid focal loss of the class logits (SMCA Section 4.1, alpha 0.25,
    # gamma 2). load_config lays a detection config's loss keys onto DETECTION_LOSS_DEFAULTS.
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Segmentation (model.masks): weights of the masks' sigmoid focal loss (with focal_alpha, focal_gamma) and
    # dice loss (official mask_loss_coef and dice_loss_coef).
    mask_coef: float = 1.0
    dice_coef: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.focal_alpha <= 1 or self.focal_gamma < 0:
            raise ConfigError(f"loss.focal_alpha must be in [0, 1] and loss.focal_gamma non-negative, got "
                              f"{self.focal_alpha} and {self.focal_gamma}")
        if self.soft_token_target not in ("multi_hot", "uniform"):
            raise ConfigError(
                f"loss.soft_token_target must be 'multi_hot' or 'uniform', got {self.soft_token_target!r}"
            )
        if self.temperature <= 0:
            raise ConfigError("loss.temperature must be positive")


@dataclass
class DataConfig:
    """Where the annotation files and images are, and how images are transformed."""

    train_ann: str = ""
    train_images: str = ""
    val_ann: str = ""
    val_images: str = ""
    # Training transforms (official: random short side 480..800, max 1333; or a crop branch with p=0.5).
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 1333
    # Evaluation / inference short side (official 800); 0 keeps the image size.
    val_size: int = 800
    batch_size: int = 2
    num_workers: int = 0
    # Page-locked host memory for batches, so copies to the GPU overlap compute (used on CUDA devices only).
    pin_memory: bool = True
    # Keep the loader's worker processes alive across epochs (needs num_workers > 0).
    persistent_workers: bool = False
    # Pad training batches up to a multiple of this (1: to the batch maximum, as the official code). A
    # multiple of 32 leaves few distinct shapes, so CPU kernels compiled for a shape are reused.
    size_divisibility: int = 1
    on_error: str = "fail"
    # Evaluate precision@k only on these dataset_name values (empty: every single-box entry).
    refexp_datasets: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.scales or min(self.scales) <= 0 or self.max_size <= 0:
            raise ConfigError("data.scales must be positive sizes and data.max_size positive")
        if self.crop_min > self.crop_max:
            raise ConfigError(f"data.crop_min ({self.crop_min}) exceeds data.crop_max ({self.crop_max})")
        if self.on_error not in ("fail", "skip"):
            raise ConfigError(f"data.on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.batch_size < 1:
            raise ConfigError("data.batch_size must be at least 1")
        if self.persistent_workers and self.num_workers < 1:
            raise ConfigError("data.persistent_workers=true needs worker processes: set "
                              "data.num_workers >= 1")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping (official defaults: three AdamW groups, clip 0.1)."""

    epochs: int = 40
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_text_encoder: float = 5e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    # Mixed precision for the forward pass: "none", "bf16" autocast (on CPUs with bf16 matrix units it is
    # several times faster per matmul), or "fp16" autocast with a dynamic loss scale (torch.amp.GradScaler;
    # for GPUs without bf16); weights, optimizer state and the losses stay float32.
    amp: str = "none"
    # Gradient accumulation: micro-batches of data.batch_size per optimizer step (per process). The losses
    # are normalised by the boxes of all of them together, so a step equals one on the whole batch.
    accumulate_steps: int = 1
    # torch.compile the tensor-only parts (backbone, text encoder, encoder, decoder), in place: checkpoint
    # keys are unchanged. The first steps pay the compilation.
    compile: bool = False
    # Feed the CNN backbone channels-last images, so its activations are channels-last, where oneDNN's CPU
    # convolutions (forward and backward) and cuDNN's tensor-core kernels are fastest: the same function up
    # to float rounding (a ResNet-101 forward + backward about 1.1x faster on 2 CPU cores).
    channels_last: bool = True
    # Run float32 linear layers (forward and backward) on oneDNN's CPU kernels instead of the BLAS behind
    # torch's linear, which on AMD processors takes an AVX2 path about half as fast (mdetr.ops.linear): the
    # same function up to float rounding. Only float32 CPU layers outside autocast are affected. Measured
    # on AMD Zen 5; on Intel processors, where MKL uses AVX-512, expect little difference (not measured).
    onednn_linear: bool = True
    # With model.freeze_text_encoder: encode each distinct caption once and reuse the text encoder's output
    # in later epochs (the same function up to float rounding; host memory, whatever the device, grows with
    # the captions' tokens: about 1.5 kB per token for MiniLM, 3 kB for RoBERTa-base).
    cache_text_features: bool = False
    # "step": x0.1 at lr_drop; "linear_with_warmup": the official default (step for the main and backbone
    # groups, linear warm-up then linear decay for the text encoder); "all_linear_with_warmup": linear for
    # all.
    schedule: str = "linear_with_warmup"
    lr_drop: int = 35
    warmup_fraction: float = 0.01
    # What the schedule counts: "steps" (epochs x steps per epoch), or "minutes": with max_minutes set, the
    # schedule runs at the pace of whichever is further along, the steps or the time budget, so a run that
    # the budget stops still finishes its warm-up, decay and lr drops (budgeted training).
    schedule_clock: str = "steps"
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 42
    device: str = "cpu"
    # Under torchrun: how long a rank waits at a collective for the others (rank 0 alone scores the
    # validation set and writes checkpoints meanwhile) before the job fails; torch's own default is 10
    # minutes for NCCL.
    dist_timeout_minutes: float = 60.0
    output_dir: str = "runs/train"
    eval_every: int = 1
    # Also keep a copy of the checkpoint as epoch_NNNN/ every this many epochs (0: only last/ and best/).
    keep_every: int = 0
    # Stop training (after finishing the current step, then evaluate and save) after this many minutes of
    # training, counted over the whole run (a resumed run continues the count); 0: no limit.
    max_minutes: float = 0.0
    log_every: int = 10
    threads: int = 0
    # Allow a new run to replace the checkpoints of an earlier run in the same output_dir.
    overwrite: bool = False
    # Fine-tuning: start from these model weights instead of the pretrained backbone and text encoder alone.
    # A checkpoint folder (mdetr train, convert or pack), a bundled model name, or an official MDETR .pth
    # whose architecture model.arch names (e.g. pretrained_resnet101_checkpoint.pth with mdetr_resnet101).
    # Every key must fit; optimizer, schedule and epoch start afresh. Ignored on --resume.
    init_weights: str = ""
    # Let the model have parameters init_weights lacks (new heads, e.g. QA on a detection model), as the
    # official --load (strict=False); they keep their initialisation and are listed in the log.
    init_allow_new_heads: bool = False
    # A batch whose loss or gradient is NaN or infinite is skipped (no optimizer update) and counted in
    # the log; this many such batches in a row stop the run with an error naming the last batch's images.
    max_nonfinite_in_a_row: int = 5

    def validate(self) -> None:
        if self.schedule not in ("step", "linear_with_warmup", "all_linear_with_warmup"):
            raise ConfigError(
                "train.schedule must be step, linear_with_warmup or all_linear_with_warmup, "
                f"got {self.schedule!r}"
            )
        if self.epochs < 1:
            raise ConfigError("train.epochs must be at least 1")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"train.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.accumulate_steps < 1:
            raise ConfigError(f"train.accumulate_steps must be at least 1, got {self.accumulate_steps}")
        if not self.dist_timeout_minutes > 0:
            raise ConfigError(f"train.dist_timeout_minutes must be positive, got {self.dist_timeout_minutes}")
        if self.schedule_clock not in ("steps", "minutes"):
            raise ConfigError(f"train.schedule_clock must be steps or minutes, got {self.schedule_clock!r}")
        if self.schedule_clock == "minutes" and self.max_minutes <= 0:
            raise ConfigError("train.schedule_clock=minutes needs a time budget: set train.max_minutes > 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("train.warmup_fraction must be in [0, 1)")
        if not 0 < self.ema_decay < 1:
            raise ConfigError("train.ema_decay must be in (0, 1)")
        if self.max_nonfinite_in_a_row < 1:
            raise ConfigError("train.max_nonfinite_in_a_row must be at least 1")


# The SMCA paper's matching costs and loss coefficients (class 2, L1 5, GIoU 2; Section 4.1).
DETECTION_LOSS_DEFAULTS: dict[str, float] = {
    "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "ce_coef": 2.0, "bbox_coef": 5.0, "giou_coef": 2.0,
}
TASKS = ("grounding", "detection")


@dataclass
class Config:
    """A whole run. ``task``: "grounding" trains MDETR on captions; "detection" trains the SMCA/DETR object
    detector on COCO-format categories (see :mod:`mdetr.models.detector`)."""

    task: str = "grounding"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        if self.task not in TASKS:
            raise ConfigError(f"task must be 'grounding' or 'detection', got {self.task!r}")
        if self.task == "grounding" and self.model.smca_multiscale:
            raise ConfigError("model.smca_multiscale=true is available for the detection model only "
                              "(task: detection)")
        if self.task == "detection" and self.model.smca_free_heads:
            raise ConfigError("model.smca_free_heads is available for the grounding model only "
                              "(task: grounding)")
        for part in (self.model, self.loss, self.data, self.train):
            part.validate()
        if not self.loss.detection_losses and not self.model.qa_dataset:
            raise ConfigError("loss.detection_losses=false leaves only the answer losses: it needs a QA "
                              "model (model.qa_dataset=gqa or clevr)")
        if self.model.image_position_in_values and self.task == "detection":
            raise ConfigError("model.image_position_in_values=true is available for the grounding model only "
                              "(task: grounding)")
        if self.train.cache_text_features and self.task == "detection":
            raise ConfigError("train.cache_text_features=true: the detection model has no text encoder")
        if self.train.cache_text_features and not self.model.freeze_text_encoder:
            raise ConfigError("train.cache_text_features=true needs a frozen text encoder (set "
                              "model.freeze_text_encoder=true): a trained encoder's features change "
                              "every step")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        return _from_dict(cls, data, source).validate()


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation, converting strings from the command line."""
    origin = get_origin(annotation)
    if origin is list:
        (item,) = get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            converted = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where} must be {'an integer' if annotation is int else 'a number'}, got {value!r}"
            ) from None
        if annotation is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return converted
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in data.items():
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _from_dict(annotation, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, annotation, f"{where}.{key}")
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) to a nested dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {dotted!r} must name a section and a key, e.g. train.epochs=3")
        value = yaml.safe_load(raw) if raw.strip() else ""
        data.setdefault(parts[0], {})[parts[1]] = value
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, task: str | None = None
) -> Config:
    """Read a YAML preset (sections model/loss/data/train and an optional ``task``), apply overrides,
    expand the model preset.

    ``model.arch`` names an architecture in :mod:`mdetr.registry`; its settings are the base onto which
    the file's other ``model`` keys are laid. ``task`` (e.g. from ``--task``) replaces the file's; for
    ``detection`` the file's ``loss`` keys are laid onto :data:`DETECTION_LOSS_DEFAULTS`.
    """
    from mdetr.registry import get_arch_config

    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping with sections model/loss/data/train")
    data = apply_overrides(data, overrides or [])
    if task is not None:
        data["task"] = task
    unknown = sorted(set(data) - {"task", "model", "loss", "data", "train"})
    if unknown:
        raise ConfigError(f"unknown section(s) in {source}: {', '.join(unknown)} "
                          "(known: task, model, loss, data, train)")
    if data.get("task") == "detection":
        data["loss"] = {**DETECTION_LOSS_DEFAULTS, **(data.get("loss") or {})}
    model = dict(data.get("model") or {})
    if "arch" in model:
        base = dataclasses.asdict(get_arch_config(model["arch"]))
        base.update(model)
        data["model"] = base
    return Config.from_dict(data, source=source)
