from pathlib import Path

import pytest

from mdetr.config import Config, ConfigError, load_config
from mdetr.registry import available_archs, get_arch_config


def test_preset_loads_and_expands_arch(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: mdetr_lite\n  num_queries: 7\ntrain:\n  epochs: 3\n")
    config = load_config(path, ["train.lr=0.001", "data.scales=[200, 232]"])
    assert config.model.backbone == "efficientnet_lite0"  # from the registry
    assert config.model.num_queries == 7  # the file wins over the registry
    assert config.train.epochs == 3 and config.train.lr == pytest.approx(0.001)
    assert config.data.scales == [200, 232]


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_config(None, ["model.arch=mdetr_nope"])


def test_type_and_consistency_errors():
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["model.hidden_dim=100", "model.nheads=8"])
    with pytest.raises(ConfigError, match="soft_token_target"):
        load_config(None, ["loss.soft_token_target=onehot"])


def test_round_trip_through_dict():
    config = load_config(None, ["model.arch=mdetr_resnet101"])
    again = Config.from_dict(config.to_dict())
    assert again == config


def test_registry_has_paper_and_lite_models():
    assert {"mdetr_lite", "mdetr_resnet101"} <= set(available_archs())
    r101 = get_arch_config("mdetr_resnet101")
    assert (r101.backbone, r101.text_encoder, r101.num_queries, r101.enc_layers, r101.dec_layers) == (
        "resnet101", "roberta-base", 100, 6, 6)


PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    config = load_config(preset)
    assert config.train.output_dir and config.data.train_ann


def test_question_answering_presets_follow_the_official_recipes():
    presets = {p.stem: load_config(p) for p in PRESETS}
    gqa_all, gqa_balanced = presets["gqa_r101_all"], presets["gqa_r101_balanced"]
    model, train = gqa_all.model, gqa_all.train
    assert (model.qa_dataset, gqa_all.loss.qa_loss_coef, model.aux_loss) == ("gqa", 25.0, False)
    assert (train.lr, train.lr_backbone, train.lr_text_encoder) == (1.4e-4, 1.4e-5, 7e-5)
    assert gqa_all.loss.detection_losses and not gqa_balanced.loss.detection_losses
    assert "_all" in gqa_all.data.train_ann and "_balanced" in gqa_balanced.data.train_ann
    # each stage starts from the previous stage's output
    chain = [("gqa_r101_all", "gqa_r101_balanced"), ("clevr_step1", "clevr_step2"),
             ("clevr_step2", "clevr_humans"), ("clevr_step1", "clevr_ref")]
    for before, after in chain:
        assert presets[after].train.init_weights == f"{presets[before].train.output_dir}/best", after
    clevr = [presets[n] for n in ("clevr_step1", "clevr_step2", "clevr_humans", "clevr_cogent", "clevr_ref")]
    for config in clevr:
        model = config.model
        assert (model.backbone, model.text_encoder, model.num_queries) == (
            "resnet18", "distilroberta-base", 25)
        assert (config.data.batch_size, config.data.scales, config.data.max_size) == (
            64, [256, 288, 320, 352, 384], 512)
    assert [c.model.qa_dataset for c in clevr] == ["", "clevr", "clevr", "clevr", ""]
    schedules = [(c.train.epochs, c.train.lr_drop) for c in clevr]
    assert schedules == [(30, 20), (30, 20), (60, 40), (30, 20), (30, 20)]
    assert not presets["clevr_humans"].loss.detection_losses and presets["clevr_ref"].model.predict_final
    assert "trainA" in presets["clevr_cogent"].data.train_images
