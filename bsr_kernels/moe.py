"""Mixture-of-Experts MLPs for timm ViTs, one gate per task: ``to_moe`` and ``MultiTaskViT``.

This is the multitask MoE variant of BSR (see the design notes): in the chosen blocks (default:
the default BSR train blocks, 3, 7 and 11 of 12) the MLP becomes :class:`MoEMlp`, ``E`` experts
that each start as a copy of the pre-trained MLP, and one bias-free ``Linear(C, E)`` gate per
task on the LayerNorm output the experts see. Routing takes the softmax over the ``E`` experts,
then the top-k; the top-k probabilities weight the expert outputs and are not renormalised
(``renormalize=True`` renormalises them). There is no capacity limit: every token reaches its k
experts. Optional Gaussian noise on the gate logits (training only) and an optional
load-balancing loss ``aux_loss_weight * (cv²(importance) + cv²(load))``.

Expert compute is grouped: the ``T·k`` (token, expert) pairs are sorted by expert and the token
rows gathered once. When the expert loads are balanced (padding every expert to the largest
adds at most 10 % rows) the experts run as one batched matmul over a padded (E, max_n, .) layout
(:class:`_PaddedExperts`); otherwise each expert runs its matmuls on its contiguous slice
(:class:`_RoutedExperts`). Both are custom autograd functions that save the fc1 pre-activations,
activations and expert outputs, never per-expert copies of the input tokens; the combine is one
batched matmul per token over its k expert outputs. On CPU the padded batched matmul measured
about 7 % faster than the per-expert loop at ViT-B width; ``torch._grouped_mm`` measured no
faster than the loop.

State dict: a MoE block's ``mlp.fc1.*``/``mlp.fc2.*`` keys become ::

    blocks.{i}.mlp.fc1_weight   (E, hidden, C)      blocks.{i}.mlp.fc1_bias   (E, hidden)
    blocks.{i}.mlp.fc2_weight   (E, C, hidden)      blocks.{i}.mlp.fc2_bias   (E, C)
    blocks.{i}.mlp.gates.{t}.weight   (E, C), one per task

and :class:`MultiTaskViT` adds ``heads.{t}.weight/bias`` (its ViT is ``vit.*``, with an empty
``head``). Everything else keeps its timm key; the model stays a timm ``VisionTransformer``.

The active task is module state (:meth:`MultiTaskViT.forward` sets it on every MoE MLP). In
``reprogram``'s lean mode, backward replays the block with the task its forward recorded, so one
backward of a loss summed over tasks is exact too.
"""
from __future__ import annotations

import contextlib
import copy
import json
import numbers
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .ops.common import autocast_dtype, autocast_off, under_functorch, values_readable
from .reprogram import _out_of_place

__all__ = ["MoEMlp", "to_moe", "MultiTaskViT", "moe_forward", "moe_reference", "route",
           "moe_blocks"]


# --- routing and grouped expert compute ----------------------------------------------------

def route(logits: torch.Tensor, top_k: int, renormalize: bool = False,
          idx: Optional[torch.Tensor] = None):
    """Softmax over experts, then top-k.

    Args:
        logits: (T, E) gate logits (floating point).
        top_k: experts per token, an int in 1..E.
        renormalize: divide the top-k probabilities by their sum.
        idx: (T, top_k) integer experts to route to instead of the top-k (a recorded routing,
            which a lean backward replays), on ``logits``' device; the weights are then these
            experts' probabilities. Their range (0..E-1) is checked on CPU only: on another
            device reading it would sync with the host, and an expert out of range there fails
            inside ``gather`` (a device-side assert on CUDA).

    Returns:
        (probs (T, E), weights (T, k), idx (T, k) int64); weights are differentiable.

    Raises:
        ValueError: naming the bad argument, before anything is computed.
    """
    _check_route(logits, top_k, renormalize, idx)
    return _route(logits, top_k, renormalize, idx)


def _check_route(logits, top_k, renormalize, idx) -> None:
    """The checks of :func:`route`'s arguments: shapes, and ``idx``'s range on CPU only."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 \
            or not logits.is_floating_point():
        raise ValueError(f"logits must be a (T, E) floating-point tensor, got {_desc(logits)}")
    # torch.jit.trace gives sizes as tensors: comparing them would record constants (and warn)
    sizes = not torch.jit.is_tracing()
    t, e = logits.shape
    _check_top_k(top_k, e if sizes else None, "the logits' E")
    _check_bool("renormalize", renormalize)
    if idx is None:
        return
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() \
            or idx.dtype == torch.bool:
        raise ValueError(f"idx must be an integer tensor, got {_desc(idx)}")
    if not sizes:
        return
    if tuple(idx.shape) != (t, top_k) or idx.device != logits.device:
        raise ValueError(f"idx must be (T, top_k) = ({t}, {top_k}) on the logits' device "
                         f"{logits.device}, got {_desc(idx)}")
    # a range check reads the values: on CPU only (no host sync), and not while recording
    if idx.numel() and values_readable(idx):
        lo, hi = torch.aminmax(idx)
        if lo < 0 or hi >= e:
            raise ValueError(f"idx must hold experts in 0..{e - 1}, got {int(lo)}..{int(hi)}")


def _desc(v) -> str:
    """A bad argument, for an error message: a tensor's shape and dtype, else its repr."""
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}"
    return f"{v!r:.60}"


