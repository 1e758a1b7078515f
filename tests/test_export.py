"""ONNX export: one export of a tiny mdetr_lite, run by onnxruntime at other image sizes, batch sizes and text
lengths than it was traced with, against PyTorch."""

import numpy as np
import pytest
import torch
from PIL import Image

from mdetr.builder import load
from mdetr.cli import main
from mdetr.config import Config, DataConfig
from mdetr.engine.checkpoint import save_checkpoint
from mdetr.inference.export import (
    ExportableMDETR,
    OnnxGroundingModel,
    compare_with_pytorch,
    example_inputs,
    processor_metadata,
)
from mdetr.inference.processor import GroundingProcessor, post_process_grounded_detection
from mdetr.registry import get_arch_config

TOLERANCE = 1e-4
# Export traces (2, 3, 160, 224) images and a 12-token batch; these differ in every dynamic axis.
CASES = [
    ((96, 131), ["a red circle", "the small blue square left of the big green triangle and a star"]),
    ((145, 64), ["circle"]),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained mdetr_lite (random weights: no pretrained files read) saved as a checkpoint folder."""
    torch.manual_seed(0)
    model_config = get_arch_config(
        "mdetr_lite", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=6,
        dropout=0.0, backbone_pretrained=False, text_encoder_pretrained=False)
    config = Config(model=model_config, data=DataConfig(val_size=128, max_size=160))
    from mdetr.builder import build_model

    model = build_model(model_config)
    with torch.no_grad():  # non-trivial frozen batch-norm statistics, so the backbone does not wash out
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "bias")):
                buffer.normal_(0, 0.1)
    return save_checkpoint(tmp_path_factory.mktemp("export") / "ckpt", model=model, config=config.to_dict())


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """The checkpoint exported once through ``mdetr export`` (which also checks it against PyTorch)."""
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(checkpoint)


@pytest.fixture(scope="module")
def session(exported):
    return OnnxGroundingModel(exported, threads=2)


@pytest.mark.parametrize(("size", "captions"), CASES)
def test_onnx_matches_pytorch_with_dynamic_shapes(model, session, size, captions):
    inputs = example_inputs(model, image_size=size, captions=captions)
    traced = example_inputs(model)
    assert inputs[0].shape[2:] != traced[0].shape[2:] and inputs[2].shape[1] != traced[2].shape[1]
    check = compare_with_pytorch(model, session, inputs)
    assert set(check.max_abs_diff) == {"pred_logits", "pred_boxes", "proj_queries", "proj_tokens"}
    assert check.max_abs_diff["pred_logits"] <= TOLERANCE
    assert check.max_abs_diff["pred_boxes"] <= TOLERANCE
    assert check.worst() <= TOLERANCE
    out = session.run(*inputs)
    batch, length = inputs[2].shape
    assert out["pred_logits"].shape == (batch, 6, model.config.num_token_slots)
    assert out["proj_tokens"].shape[:2] == (batch, length)


def test_onnx_graph_uses_the_padding_mask_and_the_text(model, session):
    """Changing the mask or a token changes the outputs, so those inputs are not folded away."""
    images, mask, ids, attention = example_inputs(model, image_size=(96, 131), captions=CASES[0][1])
    base = session.run(images, mask, ids, attention)["pred_logits"]
    unmasked = session.run(images, torch.zeros_like(mask), ids, attention)["pred_logits"]
    other_ids = ids.clone()
    other_ids[0, 1] = model.tokenizer.convert_tokens_to_ids("square")
    other_text = session.run(images, mask, other_ids, attention)["pred_logits"]
    assert (base[-1] - unmasked[-1]).abs().max() > 1e-3
    assert (base[0] - other_text[0]).abs().max() > 1e-3
    torch.testing.assert_close(base[1], other_text[1], atol=1e-6, rtol=0)  # captions stay with their image


def test_post_processing_works_on_onnx_outputs(model, session):
    processor = session.processor()  # tokenizer and sizes read from the file
    reference_processor = GroundingProcessor.for_model(model, image_size=128, max_size=160)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((90, 150), (120, 70))]
    captions = ["a red circle", "the blue square below a circle"]
    inputs = processor(images, captions)
    expected_inputs = reference_processor(images, captions)
    for key in ("pixel_values", "pixel_mask", "target_sizes"):
        assert torch.equal(inputs[key], expected_inputs[key])
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(inputs["tokenized"][key], expected_inputs["tokenized"][key])
    onnx_outputs = session(inputs["pixel_values"], inputs["pixel_mask"], inputs["tokenized"])
    with torch.no_grad():
        torch_outputs = model(inputs["pixel_values"], inputs["pixel_mask"], captions)
    kwargs = dict(target_sizes=inputs["target_sizes"], threshold=0.0, top_k=3, captions=captions)
    ours = post_process_grounded_detection(onnx_outputs, **kwargs)
    reference = post_process_grounded_detection(torch_outputs, **kwargs)
    for got, want in zip(ours, reference, strict=True):
        assert len(got["scores"]) == 3
        torch.testing.assert_close(got["scores"], want["scores"], atol=TOLERANCE, rtol=0)
        # Pixels: the normalised tolerance times the largest image side.
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=TOLERANCE * 150, rtol=0)
        assert got["phrases"] == want["phrases"]


def test_exported_model_carries_processor_settings(model, session):
    assert session.metadata == processor_metadata(model)
    assert session.metadata["image_size"] == 128 and session.metadata["max_size"] == 160
    assert session.output_names == ["pred_logits", "pred_boxes", "proj_queries", "proj_tokens"]


def test_export_rejects_unknown_format(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--format", "tflite", "--output", str(tmp_path / "m.tflite")])
    assert exit_info.value.code == 2
    assert "--format 'tflite' is not supported; the only export format is onnx" in capsys.readouterr().err
    assert not (tmp_path / "m.tflite").exists()


def test_export_rejects_models_it_cannot_represent():
    with pytest.raises(ValueError, match="only detection models can be exported"):
        ExportableMDETR(torch.nn.Linear(2, 2))


def test_missing_onnx_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        OnnxGroundingModel(tmp_path / "absent.onnx")


def test_onnx_file_from_elsewhere_has_no_processor(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "other.onnx")
    other = OnnxGroundingModel(tmp_path / "other.onnx")
    assert other.metadata == {}
    with pytest.raises(ValueError, match="other.onnx was not written by mdetr export"):
        other.processor()
