"""The training loop: one place for optimisation, evaluation, logging and checkpoints."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mdetr.config import Config, ConfigError
from mdetr.data.collate import collate
from mdetr.data.build import build_dataset
from mdetr.data.modulated import ModulatedDetection
from mdetr.engine.checkpoint import restore_training, save_checkpoint
from mdetr.engine.evaluate import evaluate
from mdetr.engine.optim import ModelEMA, adjust_learning_rate, build_optimizer
from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator
from mdetr.losses.criterion import total_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the batch's image ids."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_evaluators(config: Config, dataset: ModulatedDetection) -> dict[str, object]:
    names = list(config.data.refexp_datasets)
    evaluators: dict[str, object] = {"box_ap": CocoBoxEvaluator(dataset.ground_truth)}
    if names:
        evaluators["refexp"] = RefExpEvaluator(dataset.ground_truth, dataset_names=names)
    return evaluators


def headline_metric(summaries: dict[str, Any]) -> tuple[str, float]:
    """The number that selects the best checkpoint: precision@1 when there are referring expressions,
    class-agnostic AP@50 otherwise (as the official code)."""
    if "refexp" in summaries:
        return "P@1", float(summaries["refexp"]["overall"]["P@1"])
    return "AP50", float(summaries["box_ap"]["AP50"])


@dataclass
class TrainResult:
    output_dir: Path
    epochs_done: int
    steps: int
    best_metric: float
    last_metrics: dict[str, Any]


class JsonlLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def train(config: Config, *, resume: str | Path | None = None, progress: bool = True,
          echo=print) -> TrainResult:
    """Train ``config.model`` on ``config.data`` per ``config.train``; checkpoints in the output folder.

    Writes ``last/`` every epoch and ``best/`` whenever the headline metric improves, and ``log.jsonl``.
    ``resume`` continues from a ``last/`` folder: weights, optimizer, EMA, RNG, epoch and step.
    """
    from mdetr.builder import build

    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    out = Path(tc.output_dir)
    if resume is None and not tc.overwrite and ((out / "last").exists() or (out / "best").exists()):
        raise ConfigError(
            f"{out} already holds checkpoints of an earlier run; continue it with --resume {out / 'last'}, "
            "choose another train.output_dir, or set train.overwrite=true to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    log = JsonlLog(out / "log.jsonl")

    model, criterion, weights = build(config)
    device = torch.device(tc.device)
    model.to(device)
    train_set = build_dataset(config.data, "train", model.tokenizer)
    val_set = build_dataset(config.data, "val", model.tokenizer) if config.data.val_ann else None
    optimizer = build_optimizer(model, tc)
    ema = ModelEMA(model, decay=tc.ema_decay) if tc.ema else None

    start_epoch, step, best = 0, 0, -math.inf
    if resume is not None:
        state = restore_training(resume, model=model, optimizer=optimizer, ema=ema.module if ema else None)
        start_epoch, step, best = state["epoch"] + 1, state["step"], state.get("best", -math.inf)
        echo(f"resumed from {resume} at epoch {start_epoch}, step {step}")

    steps_per_epoch = len(train_set) // config.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} entries, fewer than one batch of {config.data.batch_size}")
    total_steps = steps_per_epoch * tc.epochs
    started = time.monotonic()
    last_metrics: dict[str, Any] = {}
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs):
        generator = torch.Generator().manual_seed(tc.seed + epoch)
        loader = DataLoader(train_set, batch_size=config.data.batch_size, shuffle=True, drop_last=True,
                            collate_fn=partial(collate, size_divisibility=config.data.size_divisibility), num_workers=config.data.num_workers, generator=generator,
                            persistent_workers=False)
        step, out_of_time = _train_one_epoch(
            model, criterion, weights, loader, optimizer, ema, config, epoch=epoch, step=step,
            total_steps=total_steps, started=started, log=log, progress=progress,
        )
        state = {"epoch": epoch, "step": step, "best": best}
        if val_set is not None and ((epoch + 1) % tc.eval_every == 0 or out_of_time or epoch + 1 == tc.epochs):
            eval_model = ema.module if ema else model
            val_loader = DataLoader(val_set, batch_size=config.data.batch_size, collate_fn=collate,
                                    num_workers=config.data.num_workers)
            last_metrics = evaluate(eval_model, val_loader, build_evaluators(config, val_set), device=device)
            name, value = headline_metric(last_metrics)
            minutes = (time.monotonic() - started) / 60
            log.write({"type": "eval", "epoch": epoch, "step": step, "minutes": minutes, name: value,
                       "metrics": last_metrics})
            echo(f"epoch {epoch}: {name} {value:.4f} after {minutes:.1f} min")
            if value > best:
                best = value
                state["best"] = best
                save_checkpoint(out / "best", model=eval_model, config=config.to_dict(), state=state)
        save_checkpoint(out / "last", model=model, config=config.to_dict(), optimizer=optimizer,
                        ema=ema.module if ema else None, state=state)
        if tc.keep_every and (epoch + 1) % tc.keep_every == 0:
            save_checkpoint(out / f"epoch_{epoch:04d}", model=model, config=config.to_dict(), optimizer=optimizer,
                            ema=ema.module if ema else None, state=state)
        if out_of_time:
            echo(f"stopping: the time budget of {tc.max_minutes} min is spent")
            break
    return TrainResult(out, epoch + 1, step, best, last_metrics)


def _train_one_epoch(model, criterion, weights, loader, optimizer, ema, config: Config, *, epoch: int, step: int,
                     total_steps: int, started: float, log: JsonlLog, progress: bool) -> tuple[int, bool]:
    tc = config.train
    device = torch.device(tc.device)
    model.train()
    criterion.train()
    iterator = loader
    bar = None
    if progress:
        from tqdm import tqdm

        iterator = bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    window_start, window_images = time.monotonic(), 0
    out_of_time = False
    for batch in iterator:
        if len(batch) == 0:  # every sample of the batch was skipped (data.on_error=skip)
            continue
        batch = batch.to(device)
        adjust_learning_rate(optimizer, tc, epoch=epoch, step=step, total_steps=total_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.amp == "bf16"):
            outputs = model(batch.images, batch.masks, batch.captions)
        losses = criterion(outputs, batch.targets)  # float32: the criterion upcasts predictions
        loss = total_loss(losses, weights)
        if not torch.isfinite(loss):
            ids = [int(t["image_id"]) for t in batch.targets]
            raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch}, step {step}, image ids {ids}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_max_norm)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        step += 1
        window_images += len(batch.captions)
        if step % tc.log_every == 0 or bar is not None:
            elapsed = time.monotonic() - window_start
            rate = window_images / elapsed if elapsed > 0 else 0.0
            lr = optimizer.param_groups[0]["lr"]
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", img_s=f"{rate:.1f}")
            if step % tc.log_every == 0:
                record = {"type": "train", "epoch": epoch, "step": step, "loss": loss.item(), "lr": lr,
                          "images_per_s": rate, "minutes": (time.monotonic() - started) / 60}
                record.update({k: v.item() for k, v in losses.items() if not k[-1].isdigit()})
                log.write(record)
                window_start, window_images = time.monotonic(), 0
        if tc.max_minutes and (time.monotonic() - started) / 60 >= tc.max_minutes:
            out_of_time = True
            break
    return step, out_of_time
