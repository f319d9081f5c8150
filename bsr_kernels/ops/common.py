"""Shared input checks, sizes and the backend interface of the token-drop ops.

Every backend (reference, cpp, triton) implements :class:`Backend`. Shapes follow timm:

* ``q``, ``k``: (B, H, N, d), as timm's ``Attention`` makes them (after q_norm / k_norm).
* ``x``: (B, N, C), the residual stream.
* Token 0 is the CLS token; tokens ``0 .. P-1`` are prefix tokens (CLS, then registers).

Scores are the CLS row of the attention probabilities averaged over heads, for the ``M = N - P``
non-prefix tokens. They are accumulated in float32 (float64 for float64 inputs).

Selection rule (every backend must follow it exactly): rank candidates by score, highest first;
NaN ranks as -inf; equal scores rank by position, lower first. The ``n_keep`` best are kept and
returned in ascending position order. Dropped tokens are summed into one fused token weighted by
their (not renormalised) scores when ``fuse_token`` and at least one token is dropped.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch

from .. import _config

__all__ = [
    "Backend",
    "autocast_dtype",
    "autocast_off",
    "DropPlan",
    "check_backend_name",
    "check_kept",
    "compute_dtype",
    "check_qk",
    "check_x",
    "check_keep_rate",
    "check_prefix",
    "resolve_scale",
    "num_kept",
    "out_tokens",
    "plain_call",
    "under_functorch",
    "values_readable",
]


def under_functorch() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) runs the
    call: the drop ops then compute their definition, and reprogrammed blocks and MoE MLPs
    their plain autograd forms (functorch refuses custom autograd.Functions)."""
    return torch._C._are_functorch_transforms_active()


