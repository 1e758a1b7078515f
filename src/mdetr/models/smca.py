"""Spatially modulated co-attention: a decoder whose cross-attention is pulled towards a predicted box
(SMCA, Gao et al., ICCV 2021, Section 3.3), usable in place of the DETR decoder of :mod:`transformer`.

Each object query predicts a reference centre in normalised image coordinates from its embedding (SMCA
Eq. 3, computed once and shared by every decoder layer). In each layer the query also predicts scales
and, in the multi-head variant, a per-head offset of the centre (Eq. 6); they define a Gaussian-like weight
map ``G`` over the feature grid (Eq. 4) whose logarithm is added to the cross-attention logits before the
softmax (Eq. 5). Box centres are then predicted relative to the reference centre (Eq. 12, see
:func:`box_from_reference`).

Conventions:

* Coordinates are in feature-map cells, ``x`` along the width and ``y`` along the height; cell ``(i, j)``
  sits at ``(i + 0.5, j + 0.5)``. A normalised centre is scaled by the *unpadded* feature size of its image
  (read from the padding mask), because boxes are normalised to the unpadded image.
* Centres and scales are ordered ``(x, y)`` / ``(s_w, s_h)``, like the ``cxcywh`` boxes.
* Scale options (SMCA Table 2): ``"fixed"`` (s = 1, only the centre is predicted), ``"single"`` (one
  predicted scale for both axes) and ``"independent"`` (``s_w`` and ``s_h`` predicted separately). Scales
  come from a linear layer initialised to output 1, so every variant starts as the fixed one. The official
  code multiplies the squared distance by the squared output (an inverse scale); here Eq. 4 is followed and
  the distance is divided by ``beta * s^2``, with ``s^2`` kept above ``MIN_SCALE_SQ`` so ``log G`` stays
  finite.
* ``beta`` defaults to 8, the official ``--smooth``: with s = 1, ``G`` is a Gaussian of standard deviation 2
  cells.

Text tokens of the MDETR joint memory. The memory holds the image tokens (in raster order) followed by the
caption's tokens, which have no spatial position. The prior gives them ``log G = 0`` (they are not
modulated): a text token is weighted as if it lay at the query's centre, where ``G = 1``. Hence

* among the image tokens, the attention renormalised to them is exactly SMCA's Eq. 5/6, and
* among the text tokens, the attention is exactly the unmodulated one, so a query can always read the
  caption, whatever region it looks at; MDETR's decoder relies on this to condition queries on the text.

Since ``G <= 1``, a sharper prior (smaller ``beta``) moves attention mass from distant pixels to both the
pixels near the centre and the text. The alternatives were worse: masking the text would cut the decoder
off from the caption, and a constant below 0 would be an arbitrary extra hyper-parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.models.heads import MLP
from mdetr.models.transformer import MultiheadAttention, _clones, _with_pos

SCALE_OPTIONS = ("fixed", "single", "independent")


def check_prior_options(scale: str, beta: float) -> None:
    """Refuse a scale option outside :data:`SCALE_OPTIONS` or a non-positive bandwidth."""
    if scale not in SCALE_OPTIONS:
        raise ValueError(f"SMCA scale must be one of {SCALE_OPTIONS}, got {scale!r}")
    if beta <= 0:
        raise ValueError(f"SMCA beta must be positive, got {beta}")


# Lower bound of s^2 in Eq. 4: a predicted scale near zero would make log G -inf off the centre.
MIN_SCALE_SQ = 1e-2


def feature_grid(height: int, width: int, *, device: torch.device | None = None) -> Tensor:
    """Cell centres of an (H, W) feature map in raster order: (H * W, 2) as (x, y) in cell units."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def gaussian_log_weight(
    centers: Tensor, scales: Tensor, *, grid_shape: tuple[int, int], beta: float
) -> Tensor:
    """``log G`` of SMCA Eq. 4 over an (H, W) grid.

    centers: (..., 2) as (c_w, c_h) in cell units; scales: (..., 2) as (s_w, s_h), broadcastable to centers.
    Returns (..., H * W) in raster order: ``-(i - c_w)^2 / (beta s_w^2) - (j - c_h)^2 / (beta s_h^2)``.
    """
    grid = feature_grid(*grid_shape, device=centers.device).to(centers.dtype)  # (HW, 2)
    squared = (grid - centers.unsqueeze(-2)).square()  # (..., HW, 2)
    bandwidth = beta * scales.square().clamp_min(MIN_SCALE_SQ)  # (..., 2)
    return -(squared / bandwidth.unsqueeze(-2)).sum(-1)


