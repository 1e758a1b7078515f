"""The training loop: one place for optimisation, evaluation, logging and checkpoints."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from mdetr.builder import initialise_from
from mdetr.config import Config, ConfigError, TrainConfig
from mdetr.data.build import build_dataset
from mdetr.data.collate import Batch, collate
from mdetr.data.modulated import ModulatedDetection
from mdetr.engine.checkpoint import restore_training, save_checkpoint
from mdetr.engine.distributed import (
    DistributedContext,
    any_rank,
    barrier,
    broadcast_object,
    gather_objects,
    gather_predictions,
    global_num_boxes,
    gradient_sync,
    init_distributed,
    reduce_sum,
    shard_indices,
    shutdown,
    unused_parameters,
    wrap_model,
)
from mdetr.engine.evaluate import evaluate, predict_dataset
from mdetr.engine.faults import FaultTracker, gradient_norm, write_skip_report
from mdetr.engine.optim import ModelEMA, adjust_learning_rate, build_optimizer
from mdetr.eval import CocoBoxEvaluator, RefExpEvaluator
from mdetr.inference.optimize import channels_last_backbone
from mdetr.losses.criterion import total_loss
from mdetr.losses.qa import QASetCriterion
from mdetr.models.compile import compile_submodules
from mdetr.ops.linear import onednn_linear_layers


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


class TrainingTask(Protocol):
    """What the loop needs to know about a task: how to build the model, read the data, run a batch and
    score the model. :class:`GroundingTask` (MDETR) and :class:`mdetr.engine.detection.DetectionTask`."""

    name: str

    def build(self, config: Config) -> tuple[nn.Module, nn.Module, dict[str, float]]:
        """Model, criterion and loss weights (the criterion returns named unweighted losses)."""

    def dataset(self, config: Config, split: str, model: nn.Module) -> Dataset:
        """The ``"train"`` or ``"val"`` set of ``config.data``."""

    def collate(self, config: Config, split: str) -> Any:
        """The DataLoader's ``collate_fn`` for the split, returning a :class:`Batch`."""

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """The model's raw predictions for a batch (what the criterion takes)."""

    def evaluate(self, config: Config, model: nn.Module, loader: DataLoader, dataset: Dataset, *,
                 device: torch.device) -> dict[str, Any]:
        """Metric name -> summary on a validation loader.

        A task may also offer the two halves, ``predict(model, loader, *, device)`` -> image id ->
        prediction and ``score(config, dataset, predictions)`` -> summaries; distributed training then
        splits the validation set over the ranks and scores the gathered predictions on rank 0. Without
        them rank 0 evaluates the whole set while the others wait.
        """

    def headline(self, summaries: dict[str, Any]) -> tuple[str, float]:
        """The metric that picks the best checkpoint."""


class GroundingTask:
    """MDETR on captions: the :func:`mdetr.builder.build` model, MDETR-format data, P@k / box AP."""

    name = "grounding"

    def build(self, config: Config) -> tuple[nn.Module, nn.Module, dict[str, float]]:
        from mdetr.builder import build

        return build(config)

    def dataset(self, config: Config, split: str, model: nn.Module) -> ModulatedDetection:
        return build_dataset(config.data, split, model.tokenizer)

    def collate(self, config: Config, split: str) -> Any:
        return (
            partial(collate, size_divisibility=config.data.size_divisibility) if split == "train" else collate
        )

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(batch.images, batch.masks, batch.captions)

    def evaluate(self, config: Config, model: nn.Module, loader: DataLoader, dataset: ModulatedDetection, *,
                 device: torch.device) -> dict[str, Any]:
        return evaluate(model, loader, build_evaluators(config, dataset), device=device)

    def predict(self, model: nn.Module, loader: DataLoader, *,
                device: torch.device) -> dict[int, dict[str, Tensor]]:
        """The first half of :meth:`evaluate`: image id -> post-processed prediction."""
        return predict_dataset(model, loader, device=device)

    def score(self, config: Config, dataset: ModulatedDetection,
              predictions: dict[int, dict[str, Tensor]]) -> dict[str, Any]:
        """The second half of :meth:`evaluate`: metrics of predictions for any subset of ``dataset``."""
        summaries = {}
        for name, evaluator in build_evaluators(config, dataset).items():
            evaluator.update(predictions)
            summaries[name] = evaluator.summarize()
        return summaries

    def headline(self, summaries: dict[str, Any]) -> tuple[str, float]:
        return headline_metric(summaries)


