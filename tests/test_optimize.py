"""The inference copy (folded batch norms, channels-last backbone) computes what the model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mdetr.inference.optimize import fold_frozen_batchnorm, optimize_for_inference
from mdetr.inference.predictor import Predictor
from mdetr.models.backbones.frozen_bn import FrozenBatchNorm2d
from mdetr.models.backbones.resnet import build_resnet_body
from mdetr.models.transformer import MultiheadAttention


def _randomise_batchnorm(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, FrozenBatchNorm2d):
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=generator))
            bn.running_mean.copy_(torch.randn(n, generator=generator))
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def test_folding_a_resnet_keeps_its_features() -> None:
    torch.manual_seed(0)
    body = build_resnet_body("resnet18").eval()
    _randomise_batchnorm(body, seed=1)
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = body(images)
        # 1 stem + 2 per basic block x 8 + 3 downsample branches
        assert fold_frozen_batchnorm(body) == 20
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
        folded = body(images)
    for name, value in expected.items():
        torch.testing.assert_close(folded[name], value, rtol=1e-4, atol=1e-4)


def test_folding_is_exact_arithmetic_in_float64() -> None:
    """In float64 the folded network agrees with the original to float64 rounding: the fold is the same
    function, and the float32 differences above are rounding only (a wrong eps or shift would show here)."""
    torch.manual_seed(0)
    body = build_resnet_body("resnet18").double().eval()
    _randomise_batchnorm(body, seed=2)
    images = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        expected = body(images)
        fold_frozen_batchnorm(body)
        folded = body(images)
    for name, value in expected.items():
        assert folded[name].dtype == torch.float64
        torch.testing.assert_close(folded[name], value, rtol=1e-11, atol=1e-11)


@pytest.fixture(scope="module")
def lite_model():
    """mdetr_lite with its ImageNet backbone and MiniLM (both from PyPI), transformer at random."""
    from mdetr.builder import build_model
    from mdetr.registry import get_arch_config

    torch.manual_seed(0)
    return build_model(get_arch_config("mdetr_lite")).eval()


def test_optimized_copy_gives_the_models_outputs(lite_model) -> None:
    fast = optimize_for_inference(lite_model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.backbone[0].body.modules())
    linear = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(type(m).forward is not torch.nn.Linear.forward for m in linear)  # oneDNN's
    assert all(type(m) is torch.nn.Linear for m in lite_model.modules() if isinstance(m, torch.nn.Linear))
    names = [{k for k in m.state_dict() if not k.startswith("backbone.")} for m in (fast, lite_model)]
    assert names[0] == names[1]  # the same parameter names
    assert any(isinstance(m, FrozenBatchNorm2d) for m in lite_model.modules())  # the original is untouched
    images, masks = torch.randn(2, 3, 160, 224), torch.zeros(2, 160, 224, dtype=torch.bool)
    masks[1, :, 200:] = True  # a padded image
    captions = ["a red circle", "the small blue square left of the star"]
    with torch.no_grad():
        expected, got = lite_model(images, masks, captions), fast(images, masks, captions)
    torch.testing.assert_close(got.pred_logits, expected.pred_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=0, atol=1e-5)


def test_optimized_copy_of_a_float64_model_is_exact_to_float64_rounding(lite_model) -> None:
    """Every rewrite of the copy is exact arithmetic: in float64 (where the linear layers stay on
    F.linear) the copy gives the model's outputs to float64 rounding."""
    import copy

    wide = copy.deepcopy(lite_model).double()
    fast = optimize_for_inference(wide)
    images = torch.randn(1, 3, 128, 160, dtype=torch.float64)
    masks = torch.zeros(1, 128, 160, dtype=torch.bool)
    with torch.no_grad():
        expected, got = wide(images, masks, ["a red circle"]), fast(images, masks, ["a red circle"])
    assert got.pred_logits.dtype == torch.float64
    torch.testing.assert_close(got.pred_logits, expected.pred_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=0, atol=1e-10)


def test_predictor_results_do_not_depend_on_the_optimisation(lite_model) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 210, 3), dtype=np.uint8))
    runs = [Predictor(lite_model, image_size=160, max_size=256, optimize=flag).predict(image, "a red circle",
                                                                                       threshold=0.0, top_k=5)
            for flag in (False, True)]
    plain, fast = runs
    torch.testing.assert_close(torch.as_tensor(fast.boxes), torch.as_tensor(plain.boxes), rtol=0, atol=1e-2)
    torch.testing.assert_close(torch.as_tensor(fast.scores), torch.as_tensor(plain.scores), rtol=0, atol=1e-4)


