"""SMCA multi-scale encoding and scale-selection attention (SMCA Section 3.3, Eq. 7-9)."""

import pytest
import torch

from mdetr.config import ConfigError, ModelConfig, encoder_layout_blocks
from mdetr.models.smca import ModulatedMultiheadAttention, gaussian_log_weight
from mdetr.models.smca_multiscale import (
    MultiScaleEncoder,
    MultiScaleInput,
    ScaleSelectionAttention,
    ScaleSelectionDecoder,
    ScaleSelectionDecoderLayer,
)
from mdetr.models.transformer import EncoderLayer

D, HEADS = 16, 4
SHAPES = [(4, 6), (2, 3), (1, 2)]  # strides 16, 32, 64 of a 64 x 96 image


def _encoder(layout):
    torch.manual_seed(0)
    return MultiScaleEncoder(layout=layout, d_model=D, nhead=HEADS, dim_feedforward=32, dropout=0.0).eval()


def _scales(batch=2, seed=1):
    """Random tokens, positions and masks (image 1 padded on every scale) for the three scales."""
    generator = torch.Generator().manual_seed(seed)
    sources, pos, masks = [], [], []
    for h, w in SHAPES:
        sources.append(torch.randn(batch, h * w, D, generator=generator))
        pos.append(torch.randn(batch, h * w, D, generator=generator))
        mask = torch.zeros(batch, h, w, dtype=torch.bool)
        mask[1, :, w - 1:] = w > 1  # last column padded when there is more than one
        masks.append(mask.flatten(1))
    return sources, pos, masks


def test_layout_notation():
    assert encoder_layout_blocks("2intra-multi-2intra") == ["intra", "intra", "multi", "intra", "intra"]
    assert encoder_layout_blocks("3Multi") == ["multi"] * 3
    for bad in ("2intra-", "inter", "0intra", "intra2", "2-intra"):
        with pytest.raises(ConfigError, match="smca_encoder"):
            encoder_layout_blocks(bad)


def test_config_checks_the_multiscale_options():
    with pytest.raises(ConfigError, match="decoder=smca"):
        ModelConfig(smca_multiscale=True, decoder="detr", enc_layers=5).validate()
    with pytest.raises(ConfigError, match="enc_layers=5"):
        ModelConfig(smca_multiscale=True, decoder="smca", enc_layers=6).validate()
    ModelConfig(smca_multiscale=True, decoder="smca", enc_layers=3, smca_encoder="3intra").validate()


def test_multiscale_input_gives_strides_16_32_64():
    torch.manual_seed(0)
    module = MultiScaleInput(in_channels=(24, 40), d_model=D)
    maps = module(torch.randn(2, 24, 8, 10), torch.randn(2, 40, 4, 5))  # a 128 x 160 image
    assert [tuple(m.shape) for m in maps] == [(2, D, 8, 10), (2, D, 4, 5), (2, D, 2, 3)]


def test_intra_block_is_one_layer_applied_to_each_scale_alone():
    encoder = _encoder(["intra"])
    sources, pos, masks = _scales()
    out = encoder(sources, padding_masks=masks, pos=pos)
    layer = encoder.layers[0]
    for j in range(3):
        alone = layer(sources[j], padding_mask=masks[j], pos=pos[j])
        # compare the valid tokens only (a padded token's output is never read)
        assert torch.allclose(out[j][~masks[j]], alone[~masks[j]], atol=1e-6)
    # changing another scale leaves scale 0 untouched: no exchange between scales in an intra block
    changed = [sources[0], sources[1] + 1.0, torch.randn_like(sources[2])]
    assert torch.allclose(encoder(changed, padding_masks=masks, pos=pos)[0], out[0], atol=1e-6)


def test_multi_block_mixes_scales():
    encoder = _encoder(["multi"])
    sources, pos, masks = _scales()
    out = encoder(sources, padding_masks=masks, pos=pos)
    changed = [sources[0], sources[1] + 1.0, sources[2]]
    assert not torch.allclose(encoder(changed, padding_masks=masks, pos=pos)[0], out[0], atol=1e-4)


