"""Write a tiny, randomly initialised RoBERTa-style text encoder and its tokenizer into a folder.

    python bench/make_tiny_text_encoder.py /tmp/tiny-roberta --layers 2
    python bench/make_tiny_text_encoder.py /tmp/tiny-distilroberta --layers 1
    python bench/make_tiny_text_encoder.py /tmp/random-roberta-base --layers 12 --hidden 768 --heads 12 \
        --intermediate 3072 --vocab-size 50265

Stands in for ``roberta-base`` / ``distilroberta-base`` where those files cannot be downloaded: same
model class (``RobertaModel`` with its pooler), same special tokens and position offset (padding index 1,
514 positions), a byte-level BPE tokenizer trained on a few sentences, hidden size 64 unless told. Both
this project and the official code load it by folder (``from_pretrained(FOLDER)``), which is all
``bench/compare_official.py`` needs: the weights themselves come from the checkpoint under test.

The last example is a random encoder of roberta-base's size (12 layers, width 768, 12 heads, feed-forward
3072, 50,265 embedding rows, of which the small tokenizer uses the first few hundred), for timing
(``bench/speed_vs_official.py``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

# Sentences for the BPE merges; the comparison's captions are among them so they tokenize to few pieces.
CORPUS = [
    "a man in a red shirt is holding a small black dog next to the wooden table",
    "the cat on the left of the blue car",
    "two people riding bicycles down a busy city street at night",
    "is there a large green metal cylinder behind the small rubber sphere?",
    "what color is the cube that is to the right of the yellow ball?",
    "how many objects are either large brown things or shiny spheres?",
    "the white horse standing in the grass field near a fence",
    "a bowl of fruit with apples, oranges and bananas on a kitchen counter",
    "what is the woman wearing on her head?",
    "left giraffe",
    "zebra eating grass",
]
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def make_tiny_text_encoder(folder: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                           vocab_size: int = 600, seed: int = 0, intermediate: int | None = None,
                           model_vocab_size: int | None = None) -> Path:
    """Write the tokenizer (BPE of at most ``vocab_size`` tokens) and a random ``RobertaModel``.

    intermediate: feed-forward width (default ``2 * hidden``); model_vocab_size: rows of the word-embedding
    matrix (default: the tokenizer's size; roberta-base has 50,265).
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)  # vocab.json + merges.txt, which every transformers version reads by folder
        tokenizer = RobertaTokenizerFast.from_pretrained(tmp)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(folder)

    config = RobertaConfig(
        vocab_size=max(len(tokenizer), model_vocab_size or 0), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate or 2 * hidden, max_position_embeddings=514,
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(seed)
    RobertaModel(config).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="feed-forward width (default 2 x hidden)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="word-embedding rows (default: the tokenizer's size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_text_encoder(args.folder, layers=args.layers, hidden=args.hidden, heads=args.heads,
                                  seed=args.seed, intermediate=args.intermediate,
                                  model_vocab_size=args.vocab_size)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