def plain_call(*tensors: torch.Tensor) -> bool:
    """Plain tensors, in a call that nothing records or intercepts: not torch.compile / export,
    jit.trace, a dispatch mode (fake tensors, make_fx, FlopCounterMode, selective
    checkpointing) or a function mode. torch.func transforms are :func:`under_functorch`."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and all(type(t) is torch.Tensor for t in tensors)
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled())


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` now, or None where it is off, or where
    the device type has no autocast (``meta``, whose tensors a model's shape inference runs:
    asking torch about it raises). cpu and cuda skip that availability query, so that
    torch.compile traces no more than ``torch.is_autocast_enabled``."""
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """A context that turns autocast off on ``device_type``; one that does nothing where it is
    off already. The drop ops' kernels accumulate in their compute dtype whatever autocast
    says, so their pure-PyTorch forms (the definition, a lean replay's drop) must too."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def values_readable(t: torch.Tensor) -> bool:
    """Whether an argument check may read ``t``'s values on the host: a CPU tensor (no host
    sync) in a :func:`plain_call`, and not inside torch.func.vmap, whose batched values no
    Python branch can read (grad and jvp can)."""
    if t.device.type != "cpu" or not plain_call(t):
        return False
    if not under_functorch():
        return True
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return all(i.key() != TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype for scores and the fused token: float64 if any input is float64, else
    float32 (x and q/k may differ under autocast: bf16 q, k beside an fp32 residual stream)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_tensor(t, name: str, ndim: int, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {dims}, got shape {tuple(t.shape)}")


def check_qk(q, k) -> None:
    """Checks q and k: (B, H, N, d) floating tensors of one shape, dtype and device."""
    _check_tensor(q, "q", 4, "(B, H, N, d)")
    _check_tensor(k, "k", 4, "(B, H, N, d)")
    if q.shape != k.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on the device of q ({q.device}), got {k.device}")
    if q.shape[1] < 1:
        raise ValueError(f"q must have at least one head (H >= 1), got shape {tuple(q.shape)}")
    if q.shape[3] < 1:
        raise ValueError(f"q must have a head dimension d >= 1, got shape {tuple(q.shape)}")
    if q.shape[2] < 2:
        raise ValueError(f"q must hold at least 2 tokens (N >= 2), got N={q.shape[2]}")


def check_x(x, q) -> None:
    """Checks x: (B, N, C) with the B and N of q, on q's device. x may have another floating
    dtype than q and k (autocast makes bf16/fp16 q, k beside an fp32 residual stream)."""
    _check_tensor(x, "x", 3, "(B, N, C)")
    if x.shape[0] != q.shape[0]:
        raise ValueError(f"x has batch size {x.shape[0]} but q has {q.shape[0]}")
    if x.shape[1] != q.shape[2]:
        raise ValueError(f"x has {x.shape[1]} tokens but q has N={q.shape[2]}")
    if x.device != q.device:
        raise ValueError(f"x must be on the device of q ({q.device}), got {x.device}")


def check_keep_rate(keep_rate, name: str = "keep_rate") -> float:
    """Returns keep_rate as a float in (0, 1], or raises naming the argument."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {keep_rate!r}")
    keep_rate = float(keep_rate)
    if math.isnan(keep_rate) or not (0.0 < keep_rate <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {keep_rate!r}")
    return keep_rate


def check_prefix(num_prefix_tokens, n_tokens: int) -> int:
    """Returns num_prefix_tokens as an int in [1, N), or raises naming the argument."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int, got {num_prefix_tokens!r}")
    p = int(num_prefix_tokens)
    if p < 1:
        raise ValueError(f"num_prefix_tokens must be >= 1 (token 0 is the CLS token), got {p}")
    if p >= n_tokens:
        raise ValueError(f"num_prefix_tokens must be < N={n_tokens}, got {p}")
    return p


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` when None, else a finite positive float."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return scale


def num_kept(keep_rate: float, n_candidates: int) -> int:
    """``ceil(keep_rate * n_candidates)``, robust to float noise, at least 1: 0.3 * 10 keeps 3,
    and so does a keep_rate that went through float32 (numpy, ``tensor.item()``:
    0.30000001192092896 * 10), rounded to 6 decimals before the ceiling."""
    n_candidates = int(n_candidates)  # a traced size (jit.trace) arrives as a tensor
    return max(1, min(n_candidates, math.ceil(round(keep_rate * n_candidates, 6))))


def out_tokens(n_prefix: int, n_keep: int, n_candidates: int, fuse_token: bool) -> int:
    """Tokens after a drop: prefix + kept (+ 1 fused token when something was dropped)."""
    return n_prefix + n_keep + int(DropPlan(n_prefix, n_candidates, n_keep, fuse_token).fused)


@dataclass(frozen=True)
class DropPlan:
    """The sizes of one drop, computed once in Python from shapes and handed to every backend.

    Attributes:
        n_prefix: P, prefix tokens kept first (CLS, registers).
        n_candidates: M = N - P, the scored tokens.
        n_keep: ceil(keep_rate * M), at least 1.
        fuse_token: whether the caller asked for a fused token.
    """

    n_prefix: int
    n_candidates: int
    n_keep: int
    fuse_token: bool

    @classmethod
    def make(cls, n_tokens: int, n_prefix: int, keep_rate: float, fuse_token: bool) -> "DropPlan":
        m = n_tokens - n_prefix
        return cls(n_prefix, m, num_kept(keep_rate, m), bool(fuse_token))

    @property
    def drops(self) -> bool:
        """Whether any token is dropped."""
        return self.n_keep < self.n_candidates

    @property
    def fused(self) -> bool:
        """Whether a fused token is appended: asked for, and something was dropped. The one place
        this rule lives; backends receive it as a flag."""
        return self.fuse_token and self.drops

    @property
    def out_tokens(self) -> int:
        return self.n_prefix + self.n_keep + int(self.fused)


def check_backend_name(backend) -> str:
    """A backend name for the registered ops: "" (dispatcher's choice) or a known name."""
    if backend is None or backend == "":
        return ""
    if not isinstance(backend, str) or backend not in _config.BACKEND_NAMES:
        raise ValueError(f"backend must be None or one of {', '.join(_config.BACKEND_NAMES)}, "
                         f"got {backend!r}")
    return backend


def check_kept(kept, batch: int, plan: "DropPlan", device: torch.device,
               values: bool = True) -> None:
    """Checks a recorded selection for replay: integer (B, n_keep) on x's ``device``, and with
    ``values`` on CPU its values (positions 0..M-1 among the non-prefix tokens); reading them
    on another device would sync with the host."""
    if not isinstance(kept, torch.Tensor) or kept.is_floating_point() or kept.is_complex() \
            or kept.dtype == torch.bool:
        raise TypeError(f"kept must be an integer tensor, got {kept!r:.60}")
    if tuple(kept.shape) != (batch, plan.n_keep):
        raise ValueError(f"kept must have shape (B, n_keep) = {(batch, plan.n_keep)} for this "
                         f"keep_rate, got {tuple(kept.shape)}")
    if kept.device != device:
        raise ValueError(f"kept must be on x's device {device}, got {kept.device}")
    if values and kept.numel() and values_readable(kept):
        lo, hi = torch.aminmax(kept)
        if lo < 0 or hi >= plan.n_candidates:
            raise ValueError(f"kept must hold positions 0..{plan.n_candidates - 1} among the "
                             f"non-prefix tokens, got {int(lo)}..{int(hi)}")


class Backend:
    """One implementation of the token-drop ops. Subclasses fill in every method.

    All tensors arrive checked and on one device. ``scores`` and ``lse`` are in
    ``compute_dtype(x.dtype, q.dtype)`` (``compute_dtype(q.dtype)`` for ``cls_scores``); ``kept``
    is int32 (B, n_keep), distinct positions: ascending from a selection, in any order in a
    replay (the backward follows it).
    """

    name: str = "?"
    #: Whether x may have another dtype than q and k (else the caller casts x, q and k to their
    #: ``compute_dtype`` and x_out back to x's dtype).
    mixed_dtypes: bool = False

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Why this backend cannot run on ``device``/``dtype``; empty when it can."""
        raise NotImplementedError

    def cls_scores(self, q, k, scale: float, num_prefix_tokens: int):
        """-> (scores (B, N-P), lse (B, H)): head-mean CLS-row probabilities and the per-head
        logsumexp of the scaled CLS-row logits."""
        raise NotImplementedError

    def cls_scores_backward(self, grad_scores, q, k, lse, scale: float, num_prefix_tokens: int):
        """-> (grad_q, grad_k), both shaped like q; only row 0 of grad_q is non-zero."""
        raise NotImplementedError

    def drop_forward(self, x, q, k, scale: float, num_prefix_tokens: int, n_keep: int,
                     fuse_token: bool):
        """-> (x_out (B, out_tokens, C) in x.dtype, kept int32 (B, n_keep), scores, lse)."""
        raise NotImplementedError

    def drop_replay(self, x, q, k, kept, scale: float, num_prefix_tokens: int, fuse_token: bool):
        """The forward with a recorded selection ``kept`` (int32, ascending).
        -> (x_out, scores, lse)."""
        raise NotImplementedError

    def drop_backward(self, grad_out, x, q, k, kept, scores, lse, scale: float,
                      num_prefix_tokens: int):
        """Backward of a drop that appended a fused token. -> (grad_x (B, N, C), grad_q, grad_k)."""
        raise NotImplementedError

    def gather_backward(self, grad_out, kept, n_tokens: int, num_prefix_tokens: int):
        """Backward of a drop without a fused token: scatters grad_out back. -> grad_x (B, N, C)."""
        raise NotImplementedError
