"""An object detector with the SMCA (or DETR) decoder: images in, category logits and boxes out.

The detection half of SMCA (Gao et al., ICCV 2021): a backbone, a transformer encoder over the image
features, a decoder whose queries each predict a box and one sigmoid logit per category. With
``config.decoder == "smca"`` the decoder's co-attention is spatially modulated and box centres are
predicted relative to each query's reference centre (Eq. 12); with ``"detr"`` it is DETR's plain decoder,
the baseline SMCA is compared with. ``config.smca_multiscale`` switches to the multi-scale encoder and the
scale-selection decoder of :mod:`mdetr.models.smca_multiscale`.

Differences from MDETR (:mod:`mdetr.models.mdetr`): no text at all, classification over ``num_classes``
category ids instead of token slots, and the classification bias starts at the focal-loss prior
``p = 0.01`` (SMCA Section 4.1). The backbone, position embedding, encoder layer and decoder layers are the
same classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.config import ConfigError, ModelConfig, encoder_layout_blocks
from mdetr.models.backbones import build_backbone_body
from mdetr.models.heads import MLP
from mdetr.models.mdetr import BackboneWithMask, Joiner, freeze_backbone_levels
from mdetr.models.position import PositionEmbeddingSine
from mdetr.models.smca import SMCADecoder, SMCADecoderLayer, box_from_reference
from mdetr.models.smca_multiscale import (
    SCALE_STRIDES,
    MultiScaleEncoder,
    MultiScaleInput,
    ScaleSelectionDecoder,
    ScaleSelectionDecoderLayer,
)
from mdetr.models.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer

# Initial foreground probability of every class logit (focal-loss prior, SMCA Section 4.1).
PRIOR_PROBABILITY = 0.01


@dataclass
class DetectionOutput:
    """Raw predictions of one decoder layer (the last one at the top level).

    pred_logits: (B, Q, C) one sigmoid logit per category id 0..C-1 (ids absent from the data are never
        positive).
    pred_boxes: (B, Q, 4) boxes as normalised (cx, cy, w, h) relative to the unpadded image.
    aux_outputs: the same for decoder layers 0..L_dec-2 (empty when aux_loss is off).
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[DetectionOutput] = field(default_factory=list)


@dataclass
class EncodedImage:
    """Encoder output per scale (one entry single-scale, three multi-scale), image tokens in raster order.

    memories[j]: (B, H_j W_j, D); padding_masks[j]: (B, H_j W_j) True on padding; pos[j]: (B, H_j W_j, D);
    shapes[j]: (H_j, W_j).
    """

    memories: list[Tensor]
    padding_masks: list[Tensor]
    pos: list[Tensor]
    shapes: list[tuple[int, int]]


def _check_detector_config(config: ModelConfig) -> None:
    config.validate()
    if config.num_classes < 1:
        raise ConfigError("the detection model needs model.num_classes >= 1 (0 is resolved from the training "
                          "annotations by the detection task before the model is built)")
    heads = [name for name, on in (("model.qa_dataset", config.qa_dataset), ("model.predict_final",
             config.predict_final), ("model.masks", config.masks)) if on]
    if heads:
        raise ConfigError(f"{', '.join(heads)} belong to MDETR; the detection model has no such head")


