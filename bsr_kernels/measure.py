"""Device-independent cost measurements: saved activation bytes and FLOPs.

These implement the measurement rules of the design document:

* **Saved activation memory**: the distinct storages that autograd keeps for backward during one
  forward pass, seen through :func:`torch.autograd.graph.saved_tensors_hooks`, excluding parameter
  (and buffer) storages. A storage counts once however many saved tensors view it (q, k and v of
  one ``qkv`` projection are one storage). A saved tensor counts only while the graph still holds
  it when the forward returns; intermediate graphs that died during the forward are not counted.
  Tensors that a custom ``autograd.Function`` stores as plain ``ctx`` attributes instead of
  ``ctx.save_for_backward`` bypass the hooks and are invisible here: save through
  ``save_for_backward`` to be measured honestly.
* **FLOPs**: :class:`torch.utils.flop_counter.FlopCounterMode` over forward plus backward. Note that
  stock ``FlopCounterMode`` has no formula for the CPU flash-attention kernel that
  ``F.scaled_dot_product_attention`` uses on CPU (``aten._scaled_dot_product_flash_attention_for_cpu``),
  so attention matmuls of SDPA models are not counted on CPU by default. The design anchors
  (ViT-B/16 full fine-tuning forward 16.85 GMAC) are taken that way. Pass ``count_cpu_sdpa=True`` to
  count them with torch's own SDPA formulas (4·B·H·N·N·d forward; backward 2.5 times that, as
  torch counts the CUDA flash/efficient kernels, which recompute Q·K^T).

Nothing here imports the rest of ``bsr_kernels``, so any layer of the library may use it.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = [
    "SavedActivations",
    "FlopCounts",
    "saved_activations",
    "count_flops",
    "MIB",
]

#: Bytes in one MiB.
MIB = float(1 << 20)


@dataclasses.dataclass(frozen=True)
class SavedActivations:
    """What autograd kept for backward during one forward.

    Attributes:
        bytes: total bytes of the distinct non-parameter storages that were saved.
        num_storages: how many distinct storages that is.
        num_saved: how many tensors were packed (several may share one storage).
        output: the forward's return value (kept so the caller may run backward).
    """

    bytes: int
    num_storages: int
    num_saved: int
    output: Any = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def mib(self) -> float:
        """Total in MiB."""
        return self.bytes / MIB

    def mib_per_image(self, batch_size: int) -> float:
        """MiB per image of a batch of ``batch_size`` images."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        return self.bytes / MIB / batch_size


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, or storage-less tensors
        return None
    return str(t.device), st.data_ptr()


def _excluded_keys(exclude: Iterable) -> set:
    keys = set()
    for item in exclude:
        tensors = (list(item.parameters()) + list(item.buffers())
                   if isinstance(item, nn.Module) else [item])
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"exclude must hold nn.Modules or tensors, got {type(t).__name__}")
            key = _storage_key(t)
            if key is not None:
                keys.add(key)
    return keys


class _Saved:
    """What the pack hook hands to autograd: a weak-referenceable holder of one saved tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_activations(fn: Callable[[], Any], exclude: Iterable = ()) -> SavedActivations:
    """Runs ``fn()`` once and measures the storages autograd saved for backward.

    Args:
        fn: the forward pass, no arguments (e.g. ``lambda: loss_fn(model(images), labels)``).
            Its return value must hold the graph (it is kept alive until counting is done and
            returned in ``.output``).
        exclude: nn.Modules (all their parameters and buffers) and/or tensors whose storages do
            not count; pass the model.

    Returns:
        :class:`SavedActivations`.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    excluded = _excluded_keys(exclude)
    holders: list[weakref.ref] = []
    num_saved = 0

    def pack(t: torch.Tensor) -> _Saved:
        nonlocal num_saved
        num_saved += 1
        holder = _Saved(t)
        holders.append(weakref.ref(holder))
        return holder

    def unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        output = fn()
    # A holder is alive exactly while a live graph node keeps it (the tensor inside may be alive
    # for other reasons, e.g. an input the caller holds). All live holders' storages are alive at
    # once, so their data pointers tell storages apart.
    sizes: dict[tuple[str, int], int] = {}
    for ref in holders:
        holder = ref()
        if holder is None:
            continue
        key = _storage_key(holder.tensor)
        if key is None or key in excluded:
            continue
        sizes[key] = holder.tensor.untyped_storage().nbytes()
    return SavedActivations(bytes=sum(sizes.values()), num_storages=len(sizes),
                            num_saved=num_saved, output=output)


@dataclasses.dataclass(frozen=True)
class FlopCounts:
    """FLOPs counted by FlopCounterMode (a multiply-add is 2 FLOPs).

    Attributes:
        forward: FLOPs of the forward pass.
        backward: FLOPs of the backward pass (0 when it was not run).
        by_op: total FLOPs per aten op (forward + backward).
    """

    forward: int
    backward: int
    by_op: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        """forward + backward."""
        return self.forward + self.backward

    @property
    def forward_macs(self) -> float:
        """Forward multiply-adds (forward FLOPs / 2)."""
        return self.forward / 2


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                            out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_mapping(count_cpu_sdpa: bool) -> dict:
    if not count_cpu_sdpa:
        return {}
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            _cpu_sdpa_backward_flop
    return mapping


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: counts everything under "Global".

    The stock tracker hooks every module and breaks on a nested ``torch.autograd.grad`` inside a
    custom backward (as the memory-lean BSR backward does); per-module counts are not needed here.
    """

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(forward: Callable[[], torch.Tensor], backward: bool = True,
                count_cpu_sdpa: bool = False) -> FlopCounts:
    """Counts the FLOPs of ``forward()`` and, optionally, of ``.backward()`` on its result.

    Args:
        forward: no-argument callable returning a scalar loss (or any tensor; a non-scalar is
            summed before backward).
        backward: also run and count the backward pass.
        count_cpu_sdpa: add formulas for the CPU SDPA kernels that stock FlopCounterMode ignores
            (see the module docstring). Off by default, as in the design anchors.

    Returns:
        :class:`FlopCounts`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping(count_cpu_sdpa))
    counter.mod_tracker = _GlobalOnly()
    with counter:
        out = forward()
        fwd = counter.get_total_flops()
        if backward:
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise ValueError("backward=True needs forward() to return a tensor that "
                                 "requires grad")
            (out if out.dim() == 0 else out.sum()).backward()
    total = counter.get_total_flops()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCounts(forward=fwd, backward=total - fwd if backward else 0, by_op=by_op)
