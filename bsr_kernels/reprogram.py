"""``reprogram(model)``: Block Selective Reprogramming for timm ``VisionTransformer`` models.

The model is changed in place by swapping ``__class__`` (ToMe-style): each block becomes a
:class:`BSRBlock` (a subclass of timm's ``Block``) and its attention a
:class:`~bsr_kernels.attention.TokenDropAttention`. Weights, state_dict keys, hooks and the model's
own class stay untouched, and :func:`restore` undoes it.

One block body (:meth:`BSRBlock.body`) serves every execution mode:

* ``"nograd"``: blocks before the first trained block run under ``torch.no_grad()``.
* ``"lean"`` / ``"fast"``: a custom autograd function (:mod:`bsr_kernels.backward`) runs the body
  without autograd, saves the block input and some projection outputs (which, by memory mode),
  and replays the body inside backward, recomputing only what the gradients need.
* Without grad mode (evaluation), the body simply runs.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from .attention import TokenDropAttention
from .ops import drop_tokens, reference
from .ops.common import check_keep_rate

__all__ = ["reprogram", "restore", "default_train_blocks", "default_drop_at", "BSRBlock",
           "kept_patches", "is_reprogrammed"]

MEMORY_MODES = ("lean", "fast")


def default_train_blocks(depth: int) -> tuple[int, ...]:
    """``(d/3*k - 1 for k = 1..3)``: (3, 7, 11) for 12 blocks."""
    return tuple(sorted({max(0, round(depth / 3 * k) - 1) for k in (1, 2, 3)}))


def default_drop_at(depth: int) -> tuple[int, ...]:
    """``(d/4*k for k = 1..3)``: (3, 6, 9) for 12 blocks."""
    return tuple(sorted({min(depth - 1, round(depth / 4 * k)) for k in (1, 2, 3)}))


def _plain_linear(name, module, inp):
    return module(inp)


class BSRBlock(Block):
    """A timm ``Block`` that may drop tokens after attention, and run memory-lean.

    Attributes set by :func:`reprogram`: ``bsr_keep_rate`` (1.0 means no drop), ``bsr_fuse``,
    ``bsr_prefix`` (P), ``bsr_mode`` ("nograd", "lean" or "fast") and ``bsr_trained``.
    """

    def body(self, x: torch.Tensor, linear=_plain_linear, drop=None) -> torch.Tensor:
        """The block's computation, written once for every mode.

        Args:
            x: (B, N, C) tokens.
            linear: ``linear(name, module, input)`` runs the projections "qkv", "proj", "fc1"
                and "fc2"; replaced by the lean backward to replay saved outputs.
            drop: ``drop(x, q, k) -> (x, kept)``; defaults to :meth:`drop`.

        Returns:
            (B, N', C) tokens, N' < N after a drop.
        """
        out, q, k = self.attn.forward_qk(self.norm1(x), linear=linear)
        x = x + self.drop_path1(self.ls1(out))
        x, _ = (drop or self.drop)(x, q, k)
        mlp = self.mlp
        if getattr(mlp, "bsr_moe", False):   # bsr_kernels.moe.MoEMlp: routed experts, whole
            return x + self.drop_path2(self.ls2(mlp(self.norm2(x))))
        h = mlp.norm(mlp.drop1(mlp.act(linear("fc1", mlp.fc1, self.norm2(x)))))
        return x + self.drop_path2(self.ls2(mlp.drop2(linear("fc2", mlp.fc2, h))))

    def drop(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             kept: Optional[torch.Tensor] = None):
        """The block's token drop; identity when ``bsr_keep_rate`` is 1.

        ``kept`` replays a recorded selection (the compressed lean backward, whose recomputed
        scores are approximate); the fusion weights are then the differentiable scores of q, k.
        """
        if self.bsr_keep_rate >= 1.0:
            return x, None
        if q.dtype != x.dtype:  # autocast: bf16/fp16 q, k beside an fp32 residual stream
            q, k = q.to(x.dtype), k.to(x.dtype)
        if kept is not None:
            x, kept, _, _ = reference.drop_tokens(x, q, k, self.attn.scale, self.bsr_prefix,
                                                  kept.shape[1], self.bsr_fuse, kept=kept)
            return x, kept
        n_candidates = x.shape[1] - self.bsr_prefix
        x, kept = drop_tokens(x, q, k, self.bsr_keep_rate, fuse_token=self.bsr_fuse,
                              num_prefix_tokens=self.bsr_prefix)
        if self._bsr_trace is not None:
            self._bsr_trace.append((kept.detach(), n_candidates))
        return x, kept

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a reprogrammed (BSR) block takes no attn_mask/is_causal: token "
                             "dropping changes the sequence; call bsr_kernels.restore(model) first")
        if self.bsr_mode == "nograd":
            with torch.no_grad():
                return self.body(x)
        if self.bsr_mode in MEMORY_MODES and torch.is_grad_enabled() and not (
                getattr(self.mlp, "bsr_moe", False) and self.mlp.plain_autograd(self.bsr_mode)):
            from .backward import lean_block
            return lean_block(self, x)
        return self.body(x)


def _check_blocks(name: str, value, depth: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a sequence of block indices, got {value!r}")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"{name} must hold ints, got {i!r}")
        if not 0 <= int(i) < depth:
            raise ValueError(f"{name} index {int(i)} is outside the model's blocks 0..{depth - 1}")
        out.append(int(i))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated indices: {out}")
    return tuple(sorted(out))


def _unsupported_reasons(model: nn.Module) -> list[str]:
    """What in ``model`` reprogram cannot handle; empty when it is supported."""
    if not isinstance(model, VisionTransformer):
        return [f"reprogram needs a timm VisionTransformer, got {type(model).__name__} "
                "(not a ViT)"]
    reasons = []
    if getattr(model, "cls_token", None) is None:
        reasons.append("the model has no class token (class_token=False): BSR scores tokens "
                       "with the CLS row of attention")
    if getattr(model, "grad_checkpointing", False):
        reasons.append("grad checkpointing is on; call model.set_grad_checkpointing(False)")
    if getattr(model, "attn_pool", None) is not None:
        reasons.append("attention pooling heads (global_pool='map'/'prr') are not supported")
    for i, blk in enumerate(model.blocks):
        where = f"block {i}"
        if type(blk) not in (Block, BSRBlock):
            reasons.append(f"{where} is a {type(blk).__name__}, only timm Block is supported")
            continue
        if type(blk.attn) not in (Attention, TokenDropAttention):
            reasons.append(f"{where} attention is a {type(blk.attn).__name__}, only timm "
                           "Attention is supported")
        elif blk.attn.gate is not None:
            reasons.append(f"{where} attention is gated, which is not supported")
        if getattr(blk.mlp, "bsr_moe", False):
            pass   # bsr_kernels.moe.MoEMlp (to_moe), called whole by BSRBlock.body
        elif type(blk.mlp) is not Mlp or not isinstance(blk.mlp.fc2, nn.Linear):
            reasons.append(f"{where} MLP is a {type(blk.mlp).__name__}, only timm Mlp is supported")
        elif not isinstance(blk.mlp.norm, nn.Identity):
            reasons.append(f"{where} MLP has a hidden norm (scale_mlp_norm), not supported")
        for name in ("ls1", "ls2"):
            if not isinstance(getattr(blk, name), (nn.Identity, LayerScale)):
                reasons.append(f"{where}.{name} is neither LayerScale nor Identity")
        stochastic = [n for n, m in blk.named_modules()
                      if (isinstance(m, nn.Dropout) and m.p > 0)
                      or (type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0) > 0)]
        if isinstance(blk.attn, Attention) and blk.attn.attn_drop.p > 0:
            stochastic.append("attn.attn_drop")
        if stochastic:
            reasons.append(f"{where} has dropout/drop-path ({', '.join(sorted(set(stochastic)))}); "
                           "create the model with drop rates 0 for BSR")
    return reasons


def is_reprogrammed(model: nn.Module) -> bool:
    """Whether :func:`reprogram` has been applied to ``model``."""
    return hasattr(model, "_bsr_config")


def reprogram(model: nn.Module, train_blocks: Optional[Sequence[int]] = None,
              drop_at: Optional[Sequence[int]] = None, keep_rate: float = 0.5,
              fuse_token: bool = True, memory_mode: str = "lean", train_norm: bool = False,
              activation_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Turns a timm ``VisionTransformer`` into its BSR form, in place.

    Args:
        model: a timm ``VisionTransformer`` with a class token (deit_*, vit_*, with register
            tokens, LayerScale or qk_norm).
        train_blocks: indices of the blocks to train; default ``(d/3*k - 1 for k = 1..3)``.
            The head is always trained; everything else is frozen.
        drop_at: blocks that drop tokens after attention; default ``(d/4*k for k = 1..3)``.
        keep_rate: fraction of non-prefix tokens kept at each drop, in (0, 1].
        fuse_token: fuse the dropped tokens into one extra token (EViT).
        memory_mode: "lean" (recompute in backward, least memory) or "fast" (plain autograd).
        train_norm: also train the final norm (``model.norm`` / ``model.fc_norm``).
        activation_dtype: opt-in compression of what the lean/fast backward saves (e.g.
            ``torch.bfloat16``, in the spirit of Mesa): saved activations are stored in this
            dtype and cast back in backward. Gradients become approximate; None (default) keeps
            them exact.

    Returns:
        The same model object, reprogrammed. Its class and state_dict keys are unchanged.

    Raises:
        ValueError: on a bad argument (named in the message) or an unsupported model; the model
            is then left unchanged.
    """
    backbone = getattr(model, "bsr_backbone", None)
    if isinstance(backbone, nn.Module):   # a wrapper (bsr_kernels.MultiTaskViT): its ViT
        reprogram(backbone, train_blocks, drop_at, keep_rate, fuse_token, memory_mode,
                  train_norm, activation_dtype)
        return model
    reasons = _unsupported_reasons(model)
    if reasons:
        raise ValueError("cannot reprogram this model:\n  " + "\n  ".join(reasons))
    depth = len(model.blocks)
    train_blocks = _check_blocks("train_blocks", default_train_blocks(depth)
                                 if train_blocks is None else train_blocks, depth)
    drop_at = _check_blocks("drop_at", default_drop_at(depth) if drop_at is None else drop_at,
                            depth)
    keep_rate = check_keep_rate(keep_rate)
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
    if not isinstance(fuse_token, bool):
        raise ValueError(f"fuse_token must be a bool, got {fuse_token!r}")
    if not isinstance(train_norm, bool):
        raise ValueError(f"train_norm must be a bool, got {train_norm!r}")
    if activation_dtype is not None and not (isinstance(activation_dtype, torch.dtype)
                                             and activation_dtype.is_floating_point):
        raise ValueError(f"activation_dtype must be a floating torch.dtype or None, "
                         f"got {activation_dtype!r}")

    if is_reprogrammed(model):
        restore(model)
    model._bsr_config = dict(train_blocks=train_blocks, drop_at=drop_at, keep_rate=keep_rate,
                             fuse_token=fuse_token, memory_mode=memory_mode,
                             train_norm=train_norm, activation_dtype=activation_dtype)
    model._bsr_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    trained_names = {"head.", "head_dist."}
    if train_norm:
        trained_names |= {"norm.", "fc_norm."}
    trained_names |= {f"blocks.{i}." for i in train_blocks}
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trained_names))

    first_trained = min(train_blocks, default=depth)
    for i, blk in enumerate(model.blocks):
        blk._bsr_orig_class = type(blk)
        blk.__class__ = BSRBlock
        blk.attn.__class__ = TokenDropAttention
        blk.bsr_keep_rate = keep_rate if i in drop_at else 1.0
        blk.bsr_fuse = fuse_token
        blk.bsr_prefix = model.num_prefix_tokens
        blk.bsr_trained = i in train_blocks
        blk.bsr_mode = "nograd" if i < first_trained else memory_mode
        blk.bsr_activation_dtype = activation_dtype
        blk._bsr_trace = None
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undoes :func:`reprogram`: plain timm classes and the original ``requires_grad`` flags.

    Raises:
        ValueError: if ``model`` was not reprogrammed.
    """
    backbone = getattr(model, "bsr_backbone", None)
    if isinstance(backbone, nn.Module):   # a wrapper (bsr_kernels.MultiTaskViT): its ViT
        restore(backbone)
        return model
    if not is_reprogrammed(model):
        raise ValueError("model was not reprogrammed by bsr_kernels.reprogram")
    for blk in model.blocks:
        blk.__class__ = blk._bsr_orig_class
        blk.attn.__class__ = Attention
        for attr in ("_bsr_orig_class", "bsr_keep_rate", "bsr_fuse", "bsr_prefix",
                     "bsr_trained", "bsr_mode", "bsr_activation_dtype", "_bsr_trace"):
            delattr(blk, attr)
    for name, p in model.named_parameters():
        p.requires_grad_(model._bsr_requires_grad.get(name, True))
    del model._bsr_config, model._bsr_requires_grad
    return model


@torch.no_grad()
def kept_patches(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Which patches survive each drop stage.

    Args:
        model: a reprogrammed model.
        images: (B, 3, H, W).

    Returns:
        One (B, n_keep) int64 tensor per drop stage, in block order: for each kept token, the
        original patch index (row-major over the patch grid). A kept *fused* token (from an
        earlier stage) is marked -1.
    """
    if not is_reprogrammed(model):
        raise ValueError("model was not reprogrammed by bsr_kernels.reprogram")
    trace: list[tuple[torch.Tensor, int]] = []
    for blk in model.blocks:
        blk._bsr_trace = trace
    try:
        model(images)
    finally:
        for blk in model.blocks:
            blk._bsr_trace = None
    out, mapping = [], None  # mapping[b, j]: original patch of non-prefix token j, -1 if fused
    for kept, n_candidates in trace:
        mapped = kept if mapping is None else torch.gather(mapping, 1, kept)
        out.append(mapped)
        mapping = mapped
        if model._bsr_config["fuse_token"] and kept.shape[1] < n_candidates:
            mapping = torch.cat([mapping, mapping.new_full((mapping.shape[0], 1), -1)], dim=1)
    return out
