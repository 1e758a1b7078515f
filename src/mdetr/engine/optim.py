"""Optimizer, learning-rate schedules and the exponential moving average of weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mdetr.config import TrainConfig
from mdetr.models.mdetr import parameter_groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the three learning-rate groups. PyTorch's fused kernel runs the update where every
    parameter allows it: the same update up to float rounding, several times faster than the per-tensor
    loop (the optimizer step is about an eighth of a ResNet-101 training step on a CPU; BENCHMARKS.md)."""
    groups = parameter_groups(model, lr=config.lr, lr_backbone=config.lr_backbone,
                              lr_text_encoder=config.lr_text_encoder)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def lr_factor(group_name: str, *, schedule: str, epoch: int, step: int, total_steps: int, lr_drop: int,
              warmup_fraction: float) -> float:
    """Multiplier of a group's initial learning rate at a given (epoch, global step).

    "step": x0.1 from epoch ``lr_drop`` on. "linear_with_warmup" (official default): the text encoder warms up
    linearly over the first ``warmup_fraction`` of steps then decays linearly to 0; the other groups follow
    "step". "all_linear_with_warmup": every group warms up and decays linearly.
    """
    step_factor = 0.1 ** (epoch // lr_drop) if lr_drop > 0 else 1.0
    linear = schedule == "all_linear_with_warmup" or (
        schedule == "linear_with_warmup" and group_name == "text_encoder"
    )
    if not linear:
        return step_factor
    warmup = round(warmup_fraction * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, *, epoch: int, step: int,
                         total_steps: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(
            group.get("name", "main"), schedule=config.schedule, epoch=epoch, step=step,
            total_steps=total_steps, lr_drop=config.lr_drop, warmup_fraction=config.warmup_fraction,
        )


class ModelEMA:
    """ema = decay * ema + (1 - decay) * weights, over the whole state dict (buffers included), every step."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(self.decay).add_(current[name].detach(), alpha=1 - self.decay)
            else:
                value.copy_(current[name])