def training_task(config: Config) -> TrainingTask:
    """The hooks for ``config.task``; a grounding config with ``model.qa_dataset=clevr`` trains question
    answering (:class:`mdetr.engine.qa.QATask`), ``gqa`` GQA (:class:`mdetr.engine.gqa.GQATask`), one with
    ``model.predict_final`` CLEVR-Ref+ (:class:`mdetr.engine.clevr_ref.ClevrRefTask`), one with
    ``model.masks=true`` referring segmentation (:class:`mdetr.engine.segmentation.SegmentationTask`)."""
    if config.task == "detection":
        from mdetr.engine.detection import DetectionTask

        return DetectionTask()
    if config.model.masks:
        from mdetr.engine.segmentation import SegmentationTask

        return SegmentationTask()
    if config.model.qa_dataset == "clevr":
        from mdetr.engine.qa import QATask

        return QATask()
    if config.model.qa_dataset == "gqa":
        from mdetr.engine.gqa import GQATask

        return GQATask()
    if config.model.predict_final:
        from mdetr.engine.clevr_ref import ClevrRefTask

        return ClevrRefTask()
    return GroundingTask()


@dataclass
class TrainResult:
    output_dir: Path
    epochs_done: int
    steps: int
    best_metric: float
    last_metrics: dict[str, Any]


class JsonlLog:
    """Appends one JSON record per line; ``path`` None (ranks other than 0) writes nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def train(config: Config, *, resume: str | Path | None = None, progress: bool = True,
          echo=print) -> TrainResult:
    """Train ``config.model`` on ``config.data`` per ``config.train``; checkpoints in the output folder.

    Writes ``last/`` every epoch and ``best/`` whenever the headline metric improves, and ``log.jsonl``.
    ``resume`` continues from a ``last/`` folder: weights, optimizer, EMA, RNG, epoch and step.
    ``config.task`` picks the model, data and metrics (:func:`training_task`).

    Under ``torchrun`` every process calls this and they train one model data-parallel
    (:mod:`mdetr.engine.distributed`), each on ``data.batch_size`` images per micro-batch; rank 0 alone
    prints, logs and writes checkpoints.
    """
    ctx = init_distributed(config.train.device, timeout_minutes=config.train.dist_timeout_minutes)
    try:
        return _train(config, ctx, resume=resume, progress=progress and ctx.is_main,
                      echo=echo if ctx.is_main else _silent)
    finally:
        shutdown(ctx)


def _silent(*_: Any) -> None:
    """The ``echo`` of ranks other than 0."""


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed per (epoch, rank); rank 0's is the single-process one, ``seed + epoch``."""
    return seed + epoch + 1_000_003 * rank


