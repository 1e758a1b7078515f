"""Cached text features: a frozen text encoder's output per caption, reused across batches."""

import json

import pytest
import torch

from mdetr.config import ConfigError, ModelConfig, load_config
from mdetr.engine.train import train
from mdetr.models.mdetr import MDETR
from mdetr.models.text import TextFeatureCache

CAPTIONS = ["the red circle", "a large green metal star left of the small blue square", "a cube"]


def _model(text_encoder, **kw):
    config = ModelConfig(backbone="resnet18", backbone_pretrained=False, text_encoder=text_encoder,
                         hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                         num_queries=5, dropout=0.0, **kw)
    torch.manual_seed(0)
    return MDETR(config)


def _encoder_calls(model):
    calls = []
    model.transformer.text_encoder.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        kwargs["input_ids"].shape), with_kwargs=True)
    return calls


def test_cached_features_equal_direct_encoding_and_skip_the_encoder(roberta_like):
    model = _model(roberta_like, freeze_text_encoder=True).eval()  # eval: the resizer's dropout is off
    images, masks = torch.randn(3, 3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.bool)
    reference = model(images, masks, CAPTIONS)
    direct = model.transformer.encode_text(CAPTIONS, images.device)
    cache = model.transformer.cache_text_features()
    calls = _encoder_calls(model)
    first = model(images, masks, CAPTIONS)
    second = model(images, masks, CAPTIONS)
    assert len(calls) == 1 and len(cache) == 3 and (cache.hits, cache.misses) == (3, 3)
    for out in (first, second):
        torch.testing.assert_close(out.pred_logits, reference.pred_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pred_boxes, reference.pred_boxes, rtol=1e-5, atol=1e-5)
    features = model.transformer.encode_text(CAPTIONS, images.device)
    real = ~direct.padding_mask
    assert torch.equal(features.padding_mask, direct.padding_mask)
    torch.testing.assert_close(features.features[real], direct.features[real], rtol=1e-5, atol=1e-5)
    # a batch with one new caption encodes that one alone, cut to its own length
    model.transformer.encode_text(["the red circle", "a blue star"], images.device)
    assert len(calls) == 2 and calls[-1][0] == 1
    assert calls[-1][1] == len(model.tokenizer("a blue star")["input_ids"])


def test_cache_is_bypassed_while_the_encoder_trains_and_keys_on_autocast(roberta_like):
    model = _model(roberta_like).train()  # encoder trainable and in train mode
    cache = model.transformer.cache_text_features()
    model.transformer.encode_text(CAPTIONS, torch.device("cpu"))
    assert len(cache) == 0
    model.eval()
    with torch.no_grad():  # inference: the encoder is a fixed function even when it was being trained
        model.transformer.encode_text(CAPTIONS, torch.device("cpu"))
        assert len(cache) == 3
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.transformer.encode_text(CAPTIONS[:1], torch.device("cpu"))
    assert len(cache) == 4  # bf16 features are kept apart from float32 ones


def test_bounded_cache_drops_the_least_recently_used(roberta_like):
    model = _model(roberta_like, freeze_text_encoder=True).eval()
    cache = model.transformer.cache_text_features(max_entries=2)
    encode = model.transformer.encode_text
    encode(CAPTIONS[:2], torch.device("cpu"))
    encode(CAPTIONS[:1], torch.device("cpu"))  # CAPTIONS[0] is now the most recent
    encode(CAPTIONS[2:], torch.device("cpu"))  # evicts CAPTIONS[1]
    assert len(cache) == 2
    calls = _encoder_calls(model)
    encode(CAPTIONS[:1], torch.device("cpu"))
    assert calls == []
    encode(CAPTIONS[1:2], torch.device("cpu"))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="max_entries"):
        TextFeatureCache(0)


def test_training_with_cached_text_features_is_the_same_run(shapes_dir, tmp_path, tiny_overrides,
                                                            monkeypatch):
    caches = []
    original = TextFeatureCache.hidden_states

    def tracked(self, *args, **kwargs):
        if self not in caches:
            caches.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TextFeatureCache, "hidden_states", tracked)
    losses = {}
    for flag in ("true", "false"):
        overrides = tiny_overrides(shapes_dir, tmp_path / flag, "train.epochs=2", "train.eval_every=100",
                                   f"train.cache_text_features={flag}")
        config = load_config(None, overrides)
        train(config, progress=False, echo=lambda *_: None)
        log = [json.loads(line) for line in (tmp_path / flag / "log.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in log if r["type"] == "train"]
    assert len(caches) == 1 and caches[0].hits > 0  # the second epoch read the first one's features
    assert len(losses["true"]) > 2 and losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_cache_needs_a_frozen_text_encoder(shapes_dir, tmp_path, tiny_overrides):
    overrides = [o for o in tiny_overrides(shapes_dir, tmp_path) if not o.startswith("model.freeze_text")]
    with pytest.raises(ConfigError, match="freeze_text_encoder"):
        load_config(None, [*overrides, "train.cache_text_features=true"])


def test_predictor_reuses_text_features_with_the_same_predictions(roberta_like):
    from PIL import Image

    from mdetr.inference.predictor import Predictor

    model = _model(roberta_like)
    image = Image.new("RGB", (80, 64), (200, 30, 30))
    plain = Predictor(model, image_size=64, max_size=96, text_cache_size=0)
    cached = Predictor(model, image_size=64, max_size=96, text_cache_size=8)
    calls = []
    cached._runner.transformer.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    expected = plain.predict(image, CAPTIONS[1], threshold=0.0)
    for _ in range(2):
        got = cached.predict(image, CAPTIONS[1], threshold=0.0)
        assert len(got.boxes) == len(expected.boxes) > 0
        torch.testing.assert_close(torch.as_tensor(got.boxes), torch.as_tensor(expected.boxes),
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.as_tensor(got.scores), torch.as_tensor(expected.scores),
                                   rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and cached.text_cache.hits == 1 and plain.text_cache is None
