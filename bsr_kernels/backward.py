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

Frozen blocks of the standard timm form (LayerNorm, GELU MLP, optional qk_norm/LayerScale) on CPU
run their backward in C++ instead: ``torch.ops.bsr_kernels.frozen_block_backward``
(``csrc/lean_block.cpp``) recomputes from the saved input only what the input gradient needs and
applies the chain rule by hand, with the token-drop backward through the registered ops. Other
blocks, CUDA tensors and autocast use the replay; :data:`FROZEN_BACKWARD` = ``"replay"`` forces it.

Backward always replays the token selection recorded in forward (the int32 kept indices), never a
recomputed one: no host sync, and compiled or compressed recomputes cannot pick other tokens.

Opt-in compression (``reprogram(..., activation_dtype=torch.bfloat16)``) stores the saved tensors in
that dtype; backward casts them back, so gradients are approximate (their effect on accuracy is reported by the benchmarks and the application).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import GELU, GELUTanh, LayerNorm, LayerScale

from .ops.cpp import extension_error

__all__ = ["lean_block", "FROZEN_BACKWARD"]

#: "auto": frozen blocks that fit use the C++ backward (see the module doc); "replay": never.
FROZEN_BACKWARD = "auto"

_LAYER_NORMS = (nn.LayerNorm, LayerNorm)
_GELU_APPROXIMATE = {GELU: "none", GELUTanh: "tanh"}


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
    if block.bsr_config.memory_mode == "fast":
        return ("qkv", "proj", "fc1")
    return ("qkv", "fc1") if block.bsr_trained else ()


def _fc2_output_needed(block) -> bool:
    ls2 = block.ls2
    return isinstance(ls2, LayerScale) and ls2.gamma.requires_grad


def _gelu_approximate(act: nn.Module) -> Optional[str]:
    if type(act) is nn.GELU:
        return act.approximate
    return _GELU_APPROXIMATE.get(type(act))


def _layer_norm_eps(norm: nn.Module, absent_ok: bool = False) -> Optional[float]:
    """eps of a plain LayerNorm over the last dim; -1 for Identity when ``absent_ok``; else None."""
    if absent_ok and type(norm) is nn.Identity:
        return -1.0
    if type(norm) in _LAYER_NORMS and len(norm.normalized_shape) == 1:
        return float(norm.eps)
    return None


def _frozen_cpp_config(block) -> Optional[tuple[list[float], str]]:
    """(eps list, GELU approximation) when the C++ frozen backward computes this block's
    gradient exactly; None when the block must replay its body instead."""
    attn, mlp = block.attn, block.mlp
    eps = [_layer_norm_eps(block.norm1), _layer_norm_eps(attn.q_norm, True),
           _layer_norm_eps(attn.k_norm, True), _layer_norm_eps(block.norm2)]
    approximate = _gelu_approximate(mlp.act)
    simple = (all(e is not None for e in eps) and approximate is not None
              and type(attn.norm) is nn.Identity and getattr(attn, "gate", None) is None
              and all(type(m) in (nn.Identity, LayerScale) for m in (block.ls1, block.ls2))
              and all(type(m) is nn.Linear for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)))
    return (eps, approximate) if simple else None


def _frozen_cpp_plan(block, x: torch.Tensor, params, autocast: bool):
    """The C++ frozen backward's config (see :func:`_frozen_cpp_config`) when it applies to
    this block and input, else None."""
    # Under torch.compile the replay is traced instead: the C++ op runs its own local autograd
    # graph, which fake tensors cannot run through.
    if torch.compiler.is_compiling():
        return None
    if not (FROZEN_BACKWARD == "auto" and not params and block.bsr_config.memory_mode == "lean"
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not autocast and extension_error() is None):
        return None
    return _frozen_cpp_config(block)


def _frozen_backward_cpp(block, config, x, kept, grad_out):
    attn, mlp = block.attn, block.mlp
    eps, approximate = config

    def gamma(ls):
        return ls.gamma if isinstance(ls, LayerScale) else None

    def affine(norm):
        return [getattr(norm, "weight", None), getattr(norm, "bias", None)]

    weights = [*affine(block.norm1), attn.qkv.weight, attn.qkv.bias, *affine(attn.q_norm),
               *affine(attn.k_norm), attn.proj.weight, attn.proj.bias, gamma(block.ls1),
               *affine(block.norm2), mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
               gamma(block.ls2)]
    weights = [None if w is None else w.detach() for w in weights]
    return torch.ops.bsr_kernels.frozen_block_backward(
        grad_out.contiguous(), x, kept[0] if kept else None, weights, attn.num_heads, eps,
        float(attn.scale), block.bsr_config.num_prefix_tokens, block.bsr_config.fuse_token,
        approximate)