def _train(config: Config, ctx: DistributedContext, *, resume: str | Path | None, progress: bool,
           echo) -> TrainResult:
    task = training_task(config)
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)  # the same on every rank, so the replicas (and EMA copies) are built equal
    out = Path(tc.output_dir)
    if resume is None and not tc.overwrite and ((out / "last").exists() or (out / "best").exists()):
        raise ConfigError(
            f"{out} already holds checkpoints of an earlier run; continue it with --resume {out / 'last'}, "
            "choose another train.output_dir, or set train.overwrite=true to replace them"
        )
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    model, criterion, weights = task.build(config)  # may complete the config (detection: the classes)
    if tc.init_weights and resume is None:
        new = initialise_from(model, tc.init_weights, allow_new_heads=tc.init_allow_new_heads)
        echo(f"initialised the model from {tc.init_weights}"
             + (f"; {len(new)} new parameter(s) keep their initialisation: {', '.join(new[:8])}"
                + (" ..." if len(new) > 8 else "") if new else ""))
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    log = JsonlLog(out / "log.jsonl" if ctx.is_main else None)
    device = ctx.device
    model.to(device)
    if tc.channels_last:
        channels_last_backbone(model, weights=False)
    if tc.onednn_linear:
        onednn_linear_layers(model)
    train_set = task.dataset(config, "train", model)
    val_set = task.dataset(config, "val", model) if config.data.val_ann else None
    faults = FaultTracker(tc.max_nonfinite_in_a_row)
    faults.note_skipped_samples(getattr(train_set, "problems", []))  # found when the file was read
    noted_at_load = len(faults.skipped_samples)
    optimizer = build_optimizer(model, tc)
    ema = ModelEMA(model, decay=tc.ema_decay) if tc.ema else None
    if tc.cache_text_features:  # after the EMA copy, which keeps no cache of its own
        getattr(model, "detr", model).transformer.cache_text_features()
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")

    start_epoch, step, best = 0, 0, -math.inf
    if resume is not None:
        state = restore_training(resume, model=model, optimizer=optimizer, ema=ema.module if ema else None)
        start_epoch, step, best = state["epoch"] + 1, state["step"], state.get("best", -math.inf)
        if "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        echo(f"resumed from {resume} at epoch {start_epoch}, step {step}")
    if tc.compile:
        echo(f"compiling {', '.join(compile_submodules(model)) or 'nothing'} (the first steps are slow)")

    loader = _train_loader(task, config, train_set, ctx, epoch=start_epoch)
    ddp_model = data_parallel(task, model, criterion, weights, loader, ctx, amp=tc.amp, echo=echo)
    steps_per_epoch = math.ceil(len(loader) / tc.accumulate_steps)
    if steps_per_epoch == 0:
        per = f" per process ({ctx.world_size} processes)" if ctx.is_distributed else ""
        raise ValueError(f"the training set has {len(train_set)} entries, fewer than one batch of "
                         f"{config.data.batch_size}{per}")
    total_steps = steps_per_epoch * tc.epochs
    # The clock of the time budget (and of the "minutes" schedule) runs on from where a resumed run stopped.
    started = time.monotonic() - (state["minutes"] * 60 if resume is not None and "minutes" in state else 0.0)
    last_metrics: dict[str, Any] = {}
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs):
        if ctx.is_distributed:  # dropout and augmentation differ across ranks, reproducibly per epoch
            seed_everything(_rank_seed(tc.seed, epoch, ctx.rank))
        if epoch > start_epoch and not config.data.persistent_workers:
            loader = _train_loader(task, config, train_set, ctx, epoch=epoch)
        loader.sampler.set_epoch(epoch)
        step, out_of_time = _train_one_epoch(
            task, ddp_model, model, criterion, weights, loader, optimizer, scaler, ema, config, ctx,
            epoch=epoch, step=step, total_steps=total_steps, started=started, log=log, progress=progress,
            faults=faults,
        )
        state = {"epoch": epoch, "step": step, "best": best, "minutes": (time.monotonic() - started) / 60}
        if scaler.is_enabled():
            state["grad_scaler"] = scaler.state_dict()
        evaluate_now = (epoch + 1) % tc.eval_every == 0 or out_of_time or epoch + 1 == tc.epochs
        if val_set is not None and evaluate_now:
            eval_model = ema.module if ema else model
            last_metrics = _evaluate(task, config, eval_model, val_set, ctx)
            name, value = task.headline(last_metrics)
            minutes = (time.monotonic() - started) / 60
            log.write({"type": "eval", "epoch": epoch, "step": step, "minutes": minutes, name: value,
                       "metrics": last_metrics})
            echo(f"epoch {epoch}: {name} {value:.4f} after {minutes:.1f} min")
            if value > best:
                best = value
                state["best"] = best
                if ctx.is_main:
                    save_checkpoint(out / "best", model=eval_model, config=config.to_dict(), state=state)
        if ctx.is_main:
            _save_epoch(out, model, optimizer, ema, config, state, epoch=epoch)
        if out_of_time:
            echo(f"stopping: the time budget of {tc.max_minutes} min is spent")
            break
    faults.skipped_samples[noted_at_load:] = [  # every rank's, for the report
        p for part in gather_objects(faults.skipped_samples[noted_at_load:], ctx) for p in part]
    if ctx.is_main:
        _report_faults(out, config, faults, val_set, log=log, echo=echo)
    barrier(ctx)  # every rank returns once rank 0 has written the checkpoints
    return TrainResult(out, epoch + 1, step, best, last_metrics)


def _report_faults(out: Path, config: Config, faults: FaultTracker, val_set: Dataset | None, *, log: JsonlLog,
                   echo) -> None:
    """Write skipped.json (what the data policy left out) and log it with the count of skipped steps."""
    problems = {"train": faults.skipped_samples, "val": getattr(val_set, "problems", [])}
    report, summary = write_skip_report(out, problems, policy=config.data.on_error)
    log.write({"type": "faults", "skipped_data": report["count"], "data_warnings": report["warnings"],
               "nonfinite_steps_skipped": faults.nonfinite_total})
    echo(summary)
    if faults.nonfinite_total:
        echo(f"skipped {faults.nonfinite_total} step(s) with a non-finite loss or gradient (see log.jsonl)")


