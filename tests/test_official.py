"""Official MDETR checkpoints: key layout of every hub model, strict safe loading, outputs recomputed by hand.

The expected state-dict layouts are generated here from the published architecture (block counts, widths,
the official parameter names), not from this package's models, so a naming or shape error in the models
shows up as a failed strict load. The checkpoint files are built like the released ones: random weights for
every key, a ``position_ids`` buffer, an ``args`` Namespace, optimizer/epoch entries. Outputs are then
recomputed in float64 straight from the file's tensors (encoder, decoder, heads, mask branch), reusing only
the backbone / text-encoder features the model computed.
"""

import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mdetr
from mdetr.checkpoints.official import (
    REPORT_FILE,
    convert_official,
    load_official,
    load_official_state_dict,
    official_model_config,
)
from mdetr.cli import main as cli_main
from mdetr.engine.checkpoint import CheckpointError
from mdetr.models.text import TextEncoderNotFoundError
from mdetr.registry import get_arch_config, official_archs, official_release

D, FFN, HEADS, LAYERS = 256, 2048, 8, 6

# The hub entries (ashkamath/mdetr hubconf.py): backbone, queries, QA dataset, alignment heads, masks.
HUB = {
    "mdetr_resnet101": ("resnet101", 100, None, True, False),
    "mdetr_efficientnetB3": ("b3", 100, None, True, False),
    "mdetr_efficientnetB5": ("b5", 100, None, True, False),
    "mdetr_clevr": ("resnet18", 25, "clevr", True, False),
    "mdetr_clevr_humans": ("resnet18", 25, "clevr", True, False),
    "mdetr_resnet101_gqa": ("resnet101", 100, "gqa", False, False),
    "mdetr_efficientnetB5_gqa": ("b5", 100, "gqa", False, False),
    "mdetr_resnet101_phrasecut": ("resnet101", 100, None, False, True),
    "mdetr_efficientnetB3_phrasecut": ("b3", 100, None, False, True),
    "mdetr_resnet101_refcoco": ("resnet101", 100, None, True, False),
    "mdetr_efficientnetB3_refcoco": ("b3", 100, None, True, False),
    "mdetr_resnet101_refcocoplus": ("resnet101", 100, None, True, False),
    "mdetr_efficientnetB3_refcocoplus": ("b3", 100, None, True, False),
    "mdetr_resnet101_refcocog": ("resnet101", 100, None, True, False),
    "mdetr_efficientnetB3_refcocog": ("b3", 100, None, True, False),
}

# ---------------------------------------------------------------------------------------------------------
# Expected layouts


def _bn(prefix, channels):
    return {f"{prefix}.{n}": (channels,) for n in ("weight", "bias", "running_mean", "running_var")}


def resnet_layout(depth):
    """torchvision ResNet names: stem, layer1..4 with conv/bn pairs, downsample on the first block."""
    blocks, bottleneck = {18: ((2, 2, 2, 2), False), 101: ((3, 4, 23, 3), True)}[depth]
    out = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    in_ch = 64
    for layer, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        width = planes * (4 if bottleneck else 1)
        for i in range(count):
            p = f"layer{layer}.{i}"
            cin = in_ch if i == 0 else width
            convs = ([(1, cin, planes), (3, planes, planes), (1, planes, width)] if bottleneck
                     else [(3, cin, planes), (3, planes, planes)])
            for j, (k, a, b) in enumerate(convs, start=1):
                out[f"{p}.conv{j}.weight"] = (b, a, k, k)
                out.update(_bn(f"{p}.bn{j}", b))
            if i == 0 and (layer > 1 or in_ch != width):
                out[f"{p}.downsample.0.weight"] = (width, in_ch, 1, 1)
                out.update(_bn(f"{p}.downsample.1", width))
        in_ch = width
    return out


