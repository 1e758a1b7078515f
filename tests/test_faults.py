"""Numerical faults and bad data during training.

- A batch whose loss or gradient is NaN/Inf is skipped (no optimizer update, no EMA update) and counted in
  log.jsonl; ``train.max_nonfinite_in_a_row`` of them in a row stop the run with the batches' image ids.
- A checkpoint holding NaN or Inf is never written.
- ``data.on_error=skip`` leaves out missing/corrupt images, spans outside the caption, captions over the
  token limit, degenerate and out-of-image boxes and duplicate ids, and lists them in skipped.json;
  ``data.on_error=fail`` stops with a message naming the file and the entry.
"""

import json
import shutil
import warnings

import pytest
import torch
from torch import nn

import mdetr.engine.train as train_module
from mdetr.cli import main as cli_main
from mdetr.config import ConfigError, load_config
from mdetr.engine.checkpoint import MODEL_FILE, CheckpointError, save_checkpoint, sha256_file
from mdetr.engine.faults import NonFiniteLossError
from mdetr.engine.train import GroundingTask, train


def _tiny(shapes_dir, output_dir, *extra, train_ann=None, images=None):
    """A one-layer, 32-wide mdetr_lite with randomly initialised parts (nothing pretrained to load)."""
    return load_config(None, [
        "model.arch=mdetr_lite", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=1", "model.dim_feedforward=64", "model.num_queries=4", "model.dropout=0.0",
        "model.backbone_pretrained=false", "model.text_encoder_pretrained=false",
        "model.freeze_text_encoder=true",
        f"data.train_ann={train_ann or shapes_dir / 'train.json'}",
        f"data.train_images={images or shapes_dir / 'images'}",
        "data.scales=[64]", "data.crop_scales=[64]", "data.crop_min=48", "data.crop_max=64",
        "data.max_size=80", "data.batch_size=4", "train.epochs=1", "train.log_every=1",
        f"train.output_dir={output_dir}", *extra,
    ])


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _PoisonedTask(GroundingTask):
    """The grounding task whose criterion makes the loss (or only its gradient) NaN on chosen batches."""

    def __init__(self, poison):
        self.poison = poison  # batch number -> "loss" | "gradient"
        self.batch_ids = []

    def build(self, config):
        model, criterion, weights = super().build(config)
        return model, _PoisonedCriterion(criterion, self), weights

    def forward(self, model, batch):
        self.batch_ids.append([t["image_id"] for t in batch.targets])
        return super().forward(model, batch)


class _PoisonedCriterion(nn.Module):
    def __init__(self, criterion, task):
        super().__init__()
        self.criterion, self.task = criterion, task

    def forward(self, outputs, targets, **kwargs):
        losses = self.criterion(outputs, targets, **kwargs)
        what = self.task.poison.get(len(self.task.batch_ids) - 1)
        if what == "loss":
            losses["loss_bbox"] = losses["loss_bbox"] * float("inf")
        elif what == "gradient":
            losses["loss_bbox"] = _NanGradient.apply(losses["loss_bbox"])
        return losses


@pytest.fixture
def poisoned(monkeypatch):
    """Install a :class:`_PoisonedTask` and count optimizer updates; returns a setter."""
    state = {"updates": 0}
    build_optimizer = train_module.build_optimizer

    def counting_optimizer(model, config):
        optimizer = build_optimizer(model, config)
        step = optimizer.step

        def counted(*args, **kwargs):
            state["updates"] += 1
            return step(*args, **kwargs)

        optimizer.step = counted
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", counting_optimizer)

    def install(poison):
        state["task"] = _PoisonedTask(poison)
        monkeypatch.setattr(train_module, "training_task", lambda config: state["task"])
        return state

    return install


