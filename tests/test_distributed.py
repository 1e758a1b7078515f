"""Data-parallel training and gradient accumulation give the step of one process on the whole batch.

Two processes on the CPU (gloo) are started by ``torchrun``, which runs this file as a script
(:func:`_worker`). They compare against one process on the same four images. The images are picked so
that the two halves hold different numbers of boxes: normalising each half's losses by its own boxes
would then give another gradient, and the tests check that it does.

The steps use plain SGD: AdamW's first step moves every parameter by about ±lr whatever the gradient's
size, so it would hide a wrongly normalised loss. Clipping is off for the same reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdetr.builder import build, load
from mdetr.config import Config, ConfigError, load_config
from mdetr.data.build import build_dataset
from mdetr.data.collate import Batch, collate
from mdetr.engine.checkpoint import load_weights, model_state
from mdetr.engine.distributed import DistributedContext, init_distributed, shard_indices, shutdown
from mdetr.engine.train import (
    GroundingTask,
    accumulate_gradients,
    data_parallel,
    seed_everything,
    train,
)
from mdetr.losses.criterion import total_loss
from mdetr.models.compile import compile_submodules
from mdetr.ops.linear import onednn_linear_layers

LR = 0.5
# Largest allowed parameter difference, relative to the largest change of the same tensor in the step. What
# remains is float summation order (the batches pad their captions to different lengths); a wrongly
# normalised loss is off by tens of percent.
TOLERANCE = 1e-4
SINGLE = DistributedContext()


def _dataset(config: Config, tokenizer: object):
    """The training images with the (deterministic) evaluation transforms; all 128 x 128."""
    return build_dataset(config.data, "val", tokenizer, ann_file=config.data.train_ann,
                         image_root=config.data.train_images)


def _pick(dataset) -> list[int]:
    """Two entries with the most boxes, then two with the fewest."""
    counts = [len(dataset[i][1]["boxes"]) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lambda i: (-counts[i], i))
    picked = order[:2] + order[-2:]
    assert sum(counts[i] for i in picked[:2]) != sum(counts[i] for i in picked[2:]), counts
    return picked


def _batch(dataset, indices: list[int]) -> Batch:
    return collate([dataset[i] for i in indices])


def _sgd_step(forward_model, model, criterion, weights, micro_batches: list[Batch], ctx) -> None:
    """One SGD step of ``model`` (run through ``forward_model``, e.g. its DDP wrapper) on the micro-batches.

    In eval mode: the text features' resizer keeps its dropout in training mode, and dropout masks drawn on
    two ranks cannot match one process's. (Batch norm is frozen, so nothing else changes.)
    """
    model.eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    optimizer.zero_grad(set_to_none=True)
    assert accumulate_gradients(GroundingTask(), forward_model, criterion, weights, micro_batches, ctx=ctx)
    optimizer.step()


def _relative_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                          start: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor that the step changed: max |got - want| / max |want - start|."""
    assert got.keys() == want.keys()
    out = {}
    for key in want:
        change = float((want[key] - start[key]).abs().max()) if want[key].is_floating_point() else 0.0
        if change > 0:
            out[key] = float((got[key] - want[key]).abs().max()) / change
    assert out, "the step should change the parameters"
    return out


def _assert_same_parameters(got, want, start) -> None:
    differences = _relative_differences(got, want, start)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, (worst, differences[worst])


def _assert_other_parameters(got, want, start) -> None:
    assert max(_relative_differences(got, want, start).values()) > 100 * TOLERANCE


