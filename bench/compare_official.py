"""Compare this implementation with the official MDETR code (ashkamath/mdetr) on identical random weights.

    python bench/compare_official.py --official-repo ~/src/mdetr --text-encoder /tmp/tiny-roberta \\
        --clevr-text-encoder /tmp/tiny-distilroberta --output runs/compare_official.json

For each model family this builds the official model with the official ``hubconf.py`` entry point (random
weights, seeded), saves its ``state_dict`` as an official-layout ``.pth`` file, loads that file with
``mdetr.load(path, arch=NAME)``, runs both models in eval mode and float32 on the same padded image batch
and captions (the official model in its two stages, ``encode_and_save`` then decode; the segmentation model
in one call), and reports the largest absolute difference of every output; then once more in float64
(copies of both models, widened exactly), where functions that are the same agree to float64 rounding.
Exit status 1 when a float32 difference exceeds ``--tolerance``.

Requirements, none of which this package depends on: a checkout of ashkamath/mdetr, ``torchvision`` and
``timm`` importable next to ``torch`` (timm 0.4.x: from 0.6 on, timm fuses batch norm and activation and the
official ``replace_bn`` silently drops the activation), and a RoBERTa-style text encoder folder
(``bench/make_tiny_text_encoder.py`` writes one) used in place of ``roberta-base`` / ``distilroberta-base``.

The official code is imported from ``--official-repo`` at run time only, and used as it is: three run-time
shims stand in for what it would otherwise download or call (see :func:`official_shims`).

Weights: the official initialisation, then every constant tensor (biases, norm scales) is perturbed, and
every frozen batch norm gets statistics measured on the input batch (a data-dependent initialisation, so
activations keep a trained network's scale through deep backbones) with random affine terms. The text
encoder's ``embeddings.position_ids`` buffer is written into the file, as transformers 4.5 did for the
released checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    """One model family: its architecture name, which is also the official ``hubconf.py`` entry point."""

    name: str
    arch: str
    questions: bool = False  # QA models get questions as captions
    text_encoder: str = "roberta-base"  # the official text_encoder_type

    @property
    def segmentation(self) -> bool:
        return self.arch.endswith("_phrasecut")


FAMILIES = {
    f.name: f
    for f in [
        Family("resnet101", "mdetr_resnet101"),
        Family("efficientnetB3", "mdetr_efficientnetB3"),
        Family("efficientnetB5", "mdetr_efficientnetB5"),
        Family("clevr", "mdetr_clevr", questions=True, text_encoder="distilroberta-base"),
        Family("gqa", "mdetr_resnet101_gqa", questions=True),
        Family("gqa_efficientnetB5", "mdetr_efficientnetB5_gqa", questions=True),
        Family("phrasecut", "mdetr_resnet101_phrasecut"),
        Family("phrasecut_efficientnetB3", "mdetr_efficientnetB3_phrasecut"),
    ]
}
DEFAULT_FAMILIES = ["resnet101", "efficientnetB3", "efficientnetB5", "clevr", "gqa", "phrasecut"]

CAPTIONS = ["the cat on the left of the blue car",
            "a man in a red shirt is holding a small black dog next to the wooden table"]
QUESTIONS = ["what color is the cube that is to the right of the yellow ball?",
             "is there a large green metal cylinder behind the small rubber sphere?"]


# --------------------------------------------------------------------------------------------------------
# The official code, imported from a checkout at run time


def import_official(repo: Path) -> dict[str, object]:
    """Import the official ``hubconf`` and model modules from a checkout (its top-level packages are
    ``models`` and ``util``, so the checkout goes first on ``sys.path``)."""
    if not (repo / "hubconf.py").is_file() or not (repo / "models" / "mdetr.py").is_file():
        raise SystemExit(f"{repo} is not a checkout of ashkamath/mdetr (no hubconf.py / models/mdetr.py)")
    sys.path.insert(0, str(repo))
    try:
        modules = {name: importlib.import_module(name) for name in
                   ("hubconf", "models.backbone", "models.transformer", "util.misc")}
    except ImportError as err:
        raise SystemExit(f"cannot import the official code from {repo}: {err}\n"
                         "It needs torchvision, timm, transformers and scipy next to torch.") from err
    return modules


@contextlib.contextmanager
def official_shims(official: dict[str, object], text_encoders: dict[str, str]) -> Iterator[None]:
    """Run-time stand-ins, undone on exit; the official source is not modified.

    1. Backbones are built with ``pretrained=False`` (the official code asks torchvision / timm for
       ImageNet weights, a download; the weights are random here anyway).
    2. ``text_encoder_type`` names (``roberta-base``, ``distilroberta-base``) map to local folders.
    3. Tokenizers get ``batch_encode_plus`` (removed in transformers 5) as an alias of ``__call__``.
    """
    import torchvision

    backbone_mod, hubconf, transformer_mod = (official[k] for k in ("models.backbone", "hubconf",
                                                                     "models.transformer"))
    saved: list[tuple[object, str, object]] = []

    def patch(owner: object, attr: str, value: object) -> None:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def without_pretrained(fn):
        def build(*args, **kwargs):
            kwargs.pop("pretrained", None)
            return fn(*args, **kwargs)
        return build

    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        patch(torchvision.models, name, without_pretrained(getattr(torchvision.models, name)))
    create_model = backbone_mod.create_model
    patch(backbone_mod, "create_model", lambda *a, **kw: create_model(*a, **{**kw, "pretrained": False}))

    transformer_cls = hubconf.Transformer

    def transformer(*args, text_encoder_type: str = "roberta-base", **kwargs):
        if text_encoder_type not in text_encoders:
            raise SystemExit(f"no local folder given for the official text encoder {text_encoder_type!r}")
        return transformer_cls(*args, text_encoder_type=text_encoders[text_encoder_type], **kwargs)

    patch(hubconf, "Transformer", transformer)
    tokenizer_cls = transformer_mod.RobertaTokenizerFast
    if not hasattr(tokenizer_cls, "batch_encode_plus"):
        shimmed = type(tokenizer_cls.__name__, (tokenizer_cls,),
                       {"batch_encode_plus": lambda self, text, **kw: self(text, **kw)})
        patch(transformer_mod, "RobertaTokenizerFast", shimmed)
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


# --------------------------------------------------------------------------------------------------------
# Inputs and weights


def make_batch(seed: int, sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Random ImageNet-normalised-like images of the given (H, W), zero-padded to a batch.

    Returns images (B, 3, H_max, W_max) and masks (B, H_max, W_max), True on padding.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, h, w)
    masks = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=gen)
        masks[i, :hi, :wi] = False
    return images, masks


@torch.no_grad()
def randomize_official(model: nn.Module, backbone: nn.Module, frozen_bn_cls: type, samples: object,
                       seed: int) -> None:
    """Random weights that exercise every parameter (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.is_floating_point() and bool((p == p.flatten()[0]).all()):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))  # zero biases, unit norm scales: +N(0, 0.1^2)

    def calibrate(module: nn.Module, inputs: tuple[Tensor]) -> None:
        x = inputs[0]
        c = x.shape[1]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) * (0.8 + 0.4 * torch.rand(c, generator=gen)))
        module.weight.copy_(0.5 + torch.rand(c, generator=gen))
        module.bias.copy_(0.2 * torch.randn(c, generator=gen))

    norms = [m for m in backbone.modules() if isinstance(m, frozen_bn_cls)]
    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    if not hooks:
        raise RuntimeError("no frozen batch norm found in the official backbone")
    try:
        backbone(samples)  # each hook fires once, in order, with the statistics of its real input
    finally:
        for h in hooks:
            h.remove()