def _route(logits, top_k, renormalize, idx):
    """:func:`route` on checked arguments."""
    probs = logits.softmax(dim=-1)
    if idx is None:
        weights, idx = probs.topk(int(top_k), dim=-1)
    else:
        idx = idx.long()
        weights = probs.gather(1, idx)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, idx


def _slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _act_backward(act: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """Gradient through the experts' activation at its input ``a``: GELU's own backward kernel,
    or autograd for any other activation."""
    approximate = _gelu_approximate(act)
    if approximate is not None:
        return torch.ops.aten.gelu_backward(dz, a, approximate=approximate)
    with torch.enable_grad():
        a_ = a.detach().requires_grad_()
        return torch.autograd.grad(_out_of_place(act, a_), a_, dz)[0]


def _gelu_approximate(act: nn.Module) -> Optional[str]:
    """The ``approximate`` of a GELU module (so backward calls ``gelu_backward``), else None."""
    if isinstance(act, nn.GELU):
        return act.approximate
    return None


class _RoutedExperts(torch.autograd.Function):
    """``out[t] = sum_j w[t, j] * expert_{idx[t, j]}(h[t])`` with the experts' stacked weights.

    Forward sorts the (token, expert) pairs by expert and runs each expert on its contiguous
    slice (one gather of the token rows, two matmuls per expert), then combines with one
    batched matmul per token over its k outputs. Saved for backward: ``h``, the sort order
    (int32), the weights, the fc1 pre-activations and activations, and the expert outputs
    (they give the gradient of the weights); never a per-expert copy of the input tokens.
    """

    @staticmethod
    def forward(ctx, h, w, idx, w1, b1, w2, b2, act):
        t, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
        xs = h.index_select(0, order // k)
        a = h.new_empty(t * k, w1.shape[1])
        for e, s0, s1 in _slices(counts):
            if b1 is None:
                torch.mm(xs[s0:s1], w1[e].t(), out=a[s0:s1])
            else:
                torch.addmm(b1[e], xs[s0:s1], w1[e].t(), out=a[s0:s1])
        del xs
        z = _out_of_place(act, a)   # a is saved for backward: an in-place act must not write it
        y = h.new_empty(t * k, w2.shape[1])
        for e, s0, s1 in _slices(counts):
            if b2 is None:
                torch.mm(z[s0:s1], w2[e].t(), out=y[s0:s1])
            else:
                torch.addmm(b2[e], z[s0:s1], w2[e].t(), out=y[s0:s1])
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(),
                                                                      device=order.device))
        yt = y.index_select(0, inv).view(t, k, y.shape[1])     # token-major expert outputs
        out = torch.bmm(w.unsqueeze(1), yt).squeeze(1)
        ctx.counts, ctx.k, ctx.act = counts, k, act
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(h, w, order.to(torch.int32), inv.to(torch.int32), a, z, yt,
                              w1, w2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, w, order, inv, a, z, yt, w1, w2 = ctx.saved_tensors
        order, inv = order.long(), inv.long()
        k, counts = ctx.k, ctx.counts
        t = h.shape[0]
        need_h, need_w, _, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        need_b1, need_b2 = need_b1 and ctx.has_b1, need_b2 and ctx.has_b2
        g = g.contiguous()
        grad_w = torch.bmm(yt, g.unsqueeze(2)).squeeze(2) if need_w else None
        # d y for each (token, expert) pair, in expert order
        dy = (w.unsqueeze(2) * g.unsqueeze(1)).view(t * k, g.shape[1]).index_select(0, order)
        empty = [e for e, n in enumerate(counts) if n == 0]

        def weight_grad(shape_like, needed):
            if not needed:
                return None
            out = torch.empty_like(shape_like)
            for e in empty:
                out[e].zero_()
            return out

        g_w1, g_w2 = weight_grad(w1, need_w1), weight_grad(w2, need_w2)
        g_b1 = weight_grad(w1[:, :, 0], need_b1)
        g_b2 = weight_grad(w2[:, :, 0], need_b2)
        dz = torch.empty_like(a)
        for e, s0, s1 in _slices(counts):
            torch.mm(dy[s0:s1], w2[e], out=dz[s0:s1])
            if need_w2:
                torch.mm(dy[s0:s1].t(), z[s0:s1], out=g_w2[e])
            if need_b2:
                torch.sum(dy[s0:s1], 0, out=g_b2[e])
        del dy
        da = _act_backward(ctx.act, a, dz)
        del dz
        grad_h = None
        xs = h.index_select(0, order // k) if need_w1 else None
        dxs = h.new_empty(t * k, h.shape[1]) if need_h else None
        for e, s0, s1 in _slices(counts):
            if need_w1:
                torch.mm(da[s0:s1].t(), xs[s0:s1], out=g_w1[e])
            if need_b1:
                torch.sum(da[s0:s1], 0, out=g_b1[e])
            if need_h:
                torch.mm(da[s0:s1], w1[e], out=dxs[s0:s1])
        if need_h:
            grad_h = dxs.index_select(0, inv).view(t, k, h.shape[1]).sum(1)
        return grad_h, grad_w, None, g_w1, g_b1, g_w2, g_b2, None


#: How the experts' matmuls are grouped: "auto" (a batched matmul over experts padded to the
#: largest expert's row count when that pads at most :data:`PAD_LIMIT` extra rows, else one
#: matmul per expert slice), "loop" or "bmm" (forced; for tests and benchmarks).
GROUPING = "auto"
PAD_LIMIT = 0.1


def _use_bmm(counts: list[int], rows: int) -> bool:
    if GROUPING != "auto":
        return GROUPING == "bmm"
    return len(counts) * max(counts) <= (1 + PAD_LIMIT) * rows


class _PaddedExperts(torch.autograd.Function):
    """:class:`_RoutedExperts` with the experts' rows padded to one (E, max_n, .) batch, so that
    each of the six matmuls of forward + backward is one ``bmm`` over experts (padding rows are
    zero in the gradients, so they add no gradient)."""

    @staticmethod
    def forward(ctx, h, w, idx, w1, b1, w2, b2, act, order, counts):
        t, k = idx.shape
        e, c, c_out = w1.shape[0], h.shape[1], w2.shape[1]
        m = max(counts)
        cnt = torch.tensor(counts, device=h.device)
        starts = torch.cumsum(cnt, 0) - cnt
        sorted_e = idx.reshape(-1).index_select(0, order)
        pad = sorted_e * m + torch.arange(t * k, device=h.device) - starts.index_select(0, sorted_e)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(),
                                                                      device=order.device))
        tm = pad.index_select(0, inv)            # padded row of each (token, slot) pair
        xs = h.new_zeros(e * m, c).index_copy_(0, pad, h.index_select(0, order // k))
        xs = xs.view(e, m, c)
        if b1 is None:
            a = torch.bmm(xs, w1.transpose(1, 2))
        else:
            a = torch.baddbmm(b1.unsqueeze(1), xs, w1.transpose(1, 2))
        del xs
        z = _out_of_place(act, a)   # a is saved for backward: an in-place act must not write it
        if b2 is None:
            y = torch.bmm(z, w2.transpose(1, 2))
        else:
            y = torch.baddbmm(b2.unsqueeze(1), z, w2.transpose(1, 2))
        yt = y.view(e * m, c_out).index_select(0, tm).view(t, k, c_out)
        out = torch.bmm(w.unsqueeze(1), yt).squeeze(1)
        ctx.k, ctx.act, ctx.m = k, act, m
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(h, w, order.to(torch.int32), pad.to(torch.int32),
                              tm.to(torch.int32), a, z, yt, w1, w2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, w, order, pad, tm, a, z, yt, w1, w2 = ctx.saved_tensors
        order, pad, tm = order.long(), pad.long(), tm.long()
        k, m = ctx.k, ctx.m
        t, e, c = h.shape[0], w1.shape[0], h.shape[1]
        need_h, need_w, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:7]
        need_b1, need_b2 = need_b1 and ctx.has_b1, need_b2 and ctx.has_b2
        g = g.contiguous()
        grad_w = torch.bmm(yt, g.unsqueeze(2)).squeeze(2) if need_w else None
        c_out = g.shape[1]   # the experts' output width (w2's), not necessarily c
        dy = h.new_zeros(e * m, c_out).index_copy_(
            0, tm, (w.unsqueeze(2) * g.unsqueeze(1)).view(t * k, c_out)).view(e, m, c_out)
        g_w2 = torch.bmm(dy.transpose(1, 2), z) if need_w2 else None
        g_b2 = dy.sum(1) if need_b2 else None
        dz = torch.bmm(dy, w2)
        del dy
        da = _act_backward(ctx.act, a, dz)
        del dz
        g_b1 = da.sum(1) if need_b1 else None
        g_w1 = grad_h = None
        if need_w1:
            xs = h.new_zeros(e * m, c).index_copy_(0, pad, h.index_select(0, order // k))
            g_w1 = torch.bmm(da.transpose(1, 2), xs.view(e, m, c))
            del xs
        if need_h:
            dxs = torch.bmm(da, w1).view(e * m, c)
            grad_h = dxs.index_select(0, tm).view(t, k, c).sum(1)
        return grad_h, grad_w, None, g_w1, g_b1, g_w2, g_b2, None, None, None


def _experts(h, w, idx, w1, b1, w2, b2, act):
    """The routed experts and the weighted combine: :class:`_PaddedExperts` when the expert
    loads are balanced enough (see :data:`GROUPING`), else :class:`_RoutedExperts`."""
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    if _use_bmm(counts, flat.numel()):
        order = torch.argsort(flat, stable=True)
        return _PaddedExperts.apply(h, w, idx, w1, b1, w2, b2, act, order, counts)
    return _RoutedExperts.apply(h, w, idx, w1, b1, w2, b2, act)


def _dense_gates(weights: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, E) gate weights: each token's ``weights`` at its routed experts ``idx``, 0 elsewhere."""
    return weights.new_zeros(weights.shape[0], num_experts).scatter(1, idx, weights)


def _dense_experts(h, w, idx, w1, b1, w2, b2, act):
    """The experts and the combine in ops a tracer or exporter can record (no data-dependent
    shapes): every expert runs on every token and its output is weighted by the token's gate
    weight for it, zero where it was not routed. The same function as :func:`_experts` (the
    routing is the same; only the summation order of the combine differs) at ``E`` times the
    MLP compute of the routed form."""
    gate = _dense_gates(w, idx, w1.shape[0])
    out = None
    for e in range(w1.shape[0]):
        y = F.linear(act(F.linear(h, w1[e], None if b1 is None else b1[e])), w2[e],
                     None if b2 is None else b2[e])
        y = gate[:, e:e + 1] * y
        out = y if out is None else out + y
    return out


def _tracing() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` (and so the dynamo ONNX exporter) is
    recording the call, or a torch.func transform (grad, vmap, jvp...) runs it: the routed
    experts' shapes depend on the routing, which the recorders cannot record, and their
    grouping reads the loads on the host and runs autograd.Functions, which functorch refuses
    (and vmap cannot batch)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or under_functorch()


def moe_forward(h: torch.Tensor, logits: torch.Tensor, w1, b1, w2, b2, top_k: int,
                renormalize: bool = False, act: Optional[nn.Module] = None,
                idx: Optional[torch.Tensor] = None):
    """The routed MoE: top-k routing of ``logits`` and the weighted combine of the experts.

    Args:
        h: (T, C) tokens (the LayerNorm output).
        logits: (T, E) gate logits.
        w1, b1, w2, b2: stacked expert weights (E, H, C), (E, H) or None, (E, C, H), (E, C) or
            None.
        top_k, renormalize, idx: see :func:`route` (``idx`` replays a recorded routing).
        act: the activation (default GELU).

    While ``torch.jit.trace`` or ``torch.export`` records the call, every expert runs on every
    token, weighted by its gate weight (zero where not routed): the same outputs (summed in
    another order) with no data-dependent shape, at ``E`` times the MLP compute. Under autocast
    the experts run in its dtype, as :class:`MoEMlp`'s do (float64 inputs stay float64); the
    router takes float16 and bfloat16 logits in float32 (``probs`` is float32 then).

    Returns:
        (out (T, C_out), probs (T, E), idx (T, k)); ``C_out`` is ``w2``'s output width.

    Raises:
        ValueError: naming the bad argument (shapes that do not match, a ``top_k`` that is not
            an int in 1..E, an ``idx`` as :func:`route` refuses it), before anything is
            computed.
    """
    _check_experts(h, logits, w1, b1, w2, b2)
    _check_route(logits, top_k, renormalize, idx)
    h, autocast_off = _autocast_input(h)
    with autocast_off:
        probs, weights, idx = _route(_router_logits(logits), top_k, renormalize, idx)
        return _combine(h, weights, idx, w1, b1, w2, b2, act), probs, idx


def _check_experts(h, logits, w1, b1, w2, b2) -> None:
    """The shape checks of :func:`moe_forward`'s tokens, logits and expert weights (none while
    ``torch.jit.trace`` records: its sizes are tensors, which they would record as constants)."""
    if torch.jit.is_tracing():
        return
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a (T, C) tensor, got {_desc(h)}")
    t, c = h.shape
    if not isinstance(w1, torch.Tensor) or w1.dim() != 3 or w1.shape[2] != c:
        raise ValueError(f"w1 must be an (E, H, C) tensor with C = {c} (h's width), got "
                         f"{_desc(w1)}")
    e, hd, _ = w1.shape
    if not isinstance(w2, torch.Tensor) or w2.dim() != 3 or w2.shape[0] != e \
            or w2.shape[2] != hd:
        raise ValueError(f"w2 must be an (E, C_out, H) tensor with (E, H) = ({e}, {hd}) (w1's), "
                         f"got {_desc(w2)}")
    for name, b, want in (("b1", b1, (e, hd)), ("b2", b2, (e, w2.shape[1]))):
        if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != want):
            raise ValueError(f"{name} must be None or a tensor of shape {want}, got {_desc(b)}")
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (t, e):
        raise ValueError(f"logits must be (T, E) = ({t}, {e}) (h's tokens, w1's experts), got "
                         f"{_desc(logits)}")


def _router_logits(logits: torch.Tensor) -> torch.Tensor:
    """The logits the router takes its softmax and top-k of: float32 at least (autocast's
    softmax policy on CUDA; CPU autocast leaves a bf16 softmax bf16), on every device. In bf16,
    0.24 % of random tokens chose another top-4 of 16 experts (C=768)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _autocast_input(h: torch.Tensor):
    """``(h, context)`` to run the experts in: under autocast, ``h`` cast to autocast's dtype
    and a context that turns autocast off, so that the experts' Functions run forward and
    backward in that one dtype (autocast would cast some of forward's ops and none of
    backward's); float64 stays float64, as autocast leaves it for ``nn.Linear``. Without
    autocast, ``h`` and a context that does nothing."""
    dtype = autocast_dtype(h.device.type)
    if dtype is None:
        return h, contextlib.nullcontext()
    if h.is_floating_point() and h.dtype != torch.float64:
        h = h.to(dtype)
    return h, autocast_off(h.device.type)


def _combine(h, weights, idx, w1, b1, w2, b2, act):
    """The experts of a routing and their weighted combine (:func:`moe_forward`), in ``h``'s
    dtype: the gate weights and expert parameters are cast to it."""
    act = act if act is not None else nn.GELU()
    # meta tensors (shape inference) have no loads to group by: the dense form, same shapes
    experts = _dense_experts if _tracing() or h.device.type == "meta" else _experts
    w1, b1, w2, b2, weights = (p if p is None or p.dtype == h.dtype else p.to(h.dtype)
                               for p in (w1, b1, w2, b2, weights))
    return experts(h, weights, idx, w1, b1, w2, b2, act)


def moe_reference(h: torch.Tensor, logits: torch.Tensor, w1, b1, w2, b2, top_k: int,
                  renormalize: bool = False, act: Optional[nn.Module] = None):
    """The dense definition, for tests: every expert on every token, masked to the top-k.

    The top-k set is chosen independently of :func:`route` (a stable descending sort).

    Returns:
        (out (T, C), mask (T, E) bool of the chosen experts).
    """
    act = act if act is not None else nn.GELU()
    probs = logits.softmax(dim=-1)
    chosen = torch.argsort(probs, dim=-1, descending=True, stable=True)[:, :top_k]
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, chosen, True)
    gate = probs * mask
    if renormalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    a = torch.einsum("tc,ehc->teh", h, w1)
    if b1 is not None:
        a = a + b1
    y = torch.einsum("teh,ech->tec", act(a), w2)
    if b2 is not None:
        y = y + b2
    return (gate[..., None] * y).sum(1), mask


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


# --- the module ----------------------------------------------------------------------------

class MoEMlp(nn.Module):
    """E experts (each the size of a timm ``Mlp``) behind one gate per task.

    Args:
        in_features: C.
        hidden_features: each expert's hidden width.
        num_experts: E.
        top_k: experts per token.
        num_tasks: gates (one per task).
        act_layer: activation module class (timm's default: GELU).
        bias: expert biases.
        noise_std: std of Gaussian noise added to the gate logits in training (0: none).
        renormalize: renormalise the top-k probabilities to sum to 1.
        aux_loss_weight: weight of ``cv²(importance) + cv²(load)``; after each training forward
            :attr:`aux_loss` holds the weighted loss (None when the weight is 0). ``load``
            counts routed tokens and carries no gradient; ``importance`` sums each expert's
            gate weights (zero for a token not routed to it; Shazeer et al., 2017). Under a
            torch.func transform, read it inside the transformed function (outside, a vmap's
            is a batched tensor that no longer reads).

    Attributes:
        task: the active task (its gate routes); set by :class:`MultiTaskViT`.
        track_usage: when True, every forward adds the routed (token, expert) counts of the
            active task to :attr:`usage` ((num_tasks, E) float64); forwards under a torch.func
            transform are not counted (an in-place update there is refused).
    """

    bsr_moe = True       # reprogram's marker: BSRBlock.body calls this module whole
    fc1 = fc2 = None     # no single fc1/fc2: the lean C++ frozen-block backward does not apply

    def __init__(self, in_features: int, hidden_features: int, num_experts: int = 16,
                 top_k: int = 4, num_tasks: int = 1, act_layer=nn.GELU, bias: bool = True,
                 noise_std: float = 0.0, renormalize: bool = False,
                 aux_loss_weight: float = 0.0):
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("hidden_features", hidden_features)
        _check_moe_args(num_experts, top_k, num_tasks, noise_std, renormalize, aux_loss_weight)
        e, c, hd = int(num_experts), int(in_features), int(hidden_features)
        # plain ints (numpy's pass the check): the routing settings are saved as JSON
        self.num_experts, self.top_k, self.num_tasks = e, int(top_k), int(num_tasks)
        self.noise_std, self.renormalize = float(noise_std), renormalize
        self.aux_loss_weight = float(aux_loss_weight)
        self.fc1_weight = nn.Parameter(torch.empty(e, hd, c))
        self.fc1_bias = nn.Parameter(torch.zeros(e, hd)) if bias else None
        self.fc2_weight = nn.Parameter(torch.empty(e, c, hd))
        self.fc2_bias = nn.Parameter(torch.zeros(e, c)) if bias else None
        for i in range(e):
            nn.init.kaiming_uniform_(self.fc1_weight[i].data, a=5 ** 0.5)
            nn.init.kaiming_uniform_(self.fc2_weight[i].data, a=5 ** 0.5)
        self.act = act_layer()
        self.gates = nn.ModuleList(nn.Linear(c, e, bias=False) for _ in range(num_tasks))
        self.task = 0
        self.aux_loss: Optional[torch.Tensor] = None
        self.track_usage = False
        self.usage = torch.zeros(num_tasks, e, dtype=torch.float64)
        self._record: Optional[list] = None          # see recorded_routing
        self._replay: Optional[torch.Tensor] = None
        # the routing settings, which no parameter holds, travel in the state_dict's metadata
        self.register_state_dict_post_hook(_routing_to_metadata)
        self.register_load_state_dict_pre_hook(_routing_from_metadata)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, num_experts: int, top_k: int, num_tasks: int = 1,
                 noise_std: float = 0.0, renormalize: bool = False,
                 aux_loss_weight: float = 0.0) -> "MoEMlp":
        """A MoE whose experts are all copies of the timm ``Mlp`` ``mlp``."""
        fc1, fc2 = mlp.fc1, mlp.fc2
        moe = cls(fc1.in_features, fc1.out_features, num_experts, top_k, num_tasks,
                  act_layer=type(mlp.act), bias=True, noise_std=noise_std,
                  renormalize=renormalize, aux_loss_weight=aux_loss_weight)
        moe.act = copy.deepcopy(mlp.act)   # same settings (e.g. GELU approximate)
        moe.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        with torch.no_grad():
            moe.fc1_weight.copy_(fc1.weight.expand_as(moe.fc1_weight))
            moe.fc2_weight.copy_(fc2.weight.expand_as(moe.fc2_weight))
            for name, layer in (("fc1_bias", fc1), ("fc2_bias", fc2)):  # each as its layer has
                if layer.bias is None:                                  # it (timm's Mlp takes
                    setattr(moe, name, None)                            # bias=(fc1, fc2))
                else:
                    getattr(moe, name).copy_(layer.bias.expand_as(getattr(moe, name)))
        return moe

    def plain_autograd(self, memory_mode: str) -> bool:
        """Whether a reprogrammed block holding this MoE should run under plain autograd rather
        than the replaying lean function: "fast" mode (so no expert matmul is recomputed), and
        in training gate noise (a replay would draw other noise) or an aux loss (it needs the
        gate's graph)."""
        return memory_mode == "fast" or (self.training and (self.noise_std > 0
                                                            or self.aux_loss_weight > 0))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(T, E) gate logits of the active task, noisy in training when ``noise_std`` > 0."""
        if not 0 <= self.task < self.num_tasks:
            raise ValueError(f"task {self.task} is out of range for {self.num_tasks} gates")
        weight = self.gates[self.task].weight
        logits = F.linear(h, weight if weight.dtype == h.dtype else weight.to(h.dtype))
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        return logits

    @contextlib.contextmanager
    def recorded_routing(self, record: Optional[list] = None,
                         replay: Optional[torch.Tensor] = None):
        """Within the block, each forward appends its routing (the (T, k) int32 experts of its
        tokens) to ``record``; or, with ``replay``, routes with those experts rather than its
        gate's top-k and leaves :attr:`usage` and :attr:`aux_loss` as they are. ``reprogram``'s
        lean backward replays a MoE block this way, so that it differentiates the experts the
        forward used even where a recompute would round the gate differently (compressed
        activations), and counts its tokens once."""
        held = self._record, self._replay
        self._record, self._replay = record, replay
        try:
            yield
        finally:
            self._record, self._replay = held

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h, autocast_off = _autocast_input(x.reshape(-1, shape[-1]))
        with autocast_off:
            return self._run(h).reshape(*shape[:-1], self.fc2_weight.shape[1])

    def _run(self, h: torch.Tensor) -> torch.Tensor:
        _, weights, idx = route(_router_logits(self.logits(h)), self.top_k, self.renormalize,
                                self._replay)
        out = _combine(h, weights, idx, self.fc1_weight, self.fc1_bias, self.fc2_weight,
                       self.fc2_bias, self.act)
        if self._record is not None:
            self._record.append(idx.to(torch.int32))
        if self._replay is not None:   # the forward replayed counted and set the aux loss
            return out
        counts = None
        if self.track_usage or (self.training and self.aux_loss_weight > 0):
            counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        if self.track_usage and not under_functorch():   # a transform's call is no batch
            self.usage[self.task] += counts.to(self.usage.device, self.usage.dtype)
        if self.training and self.aux_loss_weight > 0:
            # importance: each expert's summed gate weights (zero where a token is not routed
            # to it), as Shazeer et al. (2017) define it; load: its routed tokens
            importance = _dense_gates(weights, idx, self.num_experts).sum(0)
            self.aux_loss = self.aux_loss_weight * (_cv_squared(importance)
                                                    + _cv_squared(counts))
        else:
            self.aux_loss = None
        return out

    def extra_repr(self) -> str:
        return (f"in={self.fc1_weight.shape[2]}, hidden={self.fc1_weight.shape[1]}, "
                f"experts={self.num_experts}, top_k={self.top_k}, tasks={self.num_tasks}, "
                f"noise_std={self.noise_std}, renormalize={self.renormalize}, "
                f"aux_loss_weight={self.aux_loss_weight}")


# --- model surgery -------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_positive_int(name: str, v) -> None:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")


def _check_top_k(top_k, num_experts: Optional[int], experts: str = "num_experts") -> None:
    """``top_k`` an int in 1..``num_experts`` (``experts`` names that count in the message; no
    upper bound when it is None)."""
    _check_positive_int("top_k", top_k)
    if num_experts is not None and top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must not exceed {experts} ({num_experts})")


def _check_moe_args(num_experts, top_k, num_tasks, noise_std, renormalize, aux_loss_weight):
    _check_positive_int("num_experts", num_experts)
    _check_top_k(top_k, num_experts)
    _check_positive_int("num_tasks", num_tasks)
    for name, v in (("noise_std", noise_std), ("aux_loss_weight", aux_loss_weight)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0 \
                or v == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    _check_bool("renormalize", renormalize)


def moe_blocks(model: nn.Module) -> list[tuple[int, MoEMlp]]:
    """``[(block index, MoEMlp)]`` of a ViT or :class:`MultiTaskViT`."""
    vit = model.vit if isinstance(model, MultiTaskViT) else model
    return [(i, b.mlp) for i, b in enumerate(getattr(vit, "blocks", []))
            if isinstance(getattr(b, "mlp", None), MoEMlp)]


#: MoEMlp settings that are no parameter (so no state_dict entry): what a delta records of each
#: MoE block besides its tensors. top_k and renormalize change the logits; noise_std and
#: aux_loss_weight only training.
ROUTING_SETTINGS = ("top_k", "renormalize", "noise_std", "aux_loss_weight")
#: Of those, the ones that change the logits.
ROUTING_FORWARD = ("top_k", "renormalize")


#: The state_dict metadata key of a MoEMlp's routing settings (:data:`ROUTING_SETTINGS`).
ROUTING_KEY = "bsr_moe_routing"


def _routing_to_metadata(module, state_dict, prefix, local_metadata):
    # a JSON string, as the BSR config's (bsr_kernels.saving): plain for torch.load weights_only
    local_metadata[ROUTING_KEY] = json.dumps({k: getattr(module, k) for k in ROUTING_SETTINGS},
                                             sort_keys=True)


def _routing_from_metadata(module, state_dict, prefix, local_metadata, strict, missing,
                           unexpected, errors):
    """Warns when the weights were saved from a MoE that routes otherwise (another top_k or
    renormalize: other logits); the settings stay the module's own."""
    from .saving import BSRConfigWarning
    try:
        saved = json.loads(local_metadata.get(ROUTING_KEY, "null"))
    except (TypeError, ValueError):   # not ours to refuse: only a warning compares here
        saved = None
    if not isinstance(saved, dict):   # saved before the settings were recorded, or malformed
        return
    differ = [f"{k} {was!r} there, {now!r} here"
              for k, was, now in routing_differences(saved, module)]
    if differ:
        warnings.warn(f"{prefix[:-1] or 'the MoE MLP'}: these weights were saved from a MoE "
                      f"that routes otherwise ({', '.join(differ)}); its logits will differ",
                      BSRConfigWarning, stacklevel=3)


def routing_differences(saved: dict, module: MoEMlp) -> list[tuple[str, object, object]]:
    """``(setting, saved value, module's value)`` of the :data:`ROUTING_FORWARD` settings in
    which ``module`` routes otherwise than the ``saved`` ones (other logits)."""
    return [(k, saved.get(k), getattr(module, k)) for k in ROUTING_FORWARD
            if saved.get(k) != getattr(module, k)]


def routing_problems(model: nn.Module, saved: dict, where: str) -> list[str]:
    """How ``model``'s MoE routing differs, in settings that change the logits, from the
    ``saved`` ``{module name: settings}`` of a checkpoint (``where``: "the delta",
    "the checkpoint"), module by module."""
    modules = dict(model.named_modules())
    problems = [f"{name}: {where} has a MoE block there, the model none"
                for name in saved if not isinstance(modules.get(name), MoEMlp)]
    problems += [f"{name}: {k} {was!r} in {where}, {now!r} in the model"
                 for name in saved if isinstance(modules.get(name), MoEMlp)
                 for k, was, now in routing_differences(saved[name], modules[name])]
    return problems


def saved_routing(state_dict: dict) -> dict:
    """``{module name: settings}`` that a state_dict's metadata records for its MoE blocks
    (``model.state_dict()``, a ``torch.load``-ed one, or ``bsr_kernels.load_checkpoint``'s read
    of a ``.safetensors`` file); malformed entries are left out."""
    routing = {}
    for name, local in (getattr(state_dict, "_metadata", None) or {}).items():
        try:
            settings = json.loads(local.get(ROUTING_KEY, "null"))
        except (AttributeError, TypeError, ValueError):
            continue
        if isinstance(settings, dict):
            routing[name] = settings
    return routing


def with_routing(state_dict: dict, routing: dict) -> dict:
    """``state_dict`` carrying ``routing`` (:func:`routing_settings`) in its metadata, as
    ``model.state_dict()`` does (for a state_dict read from a file that keeps no metadata of its
    own, such as safetensors)."""
    import collections
    out = collections.OrderedDict(state_dict)
    out._metadata = collections.OrderedDict(
        (name, {ROUTING_KEY: json.dumps(settings, sort_keys=True)})
        for name, settings in routing.items())
    return out


def routing_settings(model: nn.Module) -> dict:
    """``{module name: {setting: value}}`` of every :class:`MoEMlp` in ``model``
    (:data:`ROUTING_SETTINGS`), by its name in ``model.named_modules()``."""
    return {name: {k: getattr(m, k) for k in ROUTING_SETTINGS}
            for name, m in model.named_modules() if isinstance(m, MoEMlp)}


def to_moe(model: nn.Module, blocks: Optional[Sequence[int]] = None, num_experts: int = 16,
           top_k: int = 4, num_tasks: int = 1, noise_std: float = 0.0,
           renormalize: bool = False, aux_loss_weight: float = 0.0) -> nn.Module:
    """Turns the MLPs of some blocks of a timm ViT into :class:`MoEMlp`, in place.

    Every expert starts as a copy of the block's pre-trained MLP, so before any training (with
    ``renormalize=False``) a MoE MLP's output is the dense MLP's output times the summed top-k
    gate probabilities. Gates are randomly initialised (``nn.Linear``'s default).

    Args:
        model: a timm ``VisionTransformer`` (not reprogrammed yet), or a :class:`MultiTaskViT`
            (then ``num_tasks`` must equal its number of heads).
        blocks: indices of the blocks to convert; default the default BSR train blocks
            (``round(d/3*k) - 1``: 3, 7, 11 of 12).
        num_experts, top_k, num_tasks, noise_std, renormalize, aux_loss_weight: see
            :class:`MoEMlp`.

    Returns:
        The same model object.

    Raises:
        ValueError: naming the bad argument, or why the model is not supported; the model is
            then unchanged.
    """
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    from .config import check_blocks, default_train_blocks
    from .reprogram import is_reprogrammed

    _check_moe_args(num_experts, top_k, num_tasks, noise_std, renormalize, aux_loss_weight)
    vit = model
    if isinstance(model, MultiTaskViT):
        vit = model.vit
        if num_tasks != len(model.heads):
            raise ValueError(f"num_tasks ({num_tasks}) does not match the MultiTaskViT's "
                             f"{len(model.heads)} heads")
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"model must be a timm VisionTransformer (a ViT), got "
                         f"{type(model).__name__}")
    if is_reprogrammed(vit):
        raise ValueError("model is already reprogrammed: call to_moe before "
                         "bsr_kernels.reprogram (or bsr_kernels.restore it first)")
    depth = len(vit.blocks)
    blocks = check_blocks("blocks", default_train_blocks(depth) if blocks is None else blocks,
                           depth)
    for i in blocks:
        mlp = getattr(vit.blocks[i], "mlp", None)
        if isinstance(mlp, MoEMlp):
            raise ValueError(f"blocks: block {i} is already a MoE")
        if type(mlp) is not Mlp or type(mlp.fc1) is not nn.Linear \
                or type(mlp.fc2) is not nn.Linear:
            raise ValueError(f"blocks: block {i} MLP is a {type(mlp).__name__}, to_moe needs "
                             "timm's Mlp")
        if not isinstance(mlp.norm, nn.Identity):
            raise ValueError(f"blocks: block {i} MLP has a hidden norm, not supported by to_moe")
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in (mlp.drop1, mlp.drop2)):
            raise ValueError(f"blocks: block {i} MLP has dropout; create the model with "
                             "drop rates 0")
    new = {i: MoEMlp.from_mlp(vit.blocks[i].mlp, num_experts, top_k, num_tasks, noise_std,
                              renormalize, aux_loss_weight) for i in blocks}
    for i, moe in new.items():
        moe.train(vit.blocks[i].mlp.training)
        vit.blocks[i].mlp = moe
    return model


# --- the multitask wrapper -----------------------------------------------------------------

class MultiTaskViT(nn.Module):
    """Several classification tasks on one timm ViT backbone: one linear head per task on the
    pooled (final-norm CLS) features, and the task's gate in every MoE MLP.

    Args:
        model: a timm ``VisionTransformer`` (plain or with MoE MLPs). Its own classifier is
            removed (``reset_classifier(0)``).
        num_classes: classes of each task, e.g. ``[5, 2, 2]``.

    ``forward(images, task)`` returns that task's logits; ``task`` None uses :attr:`task` (the
    last one set). ``.heads[task]`` is the task's head. ``bsr_kernels.reprogram`` accepts this
    wrapper (it reprograms :attr:`vit`; the heads stay trainable).
    """

    def __init__(self, model: nn.Module, num_classes: Sequence[int]):
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"model must be a timm VisionTransformer (a ViT), got "
                             f"{type(model).__name__}")
        if isinstance(num_classes, (str, bytes)) or not isinstance(num_classes, Sequence) \
                or not num_classes or not all(_is_int(n) and n > 0 for n in num_classes):
            raise ValueError(f"num_classes must be a non-empty list of positive ints, got "
                             f"{num_classes!r}")
        for i, moe in moe_blocks(model):
            if moe.num_tasks != len(num_classes):
                raise ValueError(f"num_classes has {len(num_classes)} tasks but block {i}'s MoE "
                                 f"has {moe.num_tasks} gates (num_tasks)")
        model.reset_classifier(0)
        self.vit = model
        dev, dt = model.cls_token.device, model.cls_token.dtype
        self.heads = nn.ModuleList(nn.Linear(model.num_features, n, device=dev, dtype=dt)
                                   for n in num_classes)
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.task = 0

    @property
    def bsr_backbone(self) -> nn.Module:
        """The ViT that ``bsr_kernels.reprogram``/``restore`` act on."""
        return self.vit

    @property
    def bsr_config(self):
        """The backbone's :class:`~bsr_kernels.config.BSRConfig` (AttributeError when it is not
        reprogrammed), so that ``save_delta``/``load_delta``/``kept_patches`` treat the wrapper
        as its ViT."""
        return self.vit.bsr_config

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks (so ``bsr_kernels.profile`` reports tokens per block)."""
        return self.vit.blocks

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def check_task(self, task) -> int:
        """``task`` as an int; ValueError naming it when it is not a task id."""
        if not _is_int(task) or not 0 <= task < len(self.heads):
            raise ValueError(f"task must be an int in 0..{len(self.heads) - 1}, got {task!r}")
        return int(task)

    def set_task(self, task: int) -> None:
        """Makes ``task`` the active one (its gate routes in every MoE MLP)."""
        task = self.check_task(task)
        self.task = task
        for _, moe in moe_blocks(self.vit):
            moe.task = task

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the MoE load-balancing losses of the last training forward (None if none)."""
        losses = [m.aux_loss for _, m in moe_blocks(self.vit) if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def forward(self, images: torch.Tensor, task: Optional[int] = None) -> torch.Tensor:
        task = self.task if task is None else self.check_task(task)
        self.set_task(task)
        return self.heads[task](self.vit(images))
