"""Packed inference checkpoints (``mdetr pack``) and the model bundled with the package."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdetr.builder import load
from mdetr.bundled import bundled_model_path, example_scenes
from mdetr.cli import main
from mdetr.engine.checkpoint import CheckpointError, sha256_file
from mdetr.inference.predictor import Predictor


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    from conftest import _tiny_overrides

    out = tmp_path_factory.mktemp("pack-run")
    config = out / "tiny.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    overrides = _tiny_overrides(shapes_dir, out / "run", "train.epochs=1", "model.decoder=smca",
                                "model.smca_reference=grid")
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    return out / "run" / "last"


@pytest.fixture(scope="module")
def packed(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "pack"
    card = out.parent / "card.json"
    card.write_text(json.dumps({"seed": 42}))
    assert main(["pack", str(trained), str(out), "--card", str(card)]) == 0
    return out


def test_pack_stores_only_what_training_changed(trained, packed):
    full = load_file(str(trained / "model.safetensors"))
    kept = load_file(str(packed / "model.safetensors"))
    doc = json.loads((packed / "state.json").read_text())
    assert doc["format"] == "mdetr-pack" and doc["card"] == {"seed": 42}
    # The frozen text encoder comes from its package, the trained transformer is stored (in float16).
    assert not any(".text_encoder." in k for k in kept)
    assert any(".text_encoder." in k for k in doc["from_pretrained"])
    assert "transformer.decoder.reference_anchor" in kept
    assert set(kept) | set(doc["from_pretrained"]) == set(full)
    assert all(v.dtype == torch.float16 for v in kept.values() if v.is_floating_point())
    for key, value in kept.items():
        torch.testing.assert_close(value.float(), full[key].float(), rtol=1e-3, atol=1e-4)


def test_packed_model_predicts_like_the_full_checkpoint(trained, packed, shapes_dir):
    image = sorted((shapes_dir / "images" / "val").glob("*.png"))[0]
    full = Predictor.from_checkpoint(trained).predict(image, "the red circle", threshold=0.0)
    small = Predictor.from_checkpoint(packed).predict(image, "the red circle", threshold=0.0)
    torch.testing.assert_close(small.boxes, full.boxes, rtol=0, atol=0.5)  # pixels; float16 weights
    torch.testing.assert_close(small.scores, full.scores, rtol=0, atol=5e-3)


def test_pack_missing_a_tensor_is_refused(packed, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(str(packed / "model.safetensors"))
    tensors.pop("transformer.decoder.reference_anchor")
    save_file(tensors, str(broken / "model.safetensors"))
    doc = json.loads((packed / "state.json").read_text())
    # a consistent, incomplete pack
    doc["files"] = {"model.safetensors": sha256_file(broken / "model.safetensors")}
    (broken / "state.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="missing keys.*reference_anchor"):
        load(broken)


def test_bundled_model_and_examples_ship_with_the_package():
    path = bundled_model_path("mdetr_lite_shapes")
    assert path is not None, "the bundled model is missing from mdetr/assets"
    assert (path / "model.safetensors").stat().st_size <= 30 * 2**20
    assert bundled_model_path("no_such_model") is None
    scenes = example_scenes()
    assert scenes and all(scene["image"].is_file() and scene["texts"] for scene in scenes)


def test_demo_grounds_every_example_with_the_bundled_model(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    assert len(records) == sum(len(scene["texts"]) for scene in example_scenes())
    for record in records:
        assert (tmp_path / "predictions" / record["picture"].rsplit("/", 1)[-1]).is_file()
        (box,) = [d["box_xyxy"] for d in record["detections"]]
        x0, y0, x1, y1 = box
        assert -1 <= x0 < x1 <= 257 and -1 <= y0 < y1 <= 257  # example scenes are 256 x 256


def test_bundled_model_grounds_unseen_colour_shape_pairs(tmp_path):
    """The shipped weights do their job: on freshly generated scenes whose colour-shape pairs never occur in
    training, the top box matches the described object far more often than chance (about 1 in 6)."""
    from torch.utils.data import DataLoader

    from mdetr.data.build import build_dataset
    from mdetr.data.collate import collate
    from mdetr.data.shapes import generate_shapes
    from mdetr.engine.evaluate import evaluate
    from mdetr.eval import RefExpEvaluator

    generate_shapes(tmp_path, seed=123, num_train=1, num_val=1, num_val_unseen=12)
    model = load("mdetr_lite_shapes")
    dataset = build_dataset(model.train_config.data, "val", model.tokenizer,
                            ann_file=tmp_path / "val_unseen.json", image_root=tmp_path / "images")
    evaluator = RefExpEvaluator(dataset.ground_truth, dataset_names=["shapes_refexp"])
    summary = evaluate(model, DataLoader(dataset, batch_size=8, collate_fn=collate), {"refexp": evaluator})
    assert summary["refexp"]["num_evaluated"] >= 20
    assert summary["refexp"]["overall"]["P@1"] >= 0.6