def _stochastic(block) -> bool:
    """Whether the block draws random numbers in this forward: dropout or drop-path with a
    non-zero rate, in training mode (e.g. turned on after ``reprogram``)."""
    if not block.training:
        return False
    attn, mlp = block.attn, block.mlp
    rates = [getattr(attn, "attn_drop", None), getattr(attn, "proj_drop", None),
             getattr(mlp, "drop1", None), getattr(mlp, "drop2", None)]
    paths = [getattr(block, "drop_path1", None), getattr(block, "drop_path2", None)]
    return (any(getattr(m, "p", 0) > 0 for m in rates)
            or any(getattr(m, "drop_prob", 0) > 0 for m in paths))


def _rng_states(device: torch.device):
    """The generator states that dropout on ``device`` draws from (CPU, plus the device's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _LeanBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, x, *params):
        names = _saved_names(block)
        # Dropout turned on after reprogram: backward must draw the same masks, so it replays
        # the body from the forward's generator states (as torch.utils.checkpoint does).
        ctx.rng = _rng_states(x.device) if _stochastic(block) else None
        saved: dict[str, torch.Tensor] = {}
        kept: list[torch.Tensor] = []

        def record_linear(name, module, inp):
            out = module(inp)
            if name in names:
                saved[name] = out
            return out

        out = block.body(x, linear=record_linear,
                         record=lambda idx, _: kept.append(idx.to(torch.int32)))
        names = tuple(n for n in names if n in saved)   # a MoE MLP (moe.py) runs no fc1
        # a MoE MLP routes with the active task's gate: backward replays with the forward's task
        ctx.task = getattr(block.mlp, "task", None) if getattr(block.mlp, "bsr_moe", False) \
            else None
        ctx.block, ctx.names = block, names
        # Backward replays the body under the forward's autocast state (autocast is thread-local
        # and the autograd engine does not carry it over).
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type),
                        torch.get_autocast_dtype(ctx.device_type))
        ctx.cpp = (None if ctx.rng is not None
                   else _frozen_cpp_plan(block, x, params, ctx.autocast[0]))
        # Each saved tensor keeps its own dtype (under autocast the projections are bf16/fp16)
        # unless compression asks for another; backward casts back to the recorded dtypes.
        tensors = [x, *(saved[n] for n in names)]
        ctx.dtypes = [t.dtype for t in tensors]
        store = block.bsr_config.activation_dtype
        ctx.save_for_backward(*(t.to(store) if store else t for t in tensors), *kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        block = ctx.block
        n_float = len(ctx.dtypes)
        x, *projections = (t.to(d) for t, d in zip(ctx.saved_tensors, ctx.dtypes))
        saved = dict(zip(ctx.names, projections))
        kept = ctx.saved_tensors[n_float:]
        if ctx.cpp is not None:
            return None, _frozen_backward_cpp(block, ctx.cpp, x, kept, grad_out)
        fc2_needed = _fc2_output_needed(block)
        params = [p for p in block.parameters() if p.requires_grad]

        def replay_linear(name, module, inp):
            if name in saved:
                return _GradOnlyLinear.apply(inp, module.weight, module.bias, _Holder(saved[name]))
            if name == "fc2" and not fc2_needed:
                return _GradOnlyLinear.apply(inp, module.weight, module.bias, _Holder(None))
            return module(inp)

        def replay():
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype,
                                                     enabled=enabled):
                x_ = x.detach().requires_grad_(ctx.needs_input_grad[1])
                # the recorded selection is replayed, never recomputed: no host sync, and the
                # same tokens even where a recompute would round differently (compressed,
                # compiled)
                out = block.body(x_, linear=replay_linear, kept=kept[0] if kept else None)
                inputs = ([x_] if ctx.needs_input_grad[1] else []) + params
                return list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))

        if ctx.task is not None:
            task, block.mlp.task = block.mlp.task, ctx.task
            try:
                return _LeanBlock._grads(ctx, replay, x)
            finally:
                block.mlp.task = task
        return _LeanBlock._grads(ctx, replay, x)

    @staticmethod
    def _grads(ctx, replay, x):
        if ctx.rng is None:
            grads = replay()
        else:  # the forward's dropout masks: replay from its generator states
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(ctx.rng[0])
                if devices:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
                grads = replay()
        grad_x = grads.pop(0) if ctx.needs_input_grad[1] else None
        return (None, grad_x, *grads)


def lean_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs a reprogrammed block through the memory-lean autograd function."""
    params = [p for p in block.parameters() if p.requires_grad]
    if not x.requires_grad and not params:
        return block.body(x)
    return _LeanBlock.apply(block, x, *params)