def gaussian_weight(centers: Tensor, scales: Tensor, *, grid_shape: tuple[int, int], beta: float) -> Tensor:
    """The weight map G of SMCA Eq. 4: (..., H * W), 1 at the centre, decaying away from it."""
    return gaussian_log_weight(centers, scales, grid_shape=grid_shape, beta=beta).exp()


def box_from_reference(box_logits: Tensor, reference_logits: Tensor) -> Tensor:
    """SMCA Eq. 12: the box centre is predicted as an offset to the reference centre before the sigmoid.

    box_logits: (..., 4) the box head's raw (cx, cy, w, h); reference_logits: (..., 2) the reference centre
    before its sigmoid (= inverse_sigmoid of the normalised reference). Returns normalised cxcywh (..., 4).
    """
    centre = box_logits[..., :2] + reference_logits
    return torch.cat([centre, box_logits[..., 2:]], dim=-1).sigmoid()


def reference_grid(num_queries: int) -> Tensor:
    """(Q, 2) normalised (x, y) centres of a raster grid of ceil(sqrt(Q)) columns covering the image."""
    cols = math.ceil(math.sqrt(num_queries))
    rows = math.ceil(num_queries / cols)
    index = torch.arange(num_queries)
    return torch.stack([(index % cols + 0.5) / cols, (index // cols + 0.5) / rows], dim=-1)


def valid_feature_size(padding_mask: Tensor, grid_shape: tuple[int, int]) -> Tensor:
    """Unpadded (W, H) of each image in cells: (B, 2) float, from the image part (B, H * W) of a mask.

    Padding is at the bottom and right, so the valid width is the number of columns with a valid pixel.
    """
    height, width = grid_shape
    valid = ~padding_mask[:, : height * width].view(-1, height, width)
    size = torch.stack([valid.any(dim=1).sum(-1), valid.any(dim=2).sum(-1)], dim=-1)
    return size.clamp_min(1).float()


class ModulatedMultiheadAttention(MultiheadAttention):
    """Multi-head attention with explicit logits, so an additive prior can enter before the softmax.

    The parameters (and projections) are :class:`~mdetr.models.transformer.MultiheadAttention`'s, so the
    layer holds the same state as the DETR decoder's cross-attention.
    """

    def forward(  # type: ignore[override]  # also returns the attention map
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        log_prior: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """query (B, Q, D), key/value (B, S, D); key_padding_mask (B, S) True on ignored keys; log_prior
        (B, h or 1, Q, S) added to the logits. Returns the output (B, Q, D) and the attention (B, h, Q, S)."""
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, h, Q, S)
        if log_prior is not None:
            logits = logits + log_prior  # SMCA Eq. 5 (shared) / Eq. 6 (per head)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attention = logits.softmax(-1)
        dropped = F.dropout(attention, p=self.dropout_p, training=self.training)
        return self._merge(dropped @ v), attention


class SpatialPrior(nn.Module):
    """Per-layer head offsets and scales of one query (SMCA Eq. 3 scales, Eq. 6 offsets).

    ``num_maps`` is 1 (head-shared, Eq. 5) or ``nhead`` (multi-head, Eq. 6). Official correspondences:
    ``head_offset`` is ``point2``, ``scale`` is ``point3``.
    """

    def __init__(self, *, d_model: int, num_maps: int, scale: str, multi_head: bool) -> None:
        super().__init__()
        self.num_maps = num_maps
        self.scale_option = scale
        self.head_offset = nn.Linear(d_model, 2 * num_maps) if multi_head else None
        per_map = {"fixed": 0, "single": 1, "independent": 2}[scale]
        self.scale = nn.Linear(d_model, per_map * num_maps) if per_map else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Every head starts at the shared centre with scale 1 (the official init of the scale layer).
        if self.head_offset is not None:
            nn.init.zeros_(self.head_offset.weight)
            nn.init.zeros_(self.head_offset.bias)
        if self.scale is not None:
            nn.init.zeros_(self.scale.weight)
            nn.init.ones_(self.scale.bias)

    def forward(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, Q, D) -> offsets (B, Q, n, 2) in cells and scales (B, Q, n, 2) as (s_w, s_h)."""
        b, q, _ = queries.shape
        if self.head_offset is None:
            offsets = queries.new_zeros(b, q, self.num_maps, 2)
        else:
            offsets = self.head_offset(queries).view(b, q, self.num_maps, 2)
        if self.scale is None:
            scales = queries.new_ones(b, q, self.num_maps, 2)
        else:
            scales = self.scale(queries).view(b, q, self.num_maps, self.scale.out_features // self.num_maps)
            scales = scales.expand(-1, -1, -1, 2)
        return offsets, scales


class SMCADecoderLayer(nn.Module):
    """The DETR decoder layer of :class:`transformer.DecoderLayer` with spatially modulated cross-attention.

    Parameter names match it (``self_attn``, ``cross_attn_image``, ``linear1``, ``norm1/3/4`` ...); the prior
    adds ``norm_prior`` (the official extra LayerNorm on ``tgt + query_pos``) and ``spatial_prior``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        scale: str = "independent",
        multi_head: bool = True,
        beta: float = 8.0,
        free_heads: int = 0,
    ) -> None:
        super().__init__()
        check_prior_options(scale, beta)
        if not 0 <= free_heads <= nhead:
            raise ValueError(f"free_heads must be in 0..{nhead} (the number of heads), got {free_heads}")
        self.beta = beta
        # The last free_heads heads of the cross-attention attend without the prior (log G = 0), so a query
        # can look past its box (e.g. at the object a spatial relation names); 0 is SMCA.
        self.free_heads = free_heads
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn_image = ModulatedMultiheadAttention(d_model=d_model, nhead=nhead, dropout=dropout)
        self.norm_prior = nn.LayerNorm(d_model)
        self.spatial_prior = SpatialPrior(
            d_model=d_model, num_maps=nhead if multi_head else 1, scale=scale, multi_head=multi_head
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)

    def log_prior(
        self, tgt: Tensor, query_pos: Tensor, *, reference: Tensor, valid_size: Tensor,
        grid_shape: tuple[int, int], num_text: int, modulated: int | None = None,
    ) -> Tensor:
        """log G for the joint memory: (B, n, Q, H * W + num_text), zero on the text tokens (n: 1 for a
        head-shared prior, else the number of heads; zero on the free heads).

        tgt, query_pos: (B, Q, D); reference: (B, Q, 2) normalised (x, y); valid_size: (B, 2) unpadded (W, H).
        modulated: only the first this many queries get the prior (None: all); log G is zero for the rest.
        """
        num_queries = tgt.shape[1]
        m = num_queries if modulated is None else modulated
        offsets, scales = self.spatial_prior(self.norm_prior(tgt[:, :m] + query_pos[:, :m]))  # (B, m, n, 2)
        centres = (reference[:, :m] * valid_size[:, None, :]).unsqueeze(2) + offsets  # (B, m, n, 2) in cells
        log_g = gaussian_log_weight(centres, scales, grid_shape=grid_shape, beta=self.beta)  # (B, m, n, HW)
        if self.free_heads:
            nhead = self.cross_attn_image.nhead
            log_g = log_g.expand(-1, -1, nhead, -1)  # a head-shared prior (n = 1) becomes per head
            modulated_heads = nhead - self.free_heads
            log_g = torch.cat([log_g[:, :, :modulated_heads], log_g.new_zeros(
                (*log_g.shape[:2], self.free_heads, log_g.shape[-1]))], dim=2)
        # Text tokens are not modulated (log G = 0), nor are the queries past the first m.
        log_g = F.pad(log_g, (0, num_text, 0, 0, 0, num_queries - m))
        return log_g.transpose(1, 2)  # (B, n, Q, HW + L)

    def forward(
        self, tgt: Tensor, memory: Tensor, *, memory_padding_mask: Tensor, pos: Tensor, query_pos: Tensor,
        reference: Tensor, valid_size: Tensor, grid_shape: tuple[int, int], modulated: int | None = None,
    ) -> Tensor:
        """tgt (B, Q, D), memory/pos (B, HW + L, D) image tokens first, memory_padding_mask (B, HW + L);
        modulated: see :meth:`log_prior`."""
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)))
        num_text = memory.shape[1] - grid_shape[0] * grid_shape[1]
        log_prior = self.log_prior(
            tgt, query_pos, reference=reference, valid_size=valid_size, grid_shape=grid_shape,
            num_text=num_text, modulated=modulated,
        )
        attended = self.cross_attn_image(
            _with_pos(tgt, query_pos), _with_pos(memory, pos), memory,
            key_padding_mask=memory_padding_mask, log_prior=log_prior,
        )[0]
        tgt = self.norm3(tgt + self.dropout3(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm4(tgt + self.dropout4(ffn))


class SMCADecoder(nn.Module):
    """Stack of SMCA decoder layers sharing one reference centre per query; returns (L, B, Q, D) like
    :class:`transformer.Decoder`.

    ``reference_point`` is the 2-layer MLP of SMCA Eq. 3 (official ``point1``), applied to the query
    embedding; its output before the sigmoid is also what the box head adds (Eq. 12).
    """

    def __init__(
        self, layer: SMCADecoderLayer, num_layers: int, d_model: int, *, grid_queries: int = 0
    ) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.reference_point = MLP(input_dim=d_model, hidden_dim=d_model, output_dim=2, num_layers=2)
        # grid_queries > 0: each query's centre starts on a regular grid over the image (a learned per-query
        # offset, initialised to the grid, is added to Eq. 3's MLP, whose last layer starts at zero). Queries
        # then cover the image from the first step and Hungarian matching pairs an object with a nearby query,
        # which keeps the matching stable early in training (as anchor-based DETR variants do).
        self.grid_queries = grid_queries
        if grid_queries:
            self.reference_anchor = nn.Parameter(reference_grid(grid_queries).logit())

    def reset_prior_parameters(self) -> None:
        """Restore the prior's initialisation (after a blanket Xavier init of the transformer)."""
        for layer in self.layers:
            layer.spatial_prior.reset_parameters()
        if self.grid_queries:
            with torch.no_grad():
                self.reference_anchor.copy_(reference_grid(self.grid_queries).logit())
            last = self.reference_point.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def reference_logits(self, query_embed: Tensor) -> Tensor:
        """(..., Q, D) query embeddings -> (..., Q, 2) reference centres (x, y) before the sigmoid
        (SMCA Eq. 3).

        Queries past the grid's (a QA model's answer queries, appended after the object queries) get no
        grid offset: they start at the image centre.
        """
        logits = self.reference_point(query_embed)
        if not self.grid_queries:
            return logits
        anchor = self.reference_anchor
        extra = logits.shape[-2] - anchor.shape[0]
        if extra > 0:
            anchor = torch.cat([anchor, anchor.new_zeros(extra, anchor.shape[1])])
        return logits + anchor

    def forward(
        self, tgt: Tensor, memory: Tensor, *, memory_padding_mask: Tensor, pos: Tensor, query_pos: Tensor,
        image_shape: tuple[int, int] | None, modulated: int | None = None,
    ) -> Tensor:
        """As :meth:`transformer.Decoder.forward`; image_shape: (H, W) of the image part of the memory.

        modulated: only the first this many queries (the object queries) attend through the spatial prior;
        the rest (a QA model's answer queries, which predict no box to centre a prior on) attend without it.
        None: every query is modulated.
        """
        if image_shape is None:
            raise ValueError("the SMCA decoder needs the feature-map size: MemoryCache.image_shape is None")
        reference = self.reference_logits(query_pos).sigmoid()  # (B, Q, 2)
        valid_size = valid_feature_size(memory_padding_mask, image_shape)
        intermediate = []
        for layer in self.layers:
            tgt = layer(
                tgt, memory, memory_padding_mask=memory_padding_mask, pos=pos, query_pos=query_pos,
                reference=reference, valid_size=valid_size, grid_shape=image_shape, modulated=modulated,
            )
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)