def _save_epoch(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: ModelEMA | None,
                config: Config, state: dict[str, Any], *, epoch: int) -> None:
    """``last/`` and, every ``train.keep_every`` epochs, ``epoch_NNNN/``."""
    save_checkpoint(out / "last", model=model, config=config.to_dict(), optimizer=optimizer,
                    ema=ema.module if ema else None, state=state)
    keep = config.train.keep_every
    if keep and (epoch + 1) % keep == 0:
        save_checkpoint(out / f"epoch_{epoch:04d}", model=model, config=config.to_dict(), optimizer=optimizer,
                        ema=ema.module if ema else None, state=state)


def _train_loader(task: TrainingTask, config: Config, train_set: Dataset, ctx: DistributedContext, *,
                  epoch: int) -> DataLoader:
    """``data.batch_size`` samples per batch and process, incomplete batches dropped.

    The sampler shuffles with ``train.seed + epoch`` (set per epoch with ``set_epoch``, so a resumed run
    sees the same order) and gives each rank every ``world_size``-th entry of the permutation. The
    generator seeds the loader's workers, differently per rank and epoch.
    """
    dc = config.data
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=config.train.seed)
    generator = torch.Generator().manual_seed(_rank_seed(config.train.seed, epoch, ctx.rank))
    return DataLoader(train_set, batch_size=dc.batch_size, sampler=sampler, drop_last=True,
                      collate_fn=task.collate(config, "train"), num_workers=dc.num_workers,
                      generator=generator, pin_memory=dc.pin_memory and ctx.device.type == "cuda",
                      persistent_workers=dc.persistent_workers)


def _evaluate(task: TrainingTask, config: Config, model: nn.Module, val_set: Dataset,
              ctx: DistributedContext) -> dict[str, Any]:
    """The task's metrics of ``model`` on the validation set, the same on every rank.

    Distributed: each rank predicts every ``world_size``-th entry and rank 0 scores the gathered
    predictions (when the task offers ``predict`` and ``score``), or rank 0 evaluates the whole set.
    """
    def loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=config.data.batch_size, collate_fn=task.collate(config, "val"),
                          num_workers=config.data.num_workers,
                          pin_memory=config.data.pin_memory and ctx.device.type == "cuda")

    if not ctx.is_distributed:
        return task.evaluate(config, model, loader(val_set), val_set, device=ctx.device)
    predict, score = getattr(task, "predict", None), getattr(task, "score", None)
    summaries = None
    if predict is not None and score is not None:
        shard = Subset(val_set, list(shard_indices(len(val_set), ctx)))
        predictions = gather_predictions(predict(model, loader(shard), device=ctx.device), ctx)
        if ctx.is_main:
            summaries = score(config, val_set, predictions)
    elif ctx.is_main:
        summaries = task.evaluate(config, model, loader(val_set), val_set, device=ctx.device)
    return broadcast_object(summaries, ctx)


