"""MDETR model: official parameter layout, output contract, and behaviour of the joint encoder."""

import math

import pytest
import torch

from mdetr.config import ModelConfig
from mdetr.models.mdetr import MDETR
from mdetr.models.position import PositionEmbeddingSine
from mdetr.registry import get_arch_config


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A 2-layer RoBERTa with a byte-level BPE tokenizer, saved as a local folder (as roberta-base would
    be)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    folder = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(["the small red circle left of the blue square", "a large green metal star"] * 5,
                            vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=80,
                           pad_token_id=1)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(folder)
    return str(folder)


def _tiny(text_encoder, **kw):
    base = dict(backbone="resnet18", backbone_pretrained=False, text_encoder=text_encoder, hidden_dim=32,
                nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=64, num_queries=5, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_official_parameter_layout_r101(tiny_roberta):
    """The paper architecture with the official key names (text encoder shrunk: roberta-base is not
    offline)."""
    config = get_arch_config("mdetr_resnet101", backbone_pretrained=False, text_encoder=tiny_roberta)
    keys = MDETR(config).state_dict()
    expected_shapes = {
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.layer3.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.0.body.layer2.0.downsample.1.running_var": (512,),
        "input_proj.weight": (256, 2048, 1, 1),
        "query_embed.weight": (100, 256),
        "class_embed.weight": (256, 256),
        "bbox_embed.layers.2.weight": (4, 256),
        "contrastive_align_projection_image.weight": (64, 256),
        "contrastive_align_projection_text.bias": (64,),
        "transformer.encoder.layers.5.self_attn.in_proj_weight": (768, 256),
        "transformer.encoder.layers.5.linear1.weight": (2048, 256),
        "transformer.encoder.layers.0.norm2.weight": (256,),
        "transformer.decoder.layers.5.cross_attn_image.in_proj_weight": (768, 256),
        "transformer.decoder.layers.5.norm4.bias": (256,),
        "transformer.decoder.norm.weight": (256,),
        "transformer.resizer.fc.weight": (256, 32),
        "transformer.resizer.layer_norm.weight": (256,),
        "transformer.text_encoder.encoder.layer.1.attention.self.query.weight": (32, 32),
    }
    for key, shape in expected_shapes.items():
        assert tuple(keys[key].shape) == shape, key
    assert not any(".norm2." in k for k in keys if k.startswith("transformer.decoder"))
    assert not any(k.startswith("backbone.0.body.fc") for k in keys)


def test_output_contract_and_aux(tiny_roberta):
    torch.manual_seed(0)
    model = MDETR(_tiny(tiny_roberta)).eval()
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True
    out = model(images, masks, ["the small red circle", "a large green metal star left of the blue square"])
    length = out.proj_tokens.shape[1]
    assert out.pred_logits.shape == (2, 5, 256) and out.pred_boxes.shape == (2, 5, 4)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    assert torch.allclose(out.proj_queries.norm(dim=-1), torch.ones(2, 5), atol=1e-5)
    assert out.text_padding_mask.shape == (2, length) and out.text_padding_mask[0].any()
    assert len(out.aux_outputs) == 2 and out.aux_outputs[0].pred_logits.shape == (2, 5, 256)


def test_text_padding_does_not_change_predictions(tiny_roberta):
    """A caption batched with a longer one (so it gets padding tokens) gives the same outputs as alone."""
    torch.manual_seed(0)
    model = MDETR(_tiny(tiny_roberta)).eval()
    image = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        alone = model(image, mask, ["the red circle"])
        batched = model(image.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1),
                        ["the red circle", "a large green metal star left of the small blue square"])
    assert torch.allclose(alone.pred_boxes[0], batched.pred_boxes[0], atol=1e-5)
    assert torch.allclose(alone.pred_logits[0], batched.pred_logits[0], atol=1e-4)


def test_encode_once_decode_equals_forward(tiny_roberta):
    torch.manual_seed(0)
    model = MDETR(_tiny(tiny_roberta)).eval()
    images, masks = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        direct = model(images, masks, ["the red circle"])
        text = model.transformer.encode_text(["the red circle"], images.device)
        cached = model.decode(model.encode(images, masks, text))
    assert torch.allclose(direct.pred_logits, cached.pred_logits, atol=1e-6)


def test_text_tokens_get_zero_position(tiny_roberta):
    model = MDETR(_tiny(tiny_roberta)).eval()
    with torch.no_grad():
        cache = model.encode(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool),
                             ["a red star"])
    length = cache.text_memory.shape[1]
    assert cache.pos[:, -length:].abs().sum() == 0
    assert cache.pos[:, :-length].abs().sum() > 0


@pytest.mark.parametrize("in_values", [False, True])
def test_image_position_in_values_is_the_encoder_run_on_src_plus_pos(tiny_roberta, in_values):
    torch.manual_seed(0)
    model = MDETR(_tiny(tiny_roberta, image_position_in_values=in_values)).eval()
    transformer = model.transformer
    src, pos = torch.randn(1, 12, 32), torch.randn(1, 12, 32)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    with torch.no_grad():
        text = transformer.encode_text(["the star left of the square"], src.device)
        cache = transformer.encode(src, mask, pos, text)
        tokens = torch.cat([src + pos if in_values else src, text.features], dim=1)
        joint_pos = torch.cat([pos, torch.zeros_like(text.features)], dim=1)
        padding = torch.cat([mask, text.padding_mask], dim=1)
        direct = transformer.encoder(tokens, padding_mask=padding, pos=joint_pos)
    assert torch.allclose(cache.memory, direct, atol=1e-6)


