"""Export MDETR to ONNX and run the exported graph with onnxruntime.

The exported graph is the whole detector, text encoder included: it takes the processor's tensors and the
caption's token ids and returns the raw predictions, with the batch size, image height and width and text
length left dynamic. :class:`OnnxGroundingModel` runs it and returns an :class:`MDETROutput`, so
:func:`mdetr.inference.processor.post_process_grounded_detection` works on its predictions unchanged.

Graph contract (``B`` images, padded size ``H x W``, ``L`` tokens, ``Q`` queries, ``S`` token slots):

inputs
    ``pixel_values`` (B, 3, H, W) float32, ImageNet-normalised and zero-padded;
    ``pixel_mask`` (B, H, W) bool, True on padding;
    ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64 (1 on real tokens), as the model's
    tokenizer returns them with ``padding="longest"``.
outputs
    ``pred_logits`` (B, Q, S) float32 logits over token slots (slot S-1: no object);
    ``pred_boxes`` (B, Q, 4) float32 normalised (cx, cy, w, h) relative to the unpadded image;
    with contrastive alignment ``proj_queries`` (B, Q, C) and ``proj_tokens`` (B, L, C), L2-normalised;
    with an is-final head ``pred_isfinal`` (B, Q, 1).

QA answer heads and the segmentation branch are not part of the export.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdetr.inference.processor import DEFAULT_MAX_TOKENS, GroundingProcessor, text_encoder_max_tokens
from mdetr.models.backbones.efficientnet import Conv2dSame
from mdetr.models.mdetr import MDETR, MDETROutput
from mdetr.models.transformer import EncodedText

MIN_IMAGE_SIDE = 64  # smallest padded height and width the exported graph accepts
INPUT_NAMES = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")
METADATA_KEY = "mdetr"  # ONNX metadata entry holding the processor settings as JSON
TOKENIZER_KEY = "mdetr.tokenizer"  # tokenizers JSON + special tokens: the file needs no checkpoint
ONNX_IR_VERSION = 10  # what the exported file declares (see export_onnx)
# Captions of different lengths for the example batch, so padding in the text is exercised too.
EXAMPLE_CAPTIONS = ("a red circle", "the small blue square left of the green triangle")


def require_onnx() -> None:
    """Raise ImportError naming the extra when the exporter's or runtime's packages are missing."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)} (pip install 'mdetr[onnx]')")


