"""The memory-lean backward of BSR blocks.

A block that lies after the first trained block runs through :class:`_LeanBlock`. Its forward runs
the block body without autograd and saves the block input, the int32 kept indices of a drop, and:

* ``memory_mode="lean"``: nothing more for frozen blocks; the qkv and fc1 outputs (the GELU
  input) for trained blocks;
* ``memory_mode="fast"``: the qkv, proj and fc1 outputs of every block, so that no matmul is
  recomputed (only LayerNorm, GELU and attention itself, which is cheap at ViT sequence lengths).

Backward replays the same body (:meth:`BSRBlock.body`) with autograd on, where

* saved projections ("qkv", "fc1") are *replayed*: their saved output is returned and their
  backward computes input and weight gradients, without recomputing the matmul;
* LayerNorm, GELU, attention (SDPA) and the cheap ``proj`` projection are recomputed;
* "fc2" is never recomputed unless a trained LayerScale needs its output: its backward only needs
  its weight and its recomputed input, so a zero placeholder (no FLOPs) stands for its output.

Frozen blocks get no weight gradients; no attention probabilities are ever stored. Gradients equal
those of plain autograd through the same body (tested in tests/test_reprogram.py).

Opt-in compression (``reprogram(..., activation_dtype=torch.bfloat16)``) stores the saved tensors in
that dtype; backward casts them back and replays the recorded token selection, so gradients are
approximate (their effect on accuracy is reported by the benchmarks and the application).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import LayerScale

__all__ = ["lean_block"]


class _GradOnlyLinear(torch.autograd.Function):
    """A linear layer whose output is given (replayed) or not needed (a zero placeholder).

    Backward computes the input, weight and bias gradients that are asked for.
    """

    @staticmethod
    def forward(ctx, inp, weight, bias, holder):
        ctx.save_for_backward(inp, weight)
        ctx.has_bias = bias is not None
        out = holder.out
        if out is None:  # nothing downstream reads the value: no compute, no memory
            shape = (*inp.shape[:-1], weight.shape[0])
            return inp.new_zeros(()).expand(shape)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        inp, weight = ctx.saved_tensors
        g_inp = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_inp = grad @ weight.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            g_w = grad.reshape(-1, grad.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1]).to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return g_inp, g_w, g_b, None


class _Holder:
    """Carries a saved tensor into a Function without autograd tracking it."""

    __slots__ = ("out",)

    def __init__(self, out):
        self.out = out


def _saved_names(block) -> tuple[str, ...]:
    """Projections whose outputs are saved (and replayed in backward) instead of recomputed."""
    if block.bsr_mode == "fast":
        return ("qkv", "proj", "fc1")
    return ("qkv", "fc1") if block.bsr_trained else ()


def _fc2_output_needed(block) -> bool:
    ls2 = block.ls2
    return isinstance(ls2, LayerScale) and ls2.gamma.requires_grad


class _LeanBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, x, *params):
        names = _saved_names(block)
        saved: dict[str, torch.Tensor] = {}
        kept: list[torch.Tensor] = []

        def record_linear(name, module, inp):
            out = module(inp)
            if name in names:
                saved[name] = out
            return out

        def record_drop(x_, q, k):
            x_, idx = block.drop(x_, q, k)
            if idx is not None:
                kept.append(idx.to(torch.int32))
            return x_, idx

        out = block.body(x, linear=record_linear, drop=record_drop)
        ctx.block, ctx.names, ctx.dtype = block, names, x.dtype
        store = block.bsr_activation_dtype or x.dtype
        ctx.save_for_backward(x.to(store), *(saved[n].to(store) for n in names), *kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        block = ctx.block
        x, *rest = (t.to(ctx.dtype) if t.is_floating_point() else t for t in ctx.saved_tensors)
        saved = dict(zip(ctx.names, rest[:len(ctx.names)]))
        compressed = block.bsr_activation_dtype not in (None, ctx.dtype)
        kept = rest[len(ctx.names):]
        fc2_needed = _fc2_output_needed(block)
        params = [p for p in block.parameters() if p.requires_grad]

        def replay_linear(name, module, inp):
            if name in saved:
                return _GradOnlyLinear.apply(inp, module.weight, module.bias, _Holder(saved[name]))
            if name == "fc2" and not fc2_needed:
                return _GradOnlyLinear.apply(inp, module.weight, module.bias, _Holder(None))
            return module(inp)

        def replay_drop(x_, q, k):
            if compressed:  # approximate recompute: replay the recorded selection
                return block.drop(x_, q, k, kept=kept[0] if kept else None)
            x_, idx = block.drop(x_, q, k)
            if idx is not None and not torch.equal(idx.to(torch.int32), kept[0]):
                raise RuntimeError("BSR lean backward: the recomputed token selection differs "
                                   "from the forward's (non-deterministic attention kernel?)")
            return x_, idx

        with torch.enable_grad():
            x_ = x.detach().requires_grad_(ctx.needs_input_grad[1])
            out = block.body(x_, linear=replay_linear, drop=replay_drop)
            inputs = ([x_] if ctx.needs_input_grad[1] else []) + params
            grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        grad_x = grads.pop(0) if ctx.needs_input_grad[1] else None
        return (None, grad_x, *grads)


def lean_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs a reprogrammed block through the memory-lean autograd function."""
    params = [p for p in block.parameters() if p.requires_grad]
    if not x.requires_grad and not params:
        return block.body(x)
    return _LeanBlock.apply(block, x, *params)
