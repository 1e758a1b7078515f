"""Fine-tuning starts: ``train.init_weights`` / ``mdetr train --init`` copy every weight before training."""

import pytest
import torch

from mdetr.builder import build, initialise_from, load
from mdetr.cli import main
from mdetr.config import load_config
from mdetr.engine.checkpoint import CheckpointError


def _frozen_run(tiny_overrides, shapes_dir, out, *extra):
    """A one-epoch run with negligible learning rates (AdamW moves a weight by about lr per step), so its
    final weights are its initial ones to within 1e-9."""
    return tiny_overrides(shapes_dir, out, "train.epochs=1", "train.lr=1e-12", "train.lr_backbone=1e-12",
                          "train.lr_text_encoder=1e-12", "train.weight_decay=0", *extra)


def test_cli_init_starts_training_from_the_given_checkpoint(tiny_checkpoint, shapes_dir, tmp_path,
                                                           tiny_overrides, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    assert main(["train", "--config", str(config), "--no-progress", "--init", str(tiny_checkpoint),
                 *_frozen_run(tiny_overrides, shapes_dir, tmp_path / "tuned")]) == 0
    assert f"initialised the model from {tiny_checkpoint}" in capsys.readouterr().out
    start = load(tiny_checkpoint).state_dict()
    tuned = load(tmp_path / "tuned" / "last").state_dict()
    assert start.keys() == tuned.keys()
    for key in start:
        assert torch.allclose(start[key], tuned[key], rtol=0, atol=1e-9), key
    # Without --init the same run starts from fresh heads: the weights differ from the checkpoint's.
    assert main(["train", "--config", str(config), "--no-progress",
                 *_frozen_run(tiny_overrides, shapes_dir, tmp_path / "fresh")]) == 0
    fresh = load(tmp_path / "fresh" / "last").state_dict()
    assert (fresh["bbox_embed.layers.0.weight"] - start["bbox_embed.layers.0.weight"]).abs().max() > 1e-3


def test_official_file_gives_its_ema_weights_when_it_kept_them(shapes_dir, tmp_path, tiny_overrides):
    config = load_config(None, tiny_overrides(shapes_dir, tmp_path / "run"))
    source, _, _ = build(config)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    ema = {k: v + 1.0 if v.is_floating_point() else v.clone() for k, v in state.items()}
    target, _, _ = build(config)

    torch.save({"model": state, "model_ema": ema, "epoch": 3}, tmp_path / "with_ema.pth")
    initialise_from(target, tmp_path / "with_ema.pth")
    for key, value in target.state_dict().items():
        assert torch.equal(value, ema[key]), key

    torch.save({"model": state, "model_ema": None}, tmp_path / "no_ema.pth")
    initialise_from(target, tmp_path / "no_ema.pth")
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_of_another_architecture_are_one_error_naming_the_keys(tiny_checkpoint, shapes_dir, tmp_path,
                                                                       tiny_overrides):
    wider = load_config(None, tiny_overrides(shapes_dir, tmp_path / "run", "model.hidden_dim=96"))
    model, _, _ = build(wider)
    with pytest.raises(CheckpointError,
                       match=r"does not fit the model: .*shape mismatches .*query_embed.weight"):
        initialise_from(model, tiny_checkpoint)


def test_new_heads_keep_their_initialisation_only_when_allowed(tiny_checkpoint, shapes_dir, tmp_path,
                                                               tiny_overrides):
    qa = load_config(None, tiny_overrides(shapes_dir, tmp_path / "run", "model.qa_dataset=clevr"))
    model, _, _ = build(qa)
    with pytest.raises(CheckpointError, match=r"missing keys .*qa_embed"):
        initialise_from(model, tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = initialise_from(model, tiny_checkpoint, allow_new_heads=True)
    assert new and all(k.startswith(("qa_embed", "answer_")) for k in new), new
    source = load(tiny_checkpoint).state_dict()
    after = model.state_dict()
    for key in after:
        expected = before[key] if key in new else source[key]
        assert torch.equal(after[key], expected), key
