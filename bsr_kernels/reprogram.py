"""``reprogram(model)``: Block Selective Reprogramming for timm ``VisionTransformer`` models.

The model is changed in place by swapping ``__class__`` (ToMe-style): each block becomes a
:class:`BSRBlock` (a subclass of timm's ``Block``) and its attention a
:class:`~bsr_kernels.attention.TokenDropAttention`. Weights, state_dict keys, hooks and the model's
own class stay untouched, and :func:`restore` undoes it. Every block refers to the model's one
:class:`~bsr_kernels.config.BSRConfig` (``model.bsr_config``); what a block does is derived from it.

One block body (:meth:`BSRBlock.body`) serves every execution mode:

* blocks before the first trained block run under ``torch.no_grad()`` (unless their input or
  one of their parameters requires grad: input gradients, parameters made trainable later);
* ``memory_mode="autograd"``: the body under plain autograd (SDPA and the fused drop op);
* ``"lean"`` / ``"fast"``: a custom autograd function (:mod:`bsr_kernels.backward`) runs the body
  without autograd, saves the block input and some projection outputs (which, by memory mode),
  and replays the body inside backward with the recorded token selection; under
  ``torch.compile``, the same policy as selective activation checkpointing (one graph);
* without grad mode (evaluation), the body simply runs.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from . import timm_hooks
from .attention import TokenDropAttention, call_linear, dropout, hooked
from .config import MEMORY_MODES, BSRConfig, default_drop_at, default_train_blocks
from .export import FX_REFUSAL, SCRIPT_REFUSAL, drop_traced
from .ops import _drop_tokens
from .ops.common import autocast_off, under_functorch

__all__ = ["reprogram", "restore", "default_train_blocks", "default_drop_at", "BSRBlock",
           "kept_patches", "is_reprogrammed", "MEMORY_MODES"]


#: What a block does, set on it by :func:`reprogram` from the config (which is frozen): whether
#: it runs without grad (before the first trained block), trains, and drops tokens.
_ROLE = ("bsr_no_grad", "bsr_trained", "bsr_drops")


class BSRBlock(Block):
    """A timm ``Block`` that may drop tokens after attention, and run memory-lean.

    Attributes set by :func:`reprogram`: ``bsr_config`` (the model's one
    :class:`~bsr_kernels.config.BSRConfig`), ``bsr_index`` (this block's position) and its role
    in that config, ``bsr_no_grad``, ``bsr_trained`` and ``bsr_drops`` (bools). Forward reads
    the role, never the index: ``torch.compile`` then keeps one compiled entry per kind of block
    (5 for the defaults), not one per block, which would pass dynamo's recompile limit (8) at 12
    blocks where a memory mode's custom backward makes every block a frame of its own.
    """

    def body(self, x: torch.Tensor, linear=call_linear, kept: Optional[torch.Tensor] = None,
             record=None) -> torch.Tensor:
        """The block's computation, written once for every mode.

        Args:
            x: (B, N, C) tokens.
            linear: ``linear(name, module, input)`` runs the projections "qkv", "proj", "fc1"
                and "fc2"; replaced by the lean backward to replay saved outputs.
            kept: replay this recorded selection instead of selecting (lean/fast backward).
            record: ``record(kept, n_candidates)`` is called at a drop (``kept_patches``).

        Returns:
            (B, N', C) tokens, N' < N after a drop.
        """
        out, q, k = self.attn.forward_qk(self.norm1(x), linear=linear)
        x = x + self.drop_path1(_out_of_place(self.ls1, out))
        if self.bsr_drops:
            cfg = self.bsr_config
            n_candidates = x.shape[1] - cfg.num_prefix_tokens
            x, kept = self.drop(x, q, k, kept)
            if record is not None:
                record(kept, n_candidates)
        mlp = self.mlp
        if getattr(mlp, "bsr_moe", False):   # bsr_kernels.moe.MoEMlp: routed experts, whole
            return x + self.drop_path2(_out_of_place(self.ls2, mlp(self.norm2(x))))
        h = mlp.norm(dropout(mlp.drop1,
                             _out_of_place(mlp.act, linear("fc1", mlp.fc1, self.norm2(x)))))
        return x + self.drop_path2(_out_of_place(self.ls2,
                                                 dropout(mlp.drop2, linear("fc2", mlp.fc2, h))))

    def drop(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             kept: Optional[torch.Tensor] = None):
        """The block's token drop (``kept`` replays a recorded selection). Under
        ``torch.jit.trace`` it records plain aten ops."""
        cfg = self.bsr_config
        if torch.jit.is_tracing():  # jit.trace / ONNX dynamo=False: record plain aten ops
            return drop_traced(x, q, k, self.attn.scale, cfg)
        # The drop accumulates in float32 (its kernels ignore autocast); so must its torch-op
        # forms, the reference and the replay of a lean/fast backward (which runs under the
        # forward's autocast): bf16 replay scores failed the C++ backward.
        with autocast_off(x.device.type):
            # a replay's kept is this op's own output: no range check (on CPU a value read)
            return _drop_tokens(x, q, k, cfg.keep_rate, cfg.fuse_token, cfg.num_prefix_tokens,
                                None, kept, None, check_values=False)

    def __prepare_scriptable__(self):  # torch.jit.script: refused, naming the supported routes
        raise RuntimeError(SCRIPT_REFUSAL)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):   # attn_mask would be one too: not the user's fault
            raise RuntimeError(FX_REFUSAL)
        if attn_mask is not None or is_causal:
            raise ValueError("a reprogrammed (BSR) block takes no attn_mask/is_causal: token "
                             "dropping changes the sequence; call bsr_kernels.restore(model) first")
        _refuse_skipped_hooks(self)
        trace = self._bsr_trace
        record = None if trace is None else (lambda kept, m: trace.append((kept.detach(), m)))
        # before the first trained block nothing needs a gradient, unless the caller asks for
        # one: an input that requires grad (input gradients, a trainable pos_embed) or a
        # parameter made trainable after reprogram
        if self.bsr_no_grad and not x.requires_grad \
                and not any(p.requires_grad for p in self.parameters()):
            with torch.no_grad():
                return self.body(x, record=record)
        mode = self.bsr_config.memory_mode
        # torch.func transforms (grad, vmap, jvp...) take the plain body: the same gradients,
        # and no custom autograd.Function, which functorch refuses. So does a block whose parts
        # carry hooks (see parts_hooked).
        if mode != "autograd" and torch.is_grad_enabled() and record is None \
                and not torch.jit.is_tracing() and not under_functorch() \
                and not (getattr(self.mlp, "bsr_moe", False) and self.mlp.plain_autograd(mode)):
            modules = list(self.modules())   # walked once: lean_block takes them too
            if parts_hooked(modules):
                if not torch.compiler.is_compiling():
                    warnings.warn(HOOKED_PARTS_WARNING.format(mode=mode), stacklevel=2)
                return self.body(x)
            from .backward import checkpointable, checkpointed_block, lean_block
            if torch.compiler.is_compiling() and checkpointable(self):
                return checkpointed_block(self, x)   # one graph (see bsr_kernels.backward)
            return lean_block(self, x, modules)
        return self.body(x, record=record)


def _out_of_place(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``module(t)``, on a copy of ``t`` when the module writes its input in place (an
    ``inplace`` flag: timm's ``LayerScale(inplace=True)``, an activation such as
    ``nn.SiLU(inplace=True)``). In the lean and fast backward ``t`` is a projection output that
    forward saved and backward replays, which a write in place would overwrite (silently wrong
    gradients), or fc2's broadcast zero placeholder, which cannot be written."""
    return module(t.clone() if getattr(module, "inplace", False) else t)


#: Warned (once a process, per mode) when a block's parts carry hooks in lean or fast mode.
HOOKED_PARTS_WARNING = (
    "bsr_kernels: a reprogrammed block whose parts (norms, projections, activation...) have "
    "forward or backward hooks runs plain autograd, so memory_mode={mode!r} saves no memory "
    "on it (hooks that torch.nn.utils.prune, weight_norm or activation-collecting tools "
    "register count too); hooks registered on the block itself keep the {mode} path")


def parts_hooked(modules: Sequence[nn.Module]) -> bool:
    """Whether a module inside a block (a norm, a projection, the activation, a LayerScale, a
    MoE MLP...) has hooks; ``modules`` is ``list(block.modules())``, the block first. Such a
    block runs plain autograd in every memory mode: the lean and fast backward would run its
    forward without autograd and replay it in backward, so what a
    hook collects would carry no gradient (an auxiliary loss on it would train nothing), the
    hook would run twice a step, and a random draw in it would differ in the replay. Hooks on
    the block itself run once, outside, and keep its mode."""
    return any(hooked(m) for m in modules[1:])


def _refuse_skipped_hooks(block) -> None:
    """A reprogrammed block runs its attention's and its (timm) MLP's pieces itself, with the
    drop between them, so hooks registered on ``attn`` or ``mlp`` would never run: refused, not
    skipped silently. Hooks on the block, or on the projections inside, run."""
    for name in ("attn", "mlp"):
        module = getattr(block, name)
        if hooked(module) and not getattr(module, "bsr_moe", False):   # a MoE MLP runs whole
            raise RuntimeError(
                f"block {block.bsr_index}.{name} has forward or backward hooks, which a "
                f"reprogrammed block does not run (it calls the {name}'s pieces itself, with the "
                "token drop in between): register them on the block, or on attn.qkv / "
                "attn.proj / mlp.fc1 / mlp.fc2, or call bsr_kernels.restore(model) first")


def _unsupported_reasons(model: nn.Module) -> list[str]:
    """What in ``model`` reprogram cannot handle; empty when it is supported."""
    if isinstance(getattr(model, "_orig_mod", None), VisionTransformer):
        return ["the model is compiled (torch.compile's OptimizedModule): reprogram the model "
                "itself, then compile it"]
    if not isinstance(model, VisionTransformer):
        return [f"reprogram needs a timm VisionTransformer, got {type(model).__name__} "
                "(not a ViT)"]
    reasons = []
    if getattr(model, "cls_token", None) is None:
        reasons.append("the model has no class token (class_token=False): BSR scores tokens "
                       "with the CLS row of attention")
    if getattr(model, "grad_checkpointing", False):
        reasons.append("grad checkpointing is on; call model.set_grad_checkpointing(False)")
    if getattr(model, "attn_pool", None) is not None:
        reasons.append("attention pooling heads (global_pool='map'/'prr') are not supported")
    for i, blk in enumerate(model.blocks):
        where = f"block {i}"
        if type(blk) not in (Block, BSRBlock):
            reasons.append(f"{where} is a {type(blk).__name__}, only timm Block is supported")
            continue
        if type(blk.attn) not in (Attention, TokenDropAttention):
            reasons.append(f"{where} attention is a {type(blk.attn).__name__}, only timm "
                           "Attention is supported")
        elif blk.attn.gate is not None:
            reasons.append(f"{where} attention is gated, which is not supported")
        if getattr(blk.mlp, "bsr_moe", False):
            pass   # bsr_kernels.moe.MoEMlp (to_moe), called whole by BSRBlock.body
        elif type(blk.mlp) is not Mlp or not isinstance(blk.mlp.fc2, nn.Linear):
            reasons.append(f"{where} MLP is a {type(blk.mlp).__name__}, only timm Mlp is supported")
        elif not isinstance(blk.mlp.norm, nn.Identity):
            reasons.append(f"{where} MLP has a hidden norm (scale_mlp_norm), not supported")
        for name in ("ls1", "ls2"):
            if not isinstance(getattr(blk, name), (nn.Identity, LayerScale)):
                reasons.append(f"{where}.{name} is neither LayerScale nor Identity")
        stochastic = [n for n, m in blk.named_modules()
                      if (isinstance(m, nn.Dropout) and m.p > 0)
                      or (type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0) > 0)]
        if isinstance(blk.attn, Attention) and blk.attn.attn_drop.p > 0:
            stochastic.append("attn.attn_drop")
        if stochastic:
            reasons.append(f"{where} has dropout/drop-path ({', '.join(sorted(set(stochastic)))}); "
                           "create the model with drop rates 0 for BSR")
    return reasons


def is_reprogrammed(model: nn.Module) -> bool:
    """Whether :func:`reprogram` has been applied to ``model``."""
    return isinstance(getattr(model, "bsr_config", None), BSRConfig)


def reprogram(model: nn.Module, train_blocks: Optional[Sequence[int]] = None,
              drop_at: Optional[Sequence[int]] = None, keep_rate: float = 0.5,
              fuse_token: bool = True, memory_mode: str = "lean", train_norm: bool = False,
              activation_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Turns a timm ``VisionTransformer`` into its BSR form, in place.

    Args:
        model: a timm ``VisionTransformer`` with a class token (deit_*, vit_*, with register
            tokens, LayerScale or qk_norm).
        train_blocks: indices of the blocks to train; default ``(round(d/3*k) - 1 for k = 1..3)``,
            clamped to the blocks. The head is always trained; everything else is frozen.
        drop_at: blocks that drop tokens after attention; default ``(round(d/4*k) for
            k = 1..3)``, clamped to the blocks.
        keep_rate: fraction of non-prefix tokens kept at each drop, in (0, 1].
        fuse_token: fuse the dropped tokens into one extra token (EViT).
        memory_mode: what backward stores; all three give the same gradients.
            ``"autograd"``: plain autograd through the block (SDPA, the fused drop op); stores
            what autograd stores, recomputes nothing; compiles best.
            ``"fast"``: stores the block input and the qkv, proj and fc1 outputs; recomputes
            LayerNorm, GELU and attention in backward, never a matmul.
            ``"lean"`` (default): stores the input of frozen blocks (plus the qkv and fc1 outputs
            of trained ones); recomputes the rest, never fc2's output. The least memory.
            Under ``torch.compile`` fast and lean run as selective activation checkpointing with
            the same policy (one graph; the drop's output rows are saved too: about 7 % more).
            Blocks before the first trained block need no backward in any mode.
        train_norm: also train the final norm (``model.norm`` / ``model.fc_norm``).
        activation_dtype: opt-in compression of what the lean/fast backward saves (e.g.
            ``torch.bfloat16``, in the spirit of Mesa): saved activations are stored in this
            dtype and cast back in backward. Gradients become approximate; None (default) keeps
            them exact. One of torch.bfloat16, float16, float32 or float64 (what a checkpoint
            can name).

    Returns:
        The same model object, reprogrammed, with ``model.bsr_config`` set. Its class and
        state_dict keys are unchanged.

    Raises:
        ValueError: on a bad argument (named in the message) or an unsupported model; the model
            is then left unchanged.
    """
    backbone = getattr(model, "bsr_backbone", None)
    if isinstance(backbone, nn.Module):   # a wrapper (bsr_kernels.MultiTaskViT): its ViT
        reprogram(backbone, train_blocks, drop_at, keep_rate, fuse_token, memory_mode,
                  train_norm, activation_dtype)
        return model
    reasons = _unsupported_reasons(model)
    if reasons:
        raise ValueError("cannot reprogram this model:\n  " + "\n  ".join(reasons))
    config = BSRConfig.create(len(model.blocks), model.num_prefix_tokens, train_blocks, drop_at,
                              keep_rate, fuse_token, memory_mode, train_norm, activation_dtype)
    timm_hooks.check_pool(getattr(model, "global_pool", "token"), config.fuse_token,
                          config.keep_rate, config.drop_at)

    if is_reprogrammed(model):
        restore(model)
    model.bsr_config = config
    model._bsr_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    trained_names = {"head.", "head_dist."}
    if train_norm:
        trained_names |= {"norm.", "fc_norm."}
    trained_names |= {f"blocks.{i}." for i in config.train_blocks}
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trained_names))

    for i, blk in enumerate(model.blocks):
        blk._bsr_orig_class = type(blk)
        blk._bsr_attn_class = type(blk.attn)   # timm's Attention, or a TokenDropAttention
        blk.__class__ = BSRBlock
        blk.attn.__class__ = TokenDropAttention
        blk.bsr_config = config
        blk.bsr_index = i
        blk.bsr_no_grad, blk.bsr_trained, blk.bsr_drops = (
            config.without_grad(i), config.trains(i), config.drops(i))
        blk._bsr_trace = None
    timm_hooks.install(model)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undoes :func:`reprogram`: plain timm classes and the original ``requires_grad`` flags.

    Raises:
        ValueError: if ``model`` was not reprogrammed.
    """
    backbone = getattr(model, "bsr_backbone", None)
    if isinstance(backbone, nn.Module):   # a wrapper (bsr_kernels.MultiTaskViT): its ViT
        restore(backbone)
        return model
    if not is_reprogrammed(model):
        raise ValueError("model was not reprogrammed by bsr_kernels.reprogram")
    for blk in model.blocks:
        blk.__class__ = blk._bsr_orig_class
        # (a model reprogrammed before the attention's class was recorded had timm's)
        blk.attn.__class__ = blk.__dict__.pop("_bsr_attn_class", Attention)
        for attr in ("_bsr_orig_class", "bsr_config", "bsr_index", "_bsr_trace", *_ROLE):
            delattr(blk, attr)
    for name, p in model.named_parameters():
        p.requires_grad_(model._bsr_requires_grad.get(name, True))
    timm_hooks.uninstall(model)
    del model.bsr_config, model._bsr_requires_grad
    return model


@torch.no_grad()
def kept_patches(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Which patches survive each drop stage.

    Args:
        model: a reprogrammed model.
        images: (B, 3, H, W).

    Returns:
        One (B, n_keep) int64 tensor per drop stage, in block order: for each kept token, the
        original patch index (row-major over the patch grid). A kept *fused* token (from an
        earlier stage) is marked -1.
    """
    if not is_reprogrammed(model):
        raise ValueError("model was not reprogrammed by bsr_kernels.reprogram")
    trace: list[tuple[torch.Tensor, int]] = []
    for blk in model.blocks:
        blk._bsr_trace = trace
    try:
        model(images)
    finally:
        for blk in model.blocks:
            blk._bsr_trace = None
    out, mapping = [], None  # mapping[b, j]: original patch of non-prefix token j, -1 if fused
    for kept, n_candidates in trace:
        mapped = kept if mapping is None else torch.gather(mapping, 1, kept)
        out.append(mapped)
        mapping = mapped
        if model.bsr_config.fuse_token and kept.shape[1] < n_candidates:
            mapping = torch.cat([mapping, mapping.new_full((mapping.shape[0], 1), -1)], dim=1)
    return out