def official_checkpoint(model: nn.Module, text_encoder_prefix: str, family: Family, folder: str) -> dict:
    """The file layout of the released checkpoints: ``{"model": state_dict, "args": Namespace}``, with the
    ``embeddings.position_ids`` buffer that transformers 4.5 saved (newer versions no longer do)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = f"{text_encoder_prefix}embeddings.position_ids"
    if key not in state:
        n = state[f"{text_encoder_prefix}embeddings.position_embeddings.weight"].shape[0]
        state[key] = torch.arange(n).unsqueeze(0)
    return {"model": state, "args": argparse.Namespace(hub_entry=family.arch, text_encoder_type=folder)}


# --------------------------------------------------------------------------------------------------------
# Running both implementations


def official_outputs(model: nn.Module, samples: object, captions: list[str],
                     segmentation: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The official call sequence: two stages for MDETR, one call for the segmentation wrapper.

    Returns (outputs, diagnostics): the model's tensor outputs by official key, and intermediate tensors.
    """
    if segmentation:
        out = model(samples, captions)
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}, {}
    cache = model(samples, captions, encode_and_save=True)
    out = model(samples, captions, encode_and_save=False, memory_cache=cache)
    outputs = {k: v for k, v in out.items() if isinstance(v, Tensor)}
    return outputs, {"memory": cache["img_memory"].transpose(0, 1)}  # (B, HW + L, D), cross-encoder output


