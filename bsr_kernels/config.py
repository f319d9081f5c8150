"""``BSRConfig``: every setting of a reprogrammed model, validated once, in one frozen object.

Every reprogrammed block refers to the same config object (``model.bsr_config``); whether a block
drops tokens, trains, or runs without autograd is derived from it, never stored per block.
``to_dict()`` / ``from_dict()`` give a JSON-safe form for checkpoints.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Iterable, Optional

import torch

from .ops.common import check_keep_rate

__all__ = ["BSRConfig", "MEMORY_MODES", "default_train_blocks", "default_drop_at", "check_blocks",
           "check_settings"]

#: What backward keeps and recomputes, by memory mode (all give the same gradients):
#:
#: * ``"autograd"``: plain autograd through the block body (SDPA, the fused drop op). Saves what
#:   autograd saves (LayerNorm, GELU, attention inputs and outputs, projections' inputs);
#:   recomputes nothing. Compiles best; the most memory of the three.
#: * ``"fast"``: a custom Function saves the block input and the qkv, proj and fc1 outputs;
#:   backward recomputes LayerNorm, GELU and attention, never a matmul.
#: * ``"lean"``: saves the block input only for frozen blocks (plus qkv and fc1 outputs for
#:   trained ones); backward recomputes the rest, never fc2's output. The least memory.
MEMORY_MODES = ("autograd", "fast", "lean")


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    return int(depth)


def default_train_blocks(depth: int) -> tuple[int, ...]:
    """``(round(d/3*k) - 1 for k = 1..3)``: (3, 7, 11) for 12 blocks."""
    depth = _check_depth(depth)
    return tuple(sorted({max(0, round(depth / 3 * k) - 1) for k in (1, 2, 3)}))


def default_drop_at(depth: int) -> tuple[int, ...]:
    """``(round(d/4*k) for k = 1..3)``: (3, 6, 9) for 12 blocks."""
    depth = _check_depth(depth)
    return tuple(sorted({min(depth - 1, round(depth / 4 * k)) for k in (1, 2, 3)}))


def check_blocks(name: str, value, depth: int) -> tuple[int, ...]:
    """Sorted block indices in ``0 .. depth-1``, no repeats; ValueError naming ``name``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a sequence of block indices, got {value!r}")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"{name} must hold ints, got {i!r}")
        if not 0 <= int(i) < depth:
            raise ValueError(f"{name} index {int(i)} is outside the model's blocks 0..{depth - 1}")
        out.append(int(i))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated indices: {out}")
    return tuple(sorted(out))


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64}


def check_settings(keep_rate, memory_mode, activation_dtype) -> float:
    """Checks the settings that do not depend on the model, each with a ValueError naming it
    (reprogram's contract: every bad argument is a ValueError); returns ``keep_rate`` as a
    float."""
    try:
        keep_rate = check_keep_rate(keep_rate)
    except TypeError as e:
        raise ValueError(str(e)) from None
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
    if activation_dtype is not None and activation_dtype not in _DTYPES.values():
        # the dtypes a checkpoint can name (to_dict / from_dict): a float8 one was taken by
        # reprogram and refused on loading (and clips or overflows beyond +-448 / +-57344)
        raise ValueError(f"activation_dtype must be one of "
                         f"{', '.join(f'torch.{n}' for n in _DTYPES)} or None, "
                         f"got {activation_dtype!r}")
    return keep_rate


