"""Speed and memory against the official MDETR code (ashkamath/mdetr), same weights, same inputs, one run.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src /tmp/official/venv/bin/python \\
        bench/speed_vs_official.py --official-repo /tmp/official/mdetr-git --threads 2 --repeats 10 \\
        --output runs/speed_vs_official.json

(the official code and its dependencies stay outside this project: see BENCHMARKS.md, section 2, for the
set-up of ``/tmp/official``). Families (``--families``):

- ``resnet101``: the hub entry ``mdetr_resnet101`` (ResNet-101, 6 + 6 layers, 100 queries, contrastive
  alignment heads) with a random text encoder of roberta-base's size (12 layers, width 768, 12 heads,
  feed-forward 3072, 50,265 embedding rows);
- ``clevr``: the hub entry ``mdetr_clevr`` (ResNet-18, 25 queries, CLEVR answer heads) with a random
  encoder of distilroberta-base's size (6 layers, width 768).

Both encoders are written by ``bench/make_tiny_text_encoder.py`` into ``--workdir`` (their small BPE
tokenizer replaces RoBERTa's 50k-token one: captions are made of words it has whole). For each family the
official model is built through the official ``hubconf.py`` with seeded random weights (the recipe of
``bench/compare_official.py``), saved as an official ``.pth``, and loaded here with
``mdetr.load(path, arch=NAME)``; both then run on the same zero-padded batch of two images
(``--sizes``, default 512x680 and 480x640 for resnet101, 320x480 twice for clevr) and two captions of the
same token length (with padding tokens the contrastive-alignment losses differ by design: the official one
lets padding tokens into its softmaxes, ours leaves them out). With more ``--sizes`` than two, the
captions repeat in order, one per image.

What is timed (float32 unless said, ``torch.set_num_threads(--threads)``, all rows in one process,
``--warmup`` untimed rounds, then ``--repeats`` timed rounds; each round runs every row of a table once,
in an order that rotates from round to round, so the rows see the same machine state):

- inference (eval mode, ``torch.no_grad``), the model only: images already normalised and padded, no
  pre- or post-processing, the tokenizer included (both models tokenize their captions):
  ``official``: ``model(samples, captions, encode_and_save=True)`` then the decode call with its memory
  cache (the official two-stage call); ``ours``: ``model(images, masks, captions)``; ``ours, inference
  copy``: the same on :func:`mdetr.inference.optimize.optimize_for_inference`'s copy (batch norms folded,
  channels-last backbone, float32 linear layers on oneDNN), which is what
  :class:`mdetr.inference.predictor.Predictor` runs;
  ``ours, inference copy, bf16``: the copy for bf16 (linear and convolution weights stored in bf16) under
  ``torch.autocast("cpu", bfloat16)``, as Predictor ``dtype="bfloat16"`` runs it; ``..., compiled``
  (both dtypes, unless ``--no-compile``): the same copies compiled as ``Predictor(compile=True)`` compiles
  them (:func:`mdetr.inference.optimize.compile_for_inference`); their compilation is timed apart, as the
  row's ``first_call_s`` (the first call, before the warm-up rounds). Every output's largest
  absolute difference from the official outputs of the same round is checked (float32 rows:
  ``--tolerance``, default 1e-5; bf16: reported only). For scale, the official call also runs once on one
  thread (two when ``--threads 1``): how far that moves its own outputs is the rounding spread of the
  reference itself. After the timed rounds both models are also evaluated once in float64 (copies, the
  same weights and inputs widened exactly): our float64 outputs against the official float64 ones say
  whether the two compute the same function, and every row's last outputs against the official float64
  ones give its own rounding error (official row included), i.e. how far from exact arithmetic float32
  (or bf16) leaves each of them.
- training step (train mode, dropout set to 0 on both sides so both compute the same function, auxiliary
  decoder losses on as in the official ``main.py``): forward, the losses, backward, gradient clipping at
  0.1 and one AdamW step (official learning rates 1e-4 / 1e-5 backbone / 5e-5 text encoder, weight decay
  1e-4). ``official``: the body of ``engine.train_one_epoch`` with the official ``SetCriterion``,
  ``HungarianMatcher`` (costs 1 / 5 / 2) and, for CLEVR, ``QACriterionClevr``, weights as the official
  ``build`` gives them; ``ours``: :func:`mdetr.engine.train.accumulate_gradients` with this package's
  criterion from the same defaults, then clipping and AdamW as ``mdetr train``. Boxes, token spans and
  positive maps are built once for both. Each side trains its own copy of the same weights on the same
  batch; the losses of the first step (identical weights) are compared.

Peak memory: every (side, row) also runs in a fresh process (same interpreter and threads) that builds
the model from the saved ``.pth``, runs one warm-up call, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) and reads the peak resident set size (``VmHWM``) over ``--memory-steps``
further calls: model, optimizer state and every transient buffer the step touches, as the OS sees them.
The inference-copy rows hold only the copy (a Predictor also keeps the original model).

Writes ``--output`` (JSON) and prints Markdown tables with speed-ups over the official code and one line
per target of the issue (met / NOT met). Exit status 1 when a float32 row's outputs differ from the
official ones by more than ``--tolerance``. On an idle 2-core machine the default run takes roughly 20 to
25 minutes, most of it ResNet-101 training steps and the twelve peak-memory processes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import compare_official as co
import torch
from make_tiny_text_encoder import make_tiny_text_encoder
from torch import Tensor, nn

# Sizes of the random text encoders (make_tiny_text_encoder keyword arguments).
ENCODER_SIZES = {
    "roberta-base": dict(layers=12, hidden=768, heads=12, intermediate=3072, model_vocab_size=50265),
    "distilroberta-base": dict(layers=6, hidden=768, heads=12, intermediate=3072, model_vocab_size=50265),
}

Size = tuple[int, int]


@dataclass(frozen=True)
class Setup:
    """One benchmarked family: the hub entry, its text encoder size, the batch and its annotations.

    phrases[i]: (phrase of captions[i], normalised cxcywh box) per box; answers: CLEVR answers or None.
    """

    family: co.Family
    sizes: list[Size]
    captions: list[str]
    phrases: list[list[tuple[str, tuple[float, float, float, float]]]]
    answers: list[str] | None = None


SETUPS = {
    "resnet101": Setup(
        co.FAMILIES["resnet101"], [(512, 680), (480, 640)],
        ["a man in a red shirt is holding a small black dog next to the wooden table",
         "the white horse standing in the green grass field near a fence next to the wooden table"],
        [[("a man in a red shirt", (0.30, 0.45, 0.25, 0.70)), ("a small black dog", (0.55, 0.70, 0.20, 0.25)),
          ("the wooden table", (0.70, 0.75, 0.50, 0.40))],
         [("the white horse", (0.40, 0.50, 0.45, 0.55)), ("the green grass field", (0.50, 0.80, 1.00, 0.40)),
          ("a fence", (0.60, 0.35, 0.80, 0.15))]],
    ),
    "clevr": Setup(
        co.FAMILIES["clevr"], [(320, 480), (320, 480)],
        ["what color is the cube that is to the right of the yellow ball?",
         "is there a large green metal cylinder left of the small shiny rubber sphere?"],
        [[("the cube", (0.35, 0.55, 0.12, 0.18)), ("the yellow ball", (0.20, 0.50, 0.10, 0.14))],
         [("a large green metal cylinder", (0.45, 0.45, 0.16, 0.25)),
          ("the small shiny rubber sphere", (0.70, 0.60, 0.08, 0.12))]],
        answers=["red", "yes"],
    ),
}


def for_batch(setup: Setup, sizes: list[Size]) -> Setup:
    """The setup with one caption (and its phrases and answer) per image: ``--sizes`` may name more images
    than the family has captions, which then repeat in order."""
    n = len(sizes)
    if n == len(setup.captions):
        return setup

    def cycle(items: list) -> list:
        return [items[i % len(items)] for i in range(n)]

    return replace(setup, sizes=list(sizes), captions=cycle(setup.captions), phrases=cycle(setup.phrases),
                   answers=cycle(setup.answers) if setup.answers else None)


# --------------------------------------------------------------------------------------------------------
# Memory and summaries


def resident_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set size of this process (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise(times: list[float], batch: int) -> dict[str, float]:
    median = statistics.median(times)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) >= 2 else median
    return {"median_s": median, "p90_s": p90, "min_s": min(times), "images_per_s": batch / median,
            "repeats": len(times), "times_s": [round(t, 4) for t in times]}


def interleaved(runners: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                label: str) -> tuple[dict[str, list[float]], dict[str, list[object]]]:
    """Run every runner once per round, the starting runner rotating each round; returns the timed
    rounds' seconds and every round's results (warm-up included) per runner."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, list[object]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        last = {}
        for name in names[k:] + names[:k]:
            started = time.perf_counter()
            out = runners[name]()
            last[name] = time.perf_counter() - started
            results[name].append(out)
            if r >= warmup:
                times[name].append(last[name])
        done = ", ".join(f"{n} {last[n]:.2f}s" for n in names)
        print(f"  [{label}] round {r + 1}/{warmup + repeats}{' (warm-up)' if r < warmup else ''}: {done}",
              file=sys.stderr, flush=True)
    return times, results


