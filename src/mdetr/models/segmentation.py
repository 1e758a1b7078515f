"""Referring-expression segmentation (MDETR Section 4.3, PhraseCut): a mask for every query of the detector.

The mask branch follows DETR's panoptic head: each query of the last decoder layer attends (per head, no
values) over the image part of the cross-encoder memory; those attention maps, stacked with the projected
backbone features, are upsampled by a small convolutional FPN over backbone levels 3, 2 and 1 to a
stride-4 mask. Module names (``detr``, ``bbox_attention``, ``mask_head``) are the ones the released
PhraseCut checkpoints store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.models.mdetr import MDETR, MDETROutput
from mdetr.models.transformer import EncodedText


class QueryAttentionMap(nn.Module):
    """Multi-head attention weights of queries over a feature map (no value projection, no output).

    ``k_linear`` is applied at every pixel, i.e. as a 1x1 convolution. The softmax runs over the H*W
    positions separately for each head; padded positions get -inf first, so they receive zero weight.
    """

    def __init__(self, *, query_dim: int, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.scale = (hidden_dim / num_heads) ** -0.5
        for linear in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, queries: Tensor, features: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """queries (B, Q, D_q), features (B, D_q, H, W), padding_mask (B, H, W) True on padding
        -> weights (B, Q, N, H, W), each (b, q, n) map summing to 1."""
        q = self.q_linear(queries)
        k = F.conv2d(features, self.k_linear.weight[:, :, None, None], self.k_linear.bias)  # (B, D, H, W)
        b, num_queries = q.shape[:2]
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(b, num_queries, self.num_heads, head_dim)
        kh = k.view(b, self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        logits = torch.einsum("bqnc,bnchw->bqnhw", qh * self.scale, kh)
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask[:, None, None], float("-inf"))
        return logits.flatten(3).softmax(dim=-1).view_as(logits)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class SmallConvMaskHead(nn.Module):
    """Small convolutional FPN turning per-query attention maps into stride-4 mask logits.

    Widths: ``in_dim`` (= D + heads), then ``context_dim`` / 2, / 4, / 8, / 16, then one output channel;
    every 3x3 convolution but the last is followed by GroupNorm(8) and ReLU. Before ``lay3``, ``lay4`` and
    ``lay5``, a 1x1 ``adapter`` of the next finer backbone level is added to the nearest-upsampled maps.

    Args:
        in_dim: channels of the input (projected features concatenated with the attention maps).
        fpn_dims: channels of the three backbone levels, coarse to fine (layer3, layer2, layer1).
        context_dim: the transformer width D.
    """

    def __init__(self, *, in_dim: int, fpn_dims: Sequence[int], context_dim: int) -> None:
        super().__init__()
        if len(fpn_dims) != 3:
            raise ValueError(f"fpn_dims must list three backbone levels, got {list(fpn_dims)}")
        widths = [in_dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = _conv3x3(widths[0], widths[0])
        self.gn1 = nn.GroupNorm(8, widths[0])
        self.lay2 = _conv3x3(widths[0], widths[1])
        self.gn2 = nn.GroupNorm(8, widths[1])
        self.lay3 = _conv3x3(widths[1], widths[2])
        self.gn3 = nn.GroupNorm(8, widths[2])
        self.lay4 = _conv3x3(widths[2], widths[3])
        self.gn4 = nn.GroupNorm(8, widths[3])
        self.lay5 = _conv3x3(widths[3], widths[4])
        self.gn5 = nn.GroupNorm(8, widths[4])
        self.out_lay = _conv3x3(widths[4], 1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], widths[1], kernel_size=1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], widths[2], kernel_size=1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], widths[3], kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: Tensor, attention: Tensor, fpn: Sequence[Tensor]) -> Tensor:
        """features (B, D, h, w), attention (B, Q, N, h, w), fpn three (B, C_i, H_i, W_i) coarse to fine
        -> mask logits (B * Q, 1, H_3, W_3), batch-major (index b * Q + q)."""
        num_queries = attention.shape[1]
        # Every query gets its own copy of the image features, stacked with its N attention maps.
        x = torch.cat([features.repeat_interleave(num_queries, dim=0), attention.flatten(0, 1)], dim=1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        steps = (
            (self.adapter1, self.lay3, self.gn3),
            (self.adapter2, self.lay4, self.gn4),
            (self.adapter3, self.lay5, self.gn5),
        )
        for (adapter, conv, norm), level in zip(steps, fpn, strict=True):
            lateral = adapter(level).repeat_interleave(num_queries, dim=0)  # (B * Q, C, H_i, W_i)
            x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)


class MDETRSegmentation(nn.Module):
    """MDETR with a mask per query (the released PhraseCut models).

    One call runs the detector and the mask branch. It predicts boxes, token-slot logits and masks only:
    no alignment embeddings and no answers (as the official segmentation model).

    Args:
        detr: the detector; its config must have ``masks=True`` semantics (no QA, no alignment heads).
        freeze_detector: stop gradients to every parameter of ``detr``, so only the mask branch trains (the
            official second training stage, ``--frozen_weights``). The detector stays in train mode.
    """

    def __init__(self, *, detr: MDETR, freeze_detector: bool = False) -> None:
        super().__init__()
        self.detr = detr
        if freeze_detector:
            detr.requires_grad_(False)
        self.config = detr.config
        d, heads = detr.config.hidden_dim, detr.config.nheads
        self.bbox_attention = QueryAttentionMap(query_dim=d, hidden_dim=d, num_heads=heads)
        channels = detr.backbone[0].channels
        self.mask_head = SmallConvMaskHead(
            in_dim=d + heads, fpn_dims=[channels[2], channels[1], channels[0]], context_dim=d
        )

    @property
    def tokenizer(self) -> object:
        return self.detr.tokenizer

    def forward(self, images: Tensor, masks: Tensor, text: list[str] | EncodedText) -> MDETROutput:
        """images (B, 3, H, W), masks (B, H, W) True on padding, B captions -> :class:`MDETROutput` with
        ``pred_masks`` (B, Q, H_1, W_1) logits at the stride-4 level of the padded batch."""
        cache, levels, src = self.detr.encode_with_features(images, masks, text)
        hs = self.detr.decoder_states(cache)  # (L_dec, B, Q, D)
        out = self.detr.detection_outputs(hs, cache)
        b, d, h, w = src.shape
        # The image part of the joint encoder output (tokens in raster order), back on the feature grid.
        memory = cache.memory[:, : h * w].transpose(1, 2).reshape(b, d, h, w)
        level_mask = levels[self.config.backbone_level][1]
        attention = self.bbox_attention(hs[-1], memory, level_mask)  # (B, Q, N, h, w)
        fpn = [levels[i][0] for i in (2, 1, 0)]
        logits = self.mask_head(src, attention, fpn)
        out.pred_masks = logits.view(b, hs.shape[2], logits.shape[-2], logits.shape[-1])
        return out
