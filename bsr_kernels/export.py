"""Deploying a reprogrammed model: ``torch.export``, ONNX and TorchScript.

Token dropping is part of the model, so a deployed BSR model runs the drop op too. The supported
routes:

* ``torch.export.export(model, (images,))``: the graph keeps the ``bsr_kernels::drop_tokens``
  custom op (fast kernels wherever ``bsr_kernels`` is imported).
* ONNX through the dynamo exporter: ``torch.onnx.export(model, (images,), dynamo=True)`` or
  :func:`export_onnx`. Importing ``bsr_kernels`` registers an aten decomposition of the drop op
  (the reference definition: CLS-row scores, the exact selection rule by ranks, a gather and the
  score-weighted fused token; :func:`drop_tokens_aten`) in ``torch._decomp.decomposition_table``,
  which the ONNX exporter applies to ops that have no ONNX function.
* ``torch.jit.trace``: a reprogrammed block records the reference drop (plain aten ops) while it
  is traced, so the traced module, and ``torch.onnx.export(..., dynamo=False)``, which traces, hold
  no custom op. The token counts are fixed by the traced input size.
* ``torch.jit.script`` is refused with a message naming the routes above.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .checkpoint import atomic_write
from .ops import reference
from .ops.common import DropPlan, compute_dtype, num_kept

__all__ = ["export_onnx", "SCRIPT_REFUSAL", "FX_REFUSAL", "drop_tokens_aten", "select_aten",
           "drop_traced", "drop_tokens_decomposition", "cls_attention_decomposition"]

#: The message of the error :func:`torch.jit.script` raises on a reprogrammed model.
SCRIPT_REFUSAL = (
    "torch.jit.script does not support a model reprogrammed by bsr_kernels (the token drop runs "
    "Python-side backend dispatch and a custom autograd function). Deploy it with "
    "torch.export.export(model, (images,)), with ONNX through the dynamo exporter "
    "(bsr_kernels.export_onnx(model, images, path) or torch.onnx.export(model, (images,), "
    "dynamo=True)), or with torch.jit.trace(model, images).")

#: The message of the error a reprogrammed block raises under torch.fx symbolic tracing.
FX_REFUSAL = (
    "torch.fx symbolic tracing (torch.fx.symbolic_trace, timm's create_feature_extractor and "
    "AttentionExtract's default method='fx') does not support a model reprogrammed by "
    "bsr_kernels: how many tokens a drop keeps depends on the input's shape, which fx does not "
    "know. Take features with model.forward_intermediates(images), attention maps with "
    "AttentionExtract(model, method='hook') after setting fused_attn=False on the blocks' "
    "attention, and deploy with torch.export.export(model, (images,)), "
    "bsr_kernels.export_onnx or torch.jit.trace; or call bsr_kernels.restore(model) first.")


def select_aten(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The selection rule without a stable sort, which neither ONNX exporter takes.

    Token j ranks ``#{i: s_i > s_j} + #{i < j: s_i == s_j}`` over the rule's keys
    (:func:`bsr_kernels.ops.reference.rank_key`: NaN lowest): exactly its place in the stable
    descending order. The ``n_keep`` of rank below ``n_keep`` come back ascending from
    a ``topk`` over distinct keys, so no runtime's tie order matters. Costs (B, M, M) booleans,
    which is small beside the attention of the exported model.

    Returns:
        kept (B, n_keep) int64, ascending positions.
    """
    m = scores.shape[1]
    key = reference.rank_key(scores)
    pos = torch.arange(m, device=scores.device)
    ki, kj = key.unsqueeze(1), key.unsqueeze(2)            # [b, j, i]: s_i and s_j
    before = (pos.unsqueeze(0) < pos.unsqueeze(1)).unsqueeze(0)   # [., j, i]: i < j
    rank = ((ki > kj) | ((ki == kj) & before)).to(torch.int64).sum(dim=2)
    order_key = torch.where(rank < n_keep, pos, pos + m)   # kept tokens first, by position
    return torch.topk(order_key, n_keep, dim=1, largest=False, sorted=True).values


def drop_tokens_aten(x, q, k, scale: float, num_prefix_tokens: int, n_keep: int,
                     fuse_token: bool):
    """The drop in out-of-place aten ops that tracers and ONNX take (no in-place or boolean
    scatter, no stable sort): the reference definition
    (:func:`bsr_kernels.ops.reference.drop_tokens`) with its exact selection rule
    (:func:`select_aten`).

    Returns:
        x_out (B, P + n_keep [+ 1], C), kept (B, n_keep) int64 ascending, scores (B, M), lse (B, H).
    """
    p = num_prefix_tokens
    scores, lse = reference.cls_scores(q, k, scale, p, compute_dtype(x.dtype, q.dtype))
    kept = select_aten(scores, n_keep)
    xp = x[:, p:]
    c = x.shape[-1]
    parts = [x[:, :p], torch.gather(xp, 1, kept.unsqueeze(-1).expand(-1, -1, c))]
    if DropPlan(p, xp.shape[1], n_keep, fuse_token).fused:
        kept_mask = torch.zeros_like(scores).scatter(1, kept, torch.ones_like(scores[:, :n_keep]))
        weights = torch.where(kept_mask > 0, torch.zeros_like(scores), scores)
        fused = torch.einsum("bm,bmc->bc", weights, xp.to(scores.dtype))
        parts.append(fused.to(x.dtype).unsqueeze(1))
    return torch.cat(parts, dim=1), kept, scores, lse