@pytest.fixture(scope="module")
def setup(shapes_dir, tmp_path_factory):
    """Tiny config, the initial weights on disk, the four images and the one-process step on all four."""
    from conftest import _tiny_overrides

    folder = tmp_path_factory.mktemp("distributed")
    config = load_config(None, _tiny_overrides(shapes_dir, folder / "run", "train.clip_max_norm=0",
                                               "data.batch_size=2", "train.epochs=1"))
    seed_everything(0)
    model, criterion, weights = build(config)
    onednn_linear_layers(model)  # as mdetr train (train.onednn_linear), in every model of this file
    start = model_state(model)
    save_file(start, str(folder / "init.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    dataset = _dataset(config, model.tokenizer)
    order = _pick(dataset)
    _sgd_step(model, model, criterion, weights, [_batch(dataset, order)], SINGLE)
    return {"folder": folder, "config": config, "start": start, "order": order, "dataset": dataset,
            "reference": model_state(model)}


def _fresh(setup):
    model, criterion, weights = build(setup["config"])
    onednn_linear_layers(model)
    model.load_state_dict(setup["start"])
    return model, criterion, weights


def test_accumulated_micro_batches_equal_one_batch(setup):
    """2 micro-batches of 2 with accumulation == one batch of 4, since every micro-batch's losses are
    divided by the boxes of both; dividing each by its own boxes (and averaging) is not the same."""
    dataset, order = setup["dataset"], setup["order"]
    halves = [_batch(dataset, order[:2]), _batch(dataset, order[2:])]
    model, criterion, weights = _fresh(setup)
    _sgd_step(model, model, criterion, weights, halves, SINGLE)
    _assert_same_parameters(model_state(model), setup["reference"], setup["start"])

    naive, criterion, weights = _fresh(setup)
    optimizer = torch.optim.SGD([p for p in naive.parameters() if p.requires_grad], lr=LR)
    naive.eval()
    for half in halves:  # each half normalised by its own boxes, the two averaged
        losses = criterion(GroundingTask().forward(naive, half), half.targets)
        (total_loss(losses, weights) / len(halves)).backward()
    optimizer.step()
    _assert_other_parameters(model_state(naive), setup["reference"], setup["start"])


def test_two_processes_equal_one_process(setup):
    """torchrun, 2 CPU processes (gloo): one step with 2 images each, plain and as 2 accumulated
    micro-batches of 1, gives the parameters of one process stepping on all 4; then a 1-epoch ``train``
    writes one log and checkpoint and scores every validation entry from the two ranks' predictions."""
    folder, config = setup["folder"], setup["config"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               "--nproc-per-node=2", __file__, "--folder", str(folder), "--order", json.dumps(setup["order"])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    for name in ("ddp", "ddp_accumulated"):
        for rank in (0, 1):
            _assert_same_parameters(load_file(str(folder / f"{name}_rank{rank}.safetensors")),
                                    setup["reference"], setup["start"])
    _assert_other_parameters(load_file(str(folder / "local_norm_rank0.safetensors")), setup["reference"],
                             setup["start"])

    run = Path(config.train.output_dir)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # Each rank gets half the entries in batches of 2; every step is logged once (by rank 0 alone).
    steps = -(-len(setup["dataset"]) // 2) // 2
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, steps + 1))
    (evaluation,) = [r for r in records if r["type"] == "eval"]
    model = load(run / "last")
    val_set = GroundingTask().dataset(config, "val", model)
    single = GroundingTask().evaluate(config, model, torch.utils.data.DataLoader(val_set, batch_size=2,
                                                                                 collate_fn=collate),
                                      val_set, device=torch.device("cpu"))
    gathered = evaluation["metrics"]
    assert gathered["refexp"]["num_evaluated"] == single["refexp"]["num_evaluated"] > 1
    assert gathered["refexp"]["overall"] == pytest.approx(single["refexp"]["overall"], abs=1e-6)
    assert gathered["box_ap"]["AP50"] == pytest.approx(single["box_ap"]["AP50"], abs=1e-6)


def test_shards_cover_every_entry_once():
    shards = [list(shard_indices(7, DistributedContext(rank=r, world_size=3))) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_incomplete_launcher_environment_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="LOCAL_RANK.*torchrun"):
        init_distributed("cpu")


def test_fp16_loss_scale_gives_the_unscaled_gradient(setup):
    """The grad scaler multiplies the loss by 2^16 and ``unscale_`` divides the gradients back."""
    batch = [_batch(setup["dataset"], setup["order"][:2])]
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        model, criterion, weights = _fresh(setup)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        model.eval()
        accumulate_gradients(GroundingTask(), model, criterion, weights, batch, ctx=SINGLE, scaler=scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-8)


def test_compile_keeps_state_dict_keys_and_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("backbone", torch.nn.Linear(4, 4))
    model.add_module("head", torch.nn.Linear(4, 2))
    keys, x = list(model.state_dict()), torch.randn(3, 4)
    expected = model(x)
    assert compile_submodules(model, backend="eager") == ["backbone"]
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("override, message", [
    ("train.accumulate_steps=0", "accumulate_steps"),
    ("train.dist_timeout_minutes=0", "dist_timeout_minutes"),
    ("train.amp=fp8", "'none', 'bf16' or 'fp16'"),
    ("data.persistent_workers=true", "num_workers"),
])
def test_invalid_speed_options_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _worker(argv: list[str]) -> None:
    """One torchrun process: the steps of :func:`test_two_processes_equal_one_process`, then ``train``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--order", type=json.loads, required=True)
    args = parser.parse_args(argv)
    ctx = init_distributed("cpu")
    config = Config.from_dict(json.loads((args.folder / "config.json").read_text()))
    model, criterion, weights = build(config)
    onednn_linear_layers(model)
    load_weights(model, args.folder / "init.safetensors")
    start = model_state(model)
    dataset = _dataset(config, model.tokenizer)
    mine = args.order[2 * ctx.rank: 2 * ctx.rank + 2]
    ddp = data_parallel(GroundingTask(), model, criterion, weights, [_batch(dataset, mine)], ctx, amp="none",
                        echo=print)
    for name, micro in (("ddp", [mine]), ("ddp_accumulated", [mine[:1], mine[1:]])):
        model.load_state_dict(start)
        _sgd_step(ddp, model, criterion, weights, [_batch(dataset, m) for m in micro], ctx)
        save_file(model_state(model), str(args.folder / f"{name}_rank{ctx.rank}.safetensors"))
    # Control: each rank normalising by its own boxes (DDP still averages the gradients).
    model.load_state_dict(start)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = _batch(dataset, mine)
    model.eval()
    total_loss(criterion(GroundingTask().forward(ddp, batch), batch.targets), weights).backward()
    optimizer.step()
    save_file(model_state(model), str(args.folder / f"local_norm_rank{ctx.rank}.safetensors"))
    train(config, progress=False)
    shutdown(ctx)


if __name__ == "__main__":
    _worker(sys.argv[1:])
