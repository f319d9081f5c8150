"""The one place where the helper modules (saving, export, timm hooks, summary) read a model's BSR
config as a JSON-ready dict (:meth:`BSRConfig.to_dict`), and re-apply one."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import BSRConfig

__all__ = ["bsr_config_dict", "reprogram_from_dict"]


def bsr_config_dict(model: nn.Module) -> Optional[dict]:
    """``model.bsr_config.to_dict()`` of a reprogrammed ``model``; None for a plain one."""
    cfg = getattr(model, "bsr_config", None)
    return None if cfg is None else cfg.to_dict()


def reprogram_from_dict(model: nn.Module, config: dict) -> nn.Module:
    """``reprogram`` with the settings of a dict written by :func:`bsr_config_dict` (validated by
    :meth:`BSRConfig.from_dict`; dicts of older checkpoints without ``depth`` are accepted)."""
    from .reprogram import reprogram

    if isinstance(config, dict) and "depth" in config:
        return reprogram(model, **BSRConfig.from_dict(config).reprogram_kwargs())
    kwargs = dict(config)
    dtype = kwargs.get("activation_dtype")
    if isinstance(dtype, str):
        kwargs["activation_dtype"] = getattr(torch, dtype)
    return reprogram(model, **kwargs)