def _log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_nonfinite_batches_are_skipped_and_counted(shapes_dir, tmp_path, poisoned):
    state = poisoned({1: "loss", 2: "gradient", 4: "loss"})
    echoed = []
    config = _tiny(shapes_dir, tmp_path / "run", "train.max_nonfinite_in_a_row=3", "train.ema=true")
    result = train(config, progress=False, echo=echoed.append)
    batches = state["task"].batch_ids
    assert result.steps == len(batches) == 5  # 23 entries, batches of 4
    assert state["updates"] == 2  # batches 0 and 3 only
    records = _log(tmp_path / "run")
    skipped = [r for r in records if r["type"] == "nonfinite"]
    assert [(r["step"], r["what"], r["image_ids"]) for r in skipped] == [
        (1, "loss", batches[1]), (2, "gradient", batches[2]), (4, "loss", batches[4])]
    assert [r["in_a_row"] for r in skipped] == [1, 2, 1]
    assert skipped[0]["loss"] == "inf" and skipped[1]["grad_norm"] == "nan"
    assert [r["nonfinite_skipped"] for r in records if r["type"] == "train"] == [0, 2]
    assert next(r for r in records if r["type"] == "faults")["nonfinite_steps_skipped"] == 3
    assert any("skipped 3 step(s) with a non-finite loss or gradient" in line for line in echoed)
    assert (tmp_path / "run" / "last" / MODEL_FILE).is_file()


def test_too_many_nonfinite_batches_in_a_row_stop_the_run(shapes_dir, tmp_path, poisoned, capsys):
    state = poisoned(dict.fromkeys(range(10), "loss"))
    config = _tiny(shapes_dir, tmp_path / "run", "train.max_nonfinite_in_a_row=3")
    with pytest.raises(NonFiniteLossError) as err:
        train(config, progress=False, echo=lambda *_: None)
    batches = state["task"].batch_ids
    assert len(batches) == 3 and state["updates"] == 0
    message = str(err.value)
    assert "3 batches in a row" in message and f"step 2, image ids {batches[2]}" in message
    assert all(str(ids) in message for ids in batches)
    assert not (tmp_path / "run" / "last").exists()  # nothing was saved
    # Through the command line: one error line, exit status 2.
    state = poisoned(dict.fromkeys(range(10), "gradient"))
    preset = _write_preset(tmp_path, shapes_dir)
    assert cli_main(["train", "--config", str(preset), "--no-progress",
                     f"train.output_dir={tmp_path / 'cli'}", "train.max_nonfinite_in_a_row=2"]) == 2
    assert "error: stopping: 2 batches in a row" in capsys.readouterr().err


def _write_preset(tmp_path, shapes_dir):
    config = _tiny(shapes_dir, tmp_path / "unused").to_dict()
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_max_nonfinite_must_be_positive(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="max_nonfinite_in_a_row"):
        _tiny(shapes_dir, tmp_path, "train.max_nonfinite_in_a_row=0")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_checkpoint_with_nonfinite_tensors_is_never_written(tmp_path, bad):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_checkpoint(tmp_path / "last", model=model, config={}, state={"epoch": 0})
    good = sha256_file(tmp_path / "last" / MODEL_FILE)
    with torch.no_grad():
        model[1].weight[0, 1] = bad
    with pytest.raises(CheckpointError, match=r"refusing to write .*last.*NaN or Inf.*model: 1\.weight"):
        save_checkpoint(tmp_path / "last", model=model, config={}, state={"epoch": 1})
    ema = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        ema[0].bias[2] = bad
    with pytest.raises(CheckpointError, match=r"ema: 0\.bias"):
        save_checkpoint(tmp_path / "last", model=ema, config={}, ema=ema)
    # The previous checkpoint is untouched and nothing half-written is left.
    assert sha256_file(tmp_path / "last" / MODEL_FILE) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        save_checkpoint(tmp_path / "new", model=model, config={})
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.tmp").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad data


