"""timm model features on a reprogrammed model: ``forward_intermediates``, grad checkpointing,
the pool of ``reset_classifier``.

:func:`bsr_kernels.reprogram` keeps the model's class, so the timm methods that do not fit token
dropping are replaced on the *instance* (:func:`install`; :func:`uninstall` on ``restore``):

* ``forward_intermediates(x, ..., output_fmt="NCHW")``: after a drop a block holds fewer tokens
  than the patch grid, which timm's reshape cannot take. Here the kept tokens go back to their
  grid positions; dropped positions are zero and the fused token, which is no patch, is left out
  of the map. ``output_fmt="NLC"`` returns the tokens each block really holds (timm's own code).
* ``set_grad_checkpointing(True)`` raises at the call: the lean memory mode already recomputes
  inside backward, and checkpointing around it is not supported. ``False`` is accepted.
* ``reset_classifier(num_classes, global_pool)`` refuses a pool that ``reprogram`` refuses (one
  that would average the fused token in: :func:`check_pool`) with a ValueError, before changing
  anything.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["install", "uninstall", "check_pool", "GRAD_CHECKPOINTING_REFUSAL"]

GRAD_CHECKPOINTING_REFUSAL = (
    "set_grad_checkpointing(True) is not supported on a model reprogrammed by bsr_kernels: its "
    "memory_mode='lean' already recomputes inside backward and stores less than checkpointing "
    "would. Leave grad checkpointing off, or call bsr_kernels.restore(model) first.")

_METHODS = ("forward_intermediates", "set_grad_checkpointing", "reset_classifier")


def check_pool(pool: str, fuse_token: bool, keep_rate: float, drop_at) -> None:
    """Raises a ValueError where ``global_pool=pool`` cannot go with a BSR config that appends a
    fused token (it would be pooled with the patch tokens)."""
    if pool in ("token", "") or not (fuse_token and keep_rate < 1 and drop_at):
        return
    raise ValueError(f"global_pool={pool!r} would pool the fused token (a score-weighted sum of "
                     "the dropped tokens) together with the patch tokens; use fuse_token=False "
                     "(pooling then averages the kept tokens) or a model with global_pool='token'")


class _BoundOverride:
    """A method replaced on one model instance (picklable and deep-copyable, unlike a lambda)."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.name = model, name

    def __call__(self, *args, **kwargs):
        return globals()["_" + self.name](self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<bsr_kernels override of {type(self.model).__name__}.{self.name}>"


def install(model: nn.Module) -> None:
    """Replaces the timm methods listed in the module doc on ``model``, and makes its saved
    forms carry its BSR config (:func:`bsr_kernels.saving.attach`)."""
    from . import saving
    saving.attach(model)
    for name in _METHODS:
        if hasattr(type(model), name):
            model.__dict__[name] = _BoundOverride(model, name)


def uninstall(model: nn.Module) -> None:
    """Undoes :func:`install`."""
    from . import saving
    saving.detach(model)
    for name in _METHODS:
        if isinstance(model.__dict__.get(name), _BoundOverride):
            del model.__dict__[name]


def _set_grad_checkpointing(model: nn.Module, enable: bool = True):
    if enable:
        raise RuntimeError(GRAD_CHECKPOINTING_REFUSAL)
    return type(model).set_grad_checkpointing(model, False)


def _reset_classifier(model: nn.Module, num_classes: int, global_pool: str | None = None):
    if global_pool is not None:
        from .config_access import bsr_config_dict
        cfg = bsr_config_dict(model)
        check_pool(global_pool, cfg["fuse_token"], cfg["keep_rate"], cfg["drop_at"])
    return type(model).reset_classifier(model, num_classes, global_pool)


def _fuse_token(model: nn.Module) -> bool:
    from .config_access import bsr_config_dict
    return bool(bsr_config_dict(model)["fuse_token"])


def _forward_intermediates(model: nn.Module, x: torch.Tensor, indices=None,
                           return_prefix_tokens: bool = False, norm: bool = False,
                           stop_early: bool = False, output_fmt: str = "NCHW",
                           intermediates_only: bool = False, output_dict: bool = False,
                           attn_mask=None, is_causal: bool = False):
    """timm's ``forward_intermediates`` for a reprogrammed ViT (see the module doc)."""
    from timm.models._features import feature_take_indices

    timm_fi = type(model).forward_intermediates
    kwargs = dict(indices=indices, norm=norm, stop_early=stop_early)
    if attn_mask is not None:   # passed only when set: older timm lacks is_causal
        kwargs["attn_mask"] = attn_mask
    if is_causal:
        kwargs["is_causal"] = is_causal
    if output_fmt != "NCHW":
        return timm_fi(model, x, return_prefix_tokens=return_prefix_tokens, output_fmt=output_fmt,
                       intermediates_only=intermediates_only, output_dict=output_dict, **kwargs)
    patch_drop = getattr(model, "patch_drop", None)
    if model.training and getattr(patch_drop, "prob", 0.0) > 0:
        raise ValueError(
            f"output_fmt='NCHW' puts each block's tokens at their patch positions, which patch "
            f"dropout (patch_drop_rate {patch_drop.prob}) loses in training mode: call "
            "model.eval() first, or take output_fmt='NLC' (the tokens each block holds)")
    trace: list[tuple[torch.Tensor, int]] = []
    marks: list[int] = []   # len(trace) after each block that ran
    hooks = [blk.register_forward_hook(lambda m, a, o: marks.append(len(trace)))
             for blk in model.blocks]
    for blk in model.blocks:
        blk._bsr_trace = trace
    try:
        res = timm_fi(model, x, return_prefix_tokens=True, output_fmt="NLC",
                      intermediates_only=intermediates_only, output_dict=True, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        for blk in model.blocks:
            blk._bsr_trace = None

    b, _, height, width = x.shape
    h, w = model.patch_embed.dynamic_feat_size((height, width))
    # mappings[s][b, j]: original patch of non-prefix token j after s drops, -1 for a fused token
    mapping = torch.arange(h * w, device=x.device).expand(b, h * w)
    mappings = [mapping]
    fuse = _fuse_token(model)
    for kept, n_candidates in trace:
        mapping = torch.gather(mapping, 1, kept.to(mapping.device))
        if fuse and kept.shape[1] < n_candidates:
            mapping = torch.cat([mapping, mapping.new_full((b, 1), -1)], dim=1)
        mappings.append(mapping)
    take, _ = feature_take_indices(len(model.blocks), indices)
    taken = [i for i in range(len(marks)) if i in set(take)]
    dense = []
    for i, y in zip(taken, res["image_intermediates"]):
        m = mappings[marks[i]]
        grid = y.new_zeros(b, h * w + 1, y.shape[-1])   # the last row takes the fused token
        idx = torch.where(m < 0, h * w, m).unsqueeze(-1).expand(-1, -1, y.shape[-1])
        grid = grid.scatter(1, idx, y)[:, :h * w]
        dense.append(grid.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())

    prefix = res.get("image_intermediates_prefix")
    if output_dict:
        out = {"image_intermediates": dense}
        if return_prefix_tokens and prefix is not None:
            out["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            out["image_features"] = res["image_features"]
        return out
    if return_prefix_tokens and prefix is not None:
        dense = list(zip(dense, prefix))
    if intermediates_only:
        return dense
    return res["image_features"], dense
