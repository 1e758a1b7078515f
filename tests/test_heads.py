"""Task heads: question-answering queries and heads, CLEVR-Ref+ is-final, the PhraseCut mask branch, and
their post-processing, on tiny models."""

import math

import pytest
import torch

from mdetr.builder import build, build_model
from mdetr.config import Config, ConfigError, ModelConfig
from mdetr.inference.postprocess import post_process, post_process_masks
from mdetr.models.heads import answer_head_specs
from mdetr.models.segmentation import MDETRSegmentation, QueryAttentionMap, SmallConvMaskHead


def _tiny(text_encoder, **kw):
    base = dict(backbone="resnet18", backbone_pretrained=False, text_encoder=text_encoder, hidden_dim=32,
                nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=64, num_queries=5, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def _batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True
    return images, masks, ["the red circle", "is there a cube behind the blue cylinder"]


def test_attention_map_is_a_per_head_softmax_over_pixels():
    torch.manual_seed(0)
    attention = QueryAttentionMap(query_dim=16, hidden_dim=16, num_heads=4)
    queries, features = torch.randn(2, 3, 16), torch.randn(2, 16, 3, 5)
    padding = torch.zeros(2, 3, 5, dtype=torch.bool)
    padding[1, :, 3:] = True
    weights = attention(queries, features, padding)  # (B, Q, N, H, W)
    assert weights.shape == (2, 3, 4, 3, 5)
    q = attention.q_linear(queries)
    for b in range(2):
        for i in range(3):
            for n in range(4):
                scores = torch.empty(3, 5)
                for y in range(3):
                    for x in range(5):
                        key = attention.k_linear(features[b, :, y, x])
                        scores[y, x] = q[b, i, 4 * n:4 * n + 4] @ key[4 * n:4 * n + 4] / math.sqrt(4)
                scores[padding[b]] = float("-inf")
                expected = scores.flatten().softmax(0).view(3, 5)
                assert torch.allclose(weights[b, i, n], expected, atol=1e-6)
    assert (weights[1, ..., 3:] == 0).all()


def test_mask_head_treats_every_query_separately():
    torch.manual_seed(0)
    head = SmallConvMaskHead(in_dim=128 + 8, fpn_dims=[24, 16, 8], context_dim=128).eval()
    src, att = torch.randn(2, 128, 2, 3), torch.rand(2, 4, 8, 2, 3)
    fpn = [torch.randn(2, 24, 4, 6), torch.randn(2, 16, 8, 12), torch.randn(2, 8, 16, 24)]
    out = head(src, att, fpn)
    assert out.shape == (8, 1, 16, 24)
    alone = head(src[1:], att[1:, 2:3], [f[1:] for f in fpn])
    assert torch.allclose(out[1 * 4 + 2], alone[0], atol=1e-5)  # batch-major: index b * Q + q


def test_answer_head_tables():
    assert [(s.name, s.num_outputs) for s in answer_head_specs("gqa")] == [
        ("answer_type", 5), ("answer_obj", 3), ("answer_rel", 1594), ("answer_attr", 403),
        ("answer_cat", 678), ("answer_global", 111)]
    unified = answer_head_specs("gqa", split_qa_heads=False)
    assert [(s.name, s.num_outputs) for s in unified] == [("answer", 1853)]
    clevr = answer_head_specs("clevr")
    assert [(s.name, s.num_outputs, s.mlp, s.squeeze) for s in clevr] == [
        ("answer_type", 3, False, False), ("answer_binary", 1, False, True), ("answer_reg", 20, True, False),
        ("answer_attr", 15, False, False)]
    assert answer_head_specs("") == ()


def test_gqa_answers_come_from_decoder_layer_zero(roberta_like):
    torch.manual_seed(0)
    model = build_model(_tiny(roberta_like, qa_dataset="gqa", contrastive_align=False)).eval()
    images, masks, captions = _batch()
    with torch.no_grad():
        cache = model.encode(images, masks, captions)
        hs = model.decoder_states(cache)  # (L, B, Q + 6, D)
        out = model.decode(cache)
    assert hs.shape == (3, 2, 5 + 6, 32)
    for slot, name in enumerate(["type", "obj", "rel", "attr", "cat", "global"]):
        head = getattr(model, f"answer_{name}_head")
        assert torch.allclose(out.qa[f"answer_{name}"], head(hs[0, :, 5 + slot]), atol=1e-6)
    assert not torch.allclose(out.qa["answer_type"], model.answer_type_head(hs[-1, :, 5]), atol=1e-3)
    # The QA slots are dropped before the detection heads, but were decoded jointly with the object queries.
    assert torch.allclose(out.pred_boxes, model.bbox_embed(hs[-1, :, :5]).sigmoid(), atol=1e-6)
    assert all(a.pred_logits.shape == (2, 5, 256) for a in out.aux_outputs)
    with torch.no_grad():
        model.qa_embed.weight.add_(1.0)
        moved = model.decode(cache)
    assert not torch.allclose(moved.pred_boxes, out.pred_boxes, atol=1e-4)


@pytest.mark.parametrize("layer", [-1, 1])
def test_answers_from_a_chosen_decoder_layer(roberta_like, layer):
    torch.manual_seed(0)
    model = build_model(_tiny(roberta_like, qa_dataset="clevr", qa_decoder_layer=layer)).eval()
    images, masks, captions = _batch()
    with torch.no_grad():
        cache = model.encode(images, masks, captions)
        hs = model.decoder_states(cache)  # (3, B, Q + 4, D)
        out = model.decode(cache)
        from_layer, from_first = model.answer(hs[layer, :, 5:]), model.answer(hs[0, :, 5:])
    assert set(out.qa) == {"answer_type", "answer_binary", "answer_reg", "answer_attr"}
    for name, logits in out.qa.items():
        assert torch.allclose(logits, from_layer[name], atol=1e-6)
        assert not torch.allclose(logits, from_first[name], atol=1e-3)
    # Answers read after layer 0 depend on the object queries; at layer 0 they cannot (its self-attention
    # mixes values that are still all zero), which is why a model trained here reads a later layer.
    layer0 = build_model(_tiny(roberta_like, qa_dataset="clevr", qa_decoder_layer=0)).eval()
    layer0.load_state_dict(model.state_dict())
    with torch.no_grad():
        before = layer0.decode(cache).qa
        for m in (model, layer0):
            m.query_embed.weight.add_(1.0)
        moved, moved0 = model.decode(cache).qa, layer0.decode(cache).qa
    assert not torch.allclose(moved["answer_type"], out.qa["answer_type"], atol=1e-4)
    for name, logits in before.items():
        torch.testing.assert_close(moved0[name], logits, rtol=1e-5, atol=1e-6)


def test_unified_gqa_head(roberta_like):
    model = build_model(_tiny(roberta_like, qa_dataset="gqa", split_qa_heads=False)).eval()
    with torch.no_grad():
        out = model(*_batch())
    assert model.qa_embed.weight.shape == (1, 32) and set(out.qa) == {"answer"}
    assert out.qa["answer"].shape == (2, 1853)


def test_clevr_heads_and_isfinal(roberta_like):
    torch.manual_seed(0)
    model = build_model(_tiny(roberta_like, qa_dataset="clevr", predict_final=True)).eval()
    with torch.no_grad():
        out = model(*_batch())
    assert {k: tuple(v.shape) for k, v in out.qa.items()} == {
        "answer_type": (2, 3), "answer_binary": (2,), "answer_reg": (2, 20), "answer_attr": (2, 15)}
    assert out.pred_isfinal.shape == (2, 5, 1) and out.aux_outputs[0].pred_isfinal.shape == (2, 5, 1)
    assert out.aux_outputs[0].qa == {}  # answers exist only at the top level
    result = post_process(out, torch.tensor([[64, 96], [64, 64]]))[0]
    expected = result["scores"] * out.pred_isfinal[0, :, 0].sigmoid()
    assert torch.allclose(result["scores_refexp"], expected)


def test_segmentation_model_outputs(roberta_like):
    torch.manual_seed(0)
    config = _tiny(roberta_like, masks=True, contrastive_align=False, hidden_dim=128, nheads=8)
    model = build_model(config).eval()
    assert isinstance(model, MDETRSegmentation) and model.tokenizer is model.detr.tokenizer
    with torch.no_grad():
        out = model(*_batch())
    assert out.pred_masks.shape == (2, 5, 16, 24)
    assert out.proj_queries is None and out.qa == {} and len(out.aux_outputs) == 2
    assert torch.isfinite(out.pred_masks).all()


def test_post_process_masks_crops_padding_and_resizes():
    logits = torch.full((2, 1, 4, 8), -10.0)
    logits[0, 0, :, :4] = 10.0  # left half of image 0
    logits[1, 0, :, :4] = 10.0  # all of image 1, whose right half is padding
    masks = post_process_masks(logits, torch.tensor([[16, 32], [16, 16]]), torch.tensor([[30, 40], [20, 20]]))
    assert [tuple(m.shape) for m in masks] == [(1, 30, 40), (1, 20, 20)]
    assert masks[0][0, :, :15].all() and not masks[0][0, :, 25:].any()
    assert masks[1].all()  # the padded half was cropped away before resizing
    none = post_process_masks(logits, torch.tensor([[16, 32], [16, 16]]), torch.tensor([[30, 40], [20, 20]]),
                              threshold=1.0)
    assert not any(m.any() for m in none)


@pytest.mark.parametrize("overrides, message", [
    (dict(qa_dataset="vqa"), "qa_dataset"),
    (dict(qa_dataset="clevr", split_qa_heads=False), "split_qa_heads"),
    (dict(qa_dataset="clevr", qa_decoder_layer=6), "qa_decoder_layer"),
    (dict(qa_dataset="clevr", qa_decoder_layer=-7), "qa_decoder_layer"),
    (dict(masks=True, hidden_dim=256, contrastive_align=True), "contrastive_align=false"),
    (dict(masks=True, contrastive_align=False, qa_dataset="gqa", hidden_dim=256), "qa_dataset"),
    (dict(masks=True, contrastive_align=False, hidden_dim=64, nheads=8), "multiple of 128"),
])
def test_contradictory_task_options_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides).validate()


def test_building_gqa_heads_without_answer_vocabularies_says_where_they_come_from():
    config = Config(model=ModelConfig(qa_dataset="gqa", backbone_pretrained=False))
    with pytest.raises(ConfigError, match=r"answer vocabularies in model.qa_answers .*data.train_ann"):
        build(config)