# --------------------------------------------------------------------------------------------------------
# Inputs and targets


def spans(setup: Setup) -> list[list[tuple[int, int]]]:
    out = []
    for caption, boxes in zip(setup.captions, setup.phrases, strict=True):
        row = []
        for phrase, _ in boxes:
            beg = caption.index(phrase)
            row.append((beg, beg + len(phrase)))
        out.append(row)
    return out


def official_positive_map(tokenized, i: int, spans_: list[tuple[int, int]], width: int = 256) -> Tensor:
    """The official dataset's ``create_positive_map`` (char_to_token of each span's ends), binarised as
    the official collate does, for caption ``i`` of a batch tokenization."""
    pm = torch.zeros(len(spans_), width, dtype=torch.bool)
    for j, (beg, end) in enumerate(spans_):
        b, e = tokenized.char_to_token(i, beg), tokenized.char_to_token(i, end - 1)
        if b is None or e is None:
            raise RuntimeError(f"span {(beg, end)} of caption {i} does not start and end on a token")
        pm[j, b: e + 1] = True
    return pm


@dataclass
class Inputs:
    """The batch, in the form each side takes."""

    images: Tensor
    masks: Tensor
    captions: list[str]
    samples: object  # official NestedTensor
    ours_targets: list[dict]
    official_targets: list[dict]
    official_positive_map: Tensor
    official_answers: dict[str, Tensor] | None
    token_lengths: list[int] = field(default_factory=list)