@dataclasses.dataclass(frozen=True)
class BSRConfig:
    """The BSR settings of one model.

    Attributes:
        depth: number of blocks.
        train_blocks: blocks whose parameters train (the head always does).
        drop_at: blocks that drop tokens after attention.
        keep_rate: fraction of non-prefix tokens kept at each drop, in (0, 1].
        fuse_token: append the score-weighted sum of the dropped tokens (EViT).
        memory_mode: "autograd", "fast" or "lean" (see :data:`MEMORY_MODES`).
        train_norm: also train the final norm.
        activation_dtype: store the fast/lean saved tensors in this dtype (approximate
            gradients), or None.
        num_prefix_tokens: P, the CLS token plus register tokens.
    """

    depth: int
    train_blocks: tuple[int, ...]
    drop_at: tuple[int, ...]
    keep_rate: float = 0.5
    fuse_token: bool = True
    memory_mode: str = "lean"
    train_norm: bool = False
    activation_dtype: Optional[torch.dtype] = None
    num_prefix_tokens: int = 1

    @classmethod
    def create(cls, depth: int, num_prefix_tokens: int = 1, train_blocks=None, drop_at=None,
               keep_rate=0.5, fuse_token=True, memory_mode="lean", train_norm=False,
               activation_dtype=None) -> "BSRConfig":
        """Validates every argument (ValueError naming it) and fills the defaults for
        ``depth``."""
        train_blocks = check_blocks("train_blocks", default_train_blocks(depth)
                                    if train_blocks is None else train_blocks, depth)
        drop_at = check_blocks("drop_at", default_drop_at(depth) if drop_at is None else drop_at,
                               depth)
        keep_rate = check_settings(keep_rate, memory_mode, activation_dtype)
        if not isinstance(fuse_token, bool):
            raise ValueError(f"fuse_token must be a bool, got {fuse_token!r}")
        if not isinstance(train_norm, bool):
            raise ValueError(f"train_norm must be a bool, got {train_norm!r}")
        if (isinstance(num_prefix_tokens, bool)
                or not isinstance(num_prefix_tokens, numbers.Integral) or num_prefix_tokens < 1):
            raise ValueError(f"num_prefix_tokens must be a positive int (the CLS token plus "
                             f"register tokens), got {num_prefix_tokens!r}")
        if activation_dtype is not None and memory_mode == "autograd":
            raise ValueError(f"activation_dtype={activation_dtype} compresses what the lean and "
                             "fast backward save; memory_mode='autograd' saves what autograd "
                             "saves and would ignore it: pass memory_mode='lean' or 'fast', or "
                             "activation_dtype=None")
        return cls(depth, train_blocks, drop_at, keep_rate, fuse_token, memory_mode, train_norm,
                   activation_dtype, int(num_prefix_tokens))

    # --- what each block does, derived --------------------------------------------------------
    @property
    def first_trained(self) -> int:
        """The first trained block (``depth`` when none): blocks before it need no backward."""
        return min(self.train_blocks, default=self.depth)

    def drops(self, i: int) -> bool:
        """Whether block ``i`` drops tokens (a keep_rate of 1 drops nothing)."""
        return i in self.drop_at and self.keep_rate < 1.0

    def trains(self, i: int) -> bool:
        return i in self.train_blocks

    def without_grad(self, i: int) -> bool:
        """Whether block ``i`` runs under ``torch.no_grad()`` (before the first trained block)."""
        return i < self.first_trained

    def reprogram_kwargs(self) -> dict:
        """The arguments of :func:`bsr_kernels.reprogram` that give this config."""
        return dict(train_blocks=self.train_blocks, drop_at=self.drop_at,
                    keep_rate=self.keep_rate, fuse_token=self.fuse_token,
                    memory_mode=self.memory_mode, train_norm=self.train_norm,
                    activation_dtype=self.activation_dtype)

    # --- checkpoints -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-safe dict (lists, and the dtype by name)."""
        d = dataclasses.asdict(self)
        d["train_blocks"], d["drop_at"] = list(self.train_blocks), list(self.drop_at)
        d["activation_dtype"] = (None if self.activation_dtype is None
                                 else str(self.activation_dtype).replace("torch.", ""))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BSRConfig":
        """Inverse of :meth:`to_dict`, validated; ValueError on a malformed dict."""
        if not isinstance(d, dict):
            raise ValueError(f"a BSR config must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"depth", "train_blocks", "drop_at"} - set(d))
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"malformed BSR config: missing {missing}, unknown {unknown}")
        dtype = d.get("activation_dtype")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"activation_dtype must be one of {sorted(_DTYPES)} or None, "
                             f"got {dtype!r}")
        depth = _check_depth(d["depth"])
        kwargs = {k: v for k, v in d.items() if k not in ("depth", "activation_dtype")}
        return cls.create(depth, activation_dtype=None if dtype is None else _DTYPES[dtype],
                          **kwargs)
