"""The one place where the helper modules (saving, export, timm hooks, summary) read a model's BSR
config as a JSON-ready dict (:meth:`BSRConfig.to_dict`), and re-apply one."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .config import BSRConfig

__all__ = ["bsr_config_dict", "config_from_dict", "reprogram_from_dict"]

#: The keys of the dicts saved before :class:`BSRConfig` (``reprogram``'s arguments, without the
#: model's ``depth`` and ``num_prefix_tokens``); checkpoints of that time still load.
OLD_KEYS = ("train_blocks", "drop_at", "keep_rate", "fuse_token", "memory_mode", "train_norm",
            "activation_dtype")


def bsr_config_dict(model: nn.Module) -> Optional[dict]:
    """``model.bsr_config.to_dict()`` of a reprogrammed ``model``; None for a plain one."""
    cfg = getattr(model, "bsr_config", None)
    return None if cfg is None else cfg.to_dict()


def config_from_dict(config, model: nn.Module) -> BSRConfig:
    """The :class:`BSRConfig` of a dict written by :func:`bsr_config_dict`, validated by
    :meth:`BSRConfig.from_dict`. A dict of an older checkpoint, without ``depth``, holds only
    :data:`OLD_KEYS` and takes ``model``'s depth and prefix tokens.

    Raises:
        ValueError: ``config`` is not a dict, holds unknown keys, or a value of the wrong type
            or out of range (named in the message).
    """
    if not isinstance(config, dict):
        raise ValueError(f"a BSR config must be a dict, got {type(config).__name__}")
    if "depth" not in config:
        unknown = sorted(set(config) - set(OLD_KEYS))
        if unknown:
            raise ValueError(f"malformed BSR config: unknown {unknown} (a config without depth, "
                             f"of an older checkpoint, holds only {list(OLD_KEYS)})")
        backbone = getattr(model, "bsr_backbone", model)
        config = {**config, "depth": len(getattr(backbone, "blocks", ())),
                  "num_prefix_tokens": getattr(backbone, "num_prefix_tokens", 1)}
    dtype = config.get("activation_dtype")
    if dtype is not None and not isinstance(dtype, str):   # from_dict looks it up by name
        raise ValueError(f"activation_dtype must be a dtype name or None, got {dtype!r}")
    return BSRConfig.from_dict(config)


def reprogram_from_dict(model: nn.Module, config: dict) -> nn.Module:
    """``reprogram`` with the settings of a dict written by :func:`bsr_config_dict` (validated by
    :func:`config_from_dict`; dicts of older checkpoints without ``depth`` are accepted)."""
    from .reprogram import reprogram

    return reprogram(model, **config_from_dict(config, model).reprogram_kwargs())
