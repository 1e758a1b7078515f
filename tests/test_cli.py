"""The command line end to end on a tiny shapes set: train, evaluate, predict, data tools, bad input."""

import json

import pytest
import torch

from mdetr.cli import main


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    """A tiny model trained for two epochs through ``mdetr train`` (module-scoped: reused below)."""
    from conftest import _tiny_overrides

    out = tmp_path_factory.mktemp("cli-run")
    config = out / "tiny.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    args = ["train", "--config", str(config), "--no-progress",
            *_tiny_overrides(shapes_dir, out / "run", "train.epochs=2")]
    assert main(args) == 0
    return out / "run"


def test_train_writes_checkpoints_and_log(trained):
    assert (trained / "best" / "model.safetensors").exists()
    assert (trained / "last" / "optimizer.safetensors").exists()
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {r["type"] for r in records}


def test_evaluate_prints_paper_layout_and_writes_json(trained, shapes_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    code = main(["evaluate", str(trained / "last"), "--ann", str(shapes_dir / "val.json"), "--images",
                 str(shapes_dir / "images"), "--refexp-datasets", "shapes_refexp", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "GIoU >= 0.5" in printed and "P@1" in printed and "AP50" in printed
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["refexp"]["overall"]["P@1"] <= metrics["refexp"]["overall"]["P@5"] <= 1


def test_evaluate_under_bf16_autocast_stays_close_to_float32(trained, shapes_dir, tmp_path):
    scores = {}
    for amp in ("none", "bf16"):
        out = tmp_path / f"{amp}.json"
        assert main(["evaluate", str(trained / "last"), "--ann", str(shapes_dir / "val.json"), "--images",
                     str(shapes_dir / "images"), "--refexp-datasets", "shapes_refexp", "--amp", amp,
                     "--output", str(out)]) == 0
        metrics = json.loads(out.read_text())
        scores[amp] = (metrics["refexp"]["overall"]["P@5"], metrics["box_ap"]["AP50"])
    # bf16 keeps 8 bits of mantissa: the rankings and boxes move a little, the scores barely.
    for fp32, bf16 in zip(scores["none"], scores["bf16"], strict=True):
        assert abs(fp32 - bf16) <= 0.1, scores


def test_evaluate_on_the_inference_copy_gives_the_models_metrics(trained, shapes_dir, tmp_path):
    metrics = {}
    for flag in ([], ["--optimize"]):
        out = tmp_path / f"metrics{len(flag)}.json"
        assert main(["evaluate", str(trained / "last"), "--ann", str(shapes_dir / "val.json"), "--images",
                     str(shapes_dir / "images"), "--refexp-datasets", "shapes_refexp", *flag,
                     "--output", str(out)]) == 0
        metrics[bool(flag)] = json.loads(out.read_text())
    # folded norms, channels-last convolutions and oneDNN's linear layers change float rounding only
    for name in ("P@1", "P@5", "P@10"):
        assert metrics[True]["refexp"]["overall"][name] == pytest.approx(
            metrics[False]["refexp"]["overall"][name], abs=0.02)
    assert metrics[True]["box_ap"]["AP50"] == pytest.approx(metrics[False]["box_ap"]["AP50"], abs=0.01)


def test_predict_writes_json_and_picture(trained, shapes_dir, tmp_path):
    image = sorted((shapes_dir / "images" / "val").glob("*.png"))[0]
    code = main(["predict", str(trained / "last"), "--image", str(image), "--text", "the red circle",
                 "--threshold", "0", "--top-k", "2", "--output-dir", str(tmp_path)])
    assert code == 0
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert len(records) == 1 and len(records[0]["detections"]) == 2
    from PIL import Image

    with Image.open(records[0]["picture"]) as picture:
        assert picture.width == 128


def test_predictor_api(trained, shapes_dir):
    import mdetr

    predictor = mdetr.Predictor.from_checkpoint(trained / "last")
    image = sorted((shapes_dir / "images" / "val").glob("*.png"))[0]
    caption = "the small red circle left of the blue square"
    grounding = predictor.predict(image, caption, threshold=0.0, top_k=3)
    assert grounding.boxes.shape == (3, 4) and grounding.scores.shape == (3,)
    assert (grounding.scores[:-1] >= grounding.scores[1:]).all()  # best first
    assert (grounding.boxes >= -1).all() and (grounding.boxes <= 129).all()  # pixels of a 128 px image
    for phrase, spans in zip(grounding.phrases, grounding.spans, strict=True):
        assert phrase == " ".join(caption[s:e] for s, e in spans) and phrase in caption or " " in phrase
    # The batch path gives the same answer as one call per image.
    batch = predictor.predict_batch([image, image], [caption, "a green star"], threshold=0.0, top_k=3)
    assert torch.allclose(batch[0].boxes, grounding.boxes, atol=1e-3)
    assert predictor.predict(image, caption, threshold=1.0).boxes.shape == (0, 4)


def test_data_shapes_and_validate(tmp_path, capsys):
    assert main(["data", "shapes", str(tmp_path / "s"), "--num-train", "2", "--num-val", "1",
                 "--num-val-unseen", "1", "--image-size", "96"]) == 0
    ann = tmp_path / "s" / "train.json"
    assert main(["data", "validate", str(ann), "--images", str(tmp_path / "s" / "images")]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    data = json.loads(ann.read_text())
    data["annotations"][0]["tokens_positive"] = [[0, 999]]
    data["annotations"][1]["bbox"] = [5, 5, 0, 10]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["data", "validate", str(bad), "--images", str(tmp_path / "s" / "images")]) == 1
    out = capsys.readouterr().out
    assert (f"annotation id {data['annotations'][0]['id']}" in out
            and f"annotation id {data['annotations'][1]['id']}" in out)
    assert "2 problem(s)" in out


def test_bad_input_gets_one_clear_message(shapes_dir, tmp_path, capsys):
    from conftest import _tiny_overrides

    data = json.loads((shapes_dir / "train.json").read_text())
    data["images"][0]["file_name"] = "train/missing.png"
    bad = tmp_path / "missing.json"
    bad.write_text(json.dumps(data))
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  arch: mdetr_lite\n")
    overrides = _tiny_overrides(shapes_dir, tmp_path / "run", "train.epochs=1", f"data.train_ann={bad}")
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "missing.png" in err and f"image id {data['images'][0]['id']}" in err
    assert "Traceback" not in err
    assert main(["train", "--config", str(config), "train.epochz=1"]) == 2
    assert "epochz" in capsys.readouterr().err
