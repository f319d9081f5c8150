"""The strongest peer of the library's training step: BSR written in plain PyTorch.

What a user could write in an afternoon instead of using bsr_kernels: about 60 lines on top of a
timm ``VisionTransformer``, SDPA attention, the drop from the CLS row only (softmax over one row
per head, head mean, ``topk``, gather, score-weighted fused token), plain autograd, blocks before
the first trained block under ``torch.no_grad()``. It is deliberately independent of the
library's model code (it shares no block body with it), so that comparing the two measures the
library, not a copy of it. Eager and ``torch.compile`` forms are both benchmarked.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["PeerBSR", "cls_row_drop"]


def cls_row_drop(x, q, k, keep_rate: float = 0.5, p: int = 1):
    """The CLS-row composite of issue 9: the six-line drop with a fused token (fp32 scores),
    also timed alone (eager and compiled) against the library's op by ``bench_gpu``.

    The kept rows keep their order without a sort: ``topk``'s rows are marked in a mask, and a
    running count gives each its output slot (dropped rows go to a spare slot, cut off). The
    first form, ``topk(...).indices.sort()``, computes the same, but its ``torch.compile`` did
    not finish on the H100: on 2026-11-27 the forward's compilation sat in ``ptxas`` for 180 s,
    twice (benchmarks/results/2026-11-27-h100-stacks-op-compiled.txt), and on 2026-11-26 for 145
    and 440 s. inductor turns that sort into a Triton bitonic-sort kernel; ``topk`` and
    ``cumsum`` stay ordinary kernels. Which kernel ptxas was compiling was not recorded, so the
    sort is the likely cause, not a proven one.

    The library's drop except for ties and NaN scores, which follow ``torch.topk`` here (as in
    :func:`bsr_kernels.baselines.eager_drop_composite`): on CPU tied scores at the cut need not
    keep the lower positions, and NaN ranks highest, not lowest. Under autocast (the step
    benchmarks' bf16) the logits' matmul runs in bf16 despite the ``.float()`` casts, which
    eagerly cost two copies of k; the library's scores are float32."""
    b, n, c = x.shape
    m = n - p
    n_keep = max(1, math.ceil(keep_rate * m - 1e-9))
    logits = (q[:, :, :1].float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)
    scores = logits.softmax(-1)[:, :, 0, p:].mean(1)                              # (B, M)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(
        1, scores.topk(n_keep, dim=1).indices, True)
    slot = torch.where(keep, keep.cumsum(1) - 1, n_keep)       # each kept row's output slot
    where = torch.arange(m, device=x.device).expand(b, m)
    kept = where.new_empty(b, n_keep + 1).scatter(1, slot, where)[:, :n_keep]  # in order
    xp = x[:, p:]
    parts = [x[:, :p], xp.gather(1, kept.unsqueeze(-1).expand(-1, -1, c))]
    if n_keep < m:
        w = scores.scatter(1, kept, 0.0)
        parts.append(torch.einsum("bm,bmc->bc", w, xp.float()).to(x.dtype).unsqueeze(1))
    return torch.cat(parts, 1)


class PeerBSR(torch.nn.Module):
    """A timm ViT run the BSR way in plain PyTorch (the model's own weights, nothing copied)."""

    def __init__(self, vit, train_blocks=(3, 7, 11), drop_at=(3, 6, 9), keep_rate=0.5):
        super().__init__()
        self.vit, self.drop_at, self.keep_rate = vit, set(drop_at), keep_rate
        self.first = min(train_blocks)
        for name, prm in vit.named_parameters():
            prm.requires_grad_(name.startswith("head.")
                               or any(name.startswith(f"blocks.{i}.") for i in train_blocks))

    def _block(self, i, blk, x):
        a = blk.attn
        b, n, c = x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(a.proj(o))
        if i in self.drop_at:
            x = cls_row_drop(x, q, k, self.keep_rate, self.vit.num_prefix_tokens)
        return x + blk.ls2(blk.mlp(blk.norm2(x)))

    def forward(self, images):
        vit = self.vit
        with torch.no_grad():
            x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
            for i in range(self.first):
                x = self._block(i, vit.blocks[i], x)
        for i in range(self.first, len(vit.blocks)):
            x = self._block(i, vit.blocks[i], x)
        return vit.forward_head(vit.norm(x))