def test_weights_are_shared_across_scales_so_the_encoder_is_scale_order_equivariant():
    """2Intra-Multi-2Intra has one layer per block (not one per block and scale), and permuting the scales
    permutes the outputs: no block treats "the first scale" differently from the others."""
    encoder = _encoder(encoder_layout_blocks("2intra-multi-2intra"))
    assert len(encoder.layers) == 5
    layer_params = sum(p.numel() for p in EncoderLayer(d_model=D, nhead=HEADS, dim_feedforward=32,
                                                       dropout=0.0).parameters())
    assert sum(p.numel() for p in encoder.parameters()) == 5 * layer_params
    sources, pos, masks = _scales()
    out = encoder(sources, padding_masks=masks, pos=pos)
    order = [2, 0, 1]
    permuted = encoder([sources[j] for j in order], padding_masks=[masks[j] for j in order],
                       pos=[pos[j] for j in order])
    for k, j in enumerate(order):
        valid = ~masks[j]
        assert torch.allclose(permuted[k][valid], out[j][valid], atol=1e-5)


def _attention_inputs(seed=0):
    torch.manual_seed(seed)
    attention = ScaleSelectionAttention(d_model=D, nhead=HEADS, num_scales=3, dropout=0.0)
    query = torch.randn(2, 5, D)
    keys = [torch.randn(2, h * w, D) for h, w in SHAPES]
    values = [torch.randn(2, h * w, D) for h, w in SHAPES]
    priors = [-torch.rand(2, HEADS, 5, h * w) * 3 for h, w in SHAPES]
    weights = torch.rand(2, 5, 3).softmax(-1)
    return attention, query, keys, values, priors, weights


def test_scale_selection_attention_against_a_direct_computation():
    """Eq. 8-9 written out head by head and scale by scale."""
    attention, query, keys, values, priors, weights = _attention_inputs()
    out, maps = attention(query, keys, values, scale_weights=weights, log_priors=priors)
    dh = D // HEADS
    q = attention.q_proj(query)
    heads = []
    for i in range(HEADS):
        c_i = 0
        for j in range(3):
            k = attention.k_proj[j](keys[j])[..., i * dh:(i + 1) * dh]
            v = attention.v_proj[j](values[j])[..., i * dh:(i + 1) * dh]
            logits = q[..., i * dh:(i + 1) * dh] @ k.transpose(1, 2) / dh**0.5 + priors[j][:, i]
            c_i = c_i + (logits.softmax(-1) @ v) * weights[..., j:j + 1]  # (B, Q, dh)
        heads.append(c_i)
    expected = attention.out_proj(torch.cat(heads, -1))
    assert torch.allclose(out, expected, atol=1e-5)
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(2, HEADS, 5), atol=1e-6)


def test_one_hot_scale_selection_is_single_scale_smca_on_that_scale():
    attention, query, keys, values, priors, _ = _attention_inputs(seed=3)
    for j in range(3):
        one_hot = torch.zeros(2, 5, 3)
        one_hot[..., j] = 1.0
        out = attention(query, keys, values, scale_weights=one_hot, log_priors=priors)[0]
        single = ModulatedMultiheadAttention(d_model=D, nhead=HEADS, dropout=0.0)
        with torch.no_grad():
            single.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj[j].weight,
                                                   attention.v_proj[j].weight]))
            single.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj[j].bias,
                                                 attention.v_proj[j].bias]))
            single.out_proj.load_state_dict(attention.out_proj.state_dict())
        expected = single(query, keys[j], values[j], log_prior=priors[j])[0]
        assert torch.allclose(out, expected, atol=1e-5), j


def _layer():
    torch.manual_seed(0)
    layer = ScaleSelectionDecoderLayer(d_model=D, nhead=HEADS, dim_feedforward=32, dropout=0.0)
    torch.nn.init.normal_(layer.scale_selection.weight, std=1.0)
    torch.nn.init.normal_(layer.spatial_prior.head_offset.weight, std=0.3)
    return layer.eval()


