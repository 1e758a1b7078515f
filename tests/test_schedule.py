"""Learning-rate schedules: hand-computed factors, and the time-budget clock."""

from __future__ import annotations

import pytest

from mdetr.config import ConfigError, TrainConfig
from mdetr.engine.optim import lr_factor
from mdetr.engine.train import _schedule_position


def factor(group: str, schedule: str, *, epoch: int, step: int, total: int = 100, lr_drop: int = 2,
           warmup: float = 0.1) -> float:
    return lr_factor(group, schedule=schedule, epoch=epoch, step=step, total_steps=total, lr_drop=lr_drop,
                     warmup_fraction=warmup)


def test_step_schedule_drops_tenfold_every_lr_drop_epochs() -> None:
    assert [factor("main", "step", epoch=e, step=0) for e in range(5)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )


def test_linear_with_warmup_applies_to_the_text_encoder_only() -> None:
    # 100 steps, 10 of warm-up: 5/10 at step 5; then (100 - 55) / (100 - 10) at step 55.
    assert factor("text_encoder", "linear_with_warmup", epoch=0, step=5) == pytest.approx(0.5)
    assert factor("text_encoder", "linear_with_warmup", epoch=3, step=55) == pytest.approx(45 / 90)
    assert factor("main", "linear_with_warmup", epoch=3, step=55) == pytest.approx(0.1)  # step schedule
    assert factor("main", "all_linear_with_warmup", epoch=3, step=55) == pytest.approx(45 / 90)
    assert factor("backbone", "all_linear_with_warmup", epoch=4, step=100) == 0.0


def test_steps_clock_leaves_the_position_alone() -> None:
    tc = TrainConfig(epochs=4, max_minutes=10.0)
    assert _schedule_position(tc, epoch=1, step=150, total_steps=400, minutes=9.0) == {
        "epoch": 1, "step": 150, "total_steps": 400}


def test_minutes_clock_follows_the_spent_budget_when_it_is_further_along() -> None:
    tc = TrainConfig(epochs=4, max_minutes=10.0, schedule_clock="minutes")
    # Half the budget spent after 30 of 400 steps: the schedule stands at step 200, i.e. epoch 2.
    assert _schedule_position(tc, epoch=0, step=30, total_steps=400, minutes=5.0) == {
        "epoch": 2, "step": 200, "total_steps": 400}
    # Steps ahead of the clock: the steps count.
    assert _schedule_position(tc, epoch=3, step=390, total_steps=400, minutes=1.0) == {
        "epoch": 3, "step": 390, "total_steps": 400}
    # Past the budget the position stops at the end.
    assert _schedule_position(tc, epoch=0, step=10, total_steps=400, minutes=12.0)["step"] == 400
    # So a linear schedule reaches zero when the budget is spent, however few steps were taken.
    end = _schedule_position(tc, epoch=0, step=10, total_steps=400, minutes=10.0)
    assert lr_factor("main", schedule="all_linear_with_warmup", lr_drop=100, warmup_fraction=0.01,
                     **end) == 0.0


def test_minutes_clock_needs_a_budget() -> None:
    with pytest.raises(ConfigError, match="max_minutes"):
        TrainConfig(schedule_clock="minutes").validate()
    with pytest.raises(ConfigError, match="schedule_clock"):
        TrainConfig(schedule_clock="hours", max_minutes=1.0).validate()
