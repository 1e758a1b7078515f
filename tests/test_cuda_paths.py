"""Code that only runs with CUDA or NCCL, checked here without a GPU: torch's CUDA entry points are
replaced by stand-ins that record what they are given, and the ``meta`` device stands for a second device."""

from __future__ import annotations

import datetime

import pytest
import torch

from mdetr.engine import checkpoint, distributed
from mdetr.inference.detection import post_process_detection
from mdetr.inference.postprocess import post_process
from mdetr.models.detector import DetectionOutput
from mdetr.models.mdetr import MDETROutput


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a machine with two GPUs, the current one 0; calls are recorded in the dict."""
    calls: dict[str, list] = {"set_device": [], "set_rng_state": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(device))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls["set_rng_state"].append((device, state)))
    return calls


def test_one_cuda_process_gets_an_indexed_device(fake_cuda, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init_distributed("cuda")
    assert ctx.device == torch.device("cuda", 0) and not ctx.is_distributed
    assert fake_cuda["set_device"] == [torch.device("cuda", 0)]  # torch refuses "cuda" without an index
    assert distributed.init_distributed("cuda:1").device == torch.device("cuda", 1)


def test_torchrun_processes_take_their_local_gpu_and_the_timeout(fake_cuda, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    ctx = distributed.init_distributed("cuda", timeout_minutes=45)
    assert ctx.device == torch.device("cuda", 1) and (ctx.rank, ctx.world_size) == (3, 4)
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["timeout"] == datetime.timedelta(minutes=45)


def test_cuda_rng_states_of_a_bigger_node_restore_on_the_devices_present(fake_cuda):
    state = checkpoint.rng_state()
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # a node with 4 GPUs
    state["cuda"] = [s.tolist() for s in saved]
    checkpoint.set_rng_state(state)
    restored = fake_cuda["set_rng_state"]
    assert [device for device, _ in restored] == [0, 1]
    for (_, value), expected in zip(restored, saved, strict=False):
        assert torch.equal(value, expected)


def test_post_process_takes_sizes_from_another_device():
    """Predictors build the original image sizes on the CPU while the model's outputs sit on the GPU."""
    logits = torch.zeros(1, 3, 5, device="meta", requires_grad=True)
    boxes = torch.zeros(1, 3, 4, device="meta", requires_grad=True)
    outputs = MDETROutput(pred_logits=logits, pred_boxes=boxes, proj_queries=None, proj_tokens=None,
                          text_padding_mask=None)
    (result,) = post_process(outputs, torch.tensor([[480, 640]]))
    assert result["boxes"].device.type == "meta" and result["boxes"].shape == (3, 4)
    assert not result["boxes"].requires_grad and not result["scores"].requires_grad  # no graph recorded
    detection = DetectionOutput(pred_logits=torch.zeros(1, 3, 7, device="meta"), pred_boxes=boxes)
    (found,) = post_process_detection(detection, torch.tensor([[480, 640]]), top_k=5)
    assert found["boxes"].device.type == "meta" and found["boxes"].shape == (5, 4)
