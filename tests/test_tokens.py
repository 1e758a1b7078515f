"""Character spans -> token positive maps, for WordPiece (MiniLM) and byte-level BPE tokenizers."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mdetr.data.tokens import (  # noqa: E402
    MAX_TOKENS,
    boxes_without_tokens,
    check_caption_length,
    positive_map_from_spans,
    token_char_ranges,
    token_coverage,
)

BPE_CORPUS = [
    "the cat sat on the mat",
    "a giraffe is tall",
    "the unbelievably tall giraffe",
    "two giraffes sat near a red mat",
]


def make_bpe(*, trim_offsets: bool):
    """A tiny RoBERTa-style byte-level BPE tokenizer (``<s> ... </s>``, no prefix space), trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=trim_offsets)
    bpe.train_from_iterator(
        BPE_CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"]
    )
    bpe._tokenizer.post_processor = RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")),
        ("<s>", bpe.token_to_id("<s>")),
        trim_offsets=trim_offsets,
        add_prefix_space=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module", params=[False, True], ids=["untrimmed", "trimmed"])
def bpe(request):
    return make_bpe(trim_offsets=request.param)


def marked(positive_map: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in positive_map]


def brute_force(caption: str, offsets, special, spans_per_box, num_slots=MAX_TOKENS) -> torch.Tensor:
    """Reference: a token is positive when it shares a non-space character with one of the box's spans."""
    reference = torch.zeros(len(spans_per_box), num_slots, dtype=torch.bool)
    for row, spans in enumerate(spans_per_box):
        span_chars = {c for beg, end in spans for c in range(beg, end)}
        for index, (beg, end) in enumerate(offsets):
            if special[index]:
                continue
            token_chars = {c for c in range(beg, end) if not caption[c].isspace()}
            if token_chars & span_chars:
                reference[row, index] = True
    return reference


def test_wordpiece_hand_checked(wordpiece):
    caption = "a man in a red shirt holds a giraffe."
    encoding = wordpiece(caption)
    assert encoding.tokens() == [
        "[CLS]", "a", "man", "in", "a", "red", "shirt", "holds", "a", "gi", "##raf", "##fe", ".", "[SEP]",
    ]  # fmt: skip
    spans = [
        [(0, 5)],  # "a man"
        [(11, 20)],  # "red shirt"
        [(29, 36)],  # "giraffe": three word pieces
        [(0, 5), (27, 36)],  # two mentions
        [(10, 15)],  # " red " with leading and trailing spaces
        [(0, len(caption))],  # everything: never the special tokens
    ]
    positive = positive_map_from_spans(encoding, spans, caption=caption)
    assert positive.shape == (6, 256) and positive.dtype == torch.bool
    assert marked(positive) == [
        [1, 2],
        [5, 6],
        [9, 10, 11],
        [1, 2, 8, 9, 10, 11],
        [5],
        list(range(1, 13)),
    ]
    assert not positive[:, 0].any() and not positive[:, 13].any()


def test_wordpiece_partial_word_marks_whole_token(wordpiece):
    caption = "Are there more red cubes than metal spheres?"
    encoding = wordpiece(caption)
    assert encoding.tokens()[5:7] == ["cube", "##s"]
    # "cube" without the plural s, and the "s" alone
    assert marked(positive_map_from_spans(encoding, [[(19, 23)], [(23, 24)]], caption=caption)) == [[5], [6]]


def test_bpe_hand_checked(bpe):
    caption = "the  giraffes sat on a mat."
    encoding = bpe(caption)
    assert encoding.tokens() == [
        "<s>", "the", "Ġ", "Ġgiraffe", "s", "Ġsat", "Ġ", "on", "Ġa", "Ġmat", ".", "</s>",
    ]  # fmt: skip
    spans = [
        [(5, 13)],  # "giraffes": two tokens
        [(3, 13)],  # "  giraffes": the lone "Ġ" is whitespace only
        [(14, 18)],  # "sat ": the space is the lone "Ġ" before "on", which is never marked
        [(14, 20)],  # "sat on"
        [(21, 23)],  # "a " must not reach "Ġmat"
        [(0, 3), (23, 26)],  # "the" and "mat"
        [(0, len(caption))],
    ]
    positive = positive_map_from_spans(encoding, spans, caption=caption)
    assert marked(positive) == [[3, 4], [3, 4], [5], [5, 7], [8], [1, 9], [1, 3, 4, 5, 7, 8, 9, 10]]
    assert not positive[:, 0].any() and not positive[:, 11].any()


@pytest.mark.parametrize(
    "caption",
    [
        "a man in a red shirt holds a giraffe.",
        "  the unbelievably tall giraffe. ",
        "the  giraffes sat on a mat near two red cats",
        "the Übercool naïve café-owner's dog",
    ],
)
def test_matches_brute_force_on_random_spans(caption, wordpiece, bpe):
    rng = random.Random(0)
    for tokenizer in (wordpiece, bpe):
        encoding = tokenizer(caption).encodings[0]
        spans_per_box = []
        for _ in range(40):
            spans = []
            for _ in range(rng.randint(1, 3)):
                beg = rng.randrange(len(caption))
                spans.append((beg, rng.randint(beg + 1, len(caption))))
            spans_per_box.append(spans)
        expected = brute_force(caption, encoding.offsets, encoding.special_tokens_mask, spans_per_box)
        got = positive_map_from_spans(encoding, spans_per_box, caption=caption)
        assert torch.equal(got, expected)
        # the fast coverage test used when checking files agrees with the map
        coverage = token_coverage(token_char_ranges(encoding, caption), len(caption))
        covered = [any(b"\x01" in coverage[beg:end] for beg, end in spans) for spans in spans_per_box]
        assert covered == expected.any(dim=1).tolist()


def test_accepts_offsets_and_reports_boxes_without_tokens(wordpiece):
    caption = "a red  cube"
    encoding = wordpiece(caption, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    positive = positive_map_from_spans(offsets, [[(2, 5)], [(5, 7)], [(7, 11)]], caption=caption)
    assert marked(positive) == [[2], [], [3]]
    assert boxes_without_tokens(positive) == [1]
    # the BatchEncoding's offset_mapping key works too
    assert torch.equal(positive_map_from_spans(encoding, [[(2, 5)]])[0], positive[0])
    assert token_char_ranges(offsets)[0] is None  # [CLS] has empty offsets


def test_num_slots_and_overflow(wordpiece):
    caption = " ".join(["cube"] * 300)
    encoding = wordpiece(caption)
    assert positive_map_from_spans(encoding, [[(0, 4)]], num_slots=32).shape == (1, 32)
    # token 255 would land on the "no object" slot
    beg = 5 * 254
    with pytest.raises(ValueError, match="beyond"):
        positive_map_from_spans(encoding, [[(beg, beg + 4)]], caption=caption)


def test_check_caption_length(wordpiece):
    assert check_caption_length(wordpiece, "a red cube") == 5
    assert check_caption_length(wordpiece, " ".join(["cube"] * 253)) == 255
    with pytest.raises(ValueError, match="256 tokens"):
        check_caption_length(wordpiece, " ".join(["cube"] * 254))