def make_inputs(setup: Setup, official: dict, tokenizer, seed: int, sizes: list[Size]) -> Inputs:
    from mdetr.data.tokens import positive_map_from_spans
    from mdetr.losses.qa import answer_targets

    images, masks = co.make_batch(seed, sizes)
    samples = official["util.misc"].NestedTensor(images, masks)
    batch_tok = tokenizer(setup.captions, padding="longest", return_tensors="pt")
    lengths = [len(tokenizer(c)["input_ids"]) for c in setup.captions]
    ours_targets, official_targets, maps = [], [], []
    for i, (caption, boxes, sp) in enumerate(zip(setup.captions, setup.phrases, spans(setup), strict=True)):
        box_tensor = torch.tensor([b for _, b in boxes], dtype=torch.float32)
        theirs_pm = official_positive_map(batch_tok, i, sp)
        ours_pm = positive_map_from_spans(tokenizer(caption), [[s] for s in sp], caption=caption)
        if not torch.equal(ours_pm, theirs_pm):
            raise RuntimeError(f"positive maps of caption {i} differ between the two constructions")
        target = {"boxes": box_tensor, "positive_map": ours_pm, "caption": caption, "image_id": i,
                  "size": torch.tensor(sizes[i]), "orig_size": torch.tensor(sizes[i])}
        if setup.answers:
            target["answer"] = setup.answers[i]
        ours_targets.append(target)
        official_targets.append({"boxes": box_tensor, "labels": torch.zeros(len(boxes), dtype=torch.long),
                                 "tokens_positive": [[s] for s in sp], "caption": caption,
                                 "image_id": torch.tensor(i)})
        maps.append(theirs_pm)
    answers = answer_targets(setup.answers) if setup.answers else None
    return Inputs(images, masks, list(setup.captions), samples, ours_targets, official_targets,
                  torch.cat(maps).float(), answers, lengths)


# --------------------------------------------------------------------------------------------------------
# Models


def load_official_modules(repo: Path) -> dict:
    official = co.import_official(repo)
    for name in ("models.mdetr", "models.matcher", "util.dist"):
        official[name] = importlib.import_module(name)
    return official


