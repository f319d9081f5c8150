"""The one place where the helper modules (saving, export, timm hooks, summary) read a model's BSR
config, as a JSON-ready dict, and re-apply one.

``reprogram`` keeps its settings on the model; when they become the public ``model.bsr_config``
object (``to_dict()`` / ``from_dict()``), :func:`bsr_config_dict` is the only line to change.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["bsr_config_dict", "reprogram_from_dict"]


def bsr_config_dict(model: nn.Module) -> Optional[dict]:
    """The BSR settings of a reprogrammed ``model`` as a JSON-ready dict; None for a plain one."""
    cfg = getattr(model, "_bsr_config", None)
    if cfg is None:
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    if isinstance(out.get("activation_dtype"), torch.dtype):
        out["activation_dtype"] = str(out["activation_dtype"]).replace("torch.", "")
    return out


def reprogram_from_dict(model: nn.Module, config: dict) -> nn.Module:
    """``reprogram(model, **config)`` for a dict written by :func:`bsr_config_dict`."""
    from .reprogram import reprogram

    kwargs = dict(config)
    dtype = kwargs.get("activation_dtype")
    if isinstance(dtype, str):
        kwargs["activation_dtype"] = getattr(torch, dtype)
    return reprogram(model, **kwargs)
