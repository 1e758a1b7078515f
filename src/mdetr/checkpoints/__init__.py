"""Checkpoints from other implementations: the official MDETR release (``official``)."""

from mdetr.checkpoints.official import (
    OfficialCheckpoint,
    convert_official,
    load_official,
    load_official_state_dict,
    official_model_config,
    read_official_checkpoint,
)

__all__ = [
    "OfficialCheckpoint",
    "convert_official",
    "load_official",
    "load_official_state_dict",
    "official_model_config",
    "read_official_checkpoint",
]