def test_scale_selection_weights_are_a_softmax_per_query():
    layer = _layer()
    tgt, query_pos = torch.randn(2, 5, D), torch.randn(2, 5, D)
    valid = [torch.tensor([[w, h], [w, h]], dtype=torch.float32) for h, w in SHAPES]
    priors, weights = layer.priors_and_weights(tgt, query_pos, reference=torch.rand(2, 5, 2),
                                               valid_sizes=valid, grid_shapes=SHAPES)
    assert weights.shape == (2, 5, 3) and (weights > 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(2, 5), atol=1e-6)
    # queries choose differently: the weights depend on the query
    assert weights.std(dim=1).max() > 1e-3
    assert [p.shape for p in priors] == [(2, HEADS, 5, h * w) for h, w in SHAPES]


def test_prior_sits_at_the_same_normalised_place_on_every_scale():
    layer = _layer()
    torch.nn.init.zeros_(layer.spatial_prior.head_offset.weight)  # all heads at the reference centre
    reference = torch.tensor([[[0.6, 0.3]]])
    valid = [torch.tensor([[float(w), float(h)]]) for h, w in SHAPES]
    query = torch.zeros(1, 1, D)
    priors, _ = layer.priors_and_weights(query, query, reference=reference, valid_sizes=valid,
                                         grid_shapes=SHAPES)
    for (h, w), prior in zip(SHAPES, priors, strict=True):
        centre = reference[0, 0] * torch.tensor([w, h])
        expected = gaussian_log_weight(centre, torch.ones(2), grid_shape=(h, w), beta=layer.beta)
        assert torch.allclose(prior[0, 0, 0], expected, atol=1e-5)


def test_decoder_on_padded_scales_equals_the_unpadded_ones_and_gets_gradients():
    """Every scale padded at the bottom and right decodes as the cropped scales; padding gets no attention."""
    torch.manual_seed(0)
    decoder = ScaleSelectionDecoder(_layer(), 2, D).eval()
    valid_shapes, padded_shapes = [(3, 4), (2, 2), (1, 1)], SHAPES
    memories, pos, masks, cropped = [], [], [], {"memories": [], "pos": [], "masks": []}
    for (vh, vw), (h, w) in zip(valid_shapes, padded_shapes, strict=True):
        memory, position = torch.randn(1, h, w, D), torch.randn(1, h, w, D)
        mask = torch.ones(1, h, w, dtype=torch.bool)
        mask[:, :vh, :vw] = False
        memories.append(memory.flatten(1, 2))
        pos.append(position.flatten(1, 2))
        masks.append(mask.flatten(1))
        cropped["memories"].append(memory[:, :vh, :vw].flatten(1, 2))
        cropped["pos"].append(position[:, :vh, :vw].flatten(1, 2))
        cropped["masks"].append(torch.zeros(1, vh * vw, dtype=torch.bool))
    query_pos = torch.randn(1, 4, D)
    tgt = torch.zeros_like(query_pos)
    out_padded = decoder(tgt, memories, padding_masks=masks, pos=pos, query_pos=query_pos,
                         grid_shapes=padded_shapes)
    with torch.no_grad():
        out_cropped = decoder(tgt, cropped["memories"], padding_masks=cropped["masks"], pos=cropped["pos"],
                              query_pos=query_pos, grid_shapes=valid_shapes)
        layer = decoder.layers[0]
        valid = [torch.tensor([[float(w), float(h)]]) for h, w in valid_shapes]
        reference = decoder.reference_logits(query_pos).sigmoid()
        priors, weights = layer.priors_and_weights(query_pos, query_pos, reference=reference,
                                                   valid_sizes=valid, grid_shapes=padded_shapes)
        maps = layer.cross_attn_image(query_pos, memories, memories, scale_weights=weights,
                                      key_padding_masks=masks, log_priors=priors)[1]
    assert torch.allclose(out_padded, out_cropped, atol=1e-5)
    for attention, mask in zip(maps, masks, strict=True):
        assert (attention[..., mask[0]] == 0).all()
    (out_padded * torch.randn_like(out_padded)).sum().backward()
    named = dict(decoder.named_parameters())
    # (stride 64 holds one valid cell, which takes all of its scale's attention: its keys get no gradient)
    for name in ("reference_point.layers.0.weight", "layers.0.scale_selection.weight",
                 "layers.1.spatial_prior.scale.weight", "layers.0.spatial_prior.head_offset.weight",
                 "layers.0.cross_attn_image.k_proj.0.weight", "layers.0.cross_attn_image.v_proj.2.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