def _bad_data(shapes_dir, tmp_path):
    """Four good shapes entries plus one of each kind of fault; six entries survive the file checks."""
    data = json.loads((shapes_dir / "train.json").read_text())
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "images", images)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    good = data["images"][:4]
    ids = {e["id"] for e in good}
    annotations = [a for a in data["annotations"] if a["image_id"] in ids]
    first, box = good[0], annotations[0]

    def annotation(id_, image_id, **changes):
        return {**box, "id": id_, "image_id": image_id, **changes}

    entries = [*good,
               {**first, "id": 900, "file_name": "gone.png"},  # missing image
               {**first, "id": 901, "file_name": "corrupt.png"},  # corrupt image
               {**first, "id": 902, "caption": "word " * 300},  # caption over the token limit
               {**first, "id": first["id"], "caption": "a duplicate id"}]  # duplicate image id
    annotations += [annotation(9000, 900), annotation(9001, 901), annotation(9002, 902),
                    annotation(9003, first["id"], tokens_positive=[[3, 400]]),  # span outside the caption
                    annotation(9004, first["id"], bbox=[10, 10, 0, 5]),  # degenerate box
                    annotation(9005, first["id"], bbox=[500, 500, 10, 10]),  # outside the 128x128 image
                    annotation(9005, good[1]["id"])]  # duplicate annotation id
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps({**data, "images": entries, "annotations": annotations}))
    return ann, images


EXPECTED_SKIPS = [
    ("image id 900", "the image file does not exist"),
    ("image id 901", "the image cannot be read"),
    ("image id 902", "the caption has 302 tokens (special tokens included), more than the 255"),
    ("image id 1", "the image id is used by an earlier image entry too"),
    ("annotation id 9003 (image id 1)", "span [3, 400) lies outside the caption"),
    ("annotation id 9004 (image id 1)", "zero or negative size"),
    ("annotation id 9005 (image id 1)", "lies outside the 128x128 image"),
    ("annotation id 9005 (image id 2)", "the annotation id is used by an earlier annotation too"),
]


def test_skip_policy_reports_what_was_left_out(shapes_dir, tmp_path):
    ann, images = _bad_data(shapes_dir, tmp_path)
    echoed = []
    # batch 2 over 6 surviving entries: every one is loaded; one worker: the report crosses processes
    config = _tiny(shapes_dir, tmp_path / "run", "data.on_error=skip", "data.batch_size=2",
                   "data.num_workers=1", train_ann=ann, images=images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dataset warns once per skipped sample
        result = train(config, progress=False, echo=echoed.append)
    assert result.steps == 3
    report = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert report["policy"] == "skip" and report["count"] == len(report["skipped"])
    listed = [(item["entry"], item["message"]) for item in report["skipped"]]
    for entry, phrase in EXPECTED_SKIPS:
        assert any(e == entry and phrase in m for e, m in listed), (entry, phrase, listed)
    assert len(listed) == len(EXPECTED_SKIPS)
    files = {item["entry"]: item["file"] for item in report["skipped"]}
    assert files["image id 900"] == str(images / "gone.png")
    assert files["image id 901"] == str(images / "corrupt.png")
    assert files["image id 902"] == str(ann)
    assert all(item["split"] == "train" and item["times"] == 1 for item in report["skipped"])
    faults = next(r for r in _log(tmp_path / "run") if r["type"] == "faults")
    assert faults["skipped_data"] == len(EXPECTED_SKIPS)
    assert any(line.startswith(f"data: skipped {len(EXPECTED_SKIPS)} entries") for line in echoed)


def test_fail_policy_names_file_and_entry(shapes_dir, tmp_path, capsys):
    ann, images = _bad_data(shapes_dir, tmp_path)
    preset = _write_preset(tmp_path, shapes_dir)
    assert cli_main(["train", "--config", str(preset), "--no-progress", f"data.train_ann={ann}",
                     f"data.train_images={images}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {ann}, image id 1: the image id is used by an earlier image entry too")
