"""The token-drop ops: ``cls_attention`` and ``drop_tokens``, one dispatcher, three backends.

The ops are registered with ``torch.library`` (namespace ``bsr_kernels``), with fake kernels and
autograd, so ``torch.compile`` treats them as opaque and gives the eager result. Every registered
op takes a ``backend`` string ("" for the dispatcher's choice), so a forced backend also runs the
backward. ``drop_tokens_replay`` is the forward with a recorded selection (``kept=``).

Two paths, one autograd definition. A plain eager call (:func:`_plain_eager`: plain tensors, no
tracer, no dispatch or function mode) runs the backend through an ``autograd.Function``
(``_DropFunction`` and friends) and skips the registered ops: the ``custom_op`` machinery costs
host time on every call (a forward and ``autograd.grad`` of a tiny drop on CPU: 172 us through the
registered op, 138 us for the whole public call; ``benchmarks`` section ``drop_tokens``, scope
``host``), which on a GPU is the same order as the kernels. Everything else (``torch.compile``,
``torch.export``, ``jit.trace``, ``make_fx``, fake tensors, ``FlopCounterMode``, selective
checkpointing, tensor subclasses) goes through the registered ops, which those tools see as one
opaque node. Both paths share the setup (what is saved) and the backward
(:func:`_drop_input_grads`); they differ only in how a backward kernel is reached (the backend
itself, or the registered backward op).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import (DropPlan, autocast_off, check_backend_name, check_kept, check_keep_rate, check_prefix,
                     check_qk, check_x, compute_dtype, out_tokens, plain_call, resolve_scale,
                     under_functorch)
from .dispatch import available_backends, context_backend, select_backend, use_backend
from . import reference

__all__ = ["cls_attention", "drop_tokens", "available_backends", "use_backend", "DropPlan"]


# --- registered ops (inputs already checked) ------------------------------------------------

@torch.library.custom_op("bsr_kernels::cls_attention", mutates_args=())
def _cls_attention_op(q: Tensor, k: Tensor, scale: float, num_prefix_tokens: int, backend: str
                      ) -> tuple[Tensor, Tensor]:
    return select_backend(q.device, q.dtype, name=backend).cls_scores(q, k, scale,
                                                                       num_prefix_tokens)


@_cls_attention_op.register_fake
def _(q, k, scale, num_prefix_tokens, backend):
    b, h, n, _ = q.shape
    cd = compute_dtype(q.dtype)
    return q.new_empty(b, n - num_prefix_tokens, dtype=cd), q.new_empty(b, h, dtype=cd)


@torch.library.custom_op("bsr_kernels::cls_attention_backward", mutates_args=())
def _cls_attention_bwd_op(grad_scores: Tensor, q: Tensor, k: Tensor, lse: Tensor, scale: float,
                          num_prefix_tokens: int, backend: str) -> tuple[Tensor, Tensor]:
    return select_backend(q.device, q.dtype, name=backend).cls_scores_backward(
        grad_scores, q, k, lse, scale, num_prefix_tokens)


@_cls_attention_bwd_op.register_fake
def _(grad_scores, q, k, lse, scale, num_prefix_tokens, backend):
    return torch.empty_like(q), torch.empty_like(k)


def _cls_attention_setup(ctx, inputs, output):
    q, k, scale, p, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.scale, ctx.p = scale, p
    _save_backend(ctx, backend)
    ctx.save_for_backward(q, k, output[1])


def _cls_attention_backward(ctx, grad_scores, grad_lse):
    q, k, lse = ctx.saved_tensors
    if torch.is_grad_enabled():   # create_graph=True
        gq, gk = _differentiable_vjp(
            lambda q, k: reference.cls_scores(q, k, ctx.scale, ctx.p)[0], (q, k), grad_scores)
    else:
        gq, gk = _backward_kernels(ctx).cls_scores_backward(grad_scores.contiguous(), q, k, lse,
                                                            ctx.scale, ctx.p)
    return gq, gk, None, None, None


_cls_attention_op.register_autograd(_cls_attention_backward, setup_context=_cls_attention_setup)


@torch.library.custom_op("bsr_kernels::drop_tokens", mutates_args=())
def _drop_op(x: Tensor, q: Tensor, k: Tensor, scale: float, num_prefix_tokens: int, n_keep: int,
             fuse_token: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return select_backend(x.device, x.dtype, q.dtype, name=backend).drop_forward(
        x, q, k, scale, num_prefix_tokens, n_keep, fuse_token)


def _fake_drop(x, q, num_prefix_tokens, n_keep, fuse_token):
    """x_out, scores and lse of a drop, shapes and dtypes only (the fake kernels)."""
    b, n, c = x.shape
    m = n - num_prefix_tokens
    cd = compute_dtype(x.dtype, q.dtype)
    return (x.new_empty(b, out_tokens(num_prefix_tokens, n_keep, m, fuse_token), c),
            x.new_empty(b, m, dtype=cd), x.new_empty(b, q.shape[1], dtype=cd))


@_drop_op.register_fake
def _(x, q, k, scale, num_prefix_tokens, n_keep, fuse_token, backend):
    x_out, scores, lse = _fake_drop(x, q, num_prefix_tokens, n_keep, fuse_token)
    return x_out, x.new_empty(x.shape[0], n_keep, dtype=torch.int32), scores, lse


@torch.library.custom_op("bsr_kernels::drop_tokens_replay", mutates_args=())
def _replay_op(x: Tensor, q: Tensor, k: Tensor, kept: Tensor, scale: float,
               num_prefix_tokens: int, fuse_token: bool, backend: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    return select_backend(x.device, x.dtype, q.dtype, name=backend).drop_replay(
        x, q, k, kept, scale, num_prefix_tokens, fuse_token)


@_replay_op.register_fake
def _(x, q, k, kept, scale, num_prefix_tokens, fuse_token, backend):
    return _fake_drop(x, q, num_prefix_tokens, kept.shape[1], fuse_token)


@torch.library.custom_op("bsr_kernels::drop_tokens_backward", mutates_args=())
def _drop_bwd_op(grad_out: Tensor, x: Tensor, q: Tensor, k: Tensor, kept: Tensor, scores: Tensor,
                 lse: Tensor, scale: float, num_prefix_tokens: int, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    return select_backend(x.device, x.dtype, q.dtype, name=backend).drop_backward(
        grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens)


@_drop_bwd_op.register_fake
def _(grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens, backend):
    return torch.empty_like(x), torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("bsr_kernels::gather_tokens_backward", mutates_args=())
def _gather_bwd_op(grad_out: Tensor, kept: Tensor, n_tokens: int, num_prefix_tokens: int,
                   backend: str) -> Tensor:
    return select_backend(grad_out.device, grad_out.dtype, name=backend).gather_backward(
        grad_out, kept, n_tokens, num_prefix_tokens)


@_gather_bwd_op.register_fake
def _(grad_out, kept, n_tokens, num_prefix_tokens, backend):
    return grad_out.new_empty(grad_out.shape[0], n_tokens, grad_out.shape[2])


def _save_drop(ctx, x, q, k, kept, scores, lse, scale, p, backend, fused):
    ctx.scale, ctx.p, ctx.n_tokens, ctx.fused = scale, p, x.shape[1], fused
    _save_backend(ctx, backend)
    # Saved: int32 indices always; for the fused token also x, q, k (q and k are views of the
    # block's qkv, which attention saves anyway), the (B, M) scores and the (B, H) logsumexp.
    if fused:
        ctx.save_for_backward(kept, x, q, k, scores, lse)
    else:
        ctx.save_for_backward(kept)


def _drop_setup(ctx, inputs, output):
    x, q, k, scale, p, n_keep, fuse_token, backend = inputs
    x_out, kept, scores, lse = output
    ctx.mark_non_differentiable(kept, scores, lse)
    _save_drop(ctx, x, q, k, kept, scores, lse, scale, p, backend, x_out.shape[1] > p + n_keep)


def _replay_setup(ctx, inputs, output):
    x, q, k, kept, scale, p, fuse_token, backend = inputs
    x_out, scores, lse = output
    ctx.mark_non_differentiable(scores, lse)
    _save_drop(ctx, x, q, k, kept, scores, lse, scale, p, backend,
               x_out.shape[1] > p + kept.shape[1])


def _drop_input_grads(ctx, grad_out):
    grad_out = grad_out.contiguous()
    second_order = torch.is_grad_enabled()   # create_graph=True
    if ctx.fused:
        kept, x, q, k, scores, lse = ctx.saved_tensors
        if second_order:
            return _differentiable_vjp(lambda x, q, k: reference.drop_tokens(
                x, q, k, ctx.scale, ctx.p, kept.shape[1], True, kept=kept)[0], (x, q, k), grad_out)
        return _backward_kernels(ctx).drop_backward(grad_out, x, q, k, kept, scores, lse,
                                                    ctx.scale, ctx.p)
    (kept,) = ctx.saved_tensors
    # the gather's backward is linear in grad_out; the reference's torch ops carry its graph
    kernels = reference if second_order else _backward_kernels(ctx)
    return kernels.gather_backward(grad_out, kept, ctx.n_tokens, ctx.p), None, None


def _differentiable_vjp(fn, inputs, grad):
    """Backward under ``create_graph=True`` (gradient penalties, MAML): the vector-Jacobian
    product of the pure-PyTorch definition ``fn`` at the saved ``inputs``, with the forward's
    recorded selection, as a graph of its own, so that a second backward differentiates it. The
    selection is piecewise constant, so this is the exact derivative. The kernels' backward has
    no derivative.

    Each input is differentiated through an alias of its own (``view_as``): the partial
    derivative, as the op's backward must return. Through the input itself autograd would add
    the paths between the inputs (in a block, x depends on q and k through attention). An input
    that needs no gradient gets a stand-in leaf, its gradient unused."""
    with torch.enable_grad():
        alias = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*alias), alias, grad, create_graph=True)


def _drop_backward(ctx, grad_out, *_):
    """Backward of the drop and of its replay: both take 8 inputs, x, q and k first."""
    return (*_drop_input_grads(ctx, grad_out), None, None, None, None, None)


_drop_op.register_autograd(_drop_backward, setup_context=_drop_setup)
_replay_op.register_autograd(_drop_backward, setup_context=_replay_setup)


# --- the eager path -------------------------------------------------------------------------

class _RegisteredBackward:
    """The backward kernels of the registered-op path: the registered backward ops (which a
    tracer records), with the backend name the forward resolved."""

    def __init__(self, backend: str):
        self.backend = backend

    def cls_scores_backward(self, grad_scores, q, k, lse, scale, num_prefix_tokens):
        return _cls_attention_bwd_op(grad_scores, q, k, lse, scale, num_prefix_tokens,
                                     self.backend)

    def drop_backward(self, grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens):
        return _drop_bwd_op(grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens,
                            self.backend)

    def gather_backward(self, grad_out, kept, n_tokens, num_prefix_tokens):
        return _gather_bwd_op(grad_out, kept, n_tokens, num_prefix_tokens, self.backend)


def _save_backend(ctx, backend) -> None:
    """Keeps the forward's backend: an object on the eager path, a name on the registered one."""
    ctx.impl = None if isinstance(backend, str) else backend
    ctx.backend = backend if ctx.impl is None else backend.name


