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

Frozen blocks get no weight gradients; no attention probabilities are ever stored (with SDPA,
timm's default: a model set to ``fused_attn=False`` asks for the explicit N x N path).
Gradients equal those of plain autograd through the same body (tested in
tests/test_reprogram.py).

A C++ op for the frozen blocks' backward (a hand-written chain rule) existed until 2026-11-26; it
was measured at 4-9 % of the CPU lean step (DeiT-S, B=16), under the 10 % that would pay for a
second definition of the block, and deleted: every block replays the one body.

Backward always replays the token selection recorded in forward (the int32 kept indices), never a
recomputed one: no host sync, and compiled or compressed recomputes cannot pick other tokens.

Opt-in compression (``reprogram(..., activation_dtype=torch.bfloat16)``) stores the saved tensors in
that dtype; backward casts them back, so gradients are approximate (their effect on accuracy is
reported by the benchmarks and the application).

Under ``torch.compile`` the same policy is written as selective activation checkpointing
(:func:`checkpointed_block`): the autograd function's backward calls ``torch.autograd.grad``,
which dynamo does not trace, so every replayed block was a graph break, and the compiled model
ran frame by frame. Worse, the cache entry of timm's ``VisionTransformer.forward`` that such a
model leaves (a graph of what precedes the break, guarded only on that) matched every other ViT
of the process and was tried first, so those ran frame by frame (``python -m
benchmarks.probe_compile_order``: 2 -> 12 compiled functions a step, 8.6 -> 12.1 ms on CPU, after
a model that still breaks its graph). The checkpointed form compiles into one
graph. It saves the projections listed above and the drop op's outputs (so the selection is
replayed, as here), and recomputes the rest; the drop's output rows are saved rather than
gathered again, about 8 % more saved memory than the autograd function (ViT-B/16: 7.31 against
6.79 MiB/image, ``benchmarks/probe_sac.py``). AOTAutograd's partitioner may also recompute
the last block's fc2 (fast: its only matmul recomputed), whose output the final LayerNorm's
backward needs, from tensors saved anyway rather than save that output (tests/test_benchmarks.py
counts each mode's recomputes in the compiled graphs). Blocks it cannot express (compressed
storage, a MoE MLP, a projection that is not a plain ``nn.Linear``, dropout) keep the autograd
function.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from timm.layers import LayerScale
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from .ops.common import autocast_dtype, autocast_off