def data_parallel(task: TrainingTask, model: nn.Module, criterion: nn.Module, weights: dict[str, float],
                   loader: Iterable[Batch], ctx: DistributedContext, *, amp: str, echo) -> nn.Module:
    """``model`` in DDP when there are several processes (``model`` itself otherwise).

    DDP's search for parameters without a gradient costs a graph traversal every step, so it is turned on
    only when a probe step on each rank's first batch finds such parameters (e.g. backbone levels past
    the one the transformer reads) on some rank.
    """
    if not ctx.is_distributed:
        return model
    batch = next((b for b in loader if len(b)), None)
    unused: list[str] = []
    if batch is not None:
        batch = batch.to(ctx.device)

        def probe_loss() -> Tensor:
            with autocast(ctx.device, amp):
                outputs = task.forward(model, batch)
            return total_loss(criterion(outputs, batch.targets), weights)

        model.train()
        unused = unused_parameters(model, probe_loss)
    find_unused = any_rank(bool(unused) or batch is None, ctx)
    if unused:
        shown = ", ".join(unused[:3]) + (" ..." if len(unused) > 3 else "")
        echo(f"{len(unused)} trainable parameter(s) get no gradient ({shown}): DDP looks for unused "
             "parameters every step")
    return wrap_model(model, ctx, find_unused_parameters=find_unused)


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """The forward pass's mixed-precision context for ``train.amp`` ("none": disabled)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def accumulate_gradients(
    task: TrainingTask, model: nn.Module, criterion: nn.Module, weights: dict[str, float],
    micro_batches: list[Batch], *, ctx: DistributedContext, amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, dict[str, Tensor]] | None:
    """Forward and backward every micro-batch of one optimiser step, adding into the parameters' ``.grad``.

    Every loss is divided by the boxes of *all* the step's micro-batches on all ranks (averaged over
    ranks, :func:`~mdetr.engine.distributed.global_num_boxes`), not by its own micro-batch's: MDETR's
    losses are sums over images divided by that count, so the accumulated (and, under DDP, rank-averaged)
    gradient equals the gradient of one batch holding every image of the step. Answer losses (means over
    questions of a type) are divided by this rank's question counts over all its micro-batches in the same
    way. Under DDP only the last micro-batch all-reduces the gradients.

    ``model`` is the module or its DDP wrapper. Returns this rank's weighted total loss and named
    unweighted losses, summed over the micro-batches (detached), or None, with no gradient computed, when
    some rank has no sample for this step (every sample skipped under ``data.on_error=skip``).
    """
    targets = [t for batch in micro_batches for t in batch.targets]
    num_boxes, every_rank_has_data = global_num_boxes(targets, ctx, device=ctx.device)
    if not every_rank_has_data:
        return None
    total = torch.zeros((), device=ctx.device)
    named: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            with autocast(ctx.device, amp):
                outputs = task.forward(model, batch)
            # float32: predictions upcast. Answer losses divide by the step's question counts.
            extra = {"group_targets": targets} if isinstance(criterion, QASetCriterion) else {}
            losses = criterion(outputs, batch.targets, num_boxes=num_boxes, **extra)
            loss = total_loss(losses, weights)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
        for key, value in losses.items():
            named[key] = named[key] + value.detach() if key in named else value.detach()
    return total, named


def _accumulation_groups(batches: Iterable[Batch], size: int, faults: FaultTracker, *,
                         device: torch.device) -> Iterator[list[Batch]]:
    """The loader's batches ``size`` at a time (fewer at the end of the epoch), on ``device``; batches whose
    every sample was skipped are left out, so a group may be empty."""
    group: list[Batch] = []
    for batch in batches:
        faults.note_skipped_samples(batch.skipped)
        group.append(batch)
        if len(group) == size:
            yield [b.to(device, non_blocking=True) for b in group if len(b)]
            group = []
    if group:
        yield [b.to(device, non_blocking=True) for b in group if len(b)]


def _reduce_step(loss: Tensor, losses: dict[str, Tensor], images: int, minutes: float, max_minutes: float,
                 ctx: DistributedContext) -> tuple[Tensor, dict[str, Tensor], int, float, bool]:
    """One all-reduce for the step's numbers: loss and named losses averaged over ranks (the global batch's
    losses), images summed, minutes of training averaged (one clock for the schedule on every rank), out of
    time if any rank's clock says so (so all ranks stop together)."""
    keys = sorted(losses)
    out_of_time = bool(max_minutes) and minutes >= max_minutes
    packed = torch.stack([loss.float(), *(losses[k].float() for k in keys), loss.new_tensor(float(images)),
                          loss.new_tensor(minutes), loss.new_tensor(float(out_of_time))])
    packed = reduce_sum(packed, ctx)
    world = ctx.world_size
    named = {k: packed[1 + i] / world for i, k in enumerate(keys)}
    return (packed[0] / world, named, int(packed[-3].item()), float(packed[-2].item()) / world,
            bool(packed[-1].item() > 0))


