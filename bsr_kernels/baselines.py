"""The anchors bsr_kernels measures itself against: the authors' eager formulation of BSR.

Everything here is plain PyTorch on top of timm, written from the design document and
independent of the library's model code: it keeps its own block forward (eager attention with
materialised probabilities), because an anchor that ran the library's block body would only
measure the library against itself. It shares only the argument checks and the default block
choices (``bsr_kernels.ops.common``, ``bsr_kernels.config``):

* :func:`eager_drop_composite`: the token drop as the authors (EViT style) write it: the full
  (B, H, N, N) attention probabilities, the head-mean CLS row, ``torch.topk``, a gather and the
  score-weighted fused token. The speed baseline of the fused kernels.
* :func:`eager_bsr_forward` / :class:`EagerBSR`: a timm ``VisionTransformer`` run the BSR way with
  eager attention (materialised probabilities) in every block, blocks before the first trained
  block under ``torch.no_grad()``, and the drop inside the ``drop_at`` blocks. The memory and FLOP
  baseline of ``bsr_kernels.reprogram``.
* :func:`configure_eager_bsr`: which parameters train (head and ``train_blocks``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import torch
from torch import nn

from .config import check_blocks, default_drop_at, default_train_blocks
from .ops.common import (check_keep_rate, check_prefix, check_qk, check_x, num_kept,
                         resolve_scale)
from .timm_hooks import check_pool

__all__ = [
    "eager_drop_composite",
    "eager_attention",
    "default_train_blocks",
    "default_drop_at",
    "check_vit",
    "configure_eager_bsr",
    "EagerBSROutput",
    "eager_bsr_forward",
    "EagerBSR",
]


# --- the drop op, composite ------------------------------------------------------------------

def _drop_from_probs(x: torch.Tensor, attn: torch.Tensor, num_prefix_tokens: int, n_keep: int,
                     fuse_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The drop given full attention probabilities ``attn`` (B, H, N, N) of the same block.

    Returns:
        x_out (B, P + n_keep [+ 1], C) and kept (B, n_keep) int64 ascending, positions among the
        non-prefix tokens.
    """
    p = num_prefix_tokens
    b, n, c = x.shape
    m = n - p
    if n_keep >= m:
        return x, torch.arange(m, device=x.device).expand(b, m)
    cls_attn = attn[:, :, 0, p:].mean(dim=1)                                   # (B, M)
    kept = torch.topk(cls_attn, n_keep, dim=1, largest=True, sorted=True).indices
    kept = kept.sort(dim=1).values                                             # ascending
    xp = x[:, p:]
    parts = [x[:, :p], torch.gather(xp, 1, kept.unsqueeze(-1).expand(-1, -1, c))]
    if fuse_token:
        # Score-weighted sum of the dropped rows: the kept rows get weight 0. Written over all of
        # xp (a view of x, which the gather above saves anyway) so autograd keeps no gathered
        # copy of the dropped rows for the gradient of the weights.
        keep_mask = torch.zeros(b, m, dtype=torch.bool, device=x.device).scatter_(1, kept, True)
        w_drop = cls_attn.masked_fill(keep_mask, 0.0)                           # (B, M)
        parts.append(torch.sum(xp * w_drop.unsqueeze(-1), dim=1, keepdim=True))
    return torch.cat(parts, dim=1), kept


def eager_drop_composite(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep_rate: float,
                         fuse_token: bool = True, num_prefix_tokens: int = 1,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token drop the way the authors write it, from the full attention probabilities.

    ``attn = softmax(q @ k^T * scale)`` (B, H, N, N) is materialised in the dtype of q; the
    head-mean CLS row ``attn[:, :, 0, P:]`` scores the non-prefix tokens; ``torch.topk`` picks
    ``ceil(keep_rate * (N - P))`` of them; they are gathered in ascending position order after the
    prefix tokens; with ``fuse_token`` the dropped rows, weighted by their (not renormalised)
    scores, are summed into one token appended last (none when nothing is dropped).

    Same contract as ``bsr_kernels.drop_tokens`` except ties and NaN scores, which follow
    ``torch.topk`` here instead of the library's selection rule.

    Args:
        x: (B, N, C) residual stream.
        q, k: (B, H, N, d) of the same block's attention.
        keep_rate: fraction of non-prefix tokens to keep, in (0, 1].
        fuse_token: append the score-weighted sum of the dropped tokens.
        num_prefix_tokens: P, the CLS token plus register tokens.
        scale: softmax scale, default ``d ** -0.5``.

    Returns:
        x_out (B, P + n_keep [+ 1], C) and kept_idx (B, n_keep) int64, positions among the
        non-prefix tokens, ascending. Differentiable w.r.t. x, q and k.
    """
    check_qk(q, k)
    check_x(x, q)
    keep_rate = check_keep_rate(keep_rate)
    p = check_prefix(num_prefix_tokens, q.shape[2])
    scale = resolve_scale(scale, q.shape[3])
    n_keep = num_kept(keep_rate, q.shape[2] - p)
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return _drop_from_probs(x, attn, p, n_keep, bool(fuse_token))


# --- argument checks (the defaults and block checks are the library's: bsr_kernels.config) -----

def check_vit(model) -> None:
    """Raises TypeError/ValueError unless ``model`` is a timm ViT this baseline can run.

    Needs a timm ``VisionTransformer`` with a class token whose blocks are timm ``Block`` with
    timm ``Attention`` (pre-norm; LayerScale, qk_norm, scale_norm, gated attention and register
    tokens are supported).
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("model has no class token; BSR scores tokens by the CLS attention row")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block):
            raise TypeError(f"model.blocks[{i}] is a {type(blk).__name__}; only timm Block "
                            "(pre-norm) is supported")
        if not isinstance(blk.attn, Attention):
            raise TypeError(f"model.blocks[{i}].attn is a {type(blk.attn).__name__}; only timm "
                            "Attention is supported")


