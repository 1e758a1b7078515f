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