def test_sine_position_embedding_direct():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True  # last column is padding
    pos = PositionEmbeddingSine(num_pos_feats=4)(mask)  # (1, 8, 2, 3)
    scale, eps = 2 * math.pi, 1e-6
    for y in range(2):
        for x in range(2):
            ye = (y + 1) / (2 + eps) * scale
            xe = (x + 1) / (2 + eps) * scale
            dims = [10000 ** (2 * (i // 2) / 4) for i in range(4)]
            expect_y = [math.sin(ye / dims[i]) if i % 2 == 0 else math.cos(ye / dims[i]) for i in range(4)]
            expect_x = [math.sin(xe / dims[i]) if i % 2 == 0 else math.cos(xe / dims[i]) for i in range(4)]
            assert pos[0, :, y, x].tolist() == pytest.approx(expect_y + expect_x, abs=1e-5)


def test_frozen_levels_and_parameter_groups(tiny_roberta):
    from mdetr.models.mdetr import parameter_groups

    model = MDETR(_tiny(tiny_roberta, backbone_frozen_levels=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.0.body.layer2.0.conv1.weight" in trainable
    assert "backbone.0.body.layer1.0.conv1.weight" not in trainable
    assert "backbone.0.body.conv1.weight" not in trainable
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-4, lr_backbone=1e-5, lr_text_encoder=5e-5)}
    assert groups["backbone"]["lr"] == 1e-5 and groups["text_encoder"]["lr"] == 5e-5
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len(trainable)


def test_stages_past_the_transformer_level_are_skipped_and_frozen():
    """mdetr_lite reads stride 16: EfficientNet's stride-32 stage never runs, so its weights are frozen
    (keys kept for checkpoints) and every trainable parameter gets a gradient, as DDP wants."""
    config = get_arch_config("mdetr_lite", backbone_pretrained=False, hidden_dim=64, enc_layers=1,
                             dec_layers=1, dim_feedforward=64, num_queries=4)
    model = MDETR(config)
    body = model.backbone[0].body
    last_used = body._feature_stages[config.backbone_level]
    names = dict(model.named_parameters())
    assert f"backbone.0.body.blocks.{last_used + 1}.0.conv_pw.weight" in names  # official keys kept
    stage_of = {n: int(n.split(".")[4]) for n in names if n.startswith("backbone.0.body.blocks.")}
    assert all(not names[n].requires_grad for n, s in stage_of.items() if s > last_used)
    assert any(names[n].requires_grad for n, s in stage_of.items() if s == last_used)
    out = model(torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool),
                ["a red circle", "the blue square left of it"])
    assert out.pred_boxes.shape == (2, 4, 4)
    loss = out.pred_logits.logsumexp(-1).sum() + out.pred_boxes.sum()
    for aux in out.aux_outputs or []:
        loss = loss + aux.pred_logits.logsumexp(-1).sum() + aux.pred_boxes.sum()
    if out.proj_queries is not None:
        loss = loss + out.proj_queries.sum() + out.proj_tokens.sum()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_backbone_levels_compute_mask_and_position_on_demand(tiny_roberta):
    """Only the levels a model reads get a resized mask and a sine embedding, and they equal the direct
    computation (nearest resize of the padding mask, then the embedding of that mask)."""
    import torch.nn.functional as F

    model = MDETR(_tiny(tiny_roberta)).eval()
    calls = []
    model.backbone[1].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    images = torch.randn(2, 3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 64:] = True
    masks[1, 48:] = True
    with torch.no_grad():
        levels = model.backbone(images, masks)
        assert len(levels) == 4 and not calls  # features only, so far
        feat, mask, pos = levels[-1]
        assert len(calls) == 1
        expected_mask = F.interpolate(masks[None].float(), size=feat.shape[-2:])[0].bool()
        assert torch.equal(mask, expected_mask) and mask[1].any() and not mask[0].any()
        torch.testing.assert_close(pos, model.backbone[1](expected_mask), rtol=0, atol=0)
        assert levels[-1].pos is pos and len(calls) == 2  # computed once (the second call is the check's)
        model(images, masks, ["a red circle", "a cube"])
    assert len(calls) == 3  # a forward pass embeds its one transformer level
    with pytest.raises(IndexError):
        levels[-1][3]


def test_multihead_attention_equals_torch_with_the_same_state():
    """The batch-first attention computes nn.MultiheadAttention's function from the same state dict (so
    official checkpoints, saved from nn.MultiheadAttention, load into it), with and without key padding."""
    from mdetr.models.transformer import MultiheadAttention

    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    ours = MultiheadAttention(32, 4).eval()
    ours.load_state_dict(reference.state_dict())
    query, key, value = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    for mask in (None, padding):
        expected = reference(query, key, value, key_padding_mask=mask, need_weights=True)[0]  # bmm + softmax
        torch.testing.assert_close(ours(query, key, value, key_padding_mask=mask), expected,
                                   rtol=1e-5, atol=1e-6)
    # padded keys carry no weight: changing them changes nothing
    noisy = value.clone()
    noisy[1, 4:] = 1e3
    torch.testing.assert_close(ours(query, key, noisy, key_padding_mask=padding),
                               ours(query, key, value, key_padding_mask=padding))