def _train_one_epoch(task: TrainingTask, ddp_model: nn.Module, model: nn.Module, criterion, weights, loader,
                     optimizer, scaler: torch.amp.GradScaler, ema, config: Config, ctx: DistributedContext, *,
                     epoch: int, step: int, total_steps: int, started: float, log: JsonlLog, progress: bool,
                     faults: FaultTracker) -> tuple[int, bool]:
    """One pass over ``loader``; one optimiser step per ``train.accumulate_steps`` batches. ``ddp_model``
    runs the forward passes (``model`` or its DDP wrapper); ``model`` is what the EMA follows."""
    tc = config.train
    ddp_model.train()
    criterion.train()
    batches: Iterable[Batch] = loader
    bar = None
    if progress:
        from tqdm import tqdm

        batches = bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    window_start, window_images = time.monotonic(), 0
    out_of_time = False
    for group in _accumulation_groups(batches, tc.accumulate_steps, faults, device=ctx.device):
        optimizer.zero_grad(set_to_none=True)
        accumulated = accumulate_gradients(task, ddp_model, criterion, weights, group, ctx=ctx, amp=tc.amp,
                                           scaler=scaler)
        if accumulated is None:  # every sample of some rank's batches was skipped (data.on_error=skip)
            continue
        scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping (no-op otherwise)
        if tc.clip_max_norm > 0:
            # the norm before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_max_norm)
        else:
            grad_norm = gradient_norm(model.parameters())
        images = sum(len(b) for b in group)
        loss, losses, images, minutes, out_of_time = _reduce_step(
            *accumulated, images, (time.monotonic() - started) / 60, tc.max_minutes, ctx)
        adjust_learning_rate(optimizer, tc, **_schedule_position(tc, epoch=epoch, step=step,
                                                                 total_steps=total_steps, minutes=minutes))
        # fp16: an overflowing gradient under a finite loss is the loss scale's business: the scaler skips
        # the update and lowers the scale.
        overflow = scaler.is_enabled() and bool(torch.isfinite(loss)) and not bool(torch.isfinite(grad_norm))
        # A non-finite loss or gradient skips the update (and the EMA); the batch still counts as a step.
        # Loss (rank-averaged) and gradient norm (of the all-reduced gradients) agree on every rank.
        image_ids = [t.get("image_id") for b in group for t in b.targets]
        skipped = None if overflow else faults.check_step(loss, grad_norm, image_ids=image_ids, epoch=epoch,
                                                          step=step)
        if skipped is None:
            scaler.step(optimizer)  # optimizer.step(), unless fp16 found an overflow
            if ema is not None and not overflow:
                ema.update(model)
        else:
            log.write(skipped)
        scaler.update()
        step += 1
        if skipped is None:
            window_images += images
            window_start, window_images = _log_step(
                log, bar, optimizer, loss, losses, faults, tc, epoch=epoch, step=step, started=started,
                window=(window_start, window_images))
        if out_of_time:
            break
    return step, out_of_time


def _schedule_position(tc: TrainConfig, *, epoch: int, step: int, total_steps: int,
                       minutes: float) -> dict[str, int]:
    """Where the learning-rate schedule stands after ``minutes`` of training: the true epoch and step, or with
    ``schedule_clock=minutes`` the position the spent fraction of the time budget corresponds to, if that is
    further along."""
    if tc.schedule_clock != "minutes":
        return {"epoch": epoch, "step": step, "total_steps": total_steps}
    spent = min(1.0, minutes / tc.max_minutes)
    step = max(step, int(spent * total_steps))
    epoch = max(epoch, step * tc.epochs // total_steps)
    return {"epoch": epoch, "step": step, "total_steps": total_steps}


def _log_step(log: JsonlLog, bar, optimizer, loss: Tensor, losses: dict[str, Tensor], faults: FaultTracker,
              tc: TrainConfig, *, epoch: int, step: int, started: float,
              window: tuple[float, int]) -> tuple[float, int]:
    """Progress bar and, every ``train.log_every`` steps, a ``train`` record; returns the throughput window
    (start time, images since), restarted after each record."""
    window_start, window_images = window
    if step % tc.log_every != 0 and bar is None:
        return window
    elapsed = time.monotonic() - window_start
    rate = window_images / elapsed if elapsed > 0 else 0.0
    lr = optimizer.param_groups[0]["lr"]
    if bar is not None:
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", img_s=f"{rate:.1f}")
    if step % tc.log_every == 0:
        record = {"type": "train", "epoch": epoch, "step": step, "loss": loss.item(), "lr": lr,
                  "images_per_s": rate, "minutes": (time.monotonic() - started) / 60,
                  "nonfinite_skipped": faults.nonfinite_total}
        record.update({k: v.item() for k, v in losses.items() if not k[-1].isdigit()})
        log.write(record)
        return time.monotonic(), 0
    return window