def _backward_kernels(ctx):
    """What a first-order backward calls: the backend itself on the eager path, the registered
    backward ops on the registered path (``create_graph=True`` takes
    :func:`_differentiable_vjp` instead: neither has a derivative)."""
    return ctx.impl if ctx.impl is not None else _RegisteredBackward(ctx.backend)


def _plain_eager(*tensors: Tensor) -> bool:
    """Whether a call can skip the registered ops: a :func:`.common.plain_call`, outside
    torch.func transforms (which the ops answer with the definition:
    :func:`.common.under_functorch`). Anything else must see the op itself."""
    return plain_call(*tensors) and not under_functorch()


def _eager_function(name: str, method: str, setup, backward) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` whose forward is the backend's ``method`` (the backend object is
    the last input), with the registered op's ``setup`` and ``backward``. Old-style (``forward``
    takes ctx): a Function with ``setup_context`` binds its arguments through ``inspect`` on
    every call (about 40 us); functorch transforms, which need that style, take the definition
    instead (:func:`.common.under_functorch`)."""
    def forward(ctx, *inputs):
        output = getattr(inputs[-1], method)(*inputs[:-1])
        setup(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,),
                dict(forward=staticmethod(forward), backward=staticmethod(backward),
                     __doc__=f"The eager path of the registered op; runs Backend.{method}."))


_ClsAttentionFunction = _eager_function("_ClsAttentionFunction", "cls_scores",
                                        _cls_attention_setup, _cls_attention_backward)
_DropFunction = _eager_function("_DropFunction", "drop_forward", _drop_setup, _drop_backward)
_ReplayFunction = _eager_function("_ReplayFunction", "drop_replay", _replay_setup,
                                  _drop_backward)


# --- public functional API --------------------------------------------------------------------

def cls_attention(q: Tensor, k: Tensor, scale: float | None = None,
                  num_prefix_tokens: int = 1, backend: str | None = None) -> Tensor:
    """CLS-row attention probabilities, averaged over heads, for the non-prefix tokens.

    ``s_j = mean_h softmax(q_cls,h . K_h^T * scale)[j]`` for ``j`` in ``P .. N-1``; the softmax
    runs over all N keys. No N x N matrix is built.

    Args:
        q, k: (B, H, N, d); token 0 is the CLS token.
        scale: softmax scale, default ``d ** -0.5``.
        num_prefix_tokens: P, the CLS token plus register tokens.
        backend: "reference", "cpp" or "triton" to force one (as ``use_backend`` does); default:
            the dispatcher's choice.

    Returns:
        (B, N - P) scores, float32 (float64 for float64 inputs). Differentiable w.r.t. q and k,
        also under torch.func transforms (which compute the definition, as for
        :func:`drop_tokens`).

    Raises:
        TypeError: an argument of the wrong type, as PyTorch raises it (a tensor argument that
            is not a floating-point tensor, k of another dtype than q, a ``scale`` or
            ``num_prefix_tokens`` that is not a number).
        ValueError: shapes, devices or values out of range, naming the argument (also an
            unknown ``backend`` name).
        RuntimeError: when no backend can run these inputs (or the forced one cannot), with
            each backend's reasons.
    """
    check_qk(q, k)
    p = check_prefix(num_prefix_tokens, q.shape[2])
    scale = resolve_scale(scale, q.shape[3])
    # resolved once, here (an unavailable backend raises here); the op and its backward get it
    impl = select_backend(q.device, q.dtype,
                          name=check_backend_name(backend) or context_backend())
    if under_functorch():   # the definition, in the compute dtype as the kernels (no autocast)
        with autocast_off(q.device.type):
            return reference.cls_scores(q, k, scale, p)[0]
    cd = compute_dtype(q.dtype)
    if not impl.mixed_dtypes and q.dtype != cd:   # half q, k for a float32/64-only backend
        q, k = q.to(cd), k.to(cd)
    if _plain_eager(q, k):
        return _ClsAttentionFunction.apply(q, k, scale, p, impl)[0]
    return _cls_attention_op(q, k, scale, p, impl.name)[0]


def drop_tokens(x: Tensor, q: Tensor, k: Tensor, keep_rate: float, fuse_token: bool = True,
                num_prefix_tokens: int = 1, scale: float | None = None, *,
                kept: Tensor | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Keeps the prefix tokens and the most CLS-attended tokens of x.

    ``n_keep = ceil(keep_rate * (N - P))`` tokens are kept, in ascending original order, after the
    P prefix tokens. With ``fuse_token`` the dropped tokens are summed, weighted by their scores,
    into one token appended last (none when nothing is dropped). Scores rank NaN lowest; ties go
    to the lower position.

    Args:
        x: (B, N, C) residual stream (its dtype may differ from q's: autocast).
        q, k: (B, H, N, d) of the same block's attention.
        keep_rate: fraction of non-prefix tokens to keep, in (0, 1].
        fuse_token: append the score-weighted sum of the dropped tokens.
        num_prefix_tokens: P, the CLS token plus register tokens.
        scale: softmax scale, default ``d ** -0.5``.
        kept: replay a recorded selection, (B, n_keep) distinct positions among the
            non-prefix tokens (as returned earlier, ascending; another order is kept in x_out),
            instead of selecting; the fusion weights are still the differentiable scores of q
            and k. ``keep_rate`` must give the same n_keep. It must be on x's device; its
            range is checked on CPU only (elsewhere reading it would sync with the host), and
            duplicates are not checked: such entries leave rows unspecified.
        backend: force "reference", "cpp" or "triton" for this call and its backward.

    Returns:
        x_out (B, P + n_keep [+ 1], C) and kept_idx (B, n_keep) int64, positions among the
        non-prefix tokens. Gradients reach x through the kept and fused rows, and q and k through
        the fusion weights. When nothing is dropped (keep_rate gives every token, no ``kept``),
        x_out is ``x`` itself, as ``nn.Identity`` returns its input.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`cls_attention` raises them, for x and
            ``kept`` too (a ``keep_rate`` or ``fuse_token`` of the wrong type is a TypeError, out
            of range a ValueError).

    Under torch.func transforms (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``vmap``)
    both ops compute the pure-PyTorch definition, whatever the backend.
    """
    return _drop_tokens(x, q, k, keep_rate, fuse_token, num_prefix_tokens, scale, kept, backend,
                        check_values=True)


def _drop_tokens(x, q, k, keep_rate, fuse_token, num_prefix_tokens, scale, kept, backend,
                 check_values: bool) -> tuple[Tensor, Tensor]:
    """:func:`drop_tokens`. ``check_values=False`` leaves out the range check of ``kept``, for a
    selection that this op returned to the caller (the model layer's replays): on CPU the check
    reads the values, which on the training path is a host sync in all but name."""
    check_qk(q, k)
    check_x(x, q)
    keep_rate = check_keep_rate(keep_rate)
    p = check_prefix(num_prefix_tokens, q.shape[2])
    scale = resolve_scale(scale, q.shape[3])
    if not isinstance(fuse_token, bool):
        raise TypeError(f"fuse_token must be a bool, got {fuse_token!r}")
    # resolved once, here (an unavailable backend raises even for a no-op drop); the ops and
    # their backward get the name
    impl = select_backend(x.device, x.dtype, q.dtype,
                          name=check_backend_name(backend) or context_backend())
    plan = DropPlan.make(x.shape[1], p, keep_rate, fuse_token)
    if kept is not None:
        check_kept(kept, x.shape[0], plan, x.device, check_values)
    if plan.n_keep == plan.n_candidates and kept is None:   # nothing to drop or reorder
        return x, torch.arange(plan.n_candidates, device=x.device).repeat(x.shape[0], 1)
    if under_functorch():   # the definition, in the compute dtype as the kernels (no autocast)
        with autocast_off(x.device.type):
            x_out, kept = reference.drop_tokens(x, q, k, scale, p, plan.n_keep,
                                                plan.fuse_token, kept=kept)[:2]
        return x_out, kept
    x_dtype = x.dtype
    cd = compute_dtype(x.dtype, q.dtype)
    if not impl.mixed_dtypes and not x.dtype == q.dtype == cd:
        # one dtype for a backend that takes one: the compute dtype the definition accumulates
        # in (casting float64 q, k down to float32 x would score and select in float32; half
        # inputs on CPU run in float32, kept rows exact, and the result is cast back)
        x, q, k = x.to(cd), q.to(cd), k.to(cd)
    # the eager path's Functions take the backend object, the registered ops its name
    eager = _plain_eager(x, q, k)
    backend = impl if eager else impl.name
    if kept is not None:
        replay = _ReplayFunction.apply if eager else _replay_op
        x_out, _, _ = replay(x, q, k, kept.to(torch.int32), scale, p, plan.fuse_token, backend)
        return x_out.to(x_dtype), kept.long()
    drop = _DropFunction.apply if eager else _drop_op
    x_out, kept, _, _ = drop(x, q, k, scale, p, plan.n_keep, plan.fuse_token, backend)
    return x_out.to(x_dtype), kept.long()
