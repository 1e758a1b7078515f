"""Spatially modulated co-attention (SMCA Eq. 3-6, 12) and its use as the MDETR decoder."""

import math
from functools import partial

import pytest
import torch

from mdetr.builder import load, load_config_from_checkpoint
from mdetr.config import Config, ConfigError, LossConfig, ModelConfig
from mdetr.engine.checkpoint import save_checkpoint
from mdetr.losses.criterion import build_criterion, total_loss, weight_dict
from mdetr.models.mdetr import MDETR
from mdetr.models.smca import (
    ModulatedMultiheadAttention,
    SMCADecoder,
    SMCADecoderLayer,
    box_from_reference,
    gaussian_log_weight,
    gaussian_weight,
    valid_feature_size,
)

D, HEADS = 16, 4


def _layer(**kw):
    base = dict(d_model=D, nhead=HEADS, dim_feedforward=32, dropout=0.0)
    base.update(kw)
    return SMCADecoderLayer(**base)


def _decoder(num_layers=2, **kw):
    torch.manual_seed(0)
    return SMCADecoder(_layer(**kw), num_layers, D)


def test_gaussian_against_direct_computation():
    torch.manual_seed(0)
    height, width, beta = 3, 5, 2.5
    centres = torch.rand(2, 3, 2) * torch.tensor([width, height])
    scales = torch.rand(2, 3, 2) + 0.5
    log_g = gaussian_log_weight(centres, scales, grid_shape=(height, width), beta=beta)
    g = gaussian_weight(centres, scales, grid_shape=(height, width), beta=beta)
    assert log_g.shape == g.shape == (2, 3, height * width)
    for b in range(2):
        for q in range(3):
            (cw, ch), (sw, sh) = centres[b, q].tolist(), scales[b, q].tolist()
            for j in range(height):
                for i in range(width):
                    x, y = i + 0.5, j + 0.5  # cell centre
                    direct = math.exp(-((x - cw) ** 2) / (beta * sw**2) - ((y - ch) ** 2) / (beta * sh**2))
                    assert g[b, q, j * width + i].item() == pytest.approx(direct, rel=1e-5)
                    assert log_g[b, q, j * width + i].item() == pytest.approx(math.log(direct), abs=1e-5)
    assert (g <= 1).all()


def test_attention_without_prior_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = ModulatedMultiheadAttention(d_model=D, nhead=HEADS, dropout=0.0)
    reference = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
    reference.load_state_dict(ours.state_dict())  # same parameter names
    q, kv = torch.randn(2, 3, D), torch.randn(2, 7, D)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    out, attention = ours(q, kv, kv, key_padding_mask=mask)
    expected, expected_attention = reference(q, kv, kv, key_padding_mask=mask, average_attn_weights=False)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(attention, expected_attention, atol=1e-6)


def _window_mass(beta: float) -> float:
    """Attention mass within 1.5 cells of the reference centre on an 8 x 8 grid of random memory."""
    torch.manual_seed(0)
    layer = _layer(beta=beta).eval()
    grid = (8, 8)
    memory, query = torch.randn(1, 64, D), torch.randn(1, 1, D)
    reference = torch.tensor([[[0.3, 0.7]]])  # centre (2.4, 5.6) cells
    log_prior = layer.log_prior(query, torch.zeros_like(query), reference=reference,
                                valid_size=torch.tensor([[8.0, 8.0]]), grid_shape=grid, num_text=0)
    attention = layer.cross_attn_image(query, memory, memory, log_prior=log_prior)[1]  # (1, h, 1, 64)
    ys, xs = torch.meshgrid(torch.arange(8) + 0.5, torch.arange(8) + 0.5, indexing="ij")
    window = ((xs - 2.4).abs() <= 1.5) & ((ys - 5.6).abs() <= 1.5)
    return attention[..., window.flatten()].sum(-1).mean().item()


def test_attention_concentrates_near_reference_as_beta_shrinks():
    masses = [_window_mass(beta) for beta in (1000.0, 16.0, 4.0, 1.0, 0.25)]
    assert all(a < b for a, b in zip(masses, masses[1:], strict=False)), masses
    assert masses[0] < 0.3 and masses[-1] > 0.99