def drop_traced(x, q, k, scale: float, config):
    """A reprogrammed block's drop while ``torch.jit.trace`` records it: plain aten ops, so the
    traced graph (and the TorchScript ONNX exporter) needs no custom op."""
    p = config.num_prefix_tokens
    n_keep = num_kept(config.keep_rate, x.shape[1] - p)
    x, kept, _, _ = drop_tokens_aten(x, q, k, scale, p, n_keep, config.fuse_token)
    return x, kept


def drop_tokens_decomposition(x, q, k, scale: float, num_prefix_tokens: int, n_keep: int,
                              fuse_token: bool, backend: str = ""):
    """``bsr_kernels::drop_tokens`` in aten ops (:func:`drop_tokens_aten`), same outputs."""
    x_out, kept, scores, lse = drop_tokens_aten(x, q, k, scale, num_prefix_tokens, n_keep,
                                                fuse_token)
    return x_out, kept.to(torch.int32), scores, lse


def cls_attention_decomposition(q, k, scale: float, num_prefix_tokens: int, backend: str = ""):
    """``bsr_kernels::cls_attention`` in aten ops: the reference definition."""
    return reference.cls_scores(q, k, scale, num_prefix_tokens)


def _register_decompositions() -> None:
    from torch._decomp import decomposition_table

    ops = torch.ops.bsr_kernels
    for op, fn in ((ops.drop_tokens.default, drop_tokens_decomposition),
                   (ops.cls_attention.default, cls_attention_decomposition)):
        if op not in decomposition_table:
            decomposition_table[op] = fn


_register_decompositions()

#: Initializers up to this size are saved in one file, written atomically. The exporter moves
#: them to an external ``<file>.data`` above 1.5 GiB (``ONNXProgram.save``); the margin keeps
#: both counts of the same initializers on one side of that line.
_ONE_FILE_BYTES = 1 << 30


def _names(value: Union[str, Sequence[str]], arg: str) -> list:
    """A list of graph names: one string is one name (not a list of its letters)."""
    names = [value] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{arg} must be a name or a list of non-empty names, got {value!r}")
    return names


def _initializer_bytes(program) -> Optional[int]:
    try:
        return sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                   if v.const_value is not None)
    except AttributeError:    # another exporter version: let ONNXProgram.save decide
        return None


def _unwrap_runtime(model: torch.nn.Module) -> torch.nn.Module:
    """The model that ``torch.compile``'s OptimizedModule, ``DataParallel`` or
    ``DistributedDataParallel`` wrap, in any nesting, which run it unchanged. A wrapper of the
    user's own (one with a ``module`` attribute and a forward that may add to it) is kept."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, parallel):
            model = model.module
        else:
            return model


def export_onnx(model: torch.nn.Module, images: torch.Tensor, path: Optional[os.PathLike] = None,
                *, dynamic_batch: bool = True, opset_version: Optional[int] = None,
                input_names: Union[str, Sequence[str]] = ("images",),
                output_names: Union[str, Sequence[str]] = ("logits",)):
    """Exports a (reprogrammed) model to ONNX with the dynamo exporter.

    The drop op is decomposed into standard ONNX ops (see the module doc), so onnxruntime runs the
    file without bsr_kernels. The number of tokens kept at each drop is fixed by the image size
    of ``images``; the batch size may vary when ``dynamic_batch``.

    Args:
        model: the model, in eval mode for deployment; a ``torch.compile``'d, DataParallel
            or DDP one exports the model it wraps (a wrapper of one's own is exported whole).
        images: an example (B, 3, H, W) batch.
        path: the ``.onnx`` file to write, or None to only return the program. Its folder must
            exist. Written atomically (a temporary file renamed over ``path``) unless the
            weights exceed 1 GiB; then the exporter writes ``path`` and ``<path>.data`` itself.
        dynamic_batch: export the batch dimension as dynamic (needs B >= 2 in ``images``).
        opset_version: ONNX opset; None for the exporter's default.
        input_names, output_names: names of the graph's inputs and outputs: a list of str as
            ``torch.onnx.export`` takes, or one str for one name (``"pixels"``).

    Returns:
        The ``torch.onnx.ONNXProgram``.

    Raises:
        ValueError: for bad arguments, checked before the export (which takes minutes on a
            ViT-B): ``images`` not (B, C, H, W), ``path`` a folder or in a folder that does not
            exist, empty or non-str names, a batch of 1 with ``dynamic_batch``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if path is not None:     # checked before the export's minutes
        if os.path.isdir(path):
            raise ValueError(f"path {os.fspath(path)} is a folder; give the .onnx file to write")
        path = Path(path)
        if not path.parent.is_dir():
            raise ValueError(f"path {path}: its folder {path.parent} does not exist; create it "
                             "first")
    input_names = _names(input_names, "input_names")
    output_names = _names(output_names, "output_names")
    if dynamic_batch and images.shape[0] < 2:
        raise ValueError("dynamic_batch needs an example batch of at least 2 images "
                         "(torch.export specialises a size of 1)")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: "
                          "pip install onnx onnxscript (onnxruntime to run the file)") from e
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    model = _unwrap_runtime(model)   # torch.export cannot trace an OptimizedModule
    program = torch.onnx.export(model, (images,), dynamo=True, input_names=input_names,
                                output_names=output_names, verbose=False, **kwargs)
    if path is not None:
        size = _initializer_bytes(program)
        if size is not None and size <= _ONE_FILE_BYTES:
            atomic_write(path, lambda tmp: program.save(os.fspath(tmp), external_data=False))
        else:   # external data is named after the file written: write path itself
            program.save(os.fspath(path))
    return program
