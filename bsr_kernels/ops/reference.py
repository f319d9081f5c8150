"""The pure-PyTorch definition of the token-drop ops. Every other backend is tested against it.

``cls_scores``, ``select_tokens`` and ``drop_tokens`` are plain differentiable PyTorch: autograd
through them *is* the definition of the gradients. The ``*_backward`` functions are the analytic
gradients in torch ops, used by the reference backend (and by backends without a backward
kernel). They build no N x N matrix either (only the CLS row of the logits), but they favour
clarity over speed.
"""
from __future__ import annotations

import torch

from .common import Backend, DropPlan, compute_dtype

__all__ = ["cls_scores", "rank_key", "select_tokens", "dropped_mask", "drop_tokens",
           "cls_scores_backward", "gather_backward", "drop_backward", "drop_replay",
           "ReferenceBackend"]


def cls_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int,
               cd: torch.dtype | None = None):
    """Head-mean CLS-row attention probabilities over the non-prefix tokens.

    Args:
        q, k: (B, H, N, d).
        scale: softmax scale.
        num_prefix_tokens: P; the softmax runs over all N keys, only columns P.. are returned.
        cd: accumulation dtype, default ``compute_dtype(q.dtype)``.

    Returns:
        scores (B, N - P) and lse (B, H), in ``cd``.
    """
    cd = cd or compute_dtype(q.dtype)
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].to(cd), k.to(cd)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return probs[:, :, num_prefix_tokens:].mean(dim=1), lse


def rank_key(scores: torch.Tensor) -> torch.Tensor:
    """The key the selection rule ranks by: NaN lowest (-inf), +-inf the largest and lowest
    finite values, as ``torch.nan_to_num(scores, nan=-inf)`` makes them (the C++ kernels'
    ``rank_key``), in ops that tracers and both ONNX exporters take. Scores from q and k are
    probabilities, never infinite; :func:`bsr_kernels.export.select_aten` takes any scores."""
    finfo = torch.finfo(scores.dtype)
    return torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")),
                       scores.clamp(finfo.min, finfo.max))


def select_tokens(scores: torch.Tensor, n_keep: int):
    """The selection rule: highest score first, NaN lowest (:func:`rank_key`), ties to the
    lower position.

    Returns:
        kept (B, n_keep) int64 ascending, and a bool mask (B, M) of the dropped tokens.
    """
    key = rank_key(scores.detach())
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    kept = order[:, :n_keep].sort(dim=1).values
    dropped = dropped_mask(key, kept)
    return kept, dropped