@pytest.mark.parametrize("scale", ["fixed", "single", "independent"])
def test_head_shared_equals_multi_head_with_zero_offsets_and_equal_scales(scale):
    torch.manual_seed(0)
    shared, multi = _layer(scale=scale, multi_head=False).eval(), _layer(scale=scale, multi_head=True).eval()
    if shared.spatial_prior.scale is not None:
        torch.nn.init.normal_(shared.spatial_prior.scale.weight, std=0.1)
    common = {k: v for k, v in shared.state_dict().items() if not k.startswith("spatial_prior.")}
    missing, unexpected = multi.load_state_dict(common, strict=False)
    assert unexpected == [] and all(k.startswith("spatial_prior.") for k in missing)
    if scale != "fixed":
        # multi-head scales: the shared rows repeated for every head, so every head equals the shared map
        shared_scale = shared.spatial_prior.scale
        with torch.no_grad():
            multi.spatial_prior.scale.weight.copy_(shared_scale.weight.repeat(HEADS, 1))
            multi.spatial_prior.scale.bias.copy_(shared_scale.bias.repeat(HEADS))
    # initialised at the shared centre
    assert torch.count_nonzero(multi.spatial_prior.head_offset.weight) == 0
    grid = (3, 4)
    tgt, query_pos = torch.randn(2, 5, D), torch.randn(2, 5, D)
    memory, pos = torch.randn(2, 12 + 3, D), torch.randn(2, 12 + 3, D)
    mask = torch.zeros(2, 15, dtype=torch.bool)
    mask[1, 13:] = True
    kwargs = dict(memory_padding_mask=mask, pos=pos, query_pos=query_pos, reference=torch.rand(2, 5, 2),
                  valid_size=torch.tensor([[4.0, 3.0], [4.0, 3.0]]), grid_shape=grid)
    assert torch.allclose(shared(tgt, memory, **kwargs), multi(tgt, memory, **kwargs), atol=1e-5)
    with torch.no_grad():
        multi.spatial_prior.head_offset.bias.fill_(1.0)  # heads move off the shared centre
    assert not torch.allclose(shared(tgt, memory, **kwargs), multi(tgt, memory, **kwargs), atol=1e-4)


