"""Crash-safe checkpoints: atomic, hashed, and a run killed with SIGKILL resumes bit for bit.

The end-to-end test kills ``mdetr train`` twice, once inside a checkpoint save (the MDETR_TEST_KILL_AT
hook of mdetr.engine.checkpoint) and once in the middle of an epoch (SIGKILL sent from here), resumes
with ``--resume`` each time, and compares the final checkpoint with an uninterrupted run of the same seed:
weights, EMA, optimizer state, learning rates, schedule position and RNG states must be identical.
A run killed mid-epoch resumes from the last end-of-epoch checkpoint and repeats that epoch's batches in
the same order with the same random draws.
"""

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mdetr.config import load_config
from mdetr.engine.checkpoint import (
    EMA_FILE,
    KILL_AT_ENV,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    load_weights,
    restore_training,
    save_checkpoint,
    sha256_file,
)
from mdetr.engine.train import train


def _small(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(path, seed=0):
    model, optimizer = _small(seed)
    save_checkpoint(path, model=model, config={"seed": seed}, optimizer=optimizer, ema=model,
                    state={"epoch": seed, "step": seed})
    return model


# ----------------------------------------------------------------------------------------------------------
# Integrity


def test_checkpoint_records_a_hash_per_tensor_file(tmp_path):
    _save(tmp_path / "ck")
    doc = json.loads((tmp_path / "ck" / STATE_FILE).read_text())
    assert set(doc["files"]) == {MODEL_FILE, EMA_FILE, OPTIMIZER_FILE}
    for name, digest in doc["files"].items():
        assert digest == sha256_file(tmp_path / "ck" / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no .tmp or .old left behind


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
@pytest.mark.parametrize("name", [MODEL_FILE, OPTIMIZER_FILE, EMA_FILE])
def test_damaged_tensor_file_is_refused_naming_it(tmp_path, name, damage):
    _save(tmp_path / "ck", seed=0)
    file = tmp_path / "ck" / name
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of the last tensor value: safetensors alone would not notice
        file.write_bytes(bytes(data))
    elif damage == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        file.unlink()
    target, optimizer = _small(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        restore_training(tmp_path / "ck", model=target, optimizer=optimizer, ema=_small(seed=2)[0])
    assert str(file) in str(err.value)
    assert ("missing" if damage == "missing" else "corrupt") in str(err.value)
    # Every file is checked before anything is loaded: the model is untouched.
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_corrupt_state_file_is_refused(tmp_path):
    _save(tmp_path / "ck")
    state = tmp_path / "ck" / STATE_FILE
    state.write_text(state.read_text()[:100])
    with pytest.raises(CheckpointError, match=f"{state}.* corrupt"):
        restore_training(tmp_path / "ck", model=_small()[0])
    with pytest.raises(CheckpointError, match="is not an mdetr checkpoint folder"):
        restore_training(tmp_path / "absent", model=_small()[0])


def test_load_weights_checks_the_hash_too(tmp_path):
    _save(tmp_path / "ck")
    file = tmp_path / "ck" / MODEL_FILE
    load_weights(_small(seed=3)[0], file)  # intact: loads
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x80
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_weights(_small(seed=3)[0], file)


# ----------------------------------------------------------------------------------------------------------
# Interrupted saves


def _save_in_child(path, seed, kill_at):
    os.environ[KILL_AT_ENV] = kill_at
    _save(path, seed)


def _killed_save(path, seed, kill_at):
    """Run a save in a forked process that SIGKILLs itself at ``kill_at``; returns its exit code."""
    process = multiprocessing.get_context("fork").Process(target=_save_in_child, args=(path, seed, kill_at))
    process.start()
    process.join(60)
    return process.exitcode


@pytest.mark.parametrize("kill_at", ["save", "swap"])
def test_a_save_killed_midway_keeps_the_previous_checkpoint(tmp_path, kill_at):
    path = tmp_path / "last"
    first = _save(path, seed=0)
    assert _killed_save(path, 1, kill_at) == -signal.SIGKILL
    assert (tmp_path / "last.tmp" / STATE_FILE).is_file()  # the new one was complete, never renamed in
    if kill_at == "swap":  # killed between the two renames: the previous one waits in last.old
        assert not path.exists() and (tmp_path / "last.old" / STATE_FILE).is_file()
    restored = _small(seed=5)[0]
    with pytest.warns(UserWarning, match="interrupted") if kill_at == "swap" else contextlib.nullcontext():
        state = restore_training(path, model=restored)
    assert state == {"epoch": 0, "step": 0}
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in first.state_dict().items())
    # The next save completes and clears what the interrupted one left.
    _save(path, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert restore_training(path, model=_small()[0]) == {"epoch": 2, "step": 2}


# ----------------------------------------------------------------------------------------------------------
# SIGKILL during training, resume, compare with an uninterrupted run


def _subset(shapes_dir, folder, entries=12):
    """The first ``entries`` captions of the shapes training set: 3 batches of 4 per epoch."""
    data = json.loads((shapes_dir / "train.json").read_text())
    images = data["images"][:entries]
    ids = {e["id"] for e in images}
    path = folder / "train12.json"
    path.write_text(json.dumps({**data, "images": images,
                                "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    return path


def _tiny_crash_overrides(train_ann, images, output_dir):
    """One layer, width 32, 32-pixel images, randomly initialised backbone and text encoder (nothing
    pretrained to read), dropout on so that resuming must restore the RNG streams, EMA on, one thread so
    that sums are reduced in the same order in every process."""
    return [
        "model.arch=mdetr_lite", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=1", "model.dim_feedforward=64", "model.num_queries=4", "model.dropout=0.1",
        "model.backbone_pretrained=false", "model.text_encoder_pretrained=false",
        "model.freeze_text_encoder=true",
        f"data.train_ann={train_ann}", f"data.train_images={images}",
        "data.scales=[32,40]", "data.crop_scales=[40]", "data.crop_min=24", "data.crop_max=40",
        "data.max_size=48", "data.batch_size=4",
        "train.epochs=3", "train.ema=true", "train.ema_decay=0.9", "train.threads=1", "train.log_every=1",
        "train.lr=5e-4", "train.seed=7", f"train.output_dir={output_dir}",
    ]


def _mdetr_train(overrides, *, resume=None, kill_at=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    command = [sys.executable, "-m", "mdetr.cli", "train", "--no-progress", "--config", os.devnull]
    if resume:
        command += ["--resume", str(resume)]
    return subprocess.Popen(command + overrides, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_when_logged(process, log, *, epoch, after_line, timeout=240):
    """SIGKILL ``process`` as soon as ``log`` shows, past its first ``after_line`` lines, a training step
    of ``epoch`` (mid-epoch: the epoch has more steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        lines = log.read_text().splitlines()[after_line:]
        records = [json.loads(line) for line in lines if line.endswith("}")]  # the last may be half-written
        if any(r["type"] == "train" and r["epoch"] == epoch for r in records):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    output = process.communicate(timeout=timeout)[0].decode()
    return process.returncode, output


def _checkpoint(folder):
    doc = json.loads((folder / STATE_FILE).read_text())
    tensors = {name: load_file(str(folder / name)) for name in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE)}
    return doc, tensors


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_sigkill_mid_save_and_mid_epoch_then_resume_equals_uninterrupted(shapes_dir, tmp_path, one_thread):
    crashed = tmp_path / "crashed"
    data = (_subset(shapes_dir, tmp_path), shapes_dir / "images")
    # 1. Killed inside the epoch-1 save of last/, after the new folder was written, before the rename.
    process = _mdetr_train(_tiny_crash_overrides(*data, crashed), kill_at="save")
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == -signal.SIGKILL, output
    assert json.loads((crashed / "last" / STATE_FILE).read_text())["state"]["epoch"] == 0
    assert (crashed / "last.tmp").exists()
    minutes_at_crash = json.loads((crashed / "last" / STATE_FILE).read_text())["state"]["minutes"]
    # 2. Resumed, then killed after the first step of epoch 1.
    logged = len((crashed / "log.jsonl").read_text().splitlines())
    process = _mdetr_train(_tiny_crash_overrides(*data, crashed), resume=crashed / "last")
    code, output = _kill_when_logged(process, crashed / "log.jsonl", epoch=1, after_line=logged)
    assert code == -signal.SIGKILL, output
    assert "resumed from" in output and "at epoch 1, step 3" in output
    assert json.loads((crashed / "last" / STATE_FILE).read_text())["state"]["epoch"] == 0
    # 3. Resumed again (in this process), to the end.
    config = load_config(None, _tiny_crash_overrides(*data, crashed))
    train(config, resume=crashed / "last", progress=False, echo=lambda *_: None)

    reference = tmp_path / "reference"
    config = load_config(None, _tiny_crash_overrides(*data, reference))
    train(config, progress=False, echo=lambda *_: None)

    (doc_a, tensors_a), (doc_b, tensors_b) = _checkpoint(reference / "last"), _checkpoint(crashed / "last")
    for name in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE):  # weights, EMA weights, Adam moments and steps
        assert tensors_a[name].keys() == tensors_b[name].keys()
        for key, value in tensors_a[name].items():
            assert torch.equal(value, tensors_b[name][key]), (name, key)
    # Training minutes (the time budget's clock) run on across resumes; everything else is identical.
    minutes_a, minutes_b = doc_a["state"].pop("minutes"), doc_b["state"].pop("minutes")
    assert minutes_a > 0 and minutes_b > minutes_at_crash > 0
    assert doc_a["state"] == doc_b["state"] == {"epoch": 2, "step": 9, "best": -float("inf")}
    assert doc_a["optimizer"] == doc_b["optimizer"]  # learning rates (schedule position) and hyper-parameters
    assert doc_a["rng"] == doc_b["rng"]  # Python, NumPy and torch generators
    assert doc_a["files"] == doc_b["files"]  # byte-identical tensor files
    assert sorted(p.name for p in crashed.iterdir() if p.is_dir()) == ["last"]