def _resolve(model, train_blocks, drop_at, keep_rate, fuse_token):
    """The checked settings; a pool that would average the fused token in is refused, as
    :func:`bsr_kernels.reprogram` refuses it (:func:`~bsr_kernels.timm_hooks.check_pool`)."""
    depth = len(model.blocks)
    train_blocks = check_blocks("train_blocks", default_train_blocks(depth)
                                if train_blocks is None else train_blocks, depth)
    drop_at = check_blocks("drop_at", default_drop_at(depth) if drop_at is None else drop_at,
                           depth)
    keep_rate = check_keep_rate(keep_rate)
    check_pool(getattr(model, "global_pool", "token"), bool(fuse_token), keep_rate, drop_at)
    return train_blocks, drop_at, keep_rate


def configure_eager_bsr(model, train_blocks: Sequence[int] | None = None) -> tuple[int, ...]:
    """Sets ``requires_grad``: True for ``model.head`` (and a distilled DeiT's ``head_dist``, as
    :func:`bsr_kernels.reprogram` trains it) and the ``train_blocks``, False elsewhere.

    Everything else is frozen: patch embedding, position embedding, CLS/register tokens, norms
    outside the trained blocks (``norm``, ``fc_norm``), and the other blocks.

    Args:
        model: timm VisionTransformer (see :func:`check_vit`).
        train_blocks: block indices, default :func:`default_train_blocks`.

    Returns:
        The trained block indices, sorted.
    """
    check_vit(model)
    depth = len(model.blocks)
    train_blocks = check_blocks("train_blocks", default_train_blocks(depth)
                                if train_blocks is None else train_blocks, depth)
    model.requires_grad_(False)
    for head in ("head", "head_dist"):
        if isinstance(getattr(model, head, None), nn.Module):
            getattr(model, head).requires_grad_(True)
    for i in train_blocks:
        model.blocks[i].requires_grad_(True)
    return train_blocks


# --- the eager BSR forward -------------------------------------------------------------------

@dataclasses.dataclass
class EagerBSROutput:
    """What :func:`eager_bsr_forward` returns.

    Attributes:
        logits: (B, num_classes).
        kept: one (B, n_keep) int64 tensor per drop stage, in ``drop_at`` order: the kept
            positions among the non-prefix tokens entering that stage, ascending.
        tokens_in: tokens entering each block (its attention), one int per block.
        tokens_out: tokens leaving each block, one int per block.
    """

    logits: torch.Tensor
    kept: list[torch.Tensor]
    tokens_in: list[int]
    tokens_out: list[int]