# timm tf_efficientnet_b3_ns / b5_ns after width and depth scaling: stem width, then per stage
# (blocks, output channels); kernel sizes and expansion ratios are those of B0.
EFFNET = {
    "b3": (40, [(2, 24), (3, 32), (3, 48), (5, 96), (5, 136), (6, 232), (2, 384)]),
    "b5": (48, [(3, 24), (5, 40), (5, 64), (7, 128), (7, 176), (9, 304), (3, 512)]),
}
EFFNET_KERNELS = (3, 3, 5, 3, 5, 5, 3)
# Channels of the stride 4, 8, 16, 32 levels (timm feature_info at out_indices 1..4).
EFFNET_LEVELS = {"b3": (32, 48, 136, 384), "b5": (40, 64, 176, 512)}


def _squeeze_excite(name, channels, reduced):
    return {f"{name}.conv_reduce.weight": (reduced, channels, 1, 1), f"{name}.conv_reduce.bias": (reduced,),
            f"{name}.conv_expand.weight": (channels, reduced, 1, 1), f"{name}.conv_expand.bias": (channels,)}


def efficientnet_layout(variant):
    stem, stages = EFFNET[variant]
    out = {"conv_stem.weight": (stem, 3, 3, 3), **_bn("bn1", stem)}
    in_ch = stem
    for s, ((count, width), k) in enumerate(zip(stages, EFFNET_KERNELS, strict=True)):
        for b in range(count):
            p = f"blocks.{s}.{b}"
            se = in_ch // 4  # squeeze-excitation width: a quarter of the block input
            if s == 0:  # depthwise-separable
                out[f"{p}.conv_dw.weight"] = (in_ch, 1, k, k)
                out.update(_bn(f"{p}.bn1", in_ch))
                out.update(_squeeze_excite(f"{p}.se", in_ch, se))
                out[f"{p}.conv_pw.weight"] = (width, in_ch, 1, 1)
                out.update(_bn(f"{p}.bn2", width))
            else:  # inverted residual, expansion 6
                mid = in_ch * 6
                out[f"{p}.conv_pw.weight"] = (mid, in_ch, 1, 1)
                out.update(_bn(f"{p}.bn1", mid))
                out[f"{p}.conv_dw.weight"] = (mid, 1, k, k)
                out.update(_bn(f"{p}.bn2", mid))
                out.update(_squeeze_excite(f"{p}.se", mid, se))
                out[f"{p}.conv_pwl.weight"] = (width, mid, 1, 1)
                out.update(_bn(f"{p}.bn3", width))
            in_ch = width
    return out


