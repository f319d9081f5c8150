"""``profile(model, images)``: what one training step of a model costs, per image.

Uses the measurement rules of the design (see :mod:`bsr_kernels.measure`): saved activation MiB
(distinct storages kept by autograd, parameters excluded), training FLOPs (FlopCounterMode over
forward + backward, with the CPU SDPA kernels counted so that fused and eager attention compare
fairly), forward multiply-adds, and the tokens entering each block.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .measure import count_flops, saved_activations

__all__ = ["profile"]


def _default_loss(logits: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    if labels is None:
        return logits.float().square().mean()
    return F.cross_entropy(logits.float(), labels)


def profile(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
            loss_fn: Optional[Callable] = None) -> dict:
    """Measures one training step of ``model`` on ``images``, per image.

    The model's ``requires_grad`` flags decide what is trained (a plain timm model is full
    fine-tuning; a reprogrammed one is BSR). Existing ``.grad`` fields are left as they were.

    Args:
        model: any model mapping images to logits (timm ViTs also report tokens per block).
        images: (B, 3, H, W).
        labels: (B,) class indices for cross-entropy; None uses the mean squared logit.
        loss_fn: ``loss_fn(logits, labels) -> scalar`` to use instead.

    Returns:
        dict with ``saved_activation_mib_per_image``, ``train_gflops_per_image``,
        ``forward_gmacs_per_image`` and ``tokens_per_block`` (list of ints; empty for models
        without ``blocks``), plus ``batch_size``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    loss_fn = loss_fn or _default_loss
    batch = images.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: nothing to profile for training")
    old_grads = [p.grad for p in params]

    tokens: list[int] = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
             for blk in getattr(model, "blocks", [])]
    try:
        mib = saved_activations(lambda: loss_fn(model(images), labels),
                                exclude=[model]).mib_per_image(batch)
    finally:
        for h in hooks:
            h.remove()
    flops = count_flops(lambda: loss_fn(model(images), labels), count_cpu_sdpa=True)
    for p, g in zip(params, old_grads):
        p.grad = g
    return {
        "saved_activation_mib_per_image": mib,
        "train_gflops_per_image": flops.total / batch / 1e9,
        "forward_gmacs_per_image": flops.forward_macs / batch / 1e9,
        "tokens_per_block": tokens,
        "batch_size": batch,
    }
