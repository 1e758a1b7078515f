"""Character spans of a caption -> token positive maps.

An MDETR annotation aligns each box with one or more character spans ``[beg, end)`` of its caption
(``tokens_positive``). The model predicts, for every query, a distribution over ``MAX_TOKENS = 256`` slots:
slot ``i < 255`` is the ``i``-th token of the tokenized caption (special tokens included, so slot 0 is
``[CLS]`` / ``<s>``) and slot 255 means "no object". The positive map of a box marks the slots of every
token its spans touch (MDETR Sec. 2.2, soft token prediction).

The official code maps a span through ``char_to_token(beg)`` .. ``char_to_token(end - 1)`` and, when a span
starts or ends on a character with no token (a space), retries one or two characters further. Here a token
is marked when its character range overlaps a span, after trimming whitespace from the token's range. That
gives the same answer on well-formed spans, needs no fallbacks for spans with leading or trailing spaces,
and behaves the same for WordPiece (offsets exclude spaces) and byte-level BPE (``"Ġcat"`` may include the
space before the word, depending on ``trim_offsets``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

MAX_TOKENS = 256
"""Width of a positive map: token slots 0..254 plus the "no object" slot 255."""

Span = tuple[int, int]


def _encoding_parts(tokenized: Any) -> tuple[list[tuple[int, int]], list[int] | None]:
    """Offsets and special-token mask of one caption, from whatever form the caller has."""
    encodings = getattr(tokenized, "encodings", None)  # transformers.BatchEncoding of a fast tokenizer
    if encodings:
        if len(encodings) != 1:
            raise ValueError(f"expected the tokenization of one caption, got a batch of {len(encodings)}")
        tokenized = encodings[0]
    if hasattr(tokenized, "offsets") and hasattr(tokenized, "special_tokens_mask"):  # tokenizers.Encoding
        return list(tokenized.offsets), list(tokenized.special_tokens_mask)
    if isinstance(tokenized, Mapping):  # a plain dict with return_offsets_mapping=True
        if "offset_mapping" not in tokenized:
            raise ValueError("the tokenization has no 'offset_mapping': use a fast tokenizer's output")
        offsets = torch.as_tensor(tokenized["offset_mapping"])
        if offsets.dim() == 3 and offsets.shape[0] != 1:
            raise ValueError(f"expected the tokenization of one caption, got a batch of {offsets.shape[0]}")
        mask = tokenized.get("special_tokens_mask")
        mask = None if mask is None else torch.as_tensor(mask).flatten().tolist()
        return [tuple(o) for o in offsets.reshape(-1, 2).tolist()], mask
    return [tuple(o) for o in tokenized], None


def token_char_ranges(tokenized: Any, caption: str | None = None) -> list[Span | None]:
    """Character range ``[beg, end)`` of every token of one caption, ``None`` for special tokens.

    ``tokenized`` is a ``BatchEncoding`` of one caption from a fast tokenizer, a ``tokenizers.Encoding``,
    or a plain sequence of ``(beg, end)`` offsets. Tokens with empty offsets (how fast tokenizers mark
    special tokens) are ``None``. When ``caption`` is given, whitespace is trimmed from each range, and a
    token that is nothing but whitespace (a lone byte-level ``"Ġ"``) becomes ``None``.
    """
    offsets, special = _encoding_parts(tokenized)
    ranges: list[Span | None] = []
    for index, (beg, end) in enumerate(offsets):
        if (special is not None and special[index]) or end <= beg:
            ranges.append(None)
            continue
        if caption is not None:
            while beg < end and caption[beg].isspace():
                beg += 1
            while end > beg and caption[end - 1].isspace():
                end -= 1
            if end <= beg:
                ranges.append(None)
                continue
        ranges.append((beg, end))
    return ranges


def tokens_in_spans(token_ranges: Sequence[Span | None], spans: Sequence[Span]) -> list[int]:
    """Indices of the tokens (ranges from :func:`token_char_ranges`) overlapping one of ``spans``."""
    return [
        index
        for index, token_range in enumerate(token_ranges)
        if token_range is not None
        and any(beg < token_range[1] and token_range[0] < end for beg, end in spans)
    ]


def token_coverage(token_ranges: Sequence[Span | None], length: int) -> bytes:
    """Byte ``c`` is 1 when character ``c`` of a ``length``-character caption lies inside a token.

    A span covers a token exactly when it contains such a character (``b"\\x01" in coverage[beg:end]``),
    which checks a file's spans in C instead of looping over tokens for each of millions of boxes.
    """
    coverage = bytearray(length)
    for token_range in token_ranges:
        if token_range is not None:
            beg, end = token_range
            coverage[beg:end] = b"\x01" * (end - beg)
    return bytes(coverage)


def positive_map_from_spans(
    tokenized: Any,
    spans_per_box: Sequence[Sequence[Span]],
    *,
    num_slots: int = MAX_TOKENS,
    caption: str | None = None,
) -> Tensor:
    """Token positive map of each box: BoolTensor ``[N_boxes, num_slots]``.

    Row ``n`` marks every token whose character range overlaps one of box ``n``'s spans (``[beg, end)``,
    end exclusive, in characters of the caption). Column ``i`` is the caption's ``i``-th token, special
    tokens included, which are never marked. Pass ``caption`` so whitespace is trimmed from token ranges;
    it is needed for byte-level BPE tokenizers whose offsets include the space before a word.

    A row that stays all False is a box whose spans cover no token: the caller reports it (see
    :func:`boxes_without_tokens`) with the file and entry it came from. Tokens must fit in slots
    ``0 .. num_slots - 2`` (the last slot is "no object"); a span reaching a token beyond raises
    ``ValueError``, which a caption-length check (:func:`check_caption_length`) prevents.
    """
    ranges = token_char_ranges(tokenized, caption)
    positive = torch.zeros(len(spans_per_box), num_slots, dtype=torch.bool)
    for row, spans in enumerate(spans_per_box):
        hits = tokens_in_spans(ranges, spans)
        if hits and hits[-1] >= num_slots - 1:
            raise ValueError(
                f"the spans {list(spans)} reach token {hits[-1]}, beyond the {num_slots - 1} token slots "
                "of the positive map"
            )
        positive[row, hits] = True
    return positive


def boxes_without_tokens(positive_map: Tensor) -> list[int]:
    """Indices of the rows of a positive map ``[N, num_slots]`` with no token marked."""
    return torch.nonzero(~positive_map.any(dim=1)).flatten().tolist()


def caption_length_message(num_tokens: int, max_tokens: int = MAX_TOKENS - 1) -> str | None:
    """A problem message when a caption of ``num_tokens`` tokens (special tokens included) is too long."""
    if num_tokens <= max_tokens:
        return None
    return (
        f"the caption has {num_tokens} tokens (special tokens included), more than the {max_tokens} "
        "that fit in the positive map"
    )


def check_caption_length(tokenizer: Any, caption: str, max_tokens: int = MAX_TOKENS - 1) -> int:
    """Number of tokens of ``caption`` (special tokens included); ``ValueError`` if over ``max_tokens``.

    The default limit is 255: slots 0..254 of a 256-wide positive map, slot 255 being "no object". A longer
    caption would have its last tokens collide with the no-object slot (the official code does not check).
    """
    num_tokens = len(tokenizer(caption, truncation=False)["input_ids"])
    message = caption_length_message(num_tokens, max_tokens)
    if message is not None:
        raise ValueError(message)
    return num_tokens