def encoder_folders(workdir: Path) -> dict[str, str]:
    """Write (once) the random text encoders of each size; official name -> folder."""
    folders = {}
    for name, size in ENCODER_SIZES.items():
        folder = workdir / f"random-{name}"
        if not (folder / "config.json").is_file():
            print(f"writing a random {name}-sized text encoder to {folder}", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                make_tiny_text_encoder(folder, **size)
        folders[name] = str(folder)
    return folders


def build_official(setup: Setup, official: dict, encoders: dict[str, str]) -> nn.Module:
    with co.official_shims(official, encoders):
        return getattr(official["hubconf"], setup.family.arch)(pretrained=False)


def official_from_file(setup: Setup, official: dict, encoders: dict[str, str], path: Path) -> nn.Module:
    import argparse as _argparse

    model = build_official(setup, official, encoders)
    with torch.serialization.safe_globals([_argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def ours_from_file(setup: Setup, encoders: dict[str, str], path: Path) -> nn.Module:
    import mdetr

    return mdetr.load(path, arch=setup.family.arch, text_encoder=encoders[setup.family.text_encoder]).eval()


def zero_dropout(model: nn.Module) -> None:
    """Dropout off in train mode (nn.Dropout modules, the official nn.MultiheadAttention, our attention
    layers and the text encoder's attention, which reads its Dropout module's p)."""
    from mdetr.models.transformer import MultiheadAttention

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
        elif isinstance(m, MultiheadAttention):
            m.dropout_p = 0.0


# --------------------------------------------------------------------------------------------------------
# What is timed


def official_infer(model: nn.Module, inputs: Inputs) -> Callable[[], dict[str, Tensor]]:
    @torch.no_grad()
    def run() -> dict[str, Tensor]:
        return co.official_outputs(model, inputs.samples, inputs.captions, False)[0]
    return run


def ours_infer(model: nn.Module, inputs: Inputs, *, bf16: bool = False) -> Callable[[], dict[str, Tensor]]:
    @torch.no_grad()
    def run() -> dict[str, Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs.images, inputs.masks, inputs.captions)
        return _official_keys(out)
    return run


def official_thread_spread(run: Callable[[], dict[str, Tensor]], reference: dict[str, Tensor],
                           threads: int) -> dict:
    """How far the official outputs move when the same call runs on one thread instead of ``threads``:
    the float-rounding spread of the reference itself (oneDNN splits its sums by thread count)."""
    other = 1 if threads != 1 else 2
    torch.set_num_threads(other)
    try:
        outputs = run()
    finally:
        torch.set_num_threads(threads)
    return {"threads": other, "max_abs_diff": output_diffs(outputs, reference)}


def _official_keys(out) -> dict[str, Tensor]:
    """Our MDETROutput under the official output keys (:func:`compare_official.official_keys`), in
    float32 (bf16 rows widened)."""
    return {key: value.float() for key, value in co.official_keys(out).items()}


def float64_reference(theirs: nn.Module, ours: nn.Module, inputs: Inputs) -> tuple[dict[str, Tensor], dict]:
    """:func:`compare_official.float64_outputs` on the benchmark batch: the official float64 outputs (the
    stand-in for exact arithmetic) and how far our float64 outputs are from them."""
    reference, mine = co.float64_outputs(theirs, ours, type(inputs.samples), inputs.images, inputs.masks,
                                         inputs.captions, False)
    gc.collect()
    return reference, {"ours_float64_vs_official_float64": output_diffs(mine, reference)}


def official_weight_dict(qa: bool, dec_layers: int = 6) -> dict[str, float]:
    """The official ``models.mdetr.build`` weight dict at the ``main.py`` defaults (aux loss on)."""
    weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_contrastive_align": 1.0, "loss_giou": 2.0}
    if qa:  # CLEVR
        weights.update({"loss_answer_type": 1.0, "loss_answer_binary": 1.0, "loss_answer_attr": 1.0,
                        "loss_answer_reg": 1.0})
    aux = {}
    for i in range(dec_layers - 1):
        aux.update({f"{k}_{i}": v for k, v in weights.items()})
    weights.update(aux)
    return weights


def official_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """The official ``main.py`` parameter groups and AdamW."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named
                    if "backbone" not in n and "text_encoder" not in n and p.requires_grad]},
        {"params": [p for n, p in named if "backbone" in n and p.requires_grad], "lr": 1e-5},
        {"params": [p for n, p in named if "text_encoder" in n and p.requires_grad], "lr": 5e-5},
    ]
    return torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)


def official_train(model: nn.Module, official: dict, inputs: Inputs, qa: bool) -> Callable[[], dict]:
    """One iteration of the official ``engine.train_one_epoch`` (no masks, max_norm 0.1)."""
    mdetr_mod, matcher_mod, dist = official["models.mdetr"], official["models.matcher"], official["util.dist"]
    model.train()
    model.aux_loss = True  # main.py default (the hub turns it off)
    zero_dropout(model)
    matcher = matcher_mod.HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    criterion = mdetr_mod.SetCriterion(255, matcher=matcher, eos_coef=0.1,
                                       losses=["labels", "boxes", "cardinality", "contrastive_align"],
                                       temperature=0.07)
    qa_criterion = mdetr_mod.QACriterionClevr() if qa else None
    weight_dict = official_weight_dict(qa)
    optimizer = official_optimizer(model)
    samples, captions, targets = inputs.samples, inputs.captions, inputs.official_targets
    positive_map, answers = inputs.official_positive_map, inputs.official_answers

    def step() -> dict:
        memory_cache = model(samples, captions, encode_and_save=True)
        outputs = model(samples, captions, encode_and_save=False, memory_cache=memory_cache)
        loss_dict = {}
        loss_dict.update(criterion(outputs, targets, positive_map))
        if qa_criterion is not None:
            loss_dict.update(qa_criterion(outputs, answers))
        losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict.keys() if k in weight_dict)
        loss_dict_reduced = dist.reduce_dict(loss_dict)
        scaled = {k: v * weight_dict[k] for k, v in loss_dict_reduced.items() if k in weight_dict}
        loss_value = sum(scaled.values()).item()
        optimizer.zero_grad()
        losses.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return {"loss": loss_value, "grad_norm": float(norm),
                "losses": {k: float(v.detach()) for k, v in loss_dict.items() if k in weight_dict}}
    return step


def ours_train(model: nn.Module, inputs: Inputs) -> Callable[[], dict]:
    """One optimisation step of ``mdetr train`` (accumulate_gradients, clip 0.1, AdamW), with its defaults:
    PyTorch's fused AdamW kernel, channels-last backbone activations (``train.channels_last``) and linear
    layers on oneDNN (``train.onednn_linear``)."""
    from mdetr.builder import _with_answer_losses
    from mdetr.config import Config, LossConfig, TrainConfig
    from mdetr.data.collate import Batch
    from mdetr.engine.distributed import DistributedContext
    from mdetr.engine.optim import build_optimizer
    from mdetr.engine.train import GroundingTask, accumulate_gradients
    from mdetr.inference.optimize import channels_last_backbone
    from mdetr.losses.criterion import build_criterion, weight_dict
    from mdetr.ops.linear import onednn_linear_layers

    config = model.config
    config.aux_loss = True  # the training default (the official loaders turn it off for inference)
    model.train()
    zero_dropout(model)
    loss_config = LossConfig()
    criterion = build_criterion(loss_config, num_token_slots=config.num_token_slots)
    weights = weight_dict(loss_config, num_aux=config.dec_layers - 1,
                          contrastive_align=config.contrastive_align, isfinal=config.predict_final)
    if config.qa_dataset:
        criterion, weights = _with_answer_losses(Config(model=config, loss=loss_config), criterion, weights)
    train_config = TrainConfig()
    optimizer = build_optimizer(model, train_config)  # fused AdamW, as mdetr train
    if train_config.channels_last:  # channels-last backbone activations, as mdetr train
        channels_last_backbone(model, weights=False)
    if train_config.onednn_linear:  # linear layers on oneDNN, as mdetr train
        onednn_linear_layers(model)
    task, ctx = GroundingTask(), DistributedContext(device=torch.device("cpu"))
    batch = Batch(inputs.images, inputs.masks, inputs.captions, inputs.ours_targets)

    def step() -> dict:
        optimizer.zero_grad(set_to_none=True)
        total, named = accumulate_gradients(task, model, criterion, weights, [batch], ctx=ctx)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.clip_max_norm)
        loss_value = total.item()
        optimizer.step()
        return {"loss": loss_value, "grad_norm": float(norm),
                "losses": {k: float(v) for k, v in named.items() if k in weights}}
    return step


# --------------------------------------------------------------------------------------------------------
# One family, in this process


def output_diffs(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> dict[str, float]:
    return {k: v["max_abs_diff"] for k, v in co.compare(ours, theirs).items()}


def loss_agreement(ours: dict, theirs: dict) -> dict:
    keys = sorted(set(ours["losses"]) & set(theirs["losses"]))
    only = sorted(set(ours["losses"]) ^ set(theirs["losses"]))
    per_key = {k: abs(ours["losses"][k] - theirs["losses"][k]) for k in keys}
    return {"official_loss": theirs["loss"], "ours_loss": ours["loss"],
            "loss_abs_diff": abs(ours["loss"] - theirs["loss"]),
            "max_named_loss_abs_diff": max(per_key.values()) if per_key else None,
            "worst_named_loss": max(per_key, key=per_key.get) if per_key else None,
            "official_grad_norm": theirs["grad_norm"], "ours_grad_norm": ours["grad_norm"],
            "keys_on_one_side_only": only}


def run_family(name: str, setup: Setup, official: dict, encoders: dict[str, str], workdir: Path,
               args: argparse.Namespace) -> dict:
    from mdetr.inference.optimize import optimize_for_inference

    family, sizes = setup.family, args.sizes or setup.sizes
    setup = for_batch(setup, sizes)
    batch = len(sizes)
    images, masks = co.make_batch(args.seed, sizes)
    samples = official["util.misc"].NestedTensor(images, masks)
    print(f"[{name}] building {family.arch} (official hubconf), random weights", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    theirs = build_official(setup, official, encoders).eval()
    co.randomize_official(theirs, theirs.backbone, official["models.backbone"].FrozenBatchNorm2d, samples,
                          args.seed)
    folder = encoders[family.text_encoder]
    path = workdir / f"{family.arch}.pth"
    torch.save(co.official_checkpoint(theirs, "transformer.text_encoder.", family, folder), path)
    ours = ours_from_file(setup, encoders, path)
    inputs = make_inputs(setup, official, ours.tokenizer, args.seed, sizes)
    if len(set(inputs.token_lengths)) > 1:
        print(f"warning: captions of {inputs.token_lengths} tokens; with padding the contrastive-alignment "
              "losses differ by design (the official one includes padding tokens)", file=sys.stderr)
    n_params = {"official": sum(p.numel() for p in theirs.parameters()),
                "ours": sum(p.numel() for p in ours.parameters())}
    result: dict = {"arch": family.arch, "text_encoder": family.text_encoder,
                    "text_encoder_size": ENCODER_SIZES[family.text_encoder], "image_sizes": sizes,
                    "captions": inputs.captions, "caption_tokens": inputs.token_lengths,
                    "parameters": n_params}

    if not args.skip_inference:
        fast = optimize_for_inference(ours)
        runners = {"official": official_infer(theirs, inputs), "ours": ours_infer(ours, inputs),
                   "ours_inference_copy": ours_infer(fast, inputs)}
        if not args.no_bf16:
            fast_bf16 = optimize_for_inference(ours, dtype=torch.bfloat16)  # Predictor(dtype="bfloat16")'s
            runners["ours_inference_copy_bf16"] = ours_infer(fast_bf16, inputs, bf16=True)
        first_call = {}
        if not args.no_compile:
            torch._dynamo.reset()  # the previous family's graphs would count against the recompile limit
            for row, bf16 in (("ours_inference_copy_compiled", False),
                              ("ours_inference_copy_bf16_compiled", True)):
                if bf16 and args.no_bf16:
                    continue
                dtype = torch.bfloat16 if bf16 else torch.float32
                runners[row] = ours_infer(optimize_for_inference(ours, dtype=dtype, compile=True), inputs,
                                          bf16=bf16)
                print(f"[{name}] compiling {row}", file=sys.stderr, flush=True)
                start = time.perf_counter()
                runners[row]()
                first_call[row] = time.perf_counter() - start
        times, outs = interleaved(runners, warmup=args.warmup, repeats=args.repeats,
                                  label=f"{name} inference")
        rows = {}
        for row, t in times.items():
            rows[row] = {"includes": INFER_LABELS[row], **summarise(t, batch)}
            if row in first_call:
                rows[row]["first_call_s"] = round(first_call[row], 2)
            if row == "official":
                rows[row]["max_abs_value"] = {k: float(v.abs().max()) for k, v in outs[row][-1].items()}
            else:
                # each row against the official outputs of every round (the inputs never change)
                diffs = [output_diffs(o, ref) for o, ref in zip(outs[row], outs["official"], strict=True)]
                rows[row]["max_abs_diff"] = {k: max(d[k] for d in diffs) for k in diffs[0]}
                rows[row]["speedup_vs_official"] = rows["official"]["median_s"] / rows[row]["median_s"]
        rows["official"]["thread_spread"] = official_thread_spread(runners["official"], outs["official"][-1],
                                                                   args.threads)
        reference, result["float64"] = float64_reference(theirs, ours, inputs)
        for row in rows:  # each row's rounding error: its last round against the float64 evaluation
            rows[row]["max_abs_error_vs_float64"] = output_diffs(outs[row][-1], reference)
        del reference
        result["inference"] = rows
        del fast, runners, outs
        if not args.no_bf16:
            del fast_bf16
        gc.collect()

    if not args.skip_train:
        runners = {"official": official_train(theirs, official, inputs, qa=bool(setup.answers)),
                   "ours": ours_train(ours, inputs)}
        times, outs = interleaved(runners, warmup=args.train_warmup, repeats=args.train_repeats,
                                  label=f"{name} training step")
        rows = {row: {"includes": TRAIN_LABELS[row], **summarise(t, batch)} for row, t in times.items()}
        rows["ours"]["speedup_vs_official"] = rows["official"]["median_s"] / rows["ours"]["median_s"]
        result["train"] = rows
        result["train_first_step"] = loss_agreement(outs["ours"][0], outs["official"][0])
        result["train_first_step"]["named_losses"] = {"official": outs["official"][0]["losses"],
                                                      "ours": outs["ours"][0]["losses"]}
        result["train_last_step"] = loss_agreement(outs["ours"][-1], outs["official"][-1])
        del runners, outs
    del theirs, ours
    gc.collect()

    if not args.skip_memory:
        result["peak_memory"] = memory_rows(name, path, encoders, args)
    path.unlink()
    return result


# --------------------------------------------------------------------------------------------------------
# Peak memory, one process per (side, row)

MEMORY_ROWS = [("official", "inference"), ("ours", "inference"), ("ours", "inference_copy"),
               ("ours", "inference_copy_bf16"), ("ours", "inference_copy_compiled"),
               ("ours", "inference_copy_bf16_compiled"), ("official", "train"), ("ours", "train")]


def memory_rows(name: str, path: Path, encoders: dict[str, str], args: argparse.Namespace) -> dict:
    rows = {}
    for side, mode in MEMORY_ROWS:
        if (mode == "train" and args.skip_train) or (mode != "train" and args.skip_inference) or \
                ("bf16" in mode and args.no_bf16) or (mode.endswith("compiled") and args.no_compile):
            continue
        spec = {"setup": name, "side": side, "mode": mode, "path": str(path), "encoders": encoders,
                "official_repo": str(args.official_repo), "threads": args.threads, "seed": args.seed,
                "sizes": args.sizes, "steps": args.memory_steps,
                "keep_freed_memory": args.keep_freed_memory}
        command = [sys.executable, __file__, "--worker", json.dumps(spec)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"memory worker {side} {mode} failed:\n{done.stderr[-4000:]}")
        rows[f"{side}_{mode}"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  [{name} memory] {side} {mode}: peak {rows[f'{side}_{mode}']['peak_rss_mb']:.0f} MiB",
              file=sys.stderr, flush=True)
    return rows


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    if spec["keep_freed_memory"]:
        keep_freed_memory_or_exit()
    setup = SETUPS[spec["setup"]]
    sizes = [tuple(s) for s in spec["sizes"]] if spec["sizes"] else setup.sizes
    setup = for_batch(setup, sizes)
    official = load_official_modules(Path(spec["official_repo"]))
    encoders, path = spec["encoders"], Path(spec["path"])
    rss_start = resident_mb()
    if spec["side"] == "official":
        model = official_from_file(setup, official, encoders, path)
        tokenizer = model.transformer.tokenizer
    else:
        model = ours_from_file(setup, encoders, path)
        tokenizer = model.tokenizer
        if spec["mode"].startswith("inference_copy"):
            from mdetr.inference.optimize import optimize_for_inference

            dtype = torch.bfloat16 if "bf16" in spec["mode"] else torch.float32
            # the loaded model is dropped: the copy stays
            model = optimize_for_inference(model, dtype=dtype, compile=spec["mode"].endswith("compiled"))
    gc.collect()
    inputs = make_inputs(setup, official, tokenizer, spec["seed"], sizes)
    rss_model = resident_mb()
    mode = spec["mode"]
    if mode == "train":
        run = (official_train(model, official, inputs, qa=bool(setup.answers)) if spec["side"] == "official"
               else ours_train(model, inputs))
    elif spec["side"] == "official":
        run = official_infer(model, inputs)
    else:
        run = ours_infer(model, inputs, bf16="bf16" in mode)
    run()  # warm-up: allocator pools, optimizer state, oneDNN primitives, compilation
    gc.collect()
    rss_before = resident_mb()
    reset = reset_peak_rss()
    for _ in range(spec["steps"]):
        run()
    peak = peak_rss_mb()
    return {"side": spec["side"], "mode": mode, "rss_at_start_mb": rss_start,
            "rss_model_loaded_mb": rss_model, "rss_after_warmup_mb": rss_before, "peak_rss_mb": peak,
            "peak_reset": reset, "steps": spec["steps"]}


# --------------------------------------------------------------------------------------------------------
# Report

def _mib(memory: dict | None) -> str:
    return "-" if memory is None else f"{memory['peak_rss_mb']:.0f}"


INFER_LABELS = {"official": "official (two-stage call)", "ours": "ours, model forward",
                "ours_inference_copy": "ours, inference copy (Predictor's)",
                "ours_inference_copy_bf16": "ours, inference copy, bf16 autocast",
                "ours_inference_copy_compiled": "ours, inference copy, compiled",
                "ours_inference_copy_bf16_compiled": "ours, inference copy, bf16 autocast, compiled"}
# inference row -> its peak-memory entry
MEMORY_KEYS = {"official": "official_inference", "ours": "ours_inference",
               **{row: row for row in INFER_LABELS if row.startswith("ours_inference_copy")}}
TRAIN_LABELS = {"official": "official engine.train_one_epoch body: forward (two stages), SetCriterion "
                            "(+ CLEVR QA), backward, clip 0.1, AdamW",
                "ours": "mdetr accumulate_gradients (forward, criterion, backward; channels-last backbone "
                        "activations, linear layers on oneDNN), clip 0.1, fused AdamW"}


def _timing_row(label: str, s: dict, check: str, mem: dict | None) -> str:
    """One table row: timings, speed-up, the row's agreement check (a difference or a loss) and memory."""
    return (f"| {label} | {s['median_s']:.3f} | {s['p90_s']:.3f} | {s['images_per_s']:.2f} | "
            f"{s.get('speedup_vs_official', 1.0):.2f} | {check} | {_mib(mem)} |")


def tables(results: dict) -> str:
    lines = []
    for name, r in results.items():
        sizes = " + ".join(f"{h}x{w}" for h, w in r["image_sizes"])
        if "inference" in r:
            lines += [f"\n{name} ({r['arch']}, text encoder {r['text_encoder']}-sized), inference, batch "
                      f"{len(r['image_sizes'])} ({sizes}):\n",
                      "| row | median (s) | p90 (s) | images/s | x official | largest abs diff | "
                      "peak RSS (MiB) | largest abs error vs float64 |",
                      "|---|---|---|---|---|---|---|---|"]
            for row, s in r["inference"].items():
                diff = max(s["max_abs_diff"].values()) if "max_abs_diff" in s else None
                mem = r.get("peak_memory", {}).get(MEMORY_KEYS[row])
                errors = s.get("max_abs_error_vs_float64")
                label = INFER_LABELS[row] + (f" (first call {s['first_call_s']:.0f} s)" if "first_call_s" in s
                                             else "")
                lines.append(_timing_row(label, s, "-" if diff is None else f"{diff:.1e}", mem)
                             + (f" {max(errors.values()):.1e} |" if errors else " - |"))
        if "train" in r:
            a = r["train_first_step"]
            lines += [f"\n{name}, training step, batch {len(r['image_sizes'])} ({sizes}):\n",
                      "| row | median step (s) | p90 (s) | images/s | x official | first-step loss | "
                      "peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
            for row, s in r["train"].items():
                mem = r.get("peak_memory", {}).get(f"{row}_train")
                loss = a["official_loss"] if row == "official" else a["ours_loss"]
                lines.append(_timing_row(row, s, f"{loss:.6f}", mem))
            lines.append(f"\nfirst step: |loss diff| {a['loss_abs_diff']:.1e}, largest named-loss diff "
                         f"{a['max_named_loss_abs_diff']:.1e} ({a['worst_named_loss']}), grad norm official "
                         f"{a['official_grad_norm']:.6f} / ours {a['ours_grad_norm']:.6f}")
    return "\n".join(lines)


# the float32 inference rows held to --tolerance
FLOAT32_ROWS = ("ours", "ours_inference_copy", "ours_inference_copy_compiled")


def check_targets(results: dict, tolerance: float) -> list[str]:
    """The issue's targets, one line each (met / NOT met)."""
    lines = []
    for name, r in results.items():
        inf = r.get("inference", {})
        for row in FLOAT32_ROWS:
            if row in inf:
                s = inf[row]
                key = max(s["max_abs_diff"], key=s["max_abs_diff"].get)
                diff, scale = s["max_abs_diff"][key], inf["official"]["max_abs_value"][key]
                lines.append(f"{name} inference {row}: {s['speedup_vs_official']:.2f}x official "
                             f"(target >= 1.5x: {'met' if s['speedup_vs_official'] >= 1.5 else 'NOT met'}), "
                             f"largest diff {diff:.1e} on {key} (official |max| {scale:.3g}; "
                             f"{'within' if diff <= tolerance else 'ABOVE'} {tolerance:g})")
        if "thread_spread" in inf.get("official", {}):
            spread = inf["official"]["thread_spread"]
            key = max(spread["max_abs_diff"], key=spread["max_abs_diff"].get)
            lines.append(f"{name} official on {spread['threads']} thread(s) instead of the timed count: its "
                         f"outputs move by up to {spread['max_abs_diff'][key]:.1e} ({key})")
        if "float64" in r:
            same = r["float64"]["ours_float64_vs_official_float64"]
            errors = {row: max(s["max_abs_error_vs_float64"].values()) for row, s in inf.items()
                      if "bf16" not in row and "max_abs_error_vs_float64" in s}
            lines.append(f"{name} in float64, ours against official: largest diff {max(same.values()):.1e}; "
                         "float32 rounding error against that float64 evaluation: "
                         + ", ".join(f"{row} {e:.1e}" for row, e in errors.items()))
        for row in ("ours_inference_copy_bf16", "ours_inference_copy_bf16_compiled"):
            if row in inf:
                s = inf[row]
                lines.append(f"{name} inference {row}: {s['speedup_vs_official']:.2f}x official float32 "
                             f"(target >= 3x: {'met' if s['speedup_vs_official'] >= 3 else 'NOT met'}), "
                             f"largest diff {max(s['max_abs_diff'].values()):.1e} (not held to the "
                             "tolerance)")
        if "train" in r:
            s = r["train"]["ours"]
            lines.append(f"{name} training step: {s['speedup_vs_official']:.2f}x official (target >= 1.3x: "
                         f"{'met' if s['speedup_vs_official'] >= 1.3 else 'NOT met'}), first-step loss diff "
                         f"{r['train_first_step']['loss_abs_diff']:.1e}")
    return lines


def parse_size(text: str) -> Size:
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", type=Path, default=Path("/tmp/official/mdetr-git"),
                        help="a checkout of ashkamath/mdetr (default: %(default)s)")
    parser.add_argument("--families", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="HxW",
                        help="one image per size for every family, the family's captions repeated in "
                        "order when there are more images (default: per family, see above)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed inference rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed inference rounds first")
    parser.add_argument("--train-repeats", type=int, default=None,
                        help="timed training rounds (default --repeats)")
    parser.add_argument("--train-warmup", type=int, default=None,
                        help="untimed training rounds (default --warmup)")
    parser.add_argument("--memory-steps", type=int, default=2, help="calls per peak-memory process")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 rows")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="mdetr.ops.allocator.keep_freed_memory() first (what the mdetr command does), "
                        "for both sides: large freed blocks stay in the process instead of returning "
                        "to the kernel at every call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the random text encoders are kept between runs "
                        "(default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=Path("runs/speed_vs_official.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one peak-memory measurement
    args = parser.parse_args(argv)
    if args.train_repeats is None:
        args.train_repeats = args.repeats
    if args.train_warmup is None:
        args.train_warmup = args.warmup
    if args.repeats < 1 or args.train_repeats < 1 or args.train_warmup < 1:
        parser.error("--repeats and --train-repeats must be at least 1, --train-warmup at least 1 "
                     "(the first training step is the one whose losses are compared)")
    return args


def keep_freed_memory_or_exit() -> None:
    from mdetr.ops.allocator import keep_freed_memory

    if not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: not applied (glibc's mallopt is unavailable, or the allocator "
                         "is set by the environment)")


def environment(repo: Path, threads: int) -> dict:
    info = co.environment(repo)
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {**info, "cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads,
            "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory_or_exit()
    repo = args.official_repo.expanduser().resolve()
    args.official_repo = repo
    official = load_official_modules(repo)
    env = environment(repo, args.threads)  # before the runs: its load average is the one at the start
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="speed_vs_official_")))
        workdir.mkdir(parents=True, exist_ok=True)
        encoders = encoder_folders(workdir)
        started = time.perf_counter()
        results = {name: run_family(name, SETUPS[name], official, encoders, workdir, args)
                   for name in args.families}
    skipped = [part for part in ("inference", "train", "memory") if getattr(args, f"skip_{part}")]
    document = {"environment": env, "seed": args.seed, "families_run": args.families, "skipped": skipped,
                "tolerance": args.tolerance, "keep_freed_memory": args.keep_freed_memory,
                "warmup": args.warmup, "repeats": args.repeats, "train_warmup": args.train_warmup,
                "train_repeats": args.train_repeats, "seconds": round(time.perf_counter() - started, 1),
                "load_average_at_end": os.getloadavg(), "families": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(tables(results))
    print()
    lines = check_targets(results, args.tolerance)
    print("\n".join(lines))
    print(f"\nwrote {args.output} ({document['seconds']:.0f} s)")
    bad = [r for r in results.values() for row in FLOAT32_ROWS
           if row in r.get("inference", {})
           and max(r["inference"][row]["max_abs_diff"].values()) > args.tolerance]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