def text_layout(folder):
    """HF RoBERTa names as saved by transformers 4.5 (position_ids was a persistent buffer then)."""
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    out = {"embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
           "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
           "embeddings.token_type_embeddings.weight": (1, h),
           "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
           "embeddings.position_ids": (1, cfg["max_position_embeddings"]),
           "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    for layer in range(n):
        p = f"encoder.layer.{layer}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = (h, h), (h,)
        out[f"{p}.intermediate.dense.weight"], out[f"{p}.intermediate.dense.bias"] = (i, h), (i,)
        out[f"{p}.output.dense.weight"], out[f"{p}.output.dense.bias"] = (h, i), (h,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = (h,), (h,)
    return out, h


def _linear(name, n_out, n_in):
    return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}


def _mha(name):
    return {f"{name}.in_proj_weight": (3 * D, D), f"{name}.in_proj_bias": (3 * D,),
            **_linear(f"{name}.out_proj", D, D)}


def _norm(name):
    return {f"{name}.weight": (D,), f"{name}.bias": (D,)}


def transformer_layout(text_folder):
    text, text_width = text_layout(text_folder)
    out = {f"text_encoder.{k}": v for k, v in text.items()}
    out.update(_linear("resizer.fc", D, text_width))
    out.update({"resizer.layer_norm.weight": (D,), "resizer.layer_norm.bias": (D,)})
    for i in range(LAYERS):
        p = f"encoder.layers.{i}"
        out.update({**_mha(f"{p}.self_attn"), **_linear(f"{p}.linear1", FFN, D),
                    **_linear(f"{p}.linear2", D, FFN), **_norm(f"{p}.norm1"), **_norm(f"{p}.norm2")})
        p = f"decoder.layers.{i}"
        out.update({**_mha(f"{p}.self_attn"), **_mha(f"{p}.cross_attn_image"),
                    **_linear(f"{p}.linear1", FFN, D), **_linear(f"{p}.linear2", D, FFN),
                    **_norm(f"{p}.norm1"), **_norm(f"{p}.norm3"), **_norm(f"{p}.norm4")})
    out.update(_norm("decoder.norm"))
    return out


def backbone_levels(backbone):
    if backbone == "resnet101":
        return (256, 512, 1024, 2048)
    if backbone == "resnet18":
        return (64, 128, 256, 512)
    return EFFNET_LEVELS[backbone]


def official_layout(arch, text_folder):
    """Every key and shape of the official checkpoint of a hub entry (with the given text encoder)."""
    backbone, queries, qa, align, masks = HUB[arch]
    if backbone.startswith("resnet"):
        body = resnet_layout(int(backbone.removeprefix("resnet")))
    else:
        body = efficientnet_layout(backbone)
    levels = backbone_levels(backbone)
    out = {f"backbone.0.body.{k}": v for k, v in body.items()}
    out.update({f"transformer.{k}": v for k, v in transformer_layout(text_folder).items()})
    out.update({"input_proj.weight": (D, levels[3], 1, 1), "input_proj.bias": (D,),
                "query_embed.weight": (queries, D),
                **_linear("class_embed", 256, D), **_linear("bbox_embed.layers.0", D, D),
                **_linear("bbox_embed.layers.1", D, D), **_linear("bbox_embed.layers.2", 4, D)})
    if align:
        out.update({**_linear("contrastive_align_projection_image", 64, D),
                    **_linear("contrastive_align_projection_text", 64, D)})
    if qa == "gqa":
        out["qa_embed.weight"] = (6, D)
        for name, n in (("type", 5), ("obj", 3), ("rel", 1594), ("attr", 403), ("cat", 678), ("global", 111)):
            out.update(_linear(f"answer_{name}_head", n, D))
    if qa == "clevr":
        out["qa_embed.weight"] = (4, D)
        out.update({**_linear("answer_type_head", 3, D), **_linear("answer_binary_head", 1, D),
                    **_linear("answer_attr_head", 15, D), **_linear("answer_reg_head.layers.0", D, D),
                    **_linear("answer_reg_head.layers.1", D, D),
                    **_linear("answer_reg_head.layers.2", 20, D)})
    if masks:
        out = {f"detr.{k}": v for k, v in out.items()}
        out.update({**_linear("bbox_attention.q_linear", D, D), **_linear("bbox_attention.k_linear", D, D)})
        dims = [(D + HEADS, D + HEADS), (128, D + HEADS), (64, 128), (32, 64), (16, 32)]
        for i, (o, c) in enumerate(dims, start=1):
            out[f"mask_head.lay{i}.weight"], out[f"mask_head.lay{i}.bias"] = (o, c, 3, 3), (o,)
            out[f"mask_head.gn{i}.weight"], out[f"mask_head.gn{i}.bias"] = (o,), (o,)
        out["mask_head.out_lay.weight"], out["mask_head.out_lay.bias"] = (1, 16, 3, 3), (1,)
        # Adapters read layer3, layer2, layer1.
        adapters = zip((128, 64, 32), (levels[2], levels[1], levels[0]), strict=True)
        for i, (o, c) in enumerate(adapters, start=1):
            out[f"mask_head.adapter{i}.weight"], out[f"mask_head.adapter{i}.bias"] = (o, c, 1, 1), (o,)
    return out


def random_state(layout, seed):
    """Random tensors of the layout's shapes, scaled so activations stay moderate through 100+ layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[1])[None]
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def save_official(path, state, *, ema=None):
    """A file shaped like the released ones (main.py's checkpoint dict)."""
    args = argparse.Namespace(backbone="resnet101", lr=1e-4, combine_datasets=["flickr"], frozen_weights=None,
                              text_encoder_type="roberta-base", ema=ema is not None)
    torch.save({"model": state, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 9,
                "args": args}, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Recomputation from the file's tensors (float64)


class Captured:
    """Backbone levels and text-encoder inputs/outputs recorded during one forward pass."""

    def __init__(self, model):
        detr = getattr(model, "detr", model)
        self.handles = [
            detr.backbone.register_forward_hook(self._backbone),
            detr.transformer.text_encoder.register_forward_hook(self._text, with_kwargs=True),
        ]

    def _backbone(self, module, args, output):
        self.levels = output

    def _text(self, module, args, kwargs, output):
        self.text_hidden = output.last_hidden_state
        self.text_padding = kwargs["attention_mask"] == 0

    def remove(self):
        for h in self.handles:
            h.remove()


def _layer_norm(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _attention(W, name, q_in, k_in, v_in, key_padding=None):
    w, b = W(f"{name}.in_proj_weight"), W(f"{name}.in_proj_bias")
    batch, hd = q_in.shape[0], D // HEADS

    def heads(x, part):
        y = x @ w[part * D:(part + 1) * D].T + b[part * D:(part + 1) * D]
        return y.view(batch, -1, HEADS, hd).transpose(1, 2)  # (B, N, L, hd)

    q, k, v = heads(q_in, 0), heads(k_in, 1), heads(v_in, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, D)
    return out @ W(f"{name}.out_proj.weight").T + W(f"{name}.out_proj.bias")


def _ffn(W, p, x):
    hidden = torch.relu(x @ W(f"{p}.linear1.weight").T + W(f"{p}.linear1.bias"))
    return hidden @ W(f"{p}.linear2.weight").T + W(f"{p}.linear2.bias")


def _norm_(W, name, x, eps=1e-5):
    return _layer_norm(x, W(f"{name}.weight"), W(f"{name}.bias"), eps)


def _mlp(W, name, x, layers=3):
    for i in range(layers):
        x = x @ W(f"{name}.layers.{i}.weight").T + W(f"{name}.layers.{i}.bias")
        x = torch.relu(x) if i < layers - 1 else x
    return x


def recompute(state, captured, images_mask, *, prefix="", num_qa=0):
    """The whole transformer and heads by hand: returns a dict of float64 reference outputs."""
    def W(key):
        return state[prefix + key].double()

    feat, _, pos = (t.double() if t.is_floating_point() else t for t in captured.levels[3])
    level_mask = F.interpolate(images_mask[None].float(), size=feat.shape[-2:])[0].bool()  # nearest
    src = F.conv2d(feat, W("input_proj.weight"), W("input_proj.bias"))  # (B, D, h, w)
    img = src.flatten(2).transpose(1, 2)
    text = _norm_(W, "transformer.resizer.layer_norm",
                  captured.text_hidden.double() @ W("transformer.resizer.fc.weight").T
                  + W("transformer.resizer.fc.bias"), eps=1e-12)
    x = torch.cat([img, text], 1)
    padding = torch.cat([level_mask.flatten(1), captured.text_padding], 1)
    positions = torch.cat([pos.flatten(2).transpose(1, 2), torch.zeros_like(text)], 1)
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}"
        qk = x + positions
        x = _norm_(W, f"{p}.norm1", x + _attention(W, f"{p}.self_attn", qk, qk, x, padding))
        x = _norm_(W, f"{p}.norm2", x + _ffn(W, p, x))
    memory = x
    queries = W("query_embed.weight")
    if num_qa:
        queries = torch.cat([queries, W("qa_embed.weight")])
    query_pos = queries[None].expand(x.shape[0], -1, -1)
    t = torch.zeros_like(query_pos)
    hs = []
    for i in range(LAYERS):
        p = f"transformer.decoder.layers.{i}"
        t = _norm_(W, f"{p}.norm1", t + _attention(W, f"{p}.self_attn", t + query_pos, t + query_pos, t))
        attended = _attention(W, f"{p}.cross_attn_image", t + query_pos, memory + positions, memory, padding)
        t = _norm_(W, f"{p}.norm3", t + attended)
        t = _norm_(W, f"{p}.norm4", t + _ffn(W, p, t))
        hs.append(_norm_(W, "transformer.decoder.norm", t))
    num_queries = W("query_embed.weight").shape[0]
    last = hs[-1][:, :num_queries]
    out = {"hs": hs, "memory": memory, "src": src, "level_mask": level_mask, "W": W,
           "pred_logits": last @ W("class_embed.weight").T + W("class_embed.bias"),
           "pred_boxes": _mlp(W, "bbox_embed", last).sigmoid(),
           "qa_states": hs[0][:, num_queries:]}
    if prefix + "contrastive_align_projection_image.weight" in state:
        length = text.shape[1]
        out["proj_queries"] = F.normalize(last @ W("contrastive_align_projection_image.weight").T
                                          + W("contrastive_align_projection_image.bias"), dim=-1)
        out["proj_tokens"] = F.normalize(memory[:, -length:] @ W("contrastive_align_projection_text.weight").T
                                         + W("contrastive_align_projection_text.bias"), dim=-1)
    return out


def close(actual, expected, atol=2e-4):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.double() - expected).abs().max().item()
    assert diff < atol, f"max abs difference {diff}"


def inputs():
    """Two images (the second padded on the right) and two captions of different lengths."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True
    images[1, :, :, 64:] = 0
    return images, masks, ["the small red circle", "is there a cube behind the blue cylinder"]


def run(model, images, masks, captions):
    captured = Captured(model)
    with torch.no_grad():
        out = model(images, masks, captions)
    captured.remove()
    return out, captured


# ---------------------------------------------------------------------------------------------------------
# Layout of every hub model


@pytest.mark.parametrize("arch", list(HUB))
def test_hub_model_has_the_official_layout(arch, roberta_like, distilroberta_like):
    """Built on the meta device (no memory, no init): keys and shapes equal the official layout."""
    assert arch in official_archs() and official_release(arch).checkpoint.endswith(".pth")
    folder = distilroberta_like if HUB[arch][2] == "clevr" else roberta_like
    expected_text = "distilroberta-base" if HUB[arch][2] == "clevr" else "roberta-base"
    assert get_arch_config(arch).text_encoder == expected_text
    from mdetr.builder import build_model

    with torch.device("meta"):
        model = build_model(official_model_config(arch, text_encoder=folder))
    expected = {k: v for k, v in official_layout(arch, folder).items() if not k.endswith("position_ids")}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == [] and sorted(set(actual) - set(expected)) == []
    assert {k for k in expected if expected[k] != actual[k]} == set()


def test_registry_lists_the_fifteen_hub_models_with_paper_numbers():
    assert set(HUB) == set(official_archs())
    assert "86.75" in official_release("mdetr_resnet101_refcoco").paper
    assert official_release("mdetr_resnet101_refcocoplus").url.endswith("refcoco%2B_resnet101_checkpoint.pth")
    assert get_arch_config("mdetr_efficientnetB3").backbone_frozen_levels == 0
    assert get_arch_config("mdetr_resnet101").backbone_frozen_levels == 1
    assert official_model_config("mdetr_resnet101").aux_loss is False  # as torch.hub


# ---------------------------------------------------------------------------------------------------------
# Files in the official layout, loaded strictly, outputs recomputed


def test_resnet101_pretraining_checkpoint(tmp_path, roberta_like):
    state = random_state(official_layout("mdetr_resnet101", roberta_like), seed=1)
    path = save_official(tmp_path / "pretrained_resnet101_checkpoint.pth", state)
    model = mdetr.load(path, arch="mdetr_resnet101", text_encoder=roberta_like)
    images, masks, captions = inputs()
    out, captured = run(model, images, masks, captions)
    ref = recompute(state, captured, masks)
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        close(getattr(out, key), ref[key])
    assert out.aux_outputs == [] and out.qa == {} and out.pred_masks is None
    assert captured.levels[3][0].shape[1] == 2048 and ref["level_mask"][1, :, -1].all()


def test_efficientnet_b5_gqa_checkpoint(tmp_path, roberta_like):
    """GQA: six QA queries decoded jointly with the object queries; answers read from decoder layer 0."""
    state = random_state(official_layout("mdetr_efficientnetB5_gqa", roberta_like), seed=3)
    path = save_official(tmp_path / "gqa_EB5_checkpoint.pth", state)
    model = mdetr.load(path, arch="mdetr_efficientnetB5_gqa", text_encoder=roberta_like)
    images, masks, captions = inputs()
    out, captured = run(model, images, masks, captions)
    assert captured.levels[3][0].shape[1] == 512
    ref = recompute(state, captured, masks, num_qa=6)
    close(out.pred_logits, ref["pred_logits"])
    close(out.pred_boxes, ref["pred_boxes"])
    assert out.proj_queries is None and out.proj_tokens is None
    W, qa = ref["W"], ref["qa_states"]
    for slot, (name, size) in enumerate([("type", 5), ("obj", 3), ("rel", 1594), ("attr", 403), ("cat", 678),
                                         ("global", 111)]):
        expected = qa[:, slot] @ W(f"answer_{name}_head.weight").T + W(f"answer_{name}_head.bias")
        assert out.qa[f"answer_{name}"].shape == (2, size)
        close(out.qa[f"answer_{name}"], expected)
    # Layer 0, not the last layer, feeds the answers.
    last = ref["hs"][-1][:, 100] @ W("answer_type_head.weight").T + W("answer_type_head.bias")
    assert (out.qa["answer_type"].double() - last).abs().max() > 1e-3


@pytest.fixture(scope="module")
def clevr_file(tmp_path_factory, distilroberta_like):
    state = random_state(official_layout("mdetr_clevr", distilroberta_like), seed=4)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    path = save_official(tmp_path_factory.mktemp("clevr") / "clevr_checkpoint.pth", state, ema=ema)
    return path, state, ema


def test_clevr_checkpoint(clevr_file, distilroberta_like, tmp_path):
    """ResNet-18 + 6-layer DistilRoBERTa-style encoder, 25 queries, four CLEVR answer heads."""
    path, state, _ = clevr_file
    assert state["answer_type_head.weight"].shape == (3, 256)
    model = mdetr.load(path, arch="mdetr_clevr", text_encoder=distilroberta_like)
    images, masks, captions = inputs()
    out, captured = run(model, images, masks, captions)
    ref = recompute(state, captured, masks, num_qa=4)
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        close(getattr(out, key), ref[key])
    assert out.pred_logits.shape == (2, 25, 256)
    W, qa = ref["W"], ref["qa_states"]
    close(out.qa["answer_type"], qa[:, 0] @ W("answer_type_head.weight").T + W("answer_type_head.bias"))
    binary = (qa[:, 1] @ W("answer_binary_head.weight").T + W("answer_binary_head.bias"))[:, 0]
    assert out.qa["answer_binary"].shape == (2,)
    close(out.qa["answer_binary"], binary)
    close(out.qa["answer_reg"], _mlp(W, "answer_reg_head", qa[:, 2]))
    close(out.qa["answer_attr"], qa[:, 3] @ W("answer_attr_head.weight").T + W("answer_attr_head.bias"))

    # Converted to a checkpoint folder and loaded back (offline: tokenizer and encoder config travel in
    # text_encoder/), the model gives identical outputs.
    out_dir = convert_official(path, tmp_path / "clevr", arch="mdetr_clevr", text_encoder=distilroberta_like)
    report = json.loads((out_dir / REPORT_FILE).read_text())
    assert report["dropped"] == {"transformer.text_encoder.embeddings.position_ids": [1, 40]}
    assert len(report["mapped"]) == len(state) - 1 and report["mapped"]["answer_type_head.weight"] == [3, 256]
    assert report["epoch"] == 9 and report["official_args"]["backbone"] == "resnet101"
    saved = json.loads((out_dir / "state.json").read_text())["config"]["model"]
    assert saved["text_encoder"] == "distilroberta-base" and not saved["backbone_pretrained"]
    with torch.no_grad():
        again = mdetr.load(out_dir)(images, masks, captions)
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        assert torch.equal(getattr(out, key), getattr(again, key)), key
    assert out.qa.keys() == again.qa.keys() and all(torch.equal(out.qa[k], again.qa[k]) for k in out.qa)


def test_ema_weights_on_request(clevr_file):
    path, state, ema = clevr_file
    weights = load_official_state_dict(path, ema=True)
    assert torch.equal(weights["query_embed.weight"], ema["query_embed.weight"])
    assert torch.equal(load_official_state_dict(path)["query_embed.weight"], state["query_embed.weight"])
    bare = save_official(path.with_name("no_ema.pth"), state)
    with pytest.raises(CheckpointError, match="model_ema"):
        load_official_state_dict(bare, ema=True)


def test_efficientnet_b3_phrasecut_checkpoint(tmp_path, roberta_like):
    """``detr.`` prefix, EfficientNet-B3 levels, attention maps and the FPN mask head, all recomputed from
    the file's tensors."""
    state = random_state(official_layout("mdetr_efficientnetB3_phrasecut", roberta_like), seed=5)
    path = save_official(tmp_path / "phrasecut_EB3_checkpoint.pth", state)
    model = mdetr.load(path, arch="mdetr_efficientnetB3_phrasecut", text_encoder=roberta_like)
    images, masks, captions = inputs()
    out, captured = run(model, images, masks, captions)
    assert [lvl[0].shape[1] for lvl in captured.levels] == list(EFFNET_LEVELS["b3"])
    # TensorFlow "same" padding: every level is ceil(size / stride).
    assert [tuple(lvl[0].shape[-2:]) for lvl in captured.levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    ref = recompute(state, captured, masks, prefix="detr.")
    close(out.pred_logits, ref["pred_logits"])
    close(out.pred_boxes, ref["pred_boxes"])
    assert out.proj_queries is None and out.qa == {}

    def W(key):
        return state[key].double()

    # Attention of each query over the image part of the memory: softmax over h*w per head.
    src, level_mask = ref["src"], ref["level_mask"]
    b, _, h, w = src.shape
    memory = ref["memory"][:, : h * w].transpose(1, 2).reshape(b, D, h, w)
    q = ref["hs"][-1][:, :100] @ W("bbox_attention.q_linear.weight").T + W("bbox_attention.q_linear.bias")
    k = torch.einsum("bchw,oc->bohw", memory, W("bbox_attention.k_linear.weight"))
    k = k + W("bbox_attention.k_linear.bias")[None, :, None, None]
    hd = D // HEADS
    logits = torch.einsum("bqnc,bnchw->bqnhw", q.view(b, 100, HEADS, hd), k.view(b, HEADS, hd, h, w))
    logits = logits / math.sqrt(hd)
    logits = logits.masked_fill(level_mask[:, None, None], float("-inf"))
    attention = logits.flatten(3).softmax(-1).view_as(logits)
    assert torch.allclose(attention.sum((-1, -2)), torch.ones(b, 100, HEADS, dtype=torch.float64))
    assert (attention[1, :, :, :, -1] == 0).all()  # padded column

    # Mask head: lay1/lay2 on [features, attention], then three FPN steps over layer3, layer2, layer1.
    def conv(x, name):
        weight = W(f"mask_head.{name}.weight")
        return F.conv2d(x, weight, W(f"mask_head.{name}.bias"), padding=weight.shape[-1] // 2)

    def gn_relu(x, name):
        return torch.relu(F.group_norm(x, 8, W(f"mask_head.{name}.weight"), W(f"mask_head.{name}.bias")))

    x = torch.cat([src[:, None].expand(-1, 100, -1, -1, -1).flatten(0, 1), attention.flatten(0, 1)], 1)
    x = gn_relu(conv(x, "lay1"), "gn1")
    x = gn_relu(conv(x, "lay2"), "gn2")
    for step, level in enumerate((2, 1, 0), start=1):
        feature = captured.levels[level][0].double()
        lateral = conv(feature, f"adapter{step}")[:, None].expand(-1, 100, -1, -1, -1).flatten(0, 1)
        x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
        x = gn_relu(conv(x, f"lay{step + 2}"), f"gn{step + 2}")
    expected = conv(x, "out_lay").view(b, 100, 16, 24)
    assert out.pred_masks.shape == (2, 100, 16, 24)
    close(out.pred_masks, expected, atol=5e-4)

    from mdetr.inference.postprocess import post_process_masks

    pixel_masks = post_process_masks(out.pred_masks, torch.tensor([[64, 96], [64, 64]]),
                                     torch.tensor([[128, 192], [100, 100]]))
    assert [tuple(m.shape) for m in pixel_masks] == [(100, 128, 192), (100, 100, 100)]
    assert pixel_masks[0].dtype == torch.bool


# ---------------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def clevr_model(distilroberta_like):
    from mdetr.builder import build_model

    return build_model(official_model_config("mdetr_clevr", text_encoder=distilroberta_like))


def _clevr_state(clevr_file):
    state = dict(clevr_file[1])
    del state["transformer.text_encoder.embeddings.position_ids"]
    return state


@pytest.mark.parametrize("change, listed", [
    ("missing", "missing keys (1): answer_attr_head.bias"),
    ("unexpected", "unexpected keys (1): isfinal_embed.weight"),
    ("shape", "shape mismatches (1): answer_type_head.weight (5, 256) vs model (3, 256)"),
])
def test_key_mismatch_is_one_error_listing_the_keys(clevr_file, clevr_model, change, listed):
    from mdetr.engine.checkpoint import load_state_dict_strict

    state = _clevr_state(clevr_file)
    if change == "missing":
        del state["answer_attr_head.bias"]
    elif change == "unexpected":
        state["isfinal_embed.weight"] = torch.zeros(1, 256)
    else:
        state["answer_type_head.weight"] = torch.zeros(5, 256)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(clevr_model, state, source="x.pth")
    assert listed in str(err.value) and str(err.value).startswith("x.pth does not fit the model")


def test_all_mismatches_in_one_error_through_the_loader(clevr_file, distilroberta_like, tmp_path):
    state = _clevr_state(clevr_file)
    del state["answer_attr_head.bias"]
    state["isfinal_embed.weight"] = torch.zeros(1, 256)
    state["answer_type_head.weight"] = torch.zeros(5, 256)
    path = save_official(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointError) as err:
        load_official(path, "mdetr_clevr", text_encoder=distilroberta_like)
    message = str(err.value)
    assert "answer_attr_head.bias" in message and "isfinal_embed.weight" in message
    assert "answer_type_head.weight (5, 256) vs model (3, 256)" in message


class _RunsAShellCommand:
    """What a malicious checkpoint pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, distilroberta_like):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    evil = {"model": {"query_embed.weight": torch.zeros(25, 256)}, "args": _RunsAShellCommand(marker)}
    torch.save(evil, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*system.*nothing in the file was executed"):
        load_official_state_dict(path)
    with pytest.raises(CheckpointError, match="refusing"):
        mdetr.load(path, arch="mdetr_clevr", text_encoder=distilroberta_like)
    assert not marker.exists()
    assert cli_main(["convert", str(path), str(tmp_path / "out"), "--arch", "mdetr_clevr",
                     "--text-encoder", distilroberta_like]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_official_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_state_dict(tmp_path / "absent.pth")
    with pytest.raises(mdetr.ConfigError, match="needs arch"):
        mdetr.load(garbage)


def test_missing_text_encoder_says_which_files_and_where(clevr_file, tmp_path):
    path = clevr_file[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "absent"):
        with pytest.raises(TextEncoderNotFoundError) as err:
            load_official(path, "mdetr_clevr", text_encoder=str(folder))
        message = str(err.value)
        for needed in ("config.json", "vocab.json", "merges.txt", "tokenizer.json", "--text-encoder",
                       "model.text_encoder="):
            assert needed in message
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("distilroberta-base", "config.json"), str):
        pytest.skip("distilroberta-base is in the local Hugging Face cache")
    with pytest.raises(TextEncoderNotFoundError, match="'distilroberta-base' is not a local folder"):
        load_official(path, "mdetr_clevr")


def test_cli_convert(clevr_file, distilroberta_like, tmp_path, capsys):
    path = clevr_file[0]
    out = tmp_path / "converted"
    args = ["convert", str(path), str(out), "--arch", "mdetr_clevr", "--text-encoder", distilroberta_like,
            "--ema"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "model_ema" in printed and "position_ids" in printed and (out / "model.safetensors").exists()
    assert json.loads((out / REPORT_FILE).read_text())["weights"] == "model_ema"
    assert cli_main(args) == 2  # the folder exists
    assert "--overwrite" in capsys.readouterr().err
