"""``TokenDropAttention``: a drop-in for timm's ``Attention`` that also hands its block q and k.

A block that drops tokens needs the CLS row of its attention. Rather than computing attention
probabilities twice, ``forward_qk`` returns the attention output *and* the (normalised) q and k, so
the block can call :func:`bsr_kernels.drop_tokens` after its residual add::

    out, q, k = block.attn.forward_qk(block.norm1(x))
    x = x + block.ls1(out)
    x, kept = bsr_kernels.drop_tokens(x, q, k, keep_rate=0.5, num_prefix_tokens=1)

Attention runs as timm's does: through ``F.scaled_dot_product_attention`` (no N x N
probabilities are materialised; SDPA may choose its own kernel), or, where the model asks for it
with ``fused_attn=False`` (timm's ``TIMM_FUSED_ATTN=0``), through timm's explicit path: the
N x N probabilities, ``attn_drop`` (and hooks on it, which attention-map tools use) and a
second derivative on every device.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

__all__ = ["TokenDropAttention", "LinearFn", "call_linear"]

#: ``linear(name, module, input) -> output``: how a caller may run the attention's projections
#: ("qkv" and "proj"); the default calls the module. The memory-lean backward uses it to replay
#: saved outputs instead of recomputing them.
LinearFn = Callable[[str, nn.Linear, torch.Tensor], torch.Tensor]


def call_linear(name: str, module: nn.Linear, inp: torch.Tensor) -> torch.Tensor:
    """The default :data:`LinearFn`: calls the module."""
    return module(inp)


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks (or pre-hooks) of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether hooks registered for every module (``register_module_forward_hook`` ...) exist."""
    from torch.nn.modules import module as m
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


def dropout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``module(t)`` for a block's dropout module (timm's ``proj_drop``, ``drop1``, ``drop2``),
    or ``t`` itself where that call would return it: an ``nn.Dropout`` of p=0, or in eval mode,
    with no hooks to run. Eagerly that call returns ``t`` itself and draws no random numbers,
    but in training mode torch 2.11's ``torch.compile`` traces each such call to a copy
    (``aten.clone``); torch 2.14 leaves them out."""
    if type(module) is nn.Dropout and (module.p == 0 or not module.training) \
            and not hooked(module) and not _global_hooks():
        return t
    return module(t)


class TokenDropAttention(Attention):
    """timm ``Attention`` with the same constructor, parameters and state_dict keys.

    ``forward(x, attn_mask=None, is_causal=False)`` matches timm's output. ``forward_qk`` also
    returns q and k (B, H, N, d), after q_norm/k_norm, for the block's token drop.
    A timm ``Attention`` instance can be converted in place with ``attn.__class__ =
    TokenDropAttention`` (that is what :func:`bsr_kernels.reprogram` does).
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        # the projections called directly (not through forward_qk's ``linear``), so that
        # torch.jit.script compiles this module as it compiles timm's Attention
        out, _, _ = self._attend(x, self.qkv(x), attn_mask, is_causal)
        return self.proj_drop(self.proj(out))

    def forward_qk(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   is_causal: bool = False, linear: LinearFn = call_linear):
        """Attention output plus q and k.

        Args:
            x: (B, N, C) normalised input.
            attn_mask: optional mask for SDPA.
            is_causal: causal attention.
            linear: how to run the "qkv" and "proj" projections (default: call the module).

        Returns:
            out (B, N, C_out), q (B, H, N, d), k (B, H, N, d).
        """
        out, q, k = self._attend(x, linear("qkv", self.qkv, x), attn_mask, is_causal)
        return dropout(self.proj_drop, linear("proj", self.proj, out)), q, k

    def _attend(self, x: torch.Tensor, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor],
                is_causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the qkv projection ``qkv`` of ``x``: the attention output before ``proj``
        (normed, gated), q and k."""
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.0)
        else:   # timm's explicit path, as the model chose it (q, k returned unscaled)
            logits = (q * self.scale) @ k.transpose(-2, -1)
            logits = maybe_add_mask(logits, resolve_self_attn_mask(n, logits, attn_mask,
                                                                   is_causal))
            out = self.attn_drop(logits.softmax(dim=-1)) @ v
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return out, q, k
