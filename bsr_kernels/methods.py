"""The fine-tuning methods, in one registry: used by ``bsr-finetune`` and by the benchmarks.

:func:`setup` turns a timm ``VisionTransformer`` into one method and returns a :class:`Method`:
the module mapping images to logits and the parameters that train.

======== ====================================================================================
name     what trains / what runs
======== ====================================================================================
full     every parameter; the plain timm model
linear   the classifier head only (``head.*``, ``head_dist.*``); the plain timm model
bitfit   every bias and the head; the plain timm model
bsr      :func:`bsr_kernels.reprogram` (train_blocks, drop_at, keep_rate, memory_mode,
         activation_dtype); the reprogrammed model
eager_bsr :class:`bsr_kernels.baselines.EagerBSR`, the authors' eager formulation (train_blocks,
         drop_at, keep_rate); a wrapper module around the model
======== ====================================================================================

The model is changed in place (``requires_grad``; ``bsr`` also reprograms it).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .config import check_settings

__all__ = ["METHODS", "BSR_METHODS", "Method", "setup", "trainable_parameters"]

#: Every method, in table order.
METHODS = ("full", "linear", "bitfit", "bsr", "eager_bsr")
#: The methods that take the BSR settings (train_blocks, drop_at, keep_rate).
BSR_METHODS = ("bsr", "eager_bsr")
_HEAD = ("head.", "head_dist.")


@dataclasses.dataclass
class Method:
    """One method set up on a model.

    Attributes:
        name: the method (one of :data:`METHODS`).
        module: maps images to logits (the model itself, or the eager BSR wrapper).
        model: the timm model underneath.
    """

    name: str
    module: nn.Module
    model: nn.Module

    @property
    def params(self) -> list:
        """The parameters that train, in ``model.parameters()`` order."""
        return [p for p in self.model.parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> dict:
    """``{name: parameter}`` of the parameters that train."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _set_trainable(model: nn.Module, method: str) -> None:
    for name, p in model.named_parameters():
        if method == "full":
            p.requires_grad_(True)
        elif method == "linear":
            p.requires_grad_(name.startswith(_HEAD))
        else:  # bitfit
            p.requires_grad_(name.startswith(_HEAD) or name.endswith(".bias"))


def setup(model: nn.Module, method: str, train_blocks: Optional[Sequence[int]] = None,
          drop_at: Optional[Sequence[int]] = None, keep_rate: float = 0.5,
          memory_mode: str = "lean", activation_dtype: Optional[torch.dtype] = None) -> Method:
    """Sets ``model`` (a timm ViT) up as ``method``.

    Args:
        model: a timm ``VisionTransformer``, changed in place.
        method: one of :data:`METHODS`.
        train_blocks, drop_at, keep_rate: BSR settings (``None``: the defaults for the depth);
            for ``bsr`` and ``eager_bsr`` only.
        memory_mode, activation_dtype: :func:`bsr_kernels.reprogram` options (``bsr`` only).

    Returns:
        The :class:`Method`: module to run and the trained parameters.

    Raises:
        ValueError: an unknown method, a setting out of range (whatever the method), BSR block
            settings given to a method without them, or ``memory_mode``/``activation_dtype``
            other than the defaults given to ``eager_bsr``. Nothing is changed then.
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    # the values, whatever the method: a caller that passes the command line's values to
    # every method must not pass a wrong one unnoticed
    check_settings(keep_rate, memory_mode, activation_dtype)
    if method not in BSR_METHODS and (train_blocks is not None or drop_at is not None):
        raise ValueError(f"--train-blocks and --drop-at apply to --method "
                         f"{' or '.join(BSR_METHODS)} only")
    if method == "eager_bsr" and (memory_mode != "lean" or activation_dtype is not None):
        raise ValueError("memory_mode and activation_dtype apply to --method bsr only: the eager "
                         "formulation keeps what plain autograd keeps")
    if method == "bsr":
        from .reprogram import reprogram
        module = reprogram(model, train_blocks=train_blocks, drop_at=drop_at,
                           keep_rate=keep_rate, memory_mode=memory_mode,
                           activation_dtype=activation_dtype)
    elif method == "eager_bsr":
        from .baselines import EagerBSR
        module = EagerBSR(model, train_blocks=train_blocks, drop_at=drop_at,
                          keep_rate=keep_rate)
    else:
        _set_trainable(model, method)
        module = model
    return Method(method, module, model)
