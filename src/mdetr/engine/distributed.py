"""Data-parallel training on ``torch.distributed``: one process per device, launched by ``torchrun``.

``torchrun`` (or a Slurm script that calls it) starts the processes and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the
process group (NCCL on GPUs, gloo on CPUs). Without them training runs in one process, unchanged.

What the training loop needs from the group, each in one place here:

* the number of target boxes that normalises the losses, summed over ranks and divided by the world size
  (:func:`global_num_boxes`); together with DDP's gradient averaging this gives exactly the gradient of
  the whole global batch normalised by all its boxes, as the official code does;
* the per-step loss statistics averaged over ranks, so logs and the non-finite-loss check agree
  (:func:`reduce_sum`);
* gathering each rank's validation predictions on rank 0 (:func:`gather_predictions`) and sending the
  metrics back (:func:`broadcast_object`);
* whether DDP must search for unused parameters (:func:`unused_parameters`), decided once from a probe
  step, since the search costs a graph traversal on every step.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedSetupError(RuntimeError):
    """The launcher's environment does not describe a usable process group."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the group; ``world_size`` 1 means plain single-process training.

    ``device`` is the device this process trains on (``cuda:<LOCAL_RANK>`` on GPUs). ``owns_group``: the
    group was created by :func:`init_distributed`, so :func:`shutdown` destroys it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints and scores the gathered predictions."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={value!r} must be an integer") from None


def _process_device(device: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this process: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` when there are several processes,
    and the current CUDA device (``cuda:0`` unless set otherwise) for one."""
    chosen = torch.device(device)
    if chosen.type != "cuda":
        return chosen
    if not torch.cuda.is_available():
        raise DistributedSetupError(f"train.device={device!r} but torch sees no CUDA device")
    if world_size > 1:
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); start at "
                "most one process per GPU (torchrun --nproc-per-node)"
            )
        chosen = torch.device("cuda", local_rank)
    elif chosen.index is None:  # set_device needs an index
        chosen = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(chosen)
    return chosen


def init_distributed(device: str, *, timeout_minutes: float | None = None) -> DistributedContext:
    """Join the process group ``torchrun`` describes in the environment, or run alone without one.

    An already initialised group (a caller set it up) is used as it is. The backend is NCCL for CUDA
    devices and gloo otherwise. ``timeout_minutes`` bounds how long a collective waits for the other ranks
    before the job fails (torch's default, 10 minutes for NCCL, when None): rank 0 alone scores the
    validation predictions and writes checkpoints while the others wait at their next collective.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        return DistributedContext(rank, world, local, _process_device(device, local, world), owns_group=False)
    present = [name for name in _ENV_VARS if name in os.environ]
    if not present or ("WORLD_SIZE" in present and _env_int("WORLD_SIZE") == 1):
        return DistributedContext(device=_process_device(device, 0, 1))
    missing = [name for name in _ENV_VARS if name not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}; start distributed "
            "training with torchrun, which sets all of them"
        )
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed support")
    chosen = _process_device(device, local, world)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": chosen} if chosen.type == "cuda" else {}
    if timeout_minutes is not None:
        kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistributedContext(rank, world, local, chosen, owns_group=True)


def shutdown(ctx: DistributedContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def reduce_sum(values: Tensor, ctx: DistributedContext) -> Tensor:
    """Element-wise sum of ``values`` over ranks (a copy; ``values`` itself when running alone)."""
    if not ctx.is_distributed:
        return values
    summed = values.detach().clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def global_num_boxes(targets: Sequence[dict[str, Any]], ctx: DistributedContext, *,
                     device: torch.device) -> tuple[float, bool]:
    """The loss normaliser of one optimisation step and whether every rank has data for it.

    ``targets`` are all the target dicts this rank processes before the optimiser steps (every
    micro-batch of a gradient-accumulation group). Returns the target boxes summed over ranks and divided
    by the world size, at least 1 (the official code's ``num_boxes``), and False when some rank has no
    target at all (every sample skipped), in which case every rank must skip the step, since DDP's
    gradient all-reduce needs all of them.
    """
    local = torch.tensor([float(sum(len(t["boxes"]) for t in targets)), float(len(targets) > 0)],
                         dtype=torch.float64, device=device)
    total_boxes, ranks_with_data = reduce_sum(local, ctx).tolist()
    return max(total_boxes / ctx.world_size, 1.0), int(ranks_with_data) == ctx.world_size


def broadcast_object(obj: T, ctx: DistributedContext, *, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not ctx.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=ctx.device if ctx.device.type == "cuda" else None)
    return holder[0]


def gather_predictions(predictions: dict[int, dict[str, Tensor]],
                       ctx: DistributedContext) -> dict[int, dict[str, Tensor]] | None:
    """Merge every rank's ``image id -> prediction`` dict on rank 0; None on the other ranks.

    Tensors travel on the CPU. An image predicted on two ranks keeps one of them (the evaluators replace
    an image's detections anyway).
    """
    if not ctx.is_distributed:
        return predictions
    local = {image_id: {k: v.cpu() if torch.is_tensor(v) else v for k, v in pred.items()}
             for image_id, pred in predictions.items()}
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(local, gathered, dst=0)
    if not ctx.is_main:
        return None
    merged: dict[int, dict[str, Tensor]] = {}
    for part in gathered or []:
        merged.update(part or {})
    return merged


def gather_objects(obj: T, ctx: DistributedContext) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when running alone)."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shard_indices(length: int, ctx: DistributedContext) -> range:
    """The dataset indices this rank evaluates: every ``world_size``-th, so each entry is seen once."""
    return range(ctx.rank, length, ctx.world_size)


def unused_parameters(model: nn.Module, loss_of_probe: Callable[[], Tensor]) -> list[str]:
    """Names of trainable parameters that receive no gradient from one forward and backward pass.

    ``loss_of_probe`` runs the model on a real batch and returns the loss. The random number generators
    are restored afterwards and the gradients cleared, so the probe leaves training as it found it.
    """
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = [torch.cuda.current_device()] if cuda_in_use else []
    with torch.random.fork_rng(devices=devices):
        loss_of_probe().backward()
    names = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return names


def any_rank(flag: bool, ctx: DistributedContext) -> bool:
    """True on every rank if ``flag`` is True on at least one."""
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    return bool(reduce_sum(torch.tensor([float(flag)], device=device), ctx).item() > 0)


def wrap_model(model: nn.Module, ctx: DistributedContext, *, find_unused_parameters: bool) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` (unchanged when running alone).

    Construction broadcasts rank 0's parameters and buffers, so every replica starts equal. Buffers are
    not re-synchronised at every forward: the models' batch norms are frozen, and a per-forward collective
    would deadlock when ranks run different numbers of micro-batches.
    """
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Newer torch names the per-forward buffer sync forward_sync_buffers (buffers are still synced once at
    # construction); older releases call it broadcast_buffers.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                   find_unused_parameters=find_unused_parameters, **no_buffer_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what checkpoints, the EMA and evaluation use)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulate gradients locally (DDP ``no_sync``) unless ``enabled``: only the last micro-batch of an
    accumulation group all-reduces them. Covers the forward pass, where DDP reads the setting."""
    if enabled or not isinstance(model, DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield
