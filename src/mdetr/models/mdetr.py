"""MDETR: a DETR detector whose queries are modulated by a sentence (Kamath et al., ICCV 2021).

The image backbone and the text encoder feed one transformer over the concatenated tokens; the decoder's
object queries predict boxes and, per box, a distribution over the sentence's token positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.config import ModelConfig
from mdetr.models.backbones import build_backbone_body
from mdetr.models.heads import MLP, answer_head_specs, build_answer_head
from mdetr.models.position import PositionEmbeddingSine
from mdetr.models.smca import box_from_reference
from mdetr.models.transformer import EncodedText, MemoryCache, Transformer


@dataclass
class MDETROutput:
    """Raw predictions of one decoder layer (the last one at the top level).

    pred_logits: (B, Q, S) logits over S token slots; slot S-1 is "no object", slot t < S-1 is token t of
        the tokenized caption (token 0 is the tokenizer's start token).
    pred_boxes: (B, Q, 4) boxes as normalised (cx, cy, w, h) relative to the unpadded image.
    proj_queries: (B, Q, C) L2-normalised query embeddings for contrastive alignment, or None.
    proj_tokens: (B, L, C) L2-normalised text-token embeddings (cross-encoder output), or None.
    text_padding_mask: (B, L) True on padding tokens.
    tokenized: the captions' BatchEncoding (for offsets -> phrases), or None with pre-encoded text.
    aux_outputs: the same for decoder layers 0..L_dec-2 (empty when aux_loss is off).
    qa: answer logits of a QA model, keyed by head name (the official key is ``"pred_" + name``); empty
        otherwise. GQA: ``answer_type`` (B, 5) over (obj, attr, rel, global, cat), ``answer_obj`` (B, 3),
        ``answer_rel`` (B, 1594), ``answer_attr`` (B, 403), ``answer_cat`` (B, 678), ``answer_global``
        (B, 111) (the released sizes; a model trained here has one class per answer of
        ``config.qa_answers``); unified GQA: ``answer`` (B, 1853). CLEVR: ``answer_type`` (B, 3) over (binary,
        attribute, count), ``answer_binary`` (B,) yes-logit, ``answer_reg`` (B, 20) count classes,
        ``answer_attr`` (B, 15). Read from one decoder layer (``config.qa_decoder_layer``), so only at the top
        level, never in ``aux_outputs``.
    pred_isfinal: (B, Q, 1) logit that a box belongs to the final referred set (CLEVR-Ref+), or None.
    pred_masks: (B, Q, H/4, W/4) mask logits of the segmentation model (size of the stride-4 backbone
        level of the padded batch), or None.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    proj_queries: Tensor | None
    proj_tokens: Tensor | None
    text_padding_mask: Tensor
    tokenized: object | None = None
    aux_outputs: list[MDETROutput] = field(default_factory=list)
    qa: dict[str, Tensor] = field(default_factory=dict)
    pred_isfinal: Tensor | None = None
    pred_masks: Tensor | None = None


class BackboneWithMask(nn.Module):
    """Runs a backbone body and resizes the padding mask to each feature level (nearest)."""

    def __init__(self, body: nn.Module, *, num_levels: int | None = None) -> None:
        super().__init__()
        self.body = body
        self.channels: list[int] = list(body.channels)
        self.strides: list[int] = list(body.strides)
        # Only the first num_levels feature levels are computed: a model reading stride 16 skips the
        # stride-32 stage (about a quarter of EfficientNet-Lite0's work). Its weights stay in the state dict
        # (checkpoints keep their keys) but are frozen, since nothing they compute is used.
        self.num_levels = num_levels or len(self.channels)
        freeze_levels_from(body, self.num_levels)

    def forward(self, images: Tensor, masks: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(feat, _level_mask(masks, feat))
                for feat in self.body(images, levels=self.num_levels).values()]

    def features(self, images: Tensor) -> list[Tensor]:
        """The feature maps of the first ``num_levels`` levels, without their masks."""
        return list(self.body(images, levels=self.num_levels).values())


def _level_mask(masks: Tensor, feat: Tensor) -> Tensor:
    """The (B, H, W) padding mask resized (nearest) to a feature map's size."""
    return F.interpolate(masks[None].float(), size=feat.shape[-2:])[0].to(torch.bool)


class Level(Sequence):
    """One backbone level as the triple ``(features, mask, pos)``, its mask and position embedding computed
    on first access: a model reads the mask and position of one or two levels, while the segmentation head
    reads only the features of the others."""

    def __init__(self, feat: Tensor, masks: Tensor, position: nn.Module) -> None:
        self.feat = feat
        self._masks = masks
        self._position = position

    @cached_property
    def mask(self) -> Tensor:
        return _level_mask(self._masks, self.feat)

    @cached_property
    def pos(self) -> Tensor:
        return self._position(self.mask).to(self.feat.dtype)

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError(f"a Level is indexed by 0 (features), 1 (mask) or 2 (pos), got {index!r}")
        index = index + 3 if index < 0 else index
        if index == 0:
            return self.feat
        if index == 1:
            return self.mask
        if index == 2:
            return self.pos
        raise IndexError("a Level holds (features, mask, pos)")


class Joiner(nn.Sequential):
    """(backbone, position embedding); returns per level ``(features, mask, pos)``.

    Being a Sequential keeps the official key prefix ``backbone.0.body.*``.
    """

    def __init__(self, backbone: BackboneWithMask, position: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position)

    def forward(self, images: Tensor, masks: Tensor) -> list[Level]:  # type: ignore[override]
        return [Level(feat, masks, self[1]) for feat in self[0].features(images)]


def _stage_prefixes_from(body: nn.Module, level: int) -> tuple[str, ...]:
    """Parameter-name prefixes of the body's stages that only feed feature levels ``level`` and above."""
    if hasattr(body, "_feature_stages"):  # EfficientNet: blocks after the stage that ends level - 1
        last = body._feature_stages[level - 1]
        return tuple(f"blocks.{s}." for s in range(last + 1, len(body.blocks)))
    return tuple(f"layer{i}." for i in range(level + 1, 5))  # ResNet: layer{level+1} .. layer4


def freeze_levels_from(body: nn.Module, num_levels: int) -> None:
    """Freeze the stages the first ``num_levels`` feature levels do not need (the body never runs them)."""
    if num_levels >= len(body.channels):
        return
    unused = _stage_prefixes_from(body, num_levels)
    for name, p in body.named_parameters():
        if name.startswith(unused):
            p.requires_grad_(False)


def freeze_backbone_levels(body: nn.Module, levels: int) -> None:
    """Stop gradients to the stem and the first ``levels`` feature levels (-1: the whole body).

    Frozen early stages also cost no backward pass, which dominates CPU training time at high resolution.
    """
    if levels == 0:
        return
    trainable = () if levels < 0 or levels >= 4 else _stage_prefixes_from(body, levels)
    for name, p in body.named_parameters():
        if not name.startswith(trainable) or not trainable:
            p.requires_grad_(False)


class MDETR(nn.Module):
    """The detector: backbone, text encoder, cross encoder, decoder and heads, with the official key names.

    With ``config.qa_dataset`` set, learned QA queries (``qa_embed``) are appended after the object queries
    and decoded jointly with them; the answer heads read the QA slots of decoder layer
    ``config.qa_decoder_layer`` (by default the *first*, as the released GQA/CLEVR models were trained), and
    those slots are then dropped from every layer.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_dim
        body = build_backbone_body(config.backbone, pretrained=config.backbone_pretrained,
                                   dilation=config.dilation)
        freeze_backbone_levels(body, config.backbone_frozen_levels)
        # The mask head also reads levels 0-2 (strides 4-16); nothing past the levels read is computed.
        used = max(config.backbone_level, 2) + 1 if config.masks else config.backbone_level + 1
        self.backbone = Joiner(BackboneWithMask(body, num_levels=used),
                               PositionEmbeddingSine(num_pos_feats=d // 2, normalize=True))
        self.transformer = Transformer(
            d_model=d,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            text_encoder=config.text_encoder,
            text_encoder_pretrained=config.text_encoder_pretrained,
            freeze_text_encoder=config.freeze_text_encoder,
            decoder=config.decoder,
            smca_scale=config.smca_scale,
            smca_multi_head=config.smca_multi_head,
            smca_beta=config.smca_beta,
            smca_grid_queries=config.num_queries if config.smca_reference == "grid" else 0,
            smca_free_heads=config.smca_free_heads,
            image_position_in_values=config.image_position_in_values,
        )
        self.input_proj = nn.Conv2d(body.channels[config.backbone_level], d, kernel_size=1)
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.class_embed = nn.Linear(d, config.num_token_slots)
        self.bbox_embed = MLP(input_dim=d, hidden_dim=d, output_dim=4, num_layers=3)
        if config.contrastive_align:
            self.contrastive_align_projection_image = nn.Linear(d, config.contrastive_hdim)
            self.contrastive_align_projection_text = nn.Linear(d, config.contrastive_hdim)
        self.isfinal_embed = nn.Linear(d, 1) if config.predict_final else None
        self.answer_specs = answer_head_specs(config.qa_dataset, split_qa_heads=config.split_qa_heads,
                                              qa_attributes=config.qa_attributes,
                                              qa_answers=config.qa_answers)
        self.qa_embed = nn.Embedding(len(self.answer_specs), d) if self.answer_specs else None
        for spec in self.answer_specs:
            # Attributes named like the official ones (``answer_type_head`` ...) so checkpoints load as is.
            self.add_module(f"{spec.name}_head", build_answer_head(spec, hidden_dim=d))

    def train(self, mode: bool = True) -> MDETR:
        super().train(mode)
        if self.config.freeze_text_encoder:
            self.transformer.text_encoder.eval()  # a frozen encoder gives fixed features: no dropout
        return self

    @property
    def tokenizer(self) -> object:
        return self.transformer.tokenizer

    def encode(self, images: Tensor, masks: Tensor, text: list[str] | EncodedText) -> MemoryCache:
        """Backbone + text encoder + cross encoder.

        images: (B, 3, H, W) ImageNet-normalised, zero-padded; masks: (B, H, W) True on padding.
        text: B captions, or an :class:`EncodedText` computed once and reused (e.g. for many images).
        """
        return self.encode_with_features(images, masks, text)[0]

    def encode_with_features(
        self, images: Tensor, masks: Tensor, text: list[str] | EncodedText
    ) -> tuple[MemoryCache, list[tuple[Tensor, Tensor, Tensor]], Tensor]:
        """:meth:`encode`, also returning what the mask head needs.

        Returns ``(cache, levels, src)``: ``levels`` holds per backbone level ``(features (B, C_i, H_i, W_i),
        mask (B, H_i, W_i), pos (B, D, H_i, W_i))``; ``src`` (B, D, H_l, W_l) is the projected level that
        feeds the transformer.
        """
        levels = self.backbone(images, masks)
        feat, mask, pos = levels[self.config.backbone_level]
        src = self.input_proj(feat)
        if not isinstance(text, EncodedText):
            if len(text) != images.shape[0]:
                raise ValueError(f"got {images.shape[0]} images but {len(text)} captions")
            text = self.transformer.encode_text(list(text), images.device)
        cache = self.transformer.encode(
            src.flatten(2).transpose(1, 2), mask.flatten(1), pos.flatten(2).transpose(1, 2), text,
            image_shape=(src.shape[-2], src.shape[-1]),
        )  # image tokens (B, HW, D) in raster order
        return cache, levels, src

    def decoder_states(self, cache: MemoryCache) -> Tensor:
        """Every decoder layer's output (L_dec, B, Q + A, D): Q object queries, then A QA queries."""
        queries = self.query_embed.weight
        modulated = None
        if self.qa_embed is not None:
            queries = torch.cat([queries, self.qa_embed.weight], dim=0)
            if not self.config.smca_modulate_answers:
                # The SMCA prior centres a query's attention on the box it predicts; an answer query
                # predicts no box and may need any part of the image (count, exist, compare), so it
                # attends without the prior (model.smca_modulate_answers).
                modulated = self.query_embed.num_embeddings
        return self.transformer.decode(cache, queries, modulated=modulated)

    def answer(self, qa_states: Tensor) -> dict[str, Tensor]:
        """Answer logits from the QA query states (B, A, D), one head per query (see ``MDETROutput.qa``)."""
        out = {}
        for i, spec in enumerate(self.answer_specs):
            logits = getattr(self, f"{spec.name}_head")(qa_states[:, i])
            out[spec.name] = logits.squeeze(-1) if spec.squeeze else logits
        return out

    def detection_outputs(self, hs: Tensor, cache: MemoryCache) -> MDETROutput:
        """Box, token-slot, is-final and alignment predictions from object-query states (L_dec, B, Q, D)."""
        logits = self.class_embed(hs)
        if self.config.decoder == "smca":
            # SMCA Eq. 12: centres relative to each query's reference centre (object queries only).
            reference = self.transformer.decoder.reference_logits(self.query_embed.weight)  # (Q, 2)
            boxes = box_from_reference(self.bbox_embed(hs), reference)
        else:
            boxes = self.bbox_embed(hs).sigmoid()
        isfinal = None if self.isfinal_embed is None else self.isfinal_embed(hs)  # (L_dec, B, Q, 1)
        proj_tokens = proj_queries = None
        if self.config.contrastive_align:
            proj_queries = F.normalize(self.contrastive_align_projection_image(hs), p=2, dim=-1)
            proj_tokens = F.normalize(self.contrastive_align_projection_text(cache.text_memory), p=2, dim=-1)

        def layer(i: int) -> MDETROutput:
            return MDETROutput(
                pred_logits=logits[i],
                pred_boxes=boxes[i],
                proj_queries=None if proj_queries is None else proj_queries[i],
                proj_tokens=proj_tokens,
                text_padding_mask=cache.text_padding_mask,
                tokenized=cache.tokenized,
                pred_isfinal=None if isfinal is None else isfinal[i],
            )

        out = layer(-1)
        if self.config.aux_loss:
            out.aux_outputs = [layer(i) for i in range(hs.shape[0] - 1)]
        return out

    def decode(self, cache: MemoryCache) -> MDETROutput:
        """Decoder and heads: predictions of the last layer (``aux_outputs``: the others) and, for a QA
        model, ``qa`` answer logits."""
        hs = self.decoder_states(cache)
        qa: dict[str, Tensor] = {}
        if self.qa_embed is not None:
            num_queries = self.query_embed.num_embeddings
            # The released QA models were trained with answers read from decoder layer 0, not the last one;
            # reading another layer would not reproduce them (model.qa_decoder_layer, default 0).
            qa = self.answer(hs[self.config.qa_decoder_layer, :, num_queries:])
            hs = hs[:, :, :num_queries]
        out = self.detection_outputs(hs, cache)
        out.qa = qa
        return out

    def forward(self, images: Tensor, masks: Tensor, text: list[str] | EncodedText) -> MDETROutput:
        return self.decode(self.encode(images, masks, text))


def parameter_groups(
    model: nn.Module, *, lr: float, lr_backbone: float, lr_text_encoder: float
) -> list[dict]:
    """The three AdamW groups of the official recipe, by parameter-name substring."""
    groups: dict[str, list[nn.Parameter]] = {"main": [], "backbone": [], "text_encoder": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "text_encoder" in name:
            groups["text_encoder"].append(p)
        elif "backbone" in name:
            groups["backbone"].append(p)
        else:
            groups["main"].append(p)
    rates = {"main": lr, "backbone": lr_backbone, "text_encoder": lr_text_encoder}
    return [
        {"name": name, "params": params, "lr": rates[name], "initial_lr": rates[name]}
        for name, params in groups.items()
        if params and rates[name] > 0
    ]