def dropped_mask(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A bool (B, M) mask, True where ``kept`` (B, n_keep) int64 does not hold the position (an
    out-of-place scatter: torch.func.vmap has a batching rule for it)."""
    return torch.ones_like(scores, dtype=torch.bool).scatter(
        1, kept, torch.zeros_like(kept, dtype=torch.bool))


def drop_tokens(x, q, k, scale: float, num_prefix_tokens: int, n_keep: int, fuse_token: bool,
                kept=None):
    """Keeps the prefix and the ``n_keep`` most attended tokens; optionally fuses the rest.

    Args:
        kept: optional (B, n_keep) positions to keep instead of selecting them (used to replay a
            recorded selection); the fusion weights are still the scores of q and k.

    Returns:
        x_out (B, P + n_keep [+ 1], C), kept (B, n_keep) int64, scores (B, M), lse (B, H).
    """
    p = num_prefix_tokens
    scores, lse = cls_scores(q, k, scale, p, compute_dtype(x.dtype, q.dtype))
    if kept is None:
        kept, dropped = select_tokens(scores, n_keep)
    else:
        kept = kept.long()
        dropped = dropped_mask(scores, kept)
    xp = x[:, p:]
    parts = [x[:, :p], torch.gather(xp, 1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))]
    if DropPlan(p, xp.shape[1], n_keep, fuse_token).fused:
        weights = torch.where(dropped, scores, torch.zeros_like(scores))
        fused = torch.einsum("bm,bmc->bc", weights, xp.to(scores.dtype))
        parts.append(fused.to(x.dtype).unsqueeze(1))
    return torch.cat(parts, dim=1), kept, scores, lse


def cls_scores_backward(grad_scores, q, k, lse, scale: float, num_prefix_tokens: int):
    """Analytic backward of :func:`cls_scores` from the saved logsumexp (torch ops, any device).

    Computes in lse's dtype when that is wider: a drop of float64 x with float32 q, k scores in
    float64 (``compute_dtype(x.dtype, q.dtype)``)."""
    cd = compute_dtype(q.dtype, lse.dtype)
    q0, kk = q[:, :, 0].to(cd), k.to(cd)
    probs = torch.exp(torch.einsum("bhd,bhnd->bhn", q0, kk) * scale - lse.unsqueeze(-1))
    grad_p = torch.zeros_like(probs)
    grad_p[:, :, num_prefix_tokens:] = grad_scores.to(cd).unsqueeze(1) / q.shape[1]
    grad_logits = probs * (grad_p - (probs * grad_p).sum(-1, keepdim=True)) * scale
    grad_q = torch.zeros_like(q)
    grad_q[:, :, 0] = torch.einsum("bhn,bhnd->bhd", grad_logits, kk).to(q.dtype)
    grad_k = _like(k, grad_logits.unsqueeze(-1) * q0.unsqueeze(2))
    return grad_q, grad_k


def _like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the layout of ``torch.empty_like(t)``, as the registered fake kernels
    promise."""
    return torch.empty_like(t).copy_(value)


def gather_backward(grad_out, kept, n_tokens: int, num_prefix_tokens: int):
    """Scatters the prefix and kept rows of grad_out back to (B, N, C); dropped rows get zero."""
    p, n_keep = num_prefix_tokens, kept.shape[1]
    b, _, c = grad_out.shape
    grad_x = grad_out.new_zeros(b, n_tokens, c)
    grad_x[:, :p] = grad_out[:, :p]
    idx = kept.long().unsqueeze(-1).expand(-1, -1, c) + p
    return grad_x.scatter_(1, idx, grad_out[:, p:p + n_keep])


def drop_backward(grad_out, x, q, k, kept, scores, lse, scale: float, num_prefix_tokens: int):
    """Analytic backward of :func:`drop_tokens` with a fused token (torch ops, any device)."""
    p = num_prefix_tokens
    grad_x = gather_backward(grad_out, kept, x.shape[1], p)
    dropped = dropped_mask(scores, kept.long())
    grad_fused = grad_out[:, -1].to(scores.dtype)
    weights = torch.where(dropped, scores, torch.zeros_like(scores))
    grad_x[:, p:] += (weights.unsqueeze(-1) * grad_fused.unsqueeze(1)).to(x.dtype)
    grad_scores = torch.einsum("bc,bmc->bm", grad_fused, x[:, p:].to(scores.dtype))
    grad_scores = torch.where(dropped, grad_scores, torch.zeros_like(grad_scores))
    grad_q, grad_k = cls_scores_backward(grad_scores, q, k, lse, scale, p)
    return _like(x, grad_x), grad_q, grad_k


def drop_replay(x, q, k, kept, scale: float, num_prefix_tokens: int, fuse_token: bool):
    """The drop with a recorded selection ``kept``: -> (x_out, scores, lse)."""
    x_out, _, scores, lse = drop_tokens(x, q, k, scale, num_prefix_tokens, kept.shape[1],
                                        fuse_token, kept=kept)
    return x_out, scores, lse


class ReferenceBackend(Backend):
    """The definition wrapped as a backend, with the analytic torch-op backward."""

    name = "reference"
    mixed_dtypes = True

    def not_supported_reasons(self, device, dtype):
        return []

    def cls_scores(self, q, k, scale, num_prefix_tokens):
        return cls_scores(q, k, scale, num_prefix_tokens)

    def cls_scores_backward(self, grad_scores, q, k, lse, scale, num_prefix_tokens):
        return cls_scores_backward(grad_scores, q, k, lse, scale, num_prefix_tokens)

    def drop_forward(self, x, q, k, scale, num_prefix_tokens, n_keep, fuse_token):
        x_out, kept, scores, lse = drop_tokens(x, q, k, scale, num_prefix_tokens, n_keep,
                                               fuse_token)
        return x_out, kept.to(torch.int32), scores, lse

    def drop_replay(self, x, q, k, kept, scale, num_prefix_tokens, fuse_token):
        return drop_replay(x, q, k, kept, scale, num_prefix_tokens, fuse_token)

    def drop_backward(self, grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens):
        return drop_backward(grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens)

    def gather_backward(self, grad_out, kept, n_tokens, num_prefix_tokens):
        return gather_backward(grad_out, kept, n_tokens, num_prefix_tokens)