def test_gradients_reach_centre_offset_and_scale_predictors():
    decoder = _decoder(scale="independent", multi_head=True)
    grid = (3, 4)
    memory, pos = torch.randn(2, 12 + 2, D), torch.randn(2, 12 + 2, D)
    query_pos = torch.randn(2, 5, D)
    no_padding = torch.zeros(2, 14, dtype=torch.bool)
    hs = decoder(torch.zeros_like(query_pos), memory, memory_padding_mask=no_padding,
                 pos=pos, query_pos=query_pos, image_shape=grid)
    assert hs.shape == (2, 2, 5, D)
    # Eq. 12 puts the reference logits into the box as well.
    boxes = box_from_reference(torch.randn(2, 2, 5, 4), decoder.reference_logits(query_pos))
    (hs * torch.randn_like(hs)).sum().add(boxes.sum()).backward()
    named = dict(decoder.named_parameters())
    for name in ("reference_point.layers.0.weight", "reference_point.layers.1.weight",
                 "layers.0.spatial_prior.scale.weight", "layers.1.spatial_prior.scale.weight",
                 "layers.0.spatial_prior.head_offset.weight", "layers.1.spatial_prior.head_offset.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name


def test_box_centre_is_offset_from_reference_before_sigmoid():
    reference_logits = torch.tensor([[0.4, -1.2]])
    boxes = box_from_reference(torch.tensor([[0.0, 0.0, 0.3, -0.5]]), reference_logits)
    assert torch.allclose(boxes[0, :2], reference_logits[0].sigmoid())
    assert torch.allclose(boxes[0, 2:], torch.tensor([0.3, -0.5]).sigmoid())
    shifted = box_from_reference(torch.tensor([[1.0, 2.0, 0.0, 0.0]]), reference_logits)
    assert torch.allclose(shifted[0, :2], (reference_logits[0] + torch.tensor([1.0, 2.0])).sigmoid())


def test_padded_image_gets_zero_attention_and_matches_the_unpadded_one():
    """An image padded from a 2 x 3 to a 3 x 5 grid decodes as the unpadded 2 x 3 one; padding gets no
    attention."""
    decoder = _decoder(scale="independent", multi_head=True).eval()
    torch.nn.init.normal_(decoder.layers[0].spatial_prior.head_offset.weight, std=0.3)
    torch.nn.init.normal_(decoder.layers[0].spatial_prior.scale.weight, std=0.3)
    text, text_pos = torch.randn(1, 2, D), torch.zeros(1, 2, D)
    image, image_pos = torch.randn(1, 3, 5, D), torch.randn(1, 3, 5, D)
    pad = torch.ones(3, 5, dtype=torch.bool)
    pad[:2, :3] = False
    padded_mask = torch.cat([pad.flatten()[None], torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    assert valid_feature_size(padded_mask, (3, 5)).tolist() == [[3.0, 2.0]]
    padded = dict(memory=torch.cat([image.flatten(1, 2), text], 1),
                  pos=torch.cat([image_pos.flatten(1, 2), text_pos], 1), memory_padding_mask=padded_mask)
    cropped = dict(memory=torch.cat([image[:, :2, :3].flatten(1, 2), text], 1),
                   pos=torch.cat([image_pos[:, :2, :3].flatten(1, 2), text_pos], 1),
                   memory_padding_mask=torch.zeros(1, 8, dtype=torch.bool))
    query_pos = torch.randn(1, 4, D)
    tgt = torch.zeros_like(query_pos)
    with torch.no_grad():
        out_padded = decoder(tgt, padded.pop("memory"), query_pos=query_pos, image_shape=(3, 5), **padded)
        out_cropped = decoder(tgt, cropped.pop("memory"), query_pos=query_pos, image_shape=(2, 3), **cropped)
        layer = decoder.layers[0]
        reference = decoder.reference_logits(query_pos).sigmoid()
        log_prior = layer.log_prior(query_pos, query_pos, reference=reference,
                                    valid_size=torch.tensor([[3.0, 2.0]]), grid_shape=(3, 5), num_text=2)
        memory = torch.cat([image.flatten(1, 2), text], 1)
        attention = layer.cross_attn_image(query_pos, memory, memory, key_padding_mask=padded_mask,
                                           log_prior=log_prior)[1]
    assert torch.allclose(out_padded, out_cropped, atol=1e-5)
    assert (attention[..., padded_mask[0]] == 0).all()
    assert torch.allclose(attention.sum(-1), torch.ones(1, HEADS, 4))


def test_text_tokens_are_not_modulated():
    """log G = 0 on text; renormalised over the image the attention is SMCA's, over the text DETR's."""
    torch.manual_seed(0)
    layer = _layer(scale="independent", multi_head=True).eval()
    torch.nn.init.normal_(layer.spatial_prior.head_offset.weight, std=0.3)
    grid, num_text = (3, 4), 3
    query, query_pos = torch.randn(2, 5, D), torch.randn(2, 5, D)
    image, text = torch.randn(2, 12, D), torch.randn(2, num_text, D)
    reference, valid = torch.rand(2, 5, 2), torch.tensor([[4.0, 3.0], [4.0, 3.0]])
    prior = partial(layer.log_prior, query, query_pos, reference=reference, valid_size=valid, grid_shape=grid)
    with torch.no_grad():
        joint_prior = prior(num_text=num_text)
        image_prior = prior(num_text=0)
        assert joint_prior.shape == (2, HEADS, 5, 12 + num_text)
        assert (joint_prior[..., 12:] == 0).all() and (joint_prior[..., :12] < 0).all()
        memory = torch.cat([image, text], 1)
        joint = layer.cross_attn_image(query, memory, memory, log_prior=joint_prior)[1]
        image_only = layer.cross_attn_image(query, image, image, log_prior=image_prior)[1]
        plain = layer.cross_attn_image(query, memory, memory)[1]
    renormalised = joint[..., :12] / joint[..., :12].sum(-1, keepdim=True)
    assert torch.allclose(renormalised, image_only, atol=1e-6)
    text_share = joint[..., 12:] / joint[..., 12:].sum(-1, keepdim=True)
    assert torch.allclose(text_share, plain[..., 12:] / plain[..., 12:].sum(-1, keepdim=True), atol=1e-6)
    # G <= 1, so a sharper prior only moves mass towards the text, never away from it.
    layer.beta = 0.5
    with torch.no_grad():
        sharp_prior = prior(num_text=num_text)
        sharp = layer.cross_attn_image(query, memory, memory, log_prior=sharp_prior)[1]
    assert (sharp[..., 12:].sum(-1) >= joint[..., 12:].sum(-1) - 1e-6).all()


def _tiny(text_encoder, **kw):
    base = dict(backbone="resnet18", backbone_pretrained=False, text_encoder=text_encoder, hidden_dim=32,
                nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=5, dropout=0.0,
                decoder="smca")
    base.update(kw)
    return ModelConfig(**base)


def test_config_rejects_unknown_decoder_and_scale():
    with pytest.raises(ConfigError, match="model.decoder"):
        ModelConfig(decoder="deformable").validate()
    with pytest.raises(ConfigError, match="model.smca_scale"):
        ModelConfig(decoder="smca", smca_scale="both").validate()
    assert ModelConfig().decoder == "detr"


@pytest.mark.parametrize("multi_head,scale", [(True, "independent"), (False, "single")])
def test_mdetr_with_smca_decoder_trains(roberta_like, multi_head, scale):
    torch.manual_seed(0)
    model = MDETR(_tiny(roberta_like, smca_multi_head=multi_head, smca_scale=scale)).train()
    keys = model.state_dict()
    assert "transformer.decoder.reference_point.layers.1.weight" in keys
    assert keys["transformer.decoder.layers.1.cross_attn_image.in_proj_weight"].shape == (96, 32)
    assert ("transformer.decoder.layers.0.spatial_prior.head_offset.weight" in keys) == multi_head
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, 32:, 64:] = True
    out = model(images, masks, ["the small red circle", "a large green metal star left of the blue square"])
    assert out.pred_boxes.shape == (2, 5, 4) and len(out.aux_outputs) == 1
    positive = torch.zeros(1, 8, dtype=torch.bool)
    positive[0, 1:3] = True
    targets = [{"boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]]), "positive_map": positive}] * 2
    criterion = build_criterion(LossConfig(), num_token_slots=model.config.num_token_slots)
    losses = criterion(out, targets)
    loss = total_loss(losses, weight_dict(LossConfig(), num_aux=1))
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("transformer.decoder.reference_point.layers.0.weight",
                 "transformer.decoder.layers.0.spatial_prior.scale.weight", "bbox_embed.layers.2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_mdetr_smca_boxes_follow_the_reference(roberta_like):
    """Eq. 12 in the model: box centres are the box head's logits plus the queries' reference logits."""
    torch.manual_seed(0)
    model = MDETR(_tiny(roberta_like)).eval()
    images, masks = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        cache = model.encode(images, masks, ["a red star"])
        assert cache.image_shape == (2, 2)
        hs = model.decoder_states(cache)
        out = model.decode(cache)
        reference = model.transformer.decoder.reference_logits(model.query_embed.weight)
        raw = model.bbox_embed(hs[-1])
    expected = torch.cat([raw[..., :2] + reference, raw[..., 2:]], -1).sigmoid()
    assert torch.allclose(out.pred_boxes, expected, atol=1e-6)


def test_detr_decoder_layout_unchanged(roberta_like):
    keys = MDETR(_tiny(roberta_like, decoder="detr")).state_dict()
    decoder_keys = {k for k in keys if k.startswith("transformer.decoder.")}
    assert not any("spatial_prior" in k or "reference_point" in k or "norm_prior" in k for k in decoder_keys)
    assert "transformer.decoder.layers.1.cross_attn_image.out_proj.weight" in decoder_keys


def test_prior_covers_only_the_first_modulated_queries():
    """log G of the first m queries is the full prior's; the rest (answer queries) get log G = 0."""
    torch.manual_seed(0)
    layer = _layer(scale="independent", multi_head=True).eval()
    torch.nn.init.normal_(layer.spatial_prior.head_offset.weight, std=0.3)
    query, query_pos = torch.randn(2, 5, D), torch.randn(2, 5, D)
    reference, valid = torch.rand(2, 5, 2), torch.tensor([[4.0, 3.0], [3.0, 2.0]])
    prior = partial(layer.log_prior, query, query_pos, reference=reference, valid_size=valid,
                    grid_shape=(3, 4), num_text=2)
    with torch.no_grad():
        full, partly = prior(), prior(modulated=3)
    assert partly.shape == full.shape == (2, HEADS, 5, 14)
    assert torch.equal(partly[:, :, :3], full[:, :, :3])
    assert (partly[:, :, 3:] == 0).all() and (full[:, :, 3:, :12] < 0).all()
    assert torch.equal(prior(modulated=5), full) and (prior(modulated=0) == 0).all()


@pytest.mark.parametrize("modulate_answers", [False, True])
def test_answer_queries_attend_without_the_prior(roberta_like, modulate_answers):
    """A QA model's answer queries predict no box: by default SMCA modulates only the object queries."""
    torch.manual_seed(0)
    model = MDETR(_tiny(roberta_like, qa_dataset="clevr", smca_modulate_answers=modulate_answers)).eval()
    priors = []
    layer = model.transformer.decoder.layers[0]
    layer.cross_attn_image.register_forward_hook(
        lambda module, args, kwargs, out: priors.append(kwargs["log_prior"]), with_kwargs=True)
    images, masks = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    with torch.no_grad():
        out = model(images, masks, ["is there a red star?"])
    (log_prior,) = priors
    num_queries, num_image = model.config.num_queries, 3 * 3
    assert log_prior.shape[2] == num_queries + 4 and set(out.qa) == {
        "answer_type", "answer_binary", "answer_attr", "answer_reg"}
    assert (log_prior[:, :, :num_queries, :num_image] < 0).all()
    answers = log_prior[:, :, num_queries:, :num_image]
    assert (answers < 0).all() if modulate_answers else (answers == 0).all()


def test_checkpoints_from_before_the_answer_prior_option_keep_their_behaviour(roberta_like, tmp_path):
    """A QA checkpoint written before smca_modulate_answers existed was trained with modulated answer
    queries: it loads with the option on, so it computes what it computed then; new ones keep their value."""
    torch.manual_seed(0)
    config = Config(model=_tiny(roberta_like, qa_dataset="clevr"))
    model = MDETR(config.model).eval()
    old = config.to_dict()
    del old["model"]["smca_modulate_answers"]
    save_checkpoint(tmp_path / "old", model=model, config=old, state={})
    save_checkpoint(tmp_path / "new", model=model, config=config.to_dict(), state={})
    assert load_config_from_checkpoint(tmp_path / "old").model.smca_modulate_answers is True
    assert load_config_from_checkpoint(tmp_path / "new").model.smca_modulate_answers is False
    images, masks = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    with torch.no_grad():
        before = MDETR(_tiny(roberta_like, qa_dataset="clevr", smca_modulate_answers=True))
        before.load_state_dict(model.state_dict())
        expected = before.eval()(images, masks, ["is there a red star?"]).qa["answer_binary"]
        loaded = load(tmp_path / "old")(images, masks, ["is there a red star?"]).qa["answer_binary"]
        unmodulated = model(images, masks, ["is there a red star?"]).qa["answer_binary"]
    assert torch.equal(loaded, expected) and not torch.allclose(unmodulated, expected)


@pytest.mark.parametrize("multi_head", [True, False])
def test_free_heads_attend_without_the_prior(multi_head):
    """With k free heads the last k heads' log G is zero and the others' is SMCA's, per head or shared."""
    torch.manual_seed(0)
    smca = _layer(multi_head=multi_head).eval()
    free = _layer(multi_head=multi_head, free_heads=1).eval()
    free.load_state_dict(smca.state_dict())
    if multi_head:
        torch.nn.init.normal_(smca.spatial_prior.head_offset.weight, std=0.3)
        free.spatial_prior.head_offset.weight.data.copy_(smca.spatial_prior.head_offset.weight)
    query, query_pos = torch.randn(2, 5, D), torch.randn(2, 5, D)
    args = dict(reference=torch.rand(2, 5, 2), valid_size=torch.tensor([[4.0, 3.0], [3.0, 2.0]]),
                grid_shape=(3, 4), num_text=2)
    with torch.no_grad():
        expected = smca.log_prior(query, query_pos, **args).expand(-1, HEADS, -1, -1)
        got = free.log_prior(query, query_pos, **args)
    assert got.shape == (2, HEADS, 5, 14)
    assert torch.equal(got[:, :-1], expected[:, :-1]) and (got[:, -1] == 0).all()
    assert (expected[:, -1, :, :12] < 0).all()
    with pytest.raises(ValueError, match="free_heads"):
        _layer(free_heads=HEADS + 1)
    with pytest.raises(ConfigError, match="smca_free_heads"):
        ModelConfig(decoder="smca", smca_free_heads=9).validate()
