import copy
import json

import pytest
import torch

from mdetr.builder import build, load
from mdetr.config import ConfigError, load_config
from mdetr.engine.checkpoint import CheckpointError, restore_training, save_checkpoint
from mdetr.engine.optim import build_optimizer
from mdetr.engine.train import train


def test_short_training_run_loss_falls(shapes_dir, tmp_path, tiny_overrides):
    config = load_config(None, tiny_overrides(shapes_dir, tmp_path / "run", "train.epochs=12",
                                              "train.eval_every=12"))
    result = train(config, progress=False, echo=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == result.steps and result.steps % 12 == 0  # log_every=1: one record per step
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and 0.0 <= evals[-1]["P@1"] <= 1.0
    assert (tmp_path / "run" / "last" / "model.safetensors").exists()
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert result.epochs_done == 12
    # Starting again in the same folder without --resume would clobber these checkpoints: refused.
    with pytest.raises(ConfigError, match="--resume"):
        train(config, progress=False, echo=lambda *_: None)


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(shapes_dir, tmp_path, tiny_overrides):
    base = tiny_overrides(shapes_dir, tmp_path / "full", "train.epochs=2", "train.eval_every=100",
                          "train.keep_every=1", "train.ema=true", "train.ema_decay=0.9")
    full = train(load_config(None, base), progress=False, echo=lambda *_: None)
    # Resume a second run from the first run's epoch-0 snapshot: it must end where the first ended.
    rest = tiny_overrides(shapes_dir, tmp_path / "resumed", "train.epochs=2", "train.eval_every=100",
                          "train.ema=true", "train.ema_decay=0.9")
    resumed = train(load_config(None, rest), resume=tmp_path / "full" / "epoch_0000", progress=False,
                    echo=lambda *_: None)
    assert resumed.steps == full.steps
    a = load(tmp_path / "full" / "last").state_dict()
    b = load(tmp_path / "resumed" / "last").state_dict()
    ema_a = load(tmp_path / "full" / "last", weights="ema").state_dict()
    ema_b = load(tmp_path / "resumed" / "last", weights="ema").state_dict()
    for key in ema_a:
        assert torch.allclose(ema_a[key], ema_b[key], atol=1e-6), key
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_checkpoint_restores_optimizer_and_rejects_mismatch(shapes_dir, tmp_path, tiny_overrides):
    config = load_config(None, tiny_overrides(shapes_dir, tmp_path))
    model, _, _ = build(config)
    optimizer = build_optimizer(model, config.train)
    model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool),
          ["a red circle"]).pred_boxes.sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ck", model=model, config=config.to_dict(), optimizer=optimizer,
                    state={"epoch": 0, "step": 1})
    model2, _, _ = build(config)
    optimizer2 = build_optimizer(model2, config.train)
    state = restore_training(tmp_path / "ck", model=model2, optimizer=optimizer2)
    assert state == {"epoch": 0, "step": 1}
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    s1, s2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])
    other = load_config(None, tiny_overrides(shapes_dir, tmp_path, "model.num_queries=3"))
    model3, _, _ = build(other)
    with pytest.raises(CheckpointError, match="query_embed.weight"):
        restore_training(tmp_path / "ck", model=model3)


def test_optimizer_runs_fused_and_matches_the_per_tensor_adamw(shapes_dir, tmp_path, tiny_overrides):
    """The fused AdamW update equals PyTorch's reference per-tensor loop (same groups, lrs, weight decay)
    up to float rounding, over a few steps with moving gradients."""
    config = load_config(None, tiny_overrides(shapes_dir, tmp_path / "run"))
    model, _, _ = build(config)
    reference_model, _, _ = build(config)
    reference_model.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, config.train)
    assert all(group["fused"] for group in optimizer.param_groups)
    groups = build_optimizer(reference_model, config.train).param_groups
    reference = torch.optim.AdamW([{**g, "fused": None, "foreach": False} for g in groups])
    assert [g["lr"] for g in reference.param_groups] == [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(0)
    trained = [(p, q) for p, q in zip(model.parameters(), reference_model.parameters(), strict=True)
               if p.requires_grad]
    initial = [p.detach().clone() for p, _ in trained]
    for _ in range(3):
        for p, q in trained:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    moved = max((p - p0).abs().max().item() for (p, _), p0 in zip(trained, initial, strict=True))
    assert moved > 1e-5  # the steps did move the weights, so agreeing is not trivial
    for p, q in trained:
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_channels_last_training_computes_the_same_run(shapes_dir, tmp_path, tiny_overrides):
    """train.channels_last feeds the backbone channels-last images: the same losses and weights as the
    default layout up to float rounding, with parameters (and so the fused optimizer's state) contiguous."""
    from mdetr.inference.optimize import channels_last_backbone

    runs = {}
    for layout in ("true", "false"):
        config = load_config(None, tiny_overrides(shapes_dir, tmp_path / layout, "train.epochs=1",
                                                  "train.eval_every=100", f"train.channels_last={layout}"))
        train(config, progress=False, echo=lambda *_: None)
        log = [json.loads(line) for line in (tmp_path / layout / "log.jsonl").read_text().splitlines()]
        runs[layout] = ([r["loss"] for r in log if r["type"] == "train"],
                        load(tmp_path / layout / "last").state_dict())
    (losses, weights), (reference_losses, reference_weights) = runs["true"], runs["false"]
    assert len(losses) > 2 and losses == pytest.approx(reference_losses, rel=1e-4)
    assert losses[0] != pytest.approx(losses[-1])  # it trained
    for key, value in reference_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5)
    # the layout the hook gives the backbone, with the weights left contiguous
    model, _, _ = build(config)
    assert channels_last_backbone(model, weights=False)
    seen = []
    body = model.backbone[0].body
    body.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the shapes recipes' autocast, where strides differ
        out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), ["a red circle"])
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert all(p.is_contiguous() for p in body.parameters())
    # gradients come back with their parameter's exact strides (1x1 convolutions' would not by themselves),
    # as DDP's buckets and the fused optimizer expect
    out.pred_boxes.float().sum().backward()
    trained = [p for p in model.parameters() if p.grad is not None]
    assert trained and all(p.grad.stride() == p.stride() for p in trained)
    assert any(p.dim() == 4 and p.shape[-2:] == (1, 1) for p in body.parameters() if p.grad is not None)
    assert model.input_proj.weight.grad.stride() == model.input_proj.weight.stride()  # fed by the backbone
    copy.deepcopy(model)  # as the EMA copies it