__all__ = ["lean_block", "checkpointed_block", "checkpointable"]


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
            g_w = (grad.reshape(-1, grad.shape[-1]).t()
                   @ inp.reshape(-1, inp.shape[-1]).to(grad.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return g_inp, g_w, g_b, None


class _Holder:
    """Carries a saved tensor into a Function without autograd tracking it."""

    __slots__ = ("out",)

    def __init__(self, out):
        self.out = out


def _projection(block, name: str):
    """The block's projection ``name`` (qkv, proj, fc1, fc2); None for a MoE MLP's."""
    owner = block.attn if name in ("qkv", "proj") else block.mlp
    return getattr(owner, name, None)


def _plain_linear(module) -> bool:
    """Whether ``module`` computes exactly ``x @ W.T + b`` from its own weight and bias: an
    ``nn.Linear`` itself (a subclass, such as a LoRA layer, may add parameters). Only such a
    layer's output is replayed from what forward saved, or skipped when unneeded, with
    :class:`_GradOnlyLinear`; any other is run again. (A hook, which may change the output,
    never reaches here: a block whose parts have hooks runs plain autograd,
    :func:`bsr_kernels.reprogram.parts_hooked`.)"""
    return type(module) is nn.Linear


def _saved_names(block) -> tuple[str, ...]:
    """Projections whose outputs are saved (and replayed in backward) instead of recomputed."""
    if block.bsr_config.memory_mode == "fast":
        names = ("qkv", "proj", "fc1")
    else:
        names = ("qkv", "fc1") if block.bsr_trained else ()
    return tuple(n for n in names if _plain_linear(_projection(block, n)))


def _fc2_output_needed(block) -> bool:
    """Whether backward needs fc2's output: for LayerScale's gamma gradient, or because fc2 is
    not a plain linear (:func:`_plain_linear`). Read inside the replay, where the forward's
    parameters are bound."""
    ls2 = block.ls2
    return (isinstance(ls2, LayerScale) and ls2.gamma.requires_grad) \
        or not _plain_linear(_projection(block, "fc2"))


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


def _moe_of(block):
    """The block's MoE MLP (``bsr_kernels.moe.MoEMlp``), or None."""
    return block.mlp if getattr(block.mlp, "bsr_moe", False) else None


def _rng_states(device: torch.device):
    """The generator states that dropout on ``device`` draws from (CPU, plus the device's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _parameter_slots(modules) -> list:
    """(module, name, tensor) of every parameter ``modules`` (a block's ``modules()``) hold, in
    ``parameters()`` order (a shared one once per module holding it)."""
    return [(m, name, p) for m in modules for name, p in m._parameters.items()
            if p is not None]


def _versions(slots) -> tuple[int, ...]:
    """The version counters of the parameters in ``slots`` (each in-place change bumps one)."""
    return tuple(p._version for _, _, p in slots)


def _check_unmodified(block, slots, versions) -> None:
    """Raises as plain autograd does when a parameter the replay reads was changed in place
    since forward (an optimizer step or ``load_state_dict`` between forward and backward):
    replaying with the new values would give wrong gradients silently."""
    now = _versions(slots)
    if now == versions:
        return
    names = {id(m): name for name, m in block.named_modules()}
    for (m, name, p), was, is_ in zip(slots, versions, now):
        if was != is_:
            where = ".".join(filter(None, (names.get(id(m), "?"), name)))
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: the block's parameter {where} {tuple(p.shape)} is at version "
                f"{is_}; expected version {was} instead. The lean and fast backward replays the "
                "block with its parameters, so change them only after backward.")


def _replays_as_forward(block, config, drops: bool) -> bool:
    """Whether replaying ``block``'s body now computes what its forward did under ``config``
    (the forward's, with ``drops`` its role then): it is still reprogrammed, drops where it
    dropped, and a drop keeps and fuses as it did (a block that drops nothing reads no more)."""
    now = getattr(block, "bsr_config", None)
    if now is None or getattr(block, "bsr_drops", None) != drops:
        return False
    return not drops or (now.keep_rate, now.fuse_token, now.num_prefix_tokens) \
        == (config.keep_rate, config.fuse_token, config.num_prefix_tokens)


@contextlib.contextmanager
def _forward_modes(modules, modes):
    """Sets the block's ``modules`` to the forward's train/eval flags ``modes`` for the replay
    (dropout, drop-path and MoE gate noise read them), and back afterwards."""
    held = [m.training for m in modules]
    changed = held != modes
    if changed:
        for m, t in zip(modules, modes):
            m.training = t
    try:
        yield
    finally:
        if changed:
            for m, t in zip(modules, held):
                m.training = t


@contextlib.contextmanager
def _forward_parameters(slots):
    """Binds the forward's parameter tensors to the block for the replay where the block now
    holds others: a forward under ``torch.func.functional_call`` (gradcheck of a parameter, a
    meta-learning step) swapped its tensors in, and the swap is undone before backward. The
    replay reads the module, so without this it would use the module's own values and give
    those tensors no gradient."""
    stale = [(m, name, p) for m, name, p in slots if m._parameters.get(name) is not p]
    held = [m._parameters.get(name) for m, name, _ in stale]
    for m, name, p in stale:
        m._parameters[name] = p
    try:
        yield
    finally:
        for (m, name, _), h in zip(stale, held):
            m._parameters[name] = h


class _LeanBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, modules, slots, x, *params):
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

        moe = _moe_of(block)
        routes: list[torch.Tensor] = []
        with moe.recorded_routing(record=routes) if moe else contextlib.nullcontext():
            out = block.body(x, linear=record_linear,
                             record=lambda idx, _: kept.append(idx.to(torch.int32)))
        names = tuple(n for n in names if n in saved)   # a MoE MLP (moe.py) runs no fc1
        # a MoE MLP routes with the active task's gate: backward replays with the forward's task
        # and the forward's experts (the routing, like the token selection, is replayed)
        ctx.task = moe.task if moe else None
        ctx.n_kept = len(kept)
        # backward replays in the forward's train/eval modes and refuses parameters changed since
        ctx.modules, ctx.modes = modules, [m.training for m in modules]
        ctx.versions = _versions(slots)
        # what the replay reads of the block's BSR form (the shared config object and a role:
        # reading bsr_index here would give torch.compile one entry per block)
        ctx.config, ctx.drops = block.bsr_config, block.bsr_drops
        # backward differentiates to exactly these parameters (in this order), even if
        # requires_grad changes in between, and replays with the forward's parameter tensors
        ctx.block, ctx.names, ctx.params, ctx.slots = block, names, params, slots
        # Backward replays the body under the forward's autocast state (autocast is thread-local
        # and the autograd engine does not carry it over).
        ctx.device_type = x.device.type
        ctx.autocast = autocast_dtype(ctx.device_type)   # None: off
        # Each saved tensor keeps its own dtype (under autocast the projections are bf16/fp16)
        # unless compression asks for another; backward casts back to the recorded dtypes.
        tensors = [x, *(saved[n] for n in names)]
        ctx.dtypes = [t.dtype for t in tensors]
        store = block.bsr_config.activation_dtype
        ctx.save_for_backward(*(t.to(store) if store else t for t in tensors), *kept, *routes)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        block = ctx.block
        if not _replays_as_forward(block, ctx.config, ctx.drops):
            raise RuntimeError(
                f"block {getattr(block, 'bsr_index', '')} was restored (bsr_kernels.restore) or "
                "reprogrammed with other drop settings between forward and backward: the lean "
                "and fast backward replays the block as forward ran it; call backward first")
        _check_unmodified(block, ctx.slots, ctx.versions)
        n_float = len(ctx.dtypes)
        # read once: each read unpacks every saved tensor again, which non-reentrant
        # checkpointing around the model refuses and offload hooks (save_on_cpu) pay for
        stored = ctx.saved_tensors
        x, *projections = (t.to(d) for t, d in zip(stored, ctx.dtypes))
        saved = dict(zip(ctx.names, projections))
        if torch.is_grad_enabled():   # backward(create_graph=True): a second derivative
            raise RuntimeError(
                "a double backward (create_graph=True) through a reprogrammed block needs "
                "memory_mode='autograd': the lean and fast backward replays the block without "
                "building a graph of its own (reprogram(model, memory_mode='autograd'), with "
                "attention under torch.nn.attention.sdpa_kernel(SDPBackend.MATH))")
        kept = stored[n_float:n_float + ctx.n_kept]
        routes = stored[n_float + ctx.n_kept:]
        moe = _moe_of(block)
        fc2_needed = None   # decided in the replay, with the forward's parameters bound
        # the forward's parameters; one frozen since gets no gradient, as AccumulateGrad skips a
        # parameter that no longer requires grad in plain autograd
        live = [i for i, p in enumerate(ctx.params) if p.requires_grad]
        params = [ctx.params[i] for i in live]

        def replay_linear(name, module, inp):
            if name in saved:
                return _GradOnlyLinear.apply(inp, module.weight, module.bias, _Holder(saved[name]))
            if name == "fc2" and not fc2_needed:
                return _GradOnlyLinear.apply(inp, module.weight, module.bias, _Holder(None))
            return module(inp)

        def replay():
            dtype, dev = ctx.autocast, ctx.device_type
            with torch.enable_grad(), (torch.autocast(dev, dtype=dtype) if dtype is not None
                                       else autocast_off(dev)), \
                    _forward_parameters(ctx.slots), _forward_modes(ctx.modules, ctx.modes), \
                    (moe.recorded_routing(replay=routes[0]) if routes
                     else contextlib.nullcontext()):
                nonlocal fc2_needed
                fc2_needed = _fc2_output_needed(block)
                x_ = x.detach().requires_grad_(ctx.needs_input_grad[3])
                # the recorded selection is replayed, never recomputed: no host sync, and the
                # same tokens even where a recompute would round differently (compressed,
                # compiled)
                out = block.body(x_, linear=replay_linear, kept=kept[0] if kept else None)
                inputs = ([x_] if ctx.needs_input_grad[3] else []) + params
                return list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))

        if ctx.task is not None:  # a MoE block weights with the gate of the forward's task
            task, block.mlp.task = block.mlp.task, ctx.task
        try:
            if ctx.rng is None:
                grads = replay()
            else:  # the forward's dropout masks: replay from its generator states
                devices = [x.device] if x.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.set_rng_state(ctx.rng[0])
                    if devices:
                        torch.cuda.set_rng_state(ctx.rng[1], x.device)
                    grads = replay()
        finally:
            if ctx.task is not None:
                block.mlp.task = task
        grad_x = grads.pop(0) if ctx.needs_input_grad[3] else None
        param_grads = [None] * len(ctx.params)
        for i, g in zip(live, grads):
            param_grads[i] = g
        return (None, None, None, grad_x, *param_grads)


def lean_block(block: nn.Module, x: torch.Tensor, modules: list) -> torch.Tensor:
    """Runs a reprogrammed block through the memory-lean autograd function; ``modules`` is
    ``list(block.modules())``."""
    slots = _parameter_slots(modules)
    params = list({id(p): p for _, _, p in slots if p.requires_grad}.values())  # parameters()
    if not x.requires_grad and not params:
        return block.body(x)
    return _LeanBlock.apply(block, modules, slots, x, *params)


#: The matmuls of :meth:`BSRBlock.body`, in the order it runs them (attention, then the MLP):
#: the checkpoint policy tells the projections apart by their order.
_PROJECTIONS = ("qkv", "proj", "fc1", "fc2")
_MATMULS = (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)


def _policy(save, counts, ctx, op, *args, **kwargs):
    """Selective checkpointing policy of a lean/fast block: the drop op's outputs and the
    projections in ``save`` are kept, everything else is recomputed."""
    if op is torch.ops.bsr_kernels.drop_tokens.default:
        return CheckpointPolicy.MUST_SAVE   # the selection is replayed, never recomputed
    if op in _MATMULS:
        i = counts[ctx.is_recompute]
        counts[ctx.is_recompute] = i + 1
        if i < len(_PROJECTIONS) and _PROJECTIONS[i] in save:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _contexts(save):
    # a module-level function and partials: dynamo refuses a closure as context_fn
    return create_selective_checkpoint_contexts(
        functools.partial(_policy, save, {False: 0, True: 0}))


def checkpointable(block) -> bool:
    """Whether the lean/fast backward of ``block`` can run as :func:`checkpointed_block`: no
    compressed storage, no MoE MLP, no dropout drawn, and four plain ``nn.Linear`` projections
    (the policy counts their matmuls)."""
    return (block.bsr_config.activation_dtype is None and _moe_of(block) is None
            and not _stochastic(block)
            and all(_plain_linear(_projection(block, n)) for n in _PROJECTIONS))


def checkpointed_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A reprogrammed block's lean or fast backward as selective activation checkpointing (the
    form ``torch.compile`` traces into one graph; see the module doc): the body under
    non-reentrant ``torch.utils.checkpoint`` with a policy that saves the drop op's outputs and
    the projections of :func:`_saved_names`."""
    if not x.requires_grad and not any(p.requires_grad for p in block.parameters()):
        return block.body(x)
    return checkpoint(block.body, x, use_reentrant=False,
                      context_fn=functools.partial(_contexts, _saved_names(block)))