def eager_attention(attn_mod, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` computed eagerly from its weights, the authors' way.

    Args:
        attn_mod: a timm ``Attention`` (q_norm/k_norm, norm, gate and dropouts honoured).
        h: (B, N, C) normalised input.

    Returns:
        out (B, N, C) and the materialised probabilities (B, H, N, N).
    """
    b, n, _ = h.shape
    gate = attn_mod.gate(h).sigmoid() if getattr(attn_mod, "gate", None) is not None else None
    qkv = attn_mod.qkv(h).reshape(b, n, 3, attn_mod.num_heads, attn_mod.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)       # (B, H, N, N)
    a = (attn_mod.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, -1)
    a = attn_mod.norm(a)
    if gate is not None:
        a = a * gate
    return attn_mod.proj_drop(attn_mod.proj(a)), attn


def _eager_block(blk, x: torch.Tensor, num_prefix_tokens: int, n_keep_rate: float | None,
                 fuse_token: bool):
    """One timm ``Block`` with eager attention; drops after the attention residual when
    ``n_keep_rate`` is given. Returns (x, kept or None)."""
    a, attn = eager_attention(blk.attn, blk.norm1(x))
    x = x + blk.drop_path1(blk.ls1(a))
    kept = None
    if n_keep_rate is not None:
        n_keep = num_kept(n_keep_rate, x.shape[1] - num_prefix_tokens)
        x, kept = _drop_from_probs(x, attn, num_prefix_tokens, n_keep, fuse_token)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, kept


def eager_bsr_forward(model, images: torch.Tensor, train_blocks: Sequence[int] | None = None,
                      drop_at: Sequence[int] | None = None, keep_rate: float = 0.5,
                      fuse_token: bool = True) -> EagerBSROutput:
    """Runs a timm VisionTransformer the BSR way, with eager attention in every block.

    patch_embed, ``_pos_embed``, ``patch_drop``, ``norm_pre``; then each block with materialised
    attention probabilities; in the ``drop_at`` blocks, after the attention residual, the
    prefix tokens and the ``ceil(keep_rate * (N - P))`` non-prefix tokens with the highest
    head-mean CLS attention of that block are kept (ascending), plus the fused token when
    ``fuse_token`` and something was dropped (an ordinary candidate at the next drop); then the
    model's ``norm`` and ``forward_head``. Everything before the first trained block runs under
    ``torch.no_grad()``.

    This function does not touch ``requires_grad``; call :func:`configure_eager_bsr` (or use
    :class:`EagerBSR`) to freeze what BSR freezes. ``train_blocks`` here only decides where the
    no-grad prefix ends.

    Args:
        model: timm VisionTransformer with a class token (see :func:`check_vit`).
        images: (B, 3, H, W).
        train_blocks: default :func:`default_train_blocks` of the depth.
        drop_at: default :func:`default_drop_at` of the depth.
        keep_rate: in (0, 1]; 1.0 drops nothing.
        fuse_token: append the fused token at each drop.

    Returns:
        :class:`EagerBSROutput`.
    """
    check_vit(model)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    train_blocks, drop_at, keep_rate = _resolve(model, train_blocks, drop_at, keep_rate,
                                                fuse_token)
    first_trained = train_blocks[0] if train_blocks else len(model.blocks)
    p = model.num_prefix_tokens
    kept_all: list[torch.Tensor] = []
    tokens_in: list[int] = []
    tokens_out: list[int] = []

    def no_grad_until(i: int):
        return torch.no_grad() if i < first_trained else contextlib.nullcontext()

    with no_grad_until(0):
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
    for i, blk in enumerate(model.blocks):
        with no_grad_until(i):
            tokens_in.append(x.shape[1])
            if i in drop_at:
                check_prefix(p, x.shape[1])
            x, kept = _eager_block(blk, x, p, keep_rate if i in drop_at else None,
                                   bool(fuse_token))
            tokens_out.append(x.shape[1])
            if kept is not None:
                kept_all.append(kept)
    x = model.norm(x)
    logits = model.forward_head(x)
    return EagerBSROutput(logits=logits, kept=kept_all, tokens_in=tokens_in,
                          tokens_out=tokens_out)


class EagerBSR(nn.Module):
    """The authors' eager BSR formulation of a timm ViT as a module: ``forward(images) -> logits``.

    On construction it calls :func:`configure_eager_bsr` (unless ``configure=False``), so only
    the head and ``train_blocks`` train. The last forward's :class:`EagerBSROutput` is kept in
    ``self.last`` (kept indices, token counts).

    Args:
        model: timm VisionTransformer with a class token.
        train_blocks, drop_at, keep_rate, fuse_token: see :func:`eager_bsr_forward`.
        configure: set ``requires_grad`` with :func:`configure_eager_bsr`.
    """

    def __init__(self, model, train_blocks: Sequence[int] | None = None,
                 drop_at: Sequence[int] | None = None, keep_rate: float = 0.5,
                 fuse_token: bool = True, configure: bool = True) -> None:
        super().__init__()
        check_vit(model)
        self.train_blocks, self.drop_at, self.keep_rate = _resolve(model, train_blocks, drop_at,
                                                                   keep_rate, fuse_token)
        self.fuse_token = bool(fuse_token)
        self.model = model
        self.last: EagerBSROutput | None = None
        if configure:
            configure_eager_bsr(model, self.train_blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits."""
        self.last = eager_bsr_forward(self.model, images, self.train_blocks, self.drop_at,
                                      self.keep_rate, self.fuse_token)
        return self.last.logits
