"""``profile(model, images)``: what one training step of a model costs, per image.

Uses the measurement rules of the design (see :mod:`bsr_kernels.measure`): saved activation MiB
(distinct storages kept by autograd, parameters excluded), training FLOPs (FlopCounterMode over
forward + backward, with the CPU SDPA kernels counted so that fused and eager attention compare
fairly), forward multiply-adds, and the tokens entering each block.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from .measure import count_flops, saved_activations

__all__ = ["profile", "ProfileResult"]


@dataclass(eq=False)
class ProfileResult(MutableMapping):
    """What :func:`profile` measured, per image. ``print(result)`` shows a table.

    It is also a mapping with the keys of its fields (``result["tokens_per_block"]``), as
    ``profile`` returned a dict before; keys that are not fields go to ``extra``.
    """

    saved_activation_mib_per_image: float
    train_gflops_per_image: float
    forward_gmacs_per_image: float
    tokens_per_block: list = field(default_factory=list)
    batch_size: int = 0
    extra: dict = field(default_factory=dict)

    def _names(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "extra"]

    def __getitem__(self, key: str) -> Any:
        if key in self._names():
            return getattr(self, key)
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._names():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self._names():
            raise KeyError(f"{key!r} is a field of ProfileResult and cannot be deleted")
        del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._names()
        yield from self.extra

    def __len__(self) -> int:
        return len(self._names()) + len(self.extra)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (ProfileResult, dict)):
            return NotImplemented
        return dict(self) == dict(other)

    def to_dict(self) -> dict:
        """A plain dict (JSON-ready), as ``profile`` returned before."""
        return dict(self)

    def __str__(self) -> str:
        rows = [("saved activations", f"{self.saved_activation_mib_per_image:.4g} MiB",
                 "distinct storages autograd keeps, parameters excluded"),
                ("training FLOPs", f"{self.train_gflops_per_image:.4g} GFLOP",
                 "forward + backward"),
                ("forward MACs", f"{self.forward_gmacs_per_image:.4g} GMAC", "")]
        if self.tokens_per_block:
            rows.append(("tokens per block", str(list(self.tokens_per_block)), "entering each"))
        rows += [(str(k), repr(v), "") for k, v in self.extra.items()]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"one training step, per image (batch of {self.batch_size}):"]
        lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines)


def _default_loss(logits, labels: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(logits, (tuple, list)):   # several heads: a distilled DeiT in training
        return torch.stack([_default_loss(one, labels) for one in logits]).mean()
    if labels is None:
        return logits.float().square().mean()
    return F.cross_entropy(logits.float(), labels)


def profile(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
            loss_fn: Optional[Callable] = None) -> ProfileResult:
    """Measures one training step of ``model`` on ``images``, per image.

    The model's ``requires_grad`` flags decide what is trained (a plain timm model is full
    fine-tuning; a reprogrammed one is BSR). It runs forward twice and leaves the model as it
    was: existing ``.grad`` fields, its buffers (BatchNorm statistics of a model in training
    mode) and a MoE MLP's usage counts and ``aux_loss``. It does draw from the random number
    generators (dropout, gate noise) as a training step would.

    Args:
        model: any model mapping images to logits (timm ViTs also report tokens per block).
        images: (B, 3, H, W).
        labels: (B,) class indices for cross-entropy; None uses the mean squared logit. A
            model returning several logits (timm's distilled DeiT in distillation training)
            takes the mean of their losses.
        loss_fn: ``loss_fn(logits, labels) -> scalar`` to use instead.

    Returns:
        A :class:`ProfileResult` (``print`` it for a table; it is also a mapping) with
        ``saved_activation_mib_per_image``, ``train_gflops_per_image``,
        ``forward_gmacs_per_image`` and ``tokens_per_block`` (list of ints; empty for models
        without ``blocks``), plus ``batch_size``. The same under ``torch.no_grad()``.

    Raises:
        ValueError: ``images`` is not 4-d, or the model has no trainable parameters.
        RuntimeError: under ``torch.inference_mode()``, where no backward can be recorded.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("profile measures a training step (forward and backward): call it "
                           "outside torch.inference_mode()")
    with torch.enable_grad():   # called under torch.no_grad() (an eval loop): a training step
        return _profile(model, images, labels, loss_fn or _default_loss)


def _profile(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor],
             loss_fn: Callable) -> ProfileResult:
    batch = images.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: nothing to profile for training")
    # Set the existing grads aside: backward would add into them in place (AccumulateGrad).
    old_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    # What the two forwards would change: BatchNorm running statistics in training mode (and
    # any buffer a forward updates), a MoE MLP's usage counts (track_usage) and aux_loss.
    buffers = [(m, name, b, b.clone()) for m in model.modules()
               for name, b in m._buffers.items() if b is not None]
    moes = [(m, m.usage.clone(), m.aux_loss) for m in model.modules()
            if getattr(m, "bsr_moe", False)]
    tokens: list[int] = []
    try:
        hooks = [blk.register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
                 for blk in getattr(unwrap_model(model), "blocks", [])]   # DDP, compiled
        try:
            mib = saved_activations(lambda: loss_fn(model(images), labels),
                                    exclude=[model]).mib_per_image(batch)
        finally:
            for h in hooks:
                h.remove()
        flops = count_flops(lambda: loss_fn(model(images), labels), count_cpu_sdpa=True)
    finally:
        for p, g in zip(params, old_grads):
            p.grad = g
        with torch.no_grad():   # in place: a reference the caller holds sees them back
            for m, name, b, was in buffers:
                m._buffers[name] = b          # a forward may rebind it (self.n = self.n + 1)
                b.copy_(was)
            for m, usage, aux in moes:
                m.usage.copy_(usage)
                m.aux_loss = aux
    return ProfileResult(
        saved_activation_mib_per_image=mib,
        train_gflops_per_image=flops.total / batch / 1e9,
        forward_gmacs_per_image=flops.forward_macs / batch / 1e9,
        tokens_per_block=tokens,
        batch_size=batch,
    )
