"""SMCA's multi-scale encoding and scale-selection attention (SMCA Section 3.3, Eq. 7-9).

Three feature maps at strides 16, 32 and 64 are encoded together and the decoder's queries choose, per
query, how much to read from each:

* **Input** (:class:`MultiScaleInput`). The stride-16 and stride-32 backbone levels (ResNet ``layer3`` and
  ``layer4``) are projected to ``d_model`` by 1x1 convolutions; the stride-64 map is a 3x3 stride-2
  convolution of the stride-32 backbone features, as in the released multi-scale SMCA. The paper's "3
  convolutions" are these three. No FPN.
* **Encoder** (:class:`MultiScaleEncoder`). A layout of blocks in the paper's notation
  (``"2intra-multi-2intra"``, the paper's final design): an *intra* block is one post-norm transformer
  encoder layer applied to each scale on its own, with the same weights for every scale (Table 3: sharing
  both attention and FFN generalises best); a *multi* block is one layer over the tokens of all scales
  together. Positions are the sine embedding of each map plus a learned per-scale embedding, added by the
  caller, so the encoder itself treats the scales as an unordered set (a test checks that permuting the
  scales permutes the outputs).
* **Decoder** (:class:`ScaleSelectionDecoder`). SMCA's spatially modulated co-attention (see
  :mod:`mdetr.models.smca`) run on each scale with the scale's own key/value projections; each query's
  softmax weights over the scales (Eq. 7) mix the per-scale results (Eq. 8-9).

The spatial prior on several scales: a query's normalised reference centre is placed on each grid by that
scale's unpadded size, and its head offsets and scales are read in that grid's cells. The Gaussian thus
covers the same number of cells at each scale, i.e. a region four times wider in pixels at stride 64 than
at stride 16, so the coarse scale suits large objects and the fine scale small ones, which is what scale
selection picks between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.models.smca import (
    SMCADecoder,
    SpatialPrior,
    check_prior_options,
    gaussian_log_weight,
    valid_feature_size,
)
from mdetr.models.transformer import EncoderLayer, MultiheadAttention, _clones, _with_pos

SCALE_STRIDES = (16, 32, 64)


class MultiScaleInput(nn.Module):
    """Backbone features at strides 16 and 32 -> ``d_model``-channel maps at strides 16, 32 and 64.

    ``input_proj.0`` / ``input_proj.1``: 1x1 convolutions of the stride-16 / stride-32 levels;
    ``input_proj.2``: 3x3 stride-2 convolution of the stride-32 level.
    """

    def __init__(self, *, in_channels: tuple[int, int], d_model: int) -> None:
        super().__init__()
        c16, c32 = in_channels
        self.input_proj = nn.ModuleList([
            nn.Conv2d(c16, d_model, kernel_size=1),
            nn.Conv2d(c32, d_model, kernel_size=1),
            nn.Conv2d(c32, d_model, kernel_size=3, stride=2, padding=1),
        ])

    def forward(self, features16: Tensor, features32: Tensor) -> list[Tensor]:
        """(B, C16, H/16, W/16), (B, C32, H/32, W/32) -> [(B, D, H/16, W/16), (B, D, H/32, W/32),
        (B, D, ceil(H/64), ceil(W/64))]."""
        project16, project32, project64 = self.input_proj
        return [project16(features16), project32(features32), project64(features32)]


class MultiScaleEncoder(nn.Module):
    """Intra-scale and multi-scale self-attention blocks in a given order (SMCA Section 3.3, Table 3).

    ``layers[k]`` is one :class:`~mdetr.models.transformer.EncoderLayer` per block; an intra block's layer
    runs on every scale separately (so its weights are shared across scales), a multi block's layer runs
    once on the concatenation of all scales.
    """

    def __init__(
        self, *, layout: list[str], d_model: int, nhead: int, dim_feedforward: int, dropout: float
    ) -> None:
        super().__init__()
        unknown = sorted(set(layout) - {"intra", "multi"})
        if unknown:
            raise ValueError(f"encoder blocks must be 'intra' or 'multi', got {unknown}")
        self.layout = list(layout)
        layer = EncoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout)
        self.layers = _clones(layer, len(layout))

    def forward(
        self, sources: list[Tensor], *, padding_masks: list[Tensor], pos: list[Tensor]
    ) -> list[Tensor]:
        """Per scale: tokens (B, S_j, D) in raster order, padding mask (B, S_j) True on padding, positions
        (B, S_j, D). Returns the encoded tokens per scale, same shapes."""
        if not len(sources) == len(padding_masks) == len(pos):
            raise ValueError("sources, padding_masks and pos need one entry per scale")
        sizes = [s.shape[1] for s in sources]
        joint_mask, joint_pos = torch.cat(padding_masks, 1), torch.cat(pos, 1)
        for kind, layer in zip(self.layout, self.layers, strict=True):
            if kind == "intra":
                sources = [layer(s, padding_mask=m, pos=p) for s, m, p in zip(sources, padding_masks, pos,
                                                                                  strict=True)]
            else:
                joint = layer(torch.cat(sources, 1), padding_mask=joint_mask, pos=joint_pos)
                sources = list(joint.split(sizes, dim=1))
        return sources


class ScaleSelectionAttention(nn.Module):
    """Multi-head co-attention to several scales with per-scale keys and values (SMCA Eq. 8-9).

    For head ``i`` and scale ``j``: ``C_ij = softmax(K_ij^T Q_i / sqrt(d) + log G_ij) V_ij * alpha_j``, and
    ``C_i = sum_j C_ij``; the heads are then concatenated and projected. The query projection and the output
    projection are shared by the scales, the key and value projections are not ("separate linear
    projections").
    """

    def __init__(self, *, d_model: int, nhead: int, num_scales: int, dropout: float) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.nhead = nhead
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_scales))
        self.v_proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_scales))
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.nhead, -1).transpose(1, 2)  # (B, h, N, D/h)

    def forward(
        self, query: Tensor, keys: list[Tensor], values: list[Tensor], *, scale_weights: Tensor,
        key_padding_masks: list[Tensor | None] | None = None, log_priors: list[Tensor | None] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """query (B, Q, D); per scale j keys/values (B, S_j, D), key_padding_masks (B, S_j) True on ignored
        keys, log_priors (B, h or 1, Q, S_j); scale_weights (B, Q, J) summing to 1 over J (Eq. 7).

        Returns the output (B, Q, D) and each scale's attention (B, h, Q, S_j), rows summing to 1.
        """
        num_scales = len(keys)
        masks = key_padding_masks or [None] * num_scales
        priors = log_priors or [None] * num_scales
        q = self._heads(self.q_proj(query))
        mixed = q.new_zeros(q.shape)
        attentions = []
        for j in range(num_scales):
            k = self._heads(self.k_proj[j](keys[j]))
            v = self._heads(self.v_proj[j](values[j]))
            logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, h, Q, S_j)
            if priors[j] is not None:
                logits = logits + priors[j]  # SMCA Eq. 6 on scale j
            if masks[j] is not None:
                logits = logits.masked_fill(masks[j][:, None, None, :], float("-inf"))
            attention = logits.softmax(-1)
            attentions.append(attention)
            # Eq. 8-9: each scale's co-attention feature, weighted by the query's alpha_j.
            mixed = mixed + (self.dropout(attention) @ v) * scale_weights[:, None, :, j, None]
        out = mixed.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return self.out_proj(out), attentions


class ScaleSelectionDecoderLayer(nn.Module):
    """The SMCA decoder layer over several scales: query self-attention, spatially modulated co-attention
    per scale mixed by scale-selection weights, FFN (post-norm, as :class:`smca.SMCADecoderLayer`)."""

    def __init__(
        self,
        *,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        num_scales: int = len(SCALE_STRIDES),
        scale: str = "independent",
        multi_head: bool = True,
        beta: float = 8.0,
    ) -> None:
        super().__init__()
        check_prior_options(scale, beta)
        self.beta = beta
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn_image = ScaleSelectionAttention(
            d_model=d_model, nhead=nhead, num_scales=num_scales, dropout=dropout
        )
        self.norm_prior = nn.LayerNorm(d_model)
        self.spatial_prior = SpatialPrior(
            d_model=d_model, num_maps=nhead if multi_head else 1, scale=scale, multi_head=multi_head
        )
        self.scale_selection = nn.Linear(d_model, num_scales)  # SMCA Eq. 7: alpha = softmax(FC(O_q))
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)

    def priors_and_weights(
        self, tgt: Tensor, query_pos: Tensor, *, reference: Tensor, valid_sizes: list[Tensor],
        grid_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], Tensor]:
        """log G per scale (B, n, Q, H_j W_j) and the scale-selection weights (B, Q, J).

        reference: (B, Q, 2) normalised (x, y); valid_sizes[j]: (B, 2) unpadded (W, H) of scale j in cells.
        """
        query = self.norm_prior(tgt + query_pos)
        offsets, scales = self.spatial_prior(query)  # (B, Q, n, 2) each, in cells of every scale
        log_priors = []
        for valid_size, grid_shape in zip(valid_sizes, grid_shapes, strict=True):
            centres = (reference * valid_size[:, None, :]).unsqueeze(2) + offsets  # (B, Q, n, 2)
            log_g = gaussian_log_weight(centres, scales, grid_shape=grid_shape, beta=self.beta)
            log_priors.append(log_g.transpose(1, 2))  # (B, n, Q, HW)
        return log_priors, self.scale_selection(query).softmax(-1)

    def forward(
        self, tgt: Tensor, memories: list[Tensor], *, padding_masks: list[Tensor], pos: list[Tensor],
        query_pos: Tensor, reference: Tensor, valid_sizes: list[Tensor], grid_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """tgt, query_pos (B, Q, D); per scale memory/pos (B, H_j W_j, D) and padding mask (B, H_j W_j)."""
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)))
        log_priors, weights = self.priors_and_weights(
            tgt, query_pos, reference=reference, valid_sizes=valid_sizes, grid_shapes=grid_shapes
        )
        keys = [_with_pos(m, p) for m, p in zip(memories, pos, strict=True)]
        attended = self.cross_attn_image(
            _with_pos(tgt, query_pos), keys, memories, scale_weights=weights,
            key_padding_masks=padding_masks, log_priors=log_priors,
        )[0]
        tgt = self.norm3(tgt + self.dropout3(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm4(tgt + self.dropout4(ffn))


class ScaleSelectionDecoder(SMCADecoder):
    """Stack of :class:`ScaleSelectionDecoderLayer` sharing one reference centre per query; returns every
    layer's output through the shared final norm, (L, B, Q, D).

    The reference centres (SMCA Eq. 3, optionally started on a grid: ``grid_queries``) and the prior's
    initialisation are those of :class:`~mdetr.models.smca.SMCADecoder`; only the memory is per scale.
    """

    def __init__(self, layer: ScaleSelectionDecoderLayer, num_layers: int, d_model: int, *,
                 grid_queries: int = 0) -> None:
        super().__init__(layer, num_layers, d_model, grid_queries=grid_queries)  # type: ignore[arg-type]

    def forward(  # type: ignore[override]
        self, tgt: Tensor, memories: list[Tensor], *, padding_masks: list[Tensor], pos: list[Tensor],
        query_pos: Tensor, grid_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """tgt, query_pos (B, Q, D); per scale j memory/pos (B, H_j W_j, D) in raster order, padding mask
        (B, H_j W_j), grid shape (H_j, W_j)."""
        reference = self.reference_logits(query_pos).sigmoid()  # (B, Q, 2)
        valid_sizes = [valid_feature_size(mask, shape)
                       for mask, shape in zip(padding_masks, grid_shapes, strict=True)]
        intermediate = []
        for layer in self.layers:
            tgt = layer(
                tgt, memories, padding_masks=padding_masks, pos=pos, query_pos=query_pos, reference=reference,
                valid_sizes=valid_sizes, grid_shapes=grid_shapes,
            )
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)