def our_outputs(model: nn.Module, images: Tensor, masks: Tensor, captions: list[str],
                segmentation: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The same from this package, under the official output keys."""
    diagnostics = {}
    if segmentation:
        out = model(images, masks, captions)
    else:
        cache = model.encode(images, masks, captions)
        out = model.decode(cache)
        diagnostics["memory"] = cache.memory
    return official_keys(out), diagnostics


def official_keys(out: object) -> dict[str, Tensor]:
    """The tensors of our model output (``MDETROutput`` or the segmentation output) under the official
    output keys."""
    outputs = {}
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens", "pred_isfinal", "pred_masks"):
        value = getattr(out, key, None)
        if value is not None:
            outputs[key] = value
    for name, value in out.qa.items():
        outputs[f"pred_{name}"] = value
    return outputs


@torch.no_grad()
def float64_outputs(theirs: nn.Module, ours: nn.Module, nested_tensor: type, images: Tensor, masks: Tensor,
                    captions: list[str], segmentation: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both models once more in float64 (copies; weights and inputs widened exactly): (official outputs,
    ours). Where the two compute the same function they agree to float64 rounding; the official ones also
    stand in for exact arithmetic when a float32 result's rounding error is measured."""
    wide = images.double()
    reference, _ = official_outputs(copy.deepcopy(theirs).double(), nested_tensor(wide, masks), captions,
                                    segmentation)
    mine, _ = our_outputs(copy.deepcopy(ours).double(), wide, masks, captions, segmentation)
    return reference, mine


def backbone_diagnostics(official_backbone: nn.Module, our_backbone: nn.Module, samples: object,
                         images: Tensor, masks: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The last backbone level (what ``input_proj`` reads) and its sine position embedding, both sides."""
    features, pos = official_backbone(samples)
    feat, _, our_pos = our_backbone(images, masks)[-1]
    return ({"backbone_features": feat, "position_embedding": our_pos},
            {"backbone_features": features[-1].tensors, "position_embedding": pos[-1]})


def compare(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> dict[str, dict]:
    """Per key: the largest absolute difference, the largest official magnitude (for scale), the shape."""
    if set(ours) != set(theirs):
        raise RuntimeError(f"output keys differ: ours only {sorted(set(ours) - set(theirs))}, "
                           f"official only {sorted(set(theirs) - set(ours))}")
    report = {}
    for key in sorted(theirs):
        a, b = ours[key], theirs[key]
        if a.shape != b.shape:
            raise RuntimeError(f"{key}: shape {tuple(a.shape)} here, {tuple(b.shape)} in the official model")
        report[key] = {
            "max_abs_diff": float((a.double() - b.double()).abs().max()),
            "max_abs_value": float(b.abs().max()),
            "shape": list(b.shape),
        }
    return report


def run_family(family: Family, official: dict[str, object], text_encoders: dict[str, str], args) -> dict:
    import mdetr

    hubconf = official["hubconf"]
    nested_tensor = official["util.misc"].NestedTensor
    frozen_bn_cls = official["models.backbone"].FrozenBatchNorm2d
    segmentation = family.segmentation
    captions = QUESTIONS if family.questions else CAPTIONS
    images, masks = make_batch(args.seed, args.image_sizes)
    samples = nested_tensor(images, masks)

    torch.manual_seed(args.seed)
    with official_shims(official, text_encoders):
        theirs = getattr(hubconf, family.arch)(pretrained=False)
    theirs.eval()
    official_detr = theirs.detr if segmentation else theirs
    randomize_official(theirs, official_detr.backbone, frozen_bn_cls, samples, args.seed)
    folder = text_encoders[family.text_encoder]
    prefix = ("detr." if segmentation else "") + "transformer.text_encoder."

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{family.arch}.pth"
        torch.save(official_checkpoint(theirs, prefix, family, folder), path)
        ours = mdetr.load(path, arch=family.arch, text_encoder=folder).eval()

    with torch.no_grad():
        started = time.perf_counter()
        reference, reference_diag = official_outputs(theirs, samples, captions, segmentation)
        outputs, diagnostics = our_outputs(ours, images, masks, captions, segmentation)
        seconds = time.perf_counter() - started
        our_detr = ours.detr if family.segmentation else ours
        ours_bb, theirs_bb = backbone_diagnostics(official_detr.backbone, our_detr.backbone, samples, images,
                                                  masks)
    # Float64: what is left is float64 rounding, while the float32 differences above are float32 rounding.
    wide_reference, wide_outputs = float64_outputs(theirs, ours, nested_tensor, images, masks, captions,
                                                   segmentation)
    return {
        "arch": family.arch,
        "text_encoder": folder,
        "captions": captions,
        "outputs": compare(outputs, reference),
        "outputs_float64": compare(wide_outputs, wide_reference),
        "diagnostics": compare({**diagnostics, **ours_bb}, {**reference_diag, **theirs_bb}),
        "forward_seconds": round(seconds, 1),  # both models, one batch
    }


# --------------------------------------------------------------------------------------------------------


def environment(repo: Path) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "official_repo": str(repo)}
    for name in ("torchvision", "timm"):
        with contextlib.suppress(ImportError):
            info[name] = importlib.import_module(name).__version__
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"]
        top, commit = subprocess.run(git, check=True, capture_output=True, text=True).stdout.split()
        if Path(top).resolve() == repo:  # not the commit of some repository the checkout sits in
            info["official_commit"] = commit
    return info


def timm_fuses_bn_act() -> bool:
    import timm

    major, minor = (int(x) for x in timm.__version__.split(".")[:2])
    return (major, minor) >= (0, 6)


# Columns of the summary table: (title, output keys whose largest difference it shows).
SUMMARY_COLUMNS = [
    ("pred_logits", lambda k: k == "pred_logits"),
    ("pred_boxes", lambda k: k == "pred_boxes"),
    ("proj_queries", lambda k: k == "proj_queries"),
    ("proj_tokens", lambda k: k == "proj_tokens"),
    ("QA (pred_answer_*)", lambda k: k.startswith("pred_answer")),
    ("pred_masks", lambda k: k == "pred_masks"),
]


def summary_table(results: dict[str, dict], key: str = "outputs") -> str:
    """A Markdown table, family x output group -> largest absolute difference ('-': no such output), of
    the float32 comparison (``key="outputs"``) or the float64 one (``"outputs_float64"``)."""
    lines = ["| family (arch) | " + " | ".join(t for t, _ in SUMMARY_COLUMNS) + " |",
             "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for name, r in results.items():
        cells = []
        for _, wanted in SUMMARY_COLUMNS:
            diffs = [e["max_abs_diff"] for k, e in r[key].items() if wanted(k)]
            cells.append(f"{max(diffs):.1e}" if diffs else "-")
        lines.append(f"| {name} (`{r['arch']}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(results: dict[str, dict]) -> str:
    keys = sorted({k for r in results.values() for k in r["diagnostics"]})
    lines = ["| family | " + " | ".join(f"{k} (max abs diff / max abs value)" for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        entries = [r["diagnostics"].get(k) for k in keys]
        cells = [f"{e['max_abs_diff']:.1e} / {e['max_abs_value']:.1f}" if e else "-" for e in entries]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-repo", type=Path, required=True, help="a checkout of ashkamath/mdetr")
    parser.add_argument("--text-encoder", required=True,
                        help="folder of a RoBERTa-style encoder + tokenizer, used for 'roberta-base'")
    parser.add_argument("--clevr-text-encoder", default=None,
                        help="folder used for 'distilroberta-base' (CLEVR); default: --text-encoder")
    parser.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES, choices=sorted(FAMILIES))
    parser.add_argument("--image-sizes", nargs="+", type=parse_size, default=[(333, 401), (270, 298)],
                        metavar="HxW", help="one image per size, zero-padded to a batch; sizes that are not "
                        "multiples of 32 exercise TF 'same' padding and mask resizing (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    repo = args.official_repo.expanduser().resolve()
    text_encoders = {"roberta-base": args.text_encoder,
                     "distilroberta-base": args.clevr_text_encoder or args.text_encoder}
    official = import_official(repo)
    if any("fficientnet" in f for f in args.families) and timm_fuses_bn_act():
        print("warning: timm >= 0.6 fuses batch norm and activation (BatchNormAct2d); the official "
              "replace_bn then drops EfficientNet activations, unlike the released models. Use timm 0.4.x.",
              file=sys.stderr)

    results = {}
    for name in args.families:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        results[name] = run_family(FAMILIES[name], official, text_encoders, args)
    worst = max(e["max_abs_diff"] for r in results.values() for e in r["outputs"].values())
    print("Largest |ours - official| per output, float32:\n")
    print(summary_table(results))
    print("\nThe same in float64:\n")
    print(summary_table(results, "outputs_float64"))
    print("\nIntermediate tensors (not outputs):\n")
    print(diagnostics_table(results))
    print(f"\nlargest output difference {worst:.2e} ({'within' if worst <= args.tolerance else 'ABOVE'} "
          f"tolerance {args.tolerance:g})")
    document = {"tolerance": args.tolerance, "max_abs_diff": worst, "image_sizes": args.image_sizes,
                "seed": args.seed, "environment": environment(repo), "families": results}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