class ExportableMDETR(nn.Module):
    """MDETR as a tensor-in, tensor-out module: token ids go through the text encoder inside the graph.

    ``forward(pixel_values, pixel_mask, input_ids, attention_mask)`` returns the tuple of tensors named by
    :attr:`output_names` (see the module docstring for shapes).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, MDETR):
            raise ValueError(f"only detection models can be exported; got {type(model).__name__} (the mask "
                             "head of segmentation models is not supported)")
        self.model = model

    @property
    def output_names(self) -> list[str]:
        names = ["pred_logits", "pred_boxes"]
        if self.model.config.contrastive_align:
            names += ["proj_queries", "proj_tokens"]
        if self.model.isfinal_embed is not None:
            names.append("pred_isfinal")
        return names

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> tuple[Tensor, ...]:
        transformer = self.model.transformer
        # Single-sentence inputs: token type ids are all zero, the encoder's default.
        encoded = transformer.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = encoded.last_hidden_state  # (B, L, H_text)
        text = EncodedText(transformer.resizer(hidden), attention_mask.ne(1), None)  # (B, L, D), (B, L)
        out = self.model(pixel_values, pixel_mask, text)
        return tuple(getattr(out, name) for name in self.output_names)


def _parity_same_forward(self: Conv2dSame, x: Tensor) -> Tensor:
    """:meth:`Conv2dSame.forward` for stride 2 and an odd kernel, written so that export keeps it dynamic.

    TensorFlow's "SAME" padding depends on the input size's parity: with kernel k, an even size is padded
    by ``(k - 2) // 2`` before and ``k - 2 - (k - 2) // 2`` after, an odd size by one more before. Padding
    an odd size by one extra zero row first (``2 * ceil(s / 2) - s`` rows: 0 or 1) and then as an even
    size gives the same sampling grid and the same zeros, so the graph is one Pad whose size is
    ``(s + 1) // 2``-style arithmetic, which nests compactly through the strided layers; the eager version's
    ``math.ceil``, ``max`` and ``if`` would instead fix the padding to the example's size.
    """
    height, width = x.shape[-2:]
    extra_h = 2 * ((height + 1) // 2) - height
    extra_w = 2 * ((width + 1) // 2) - width
    before = (self.kernel_size[0] - 2) // 2
    after = self.kernel_size[0] - 2 - before
    x = F.pad(x, [extra_w + before, after, extra_h + before, after])
    return self._conv_forward(x, self.weight, self.bias)


@contextmanager
def export_friendly(model: nn.Module) -> Iterator[None]:
    """Within the block, TensorFlow-"same" convolutions pad by a size-dependent amount in the graph."""
    patched = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    for module in patched:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if stride != (2, 2) or dilation != (1, 1) or kernel[0] != kernel[1] or kernel[0] % 2 == 0:
            raise ValueError(f"cannot export a TensorFlow-same convolution with kernel {kernel}, stride "
                             f"{stride} and dilation {dilation}; only stride 2 with a square odd kernel "
                             "(every EfficientNet) is supported")
    for module in patched:
        module.forward = types.MethodType(_parity_same_forward, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes about optional torchvision operators, which MDETR does not use."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registration.setLevel(level)


def example_inputs(model: MDETR, *, image_size: tuple[int, int] = (160, 224),
                   captions: Sequence[str] = EXAMPLE_CAPTIONS) -> tuple[Tensor, ...]:
    """One random image per caption, the last one padded at the bottom right when there are several, and
    the captions tokenized to the longest: ``(pixel_values, pixel_mask, input_ids, attention_mask)``."""
    height, width = image_size
    batch = len(captions)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator)
    pixel_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if batch > 1:
        pixel_mask[-1, height * 3 // 4:, :] = True
        pixel_mask[-1, :, width * 2 // 3:] = True
    pixel_values[pixel_mask[:, None].expand_as(pixel_values)] = 0.0
    tokens = model.tokenizer(list(captions), padding="longest", return_tensors="pt")
    return pixel_values, pixel_mask, tokens["input_ids"], tokens["attention_mask"]


def _dynamic_shapes(max_tokens: int) -> dict[str, dict[int, object]]:
    from torch.export import Dim

    # At least 64 px: the stride-32 backbone level then has more than one pixel (size 1 would broadcast).
    batch = Dim("batch", min=1, max=1024)
    height, width = Dim("height", min=MIN_IMAGE_SIDE), Dim("width", min=MIN_IMAGE_SIDE)
    length = Dim("text_length", min=2, max=max_tokens)  # the tokenizer's start and end tokens at least
    return {"pixel_values": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width},
            "input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}


def processor_metadata(model: MDETR) -> dict[str, object]:
    """What a user of the exported graph needs to prepare its inputs: the processor's image sizes and token
    limit, the text encoder (whose tokenizer makes ``input_ids``) and the number of token slots."""
    train_config = getattr(model, "train_config", None)
    data = getattr(train_config, "data", None)
    return {
        "arch": model.config.arch,
        "text_encoder": model.config.text_encoder,
        "image_size": int(getattr(data, "val_size", 800)),
        "max_size": int(getattr(data, "max_size", 1333)),
        "max_tokens": min(DEFAULT_MAX_TOKENS, text_encoder_max_tokens(model.transformer.text_encoder.config)),
        "num_token_slots": model.config.num_token_slots,
    }


def export_onnx(model: nn.Module, path: str | Path, *, opset: int | None = None,
                inputs: Sequence[Tensor] | None = None) -> list[str]:
    """Write ``model`` (an :class:`MDETR` in eval mode) as one ONNX file with dynamic batch, image size and
    text length; returns the graph's output names. ``inputs`` is the example batch to trace with (default
    :func:`example_inputs`)."""
    wrapper = ExportableMDETR(model).eval()
    metadata = processor_metadata(model)
    inputs = tuple(inputs) if inputs is not None else example_inputs(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with export_friendly(model), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            wrapper, inputs, dynamo=True, input_names=list(INPUT_NAMES), output_names=wrapper.output_names,
            dynamic_shapes=_dynamic_shapes(int(metadata["max_tokens"])), opset_version=opset,
            external_data=False, verbose=False,
        )
    # The exporter stamps the newest IR version its onnx knows; onnxruntime releases lag behind it, and the
    # graph uses nothing newer than IR 10 (opset <= 21 semantics), so stamp the widely readable version.
    program.model.ir_version = min(int(program.model.ir_version), ONNX_IR_VERSION)
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program.model.metadata_props[TOKENIZER_KEY] = tokenizer_json(model.tokenizer)
    # Past the 2 GB protobuf limit the weights must go to a side file; mdetr_lite is about 100 MB.
    too_big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
    program.save(str(path), external_data=too_big)
    return wrapper.output_names


def tokenizer_json(tokenizer: object) -> str:
    """A fast tokenizer as one JSON string: its ``tokenizers`` definition and special tokens."""
    return json.dumps({"tokenizer": tokenizer.backend_tokenizer.to_str(),
                       "special_tokens": dict(tokenizer.special_tokens_map)})


def tokenizer_from_json(text: str) -> object:
    """The inverse of :func:`tokenizer_json`: a ``PreTrainedTokenizerFast`` with the same vocabulary, rules
    and special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    doc = json.loads(text)
    backend = Tokenizer.from_str(doc["tokenizer"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **doc["special_tokens"])


class OnnxGroundingModel:
    """An exported MDETR run by onnxruntime, returning :class:`MDETROutput` like the PyTorch model.

    threads: onnxruntime's intra-op threads (None: its default, all cores).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:  # pragma: no cover - declared in the onnx extra
            raise RuntimeError("running an ONNX model needs onnxruntime (pip install 'mdetr[onnx]')") from err
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        custom = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, object] = json.loads(custom[METADATA_KEY]) if METADATA_KEY in custom else {}
        self._tokenizer_json = custom.get(TOKENIZER_KEY)
        self.path = path

    def processor(self, *, image_size: int | None = None, max_size: int | None = None) -> GroundingProcessor:
        """The processor the exported model expects: its tokenizer, token limit and image sizes (by default
        those of the checkpoint's evaluation), all read from the file."""
        if self._tokenizer_json is None or not self.metadata:
            raise ValueError(f"{self.path} was not written by mdetr export: it has no tokenizer or settings")
        return GroundingProcessor(
            tokenizer_from_json(self._tokenizer_json),
            image_size=int(self.metadata["image_size"] if image_size is None else image_size),
            max_size=int(self.metadata["max_size"] if max_size is None else max_size),
            max_tokens=int(self.metadata["max_tokens"]))

    def run(self, pixel_values: Tensor, pixel_mask: Tensor, input_ids: Tensor,
            attention_mask: Tensor) -> dict[str, Tensor]:
        """The graph's outputs by name, as float32 CPU tensors."""
        if min(pixel_values.shape[-2:]) < MIN_IMAGE_SIDE:
            raise ValueError(f"the exported model needs padded images of at least {MIN_IMAGE_SIDE} px per "
                             f"side, got {tuple(pixel_values.shape[-2:])}")
        feeds = {
            "pixel_values": _numpy(pixel_values, np.float32), "pixel_mask": _numpy(pixel_mask, np.bool_),
            "input_ids": _numpy(input_ids, np.int64), "attention_mask": _numpy(attention_mask, np.int64),
        }
        values = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(v) for name, v in zip(self.output_names, values, strict=True)}

    def __call__(self, pixel_values: Tensor, pixel_mask: Tensor, tokenized: object) -> MDETROutput:
        """Predictions for a processor batch: ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W) and
        the captions' BatchEncoding (kept in the result for naming phrases)."""
        attention_mask = tokenized["attention_mask"]
        out = self.run(pixel_values, pixel_mask, tokenized["input_ids"], attention_mask)
        return MDETROutput(
            pred_logits=out["pred_logits"], pred_boxes=out["pred_boxes"],
            proj_queries=out.get("proj_queries"), proj_tokens=out.get("proj_tokens"),
            text_padding_mask=torch.as_tensor(attention_mask).ne(1), tokenized=tokenized,
            pred_isfinal=out.get("pred_isfinal"),
        )


def _numpy(value: Tensor | np.ndarray, dtype: type) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    return np.ascontiguousarray(array.astype(dtype, copy=False))


@dataclass
class ExportCheck:
    """Largest absolute difference between onnxruntime and PyTorch per output on one batch."""

    max_abs_diff: dict[str, float]
    input_shapes: dict[str, tuple[int, ...]]

    def worst(self) -> float:
        return max(self.max_abs_diff.values())


@torch.no_grad()
def compare_with_pytorch(model: nn.Module, onnx_model: OnnxGroundingModel,
                         inputs: Sequence[Tensor]) -> ExportCheck:
    """Run both on the same ``(pixel_values, pixel_mask, input_ids, attention_mask)`` batch."""
    wrapper = ExportableMDETR(model).eval()
    expected = dict(zip(wrapper.output_names, wrapper(*inputs), strict=True))
    actual = onnx_model.run(*inputs)
    diffs = {name: float((actual[name] - value.float()).abs().max()) for name, value in expected.items()}
    return ExportCheck(diffs, {name: tuple(t.shape) for name, t in zip(INPUT_NAMES, inputs, strict=True)})


__all__ = ["ExportCheck", "ExportableMDETR", "OnnxGroundingModel", "compare_with_pytorch",
           "example_inputs", "export_onnx", "processor_metadata", "require_onnx", "tokenizer_from_json",
           "tokenizer_json"]