def test_bf16_copy_stores_weights_in_bf16_and_computes_the_same_numbers(lite_model) -> None:
    reference = optimize_for_inference(lite_model)
    fast = optimize_for_inference(lite_model, dtype=torch.bfloat16)
    layers = [m for m in fast.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) > 100 and all(m.weight.dtype == torch.bfloat16 for m in layers)
    attention = [m for m in fast.modules() if isinstance(m, MultiheadAttention)]
    assert attention and all(m.in_proj_weight.dtype == torch.bfloat16 for m in attention)
    assert all(p.dtype == torch.float32 for p in lite_model.parameters())  # the original is untouched
    images, masks = torch.randn(2, 3, 160, 224), torch.zeros(2, 160, 224, dtype=torch.bool)
    masks[1, :, 200:] = True
    captions = ["a red circle", "the small blue square left of the star"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference(images, masks, captions), fast(images, masks, captions)
    # autocast casts the float32 weights to bf16 at every call: stored in bf16 they give the same numbers
    for name in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    with torch.no_grad(), pytest.raises(RuntimeError):  # only for autocast: alone it mixes dtypes
        fast(images, masks, captions)


def _ran(profile, name: str) -> int:
    return sum(event.count for event in profile.key_averages() if event.key == name)


def test_compiled_copy_runs_fused_packed_convolutions_with_the_same_outputs(lite_model, cxx_compiler) -> None:
    """``compile=True``: inductor's freezing pass is on at the call (convolutions run as oneDNN's packed,
    fused ``_convolution_pointwise``, none through ``aten::convolution``), the global inductor flag is left
    as it was, and float32 outputs equal the eager copy's (folded batch norms leave only exact ReLUs and
    sums to fuse)."""
    from torch._inductor import config as inductor_config
    from torch.profiler import profile

    eager = optimize_for_inference(lite_model)
    fast = optimize_for_inference(lite_model, compile=True)
    images, masks = torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool)
    masks[1, :, 140:] = True
    captions = ["a red circle", "the small blue square left of the star"]
    freezing = inductor_config.freezing
    with torch.no_grad():
        expected = eager(images, masks, captions)
        fast(images, masks, captions)  # compiles
        with profile() as trace:
            got = fast(images, masks, captions)
    assert inductor_config.freezing == freezing
    assert _ran(trace, "mkldnn::_convolution_pointwise") + _ran(trace, "mkldnn::_convolution_pointwise_") > 30
    assert _ran(trace, "aten::convolution") <= 1  # the stem's TF "same" padding may stay outside
    torch.testing.assert_close(got.pred_logits, expected.pred_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="optimize"):
        Predictor(lite_model, optimize=False, compile=True)


def test_compiled_bf16_copy_takes_new_caption_lengths_and_image_sizes(lite_model, cxx_compiler) -> None:
    """In bf16 the text encoder and transformer are compiled too, with shapes that turn dynamic at the
    first change, and the backbone recompiles per image size: every call compiles what it should (new
    graphs for a new caption length only the first time) and stays within bf16 rounding of the eager bf16
    copy (measured: boxes 4e-3 apart at most, probabilities 3e-4)."""
    from torch._dynamo.utils import counters

    eager = optimize_for_inference(lite_model, dtype=torch.bfloat16)
    fast = optimize_for_inference(lite_model, dtype=torch.bfloat16, compile=True)
    calls = [((96, 128), "a red circle", True),  # compiles all four parts
             ((96, 128), "the small blue square left of the big green star", True),  # text parts, dynamic
             ((128, 96), "a star", True),  # the backbone, for the new size; the rest reuses its graphs
             ((128, 96), "the big blue square", False)]  # a fourth caption length (6 tokens): nothing new
    for (height, width), caption, compiles in calls:
        images, masks = torch.randn(1, 3, height, width), torch.zeros(1, height, width, dtype=torch.bool)
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = eager(images, masks, [caption]), fast(images, masks, [caption])
        assert (counters["stats"]["unique_graphs"] > graphs) == compiles, caption
        torch.testing.assert_close(got.pred_boxes.float(), expected.pred_boxes.float(), rtol=0, atol=0.01)
        probabilities = [out.pred_logits.float().softmax(-1) for out in (got, expected)]
        torch.testing.assert_close(*probabilities, rtol=0, atol=2e-3)


def test_compiled_copies_of_segmentation_models_and_what_they_refuse(lite_model) -> None:
    """The segmentation wrapper's detector parts are found under ``detr.``; a compiled copy refuses to be
    copied or pickled rather than running the original's weights (compilation itself is lazy: nothing
    runs here)."""
    import copy
    import pickle

    from mdetr.inference.optimize import compile_for_inference
    from mdetr.models.segmentation import MDETRSegmentation

    segmentation = MDETRSegmentation(detr=copy.deepcopy(lite_model)).eval()
    assert compile_for_inference(copy.deepcopy(segmentation)) == ["detr.backbone"]
    assert compile_for_inference(copy.deepcopy(segmentation), dtype=torch.bfloat16) == [
        "detr.backbone", "detr.transformer.text_encoder", "detr.transformer.encoder",
        "detr.transformer.decoder"]
    fast = optimize_for_inference(lite_model, compile=True)
    with pytest.raises(TypeError, match="Copy the model first"):
        copy.deepcopy(fast)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(fast)