class SMCADetector(nn.Module):
    """Backbone + encoder + SMCA/DETR decoder + class and box heads (see the module docstring).

    Text-related fields of the config (``text_encoder``, ``contrastive_align``, ``num_token_slots``) are
    not used.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_detector_config(config)
        self.config = config
        d = config.hidden_dim
        body = build_backbone_body(config.backbone, pretrained=config.backbone_pretrained,
                                   dilation=config.dilation)
        freeze_backbone_levels(body, config.backbone_frozen_levels)
        position = PositionEmbeddingSine(num_pos_feats=d // 2, normalize=True)
        # The multi-scale encoder reads strides 16 and 32; otherwise only the transformer's level is computed.
        used = len(body.channels) if config.smca_multiscale else config.backbone_level + 1
        self.backbone = Joiner(BackboneWithMask(body, num_levels=used), position)
        if config.smca_multiscale:
            self._build_multiscale(body, config)
        else:
            self._build_single_scale(body, config)
        # Xavier init of the transformer, as DETR; the prior keeps its own init (every scale starts at 1).
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if hasattr(self.decoder, "reset_prior_parameters"):
            self.decoder.reset_prior_parameters()
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.class_embed = nn.Linear(d, config.num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        self.bbox_embed = MLP(input_dim=d, hidden_dim=d, output_dim=4, num_layers=3)

    def _build_single_scale(self, body: nn.Module, config: ModelConfig) -> None:
        d, layer_args = config.hidden_dim, self._layer_args(config)
        self.input_proj = nn.Conv2d(body.channels[config.backbone_level], d, kernel_size=1)
        self.encoder = Encoder(EncoderLayer(**layer_args), config.enc_layers)
        if config.decoder == "smca":
            layer = SMCADecoderLayer(**layer_args, scale=config.smca_scale, multi_head=config.smca_multi_head,
                                     beta=config.smca_beta)
            self.decoder: nn.Module = SMCADecoder(layer, config.dec_layers, d,
                                                  grid_queries=_grid_queries(config))
        else:
            self.decoder = Decoder(DecoderLayer(**layer_args), config.dec_layers, d)

    def _build_multiscale(self, body: nn.Module, config: ModelConfig) -> None:
        strides = list(body.strides)
        if 16 not in strides or 32 not in strides:
            raise ConfigError(f"model.smca_multiscale=true needs backbone levels at strides 16 and 32; "
                              f"{config.backbone} has strides {strides}")
        self._levels = (strides.index(16), strides.index(32))
        d, layer_args = config.hidden_dim, self._layer_args(config)
        self.multiscale_input = MultiScaleInput(
            in_channels=(body.channels[self._levels[0]], body.channels[self._levels[1]]), d_model=d
        )
        # A learned embedding per scale, added to the sine positions, tells the shared intra-scale blocks
        # and the multi-scale block which scale a token comes from.
        self.level_embed = nn.Parameter(torch.randn(len(SCALE_STRIDES), d) * 0.02)
        self.encoder = MultiScaleEncoder(layout=encoder_layout_blocks(config.smca_encoder), **layer_args)
        layer = ScaleSelectionDecoderLayer(**layer_args, num_scales=len(SCALE_STRIDES),
                                           scale=config.smca_scale, multi_head=config.smca_multi_head,
                                           beta=config.smca_beta)
        self.decoder = ScaleSelectionDecoder(layer, config.dec_layers, d, grid_queries=_grid_queries(config))

    @staticmethod
    def _layer_args(config: ModelConfig) -> dict[str, int | float]:
        return {"d_model": config.hidden_dim, "nhead": config.nheads,
                "dim_feedforward": config.dim_feedforward, "dropout": config.dropout}

    def encode(self, images: Tensor, masks: Tensor) -> EncodedImage:
        """Backbone and encoder. images: (B, 3, H, W) ImageNet-normalised, zero-padded; masks: (B, H, W)
        True on padding."""
        levels = self.backbone(images, masks)
        if not self.config.smca_multiscale:
            feat, mask, pos = levels[self.config.backbone_level]
            src = self.input_proj(feat)
            memory = self.encoder(_tokens(src), padding_mask=mask.flatten(1), pos=_tokens(pos))
            return EncodedImage([memory], [mask.flatten(1)], [_tokens(pos)], [tuple(src.shape[-2:])])
        (feat16, mask16, pos16), (feat32, mask32, pos32) = (levels[i] for i in self._levels)
        maps = self.multiscale_input(feat16, feat32)
        mask64 = F.interpolate(masks[None].float(), size=maps[2].shape[-2:])[0].to(torch.bool)
        pos64 = self.backbone[1](mask64).to(maps[2].dtype)
        level_masks, level_pos = [mask16, mask32, mask64], [pos16, pos32, pos64]
        sources = [_tokens(m) for m in maps]
        padding = [m.flatten(1) for m in level_masks]
        pos = [_tokens(p) + self.level_embed[j] for j, p in enumerate(level_pos)]
        memories = self.encoder(sources, padding_masks=padding, pos=pos)
        return EncodedImage(memories, padding, pos, [tuple(m.shape[-2:]) for m in maps])

    def decoder_states(self, encoded: EncodedImage) -> Tensor:
        """Every decoder layer's query states, (L_dec, B, Q, D)."""
        batch = encoded.memories[0].shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos)
        if self.config.smca_multiscale:
            return self.decoder(tgt, encoded.memories, padding_masks=encoded.padding_masks, pos=encoded.pos,
                                query_pos=query_pos, grid_shapes=encoded.shapes)
        extra = {"image_shape": encoded.shapes[0]} if self.config.decoder == "smca" else {}
        return self.decoder(tgt, encoded.memories[0], memory_padding_mask=encoded.padding_masks[0],
                            pos=encoded.pos[0], query_pos=query_pos, **extra)

    def forward(self, images: Tensor, masks: Tensor) -> DetectionOutput:
        """images (B, 3, H, W) normalised and zero-padded, masks (B, H, W) True on padding."""
        hs = self.decoder_states(self.encode(images, masks))
        logits = self.class_embed(hs)  # (L_dec, B, Q, C)
        if self.config.decoder == "smca":
            # SMCA Eq. 12: centres as offsets to the queries' reference centres, before the sigmoid.
            reference = self.decoder.reference_logits(self.query_embed.weight)  # (Q, 2)
            boxes = box_from_reference(self.bbox_embed(hs), reference)
        else:
            boxes = self.bbox_embed(hs).sigmoid()
        out = DetectionOutput(logits[-1], boxes[-1])
        if self.config.aux_loss:
            out.aux_outputs = [DetectionOutput(logits[i], boxes[i]) for i in range(hs.shape[0] - 1)]
        return out


def _grid_queries(config: ModelConfig) -> int:
    """Queries whose reference centres start on a grid (``smca_reference: grid``), else 0."""
    return config.num_queries if config.smca_reference == "grid" else 0


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W, C) in raster order."""
    return x.flatten(2).transpose(1, 2)
