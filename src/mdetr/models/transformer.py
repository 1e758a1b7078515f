"""The cross encoder over image and text tokens and the DETR decoder (MDETR paper Section 2.2, Figure 2).

All tensors here are batch-first: sequences are (B, S, D). Parameter names follow the official model
(``self_attn``, ``cross_attn_image``, ``linear1``, ``norm1`` ...) so its checkpoints load unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.models.text import FeatureResizer, TextFeatureCache, build_text_encoder


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), so the official checkpoints load unchanged, computing the same function.

    Written out because ``nn.MultiheadAttention(batch_first=True)`` projects a transposed (sequence-first)
    view of its inputs: under CPU bf16 autocast that non-contiguous ``linear`` becomes a batched matmul over
    a copy of the weight per token (several times slower than the float32 layer; measured in BENCHMARKS.md).
    Here every projection reads contiguous (B, N, D) rows and the attention itself is
    ``scaled_dot_product_attention``.
    """

    # Applies the three input projections; an inference copy may swap in another kernel of the same
    # function (mdetr.ops.linear.onednn_linear_layers).
    project = staticmethod(F.linear)

    def __init__(self, d_model: int, nhead: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.nhead = nhead
        self.dropout_p = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor, index: int) -> Tensor:
        """(B, N, D) -> projection ``index`` (0 query, 1 key, 2 value) split into heads (B, h, N, D/h)."""
        d = x.shape[-1]
        projected = self.project(x, self.in_proj_weight[index * d : (index + 1) * d],
                                 self.in_proj_bias[index * d : (index + 1) * d])
        return projected.view(x.shape[0], x.shape[1], self.nhead, -1).transpose(1, 2)

    def _merge(self, heads: Tensor) -> Tensor:
        """(B, h, N, D/h) -> (B, N, D) through the output projection."""
        b, _, n, _ = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(b, n, -1))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """query (B, Q, D), key/value (B, S, D); key_padding_mask (B, S) True on ignored keys -> (B, Q, D)."""
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return self._merge(out)


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; positions are added to queries and keys only."""

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, *, padding_mask: Tensor, pos: Tensor) -> Tensor:
        q = k = _with_pos(src, pos)
        attended = self.self_attn(q, k, src, key_padding_mask=padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, cross-attention to the joint image+text memory, FFN.

    The official model names the norms 1, 3 and 4 (a text cross-attention with norm 2 was removed).
    """

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn_image = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)

    def forward(
        self, tgt: Tensor, memory: Tensor, *, memory_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)))
        attended = self.cross_attn_image(
            _with_pos(tgt, query_pos), _with_pos(memory, pos), memory, key_padding_mask=memory_padding_mask
        )
        tgt = self.norm3(tgt + self.dropout3(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm4(tgt + self.dropout4(ffn))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)

    def forward(self, src: Tensor, *, padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, padding_mask=padding_mask, pos=pos)
        return src


class Decoder(nn.Module):
    """Stack of decoder layers; returns every layer's output through the shared final norm (L, B, Q, D)."""

    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, memory: Tensor, *, memory_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_padding_mask=memory_padding_mask, pos=pos, query_pos=query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


@dataclass
class MemoryCache:
    """What the cross encoder produces for one batch, reusable by the decoder (and by cached-text inference).

    memory: (B, HW + L, D) the joint encoder output, image tokens first.
    padding_mask: (B, HW + L) True on padded image pixels and padded text tokens.
    pos: (B, HW + L, D) sine positions for image tokens, zeros for text tokens.
    text_memory: (B, L, D) the encoder output at the text positions (used by contrastive alignment).
    text_padding_mask: (B, L) True on padding tokens.
    tokenized: the tokenizer's BatchEncoding for the captions (offsets, char_to_token), or None.
    image_shape: (H, W) of the feature map whose raster-order tokens open the memory, or None when unknown
        (the SMCA decoder needs it to place its spatial prior).
    """

    memory: Tensor
    padding_mask: Tensor
    pos: Tensor
    text_memory: Tensor
    text_padding_mask: Tensor
    tokenized: object | None
    image_shape: tuple[int, int] | None = None


@dataclass
class EncodedText:
    """Text already run through the text encoder and resizer: (B, L, D) features and (B, L) padding mask."""

    features: Tensor
    padding_mask: Tensor
    tokenized: object | None = None


class Transformer(nn.Module):
    """Text encoder + resizer + cross encoder + decoder.

    decoder: ``"detr"`` (the official decoder) or ``"smca"`` (spatially modulated co-attention, see
    :mod:`mdetr.models.smca`, configured by ``smca_scale``, ``smca_multi_head`` and ``smca_beta``).
    image_position_in_values: add the image positions to the image tokens at the encoder input (see
    :meth:`encode`); off in the official model.
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        text_encoder: str = "roberta-base",
        text_encoder_pretrained: bool = True,
        freeze_text_encoder: bool = False,
        decoder: str = "detr",
        smca_scale: str = "independent",
        smca_multi_head: bool = True,
        smca_beta: float = 8.0,
        smca_grid_queries: int = 0,
        smca_free_heads: int = 0,
        image_position_in_values: bool = False,
    ) -> None:
        super().__init__()
        enc_layer = EncoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                                 dropout=dropout)
        self.encoder = Encoder(enc_layer, num_encoder_layers)
        self.decoder_type = decoder
        if decoder == "detr":
            dec_layer = DecoderLayer(
                d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout
            )
            self.decoder: nn.Module = Decoder(dec_layer, num_decoder_layers, d_model)
        elif decoder == "smca":
            from mdetr.models.smca import SMCADecoder, SMCADecoderLayer  # smca builds on this module

            smca_layer = SMCADecoderLayer(
                d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                scale=smca_scale, multi_head=smca_multi_head, beta=smca_beta, free_heads=smca_free_heads,
            )
            self.decoder = SMCADecoder(smca_layer, num_decoder_layers, d_model,
                                       grid_queries=smca_grid_queries)
        else:
            raise ValueError(f"decoder must be 'detr' or 'smca', got {decoder!r}")
        self.d_model = d_model
        self.nhead = nhead
        self.image_position_in_values = image_position_in_values
        # Xavier init of the transformer proper, done before the text encoder exists so it is untouched.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if decoder == "smca":
            self.decoder.reset_prior_parameters()
        self.text_encoder, self.tokenizer = build_text_encoder(
            text_encoder, pretrained=text_encoder_pretrained
        )
        if freeze_text_encoder:
            for p in self.text_encoder.parameters():
                p.requires_grad_(False)
        # The encoder's pooler (kept: it is part of the official key layout) feeds nothing MDETR reads.
        pooler = getattr(self.text_encoder, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)
        self.resizer = FeatureResizer(
            input_dim=self.text_encoder.config.hidden_size, output_dim=d_model, dropout=0.1
        )
        # Set by cache_text_features(): the frozen encoder's output per caption, reused across batches.
        self.text_cache: TextFeatureCache | None = None

    def cache_text_features(self, max_entries: int | None = None) -> TextFeatureCache:
        """Keep the text encoder's output per caption and reuse it whenever the encoder is frozen and in
        eval mode (see :class:`~mdetr.models.text.TextFeatureCache`); returns the cache."""
        self.text_cache = TextFeatureCache(max_entries)
        return self.text_cache

    def tokenize(self, captions: list[str], device: torch.device) -> object:
        return self.tokenizer(captions, padding="longest", return_tensors="pt").to(device)

    def encode_text(self, captions: list[str], device: torch.device, *,
                    cache: TextFeatureCache | None = None) -> EncodedText:
        """Tokenize, encode and resize ``captions``; ``cache`` (default: :attr:`text_cache`, if set) keeps
        the encoder's output per caption while the encoder is frozen."""
        tokenized = self.tokenize(captions, device)
        inputs = {k: v for k, v in tokenized.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        cache = cache if cache is not None else self.text_cache
        if cache is not None and cache.usable(self.text_encoder):
            hidden = cache.hidden_states(self.text_encoder, captions, inputs)
        else:
            hidden = self.text_encoder(**inputs).last_hidden_state  # (B, L, H_text)
        return EncodedText(self.resizer(hidden), tokenized["attention_mask"].ne(1), tokenized)

    def encode(
        self,
        src: Tensor,
        mask: Tensor,
        pos: Tensor,
        text: EncodedText,
        *,
        image_shape: tuple[int, int] | None = None,
    ) -> MemoryCache:
        """Joint self-attention over image tokens (B, HW, D) and text tokens; text gets zero position.

        image_shape: the (H, W) the image tokens were flattened from, kept in the cache for the decoder.
        With ``image_position_in_values`` the image tokens enter as ``src + pos``, so every attention value
        read from them carries their position (queries and keys get ``pos`` as always).
        """
        if self.image_position_in_values:
            src = src + pos
        memory = torch.cat([src, text.features], dim=1)
        padding_mask = torch.cat([mask, text.padding_mask], dim=1)
        pos = torch.cat([pos, torch.zeros_like(text.features)], dim=1)
        memory = self.encoder(memory, padding_mask=padding_mask, pos=pos)
        length = text.features.shape[1]
        return MemoryCache(
            memory, padding_mask, pos, memory[:, -length:], text.padding_mask, text.tokenized, image_shape
        )

    def decode(self, cache: MemoryCache, query_embed: Tensor, *, modulated: int | None = None) -> Tensor:
        """Queries (Q, D) cross-attend to the joint memory; returns (L_dec, B, Q, D).

        modulated (SMCA decoder only): the spatial prior applies to the first this many queries (None: all).
        """
        batch = cache.memory.shape[0]
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos)
        extra = {}
        if self.decoder_type == "smca":
            extra = {"image_shape": cache.image_shape, "modulated": modulated}
        return self.decoder(
            tgt, cache.memory, memory_padding_mask=cache.padding_mask, pos=cache.pos, query_pos=query_pos,
            **extra,
        )
