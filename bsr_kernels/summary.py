"""Helpers users would otherwise write: what a model trains (:func:`trainable_summary`) and which
patches BSR keeps, drawn over the images (:func:`draw_kept`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.utils import unwrap_model

from .checkpoint import atomic_write
from .config_access import bsr_config_dict

__all__ = ["TrainableSummary", "trainable_summary", "kept_masks", "draw_kept"]


@dataclass
class TrainableSummary:
    """Trainable parameters of a model (as PEFT's ``print_trainable_parameters``).

    Attributes:
        trainable: parameters with ``requires_grad``.
        total: all parameters.
        groups: ``{group: (trainable, total)}`` per top-level part, blocks one by one
            (``"blocks.3"``, ``"head"``, ``"patch_embed"``...), in model order; under a
            compiled or DDP wrapper, the wrapped model's; in a model holding the ViT (a
            :class:`~bsr_kernels.MultiTaskViT`), its parts by their full name (``"vit.blocks.3"``).
        bsr: the BSR settings of a reprogrammed model, None for a plain one.
    """

    trainable: int
    total: int
    groups: dict = field(default_factory=dict)
    bsr: Optional[dict] = None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        line = (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.trainable_percent:.4f}")
        trained = [g for g, (t, _) in self.groups.items() if t]
        if trained:
            line += "\ntrained: " + ", ".join(
                g if t == n else f"{g} ({t:,} of {n:,})"
                for g, (t, n) in self.groups.items() if t)
        if self.bsr is not None:
            b = self.bsr
            line += (f"\nBSR: drops tokens in blocks {tuple(b['drop_at'])} "
                     f"(keep_rate {b['keep_rate']}, fuse_token {b['fuse_token']}), "
                     f"memory_mode {b['memory_mode']!r}")
        return line


def _root(names: Sequence[str]) -> str:
    """The prefix under which the model's ``blocks.<i>`` are (``"vit."`` in a
    :class:`~bsr_kernels.MultiTaskViT`, ``"1."`` in an ``nn.Sequential``), or "". Blocks under
    several prefixes (the stages of a ConvNeXt or Swin: ``stages.0.blocks.0``,
    ``stages.1.blocks.0``) are no ViT's: those models group by stage."""
    prefixes = set()
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i] == "blocks" and parts[i + 1].isdigit():
                prefixes.add(".".join(parts[:i]) + "." if i else "")
                break
    return prefixes.pop() if len(prefixes) == 1 else ""


def _group(name: str, root: str = "") -> str:
    """The part of the model ``name`` belongs to: a block (``blocks.3``), another top-level
    part of the ViT at ``root`` (``head``, ``patch_embed``, ``cls_token``), or a numbered part
    outside it (``heads.0``)."""
    if root and name.startswith(root):
        return root + _group(name[len(root):])
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():      # blocks.3.attn.qkv.weight -> blocks.3
        return ".".join(parts[:2])
    return parts[0] if len(parts) > 1 else name     # head.weight -> head; cls_token stays


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Counts trainable and total parameters, per part of the model.

    ``print(bsr_kernels.trainable_summary(model))`` prints PEFT's line
    (``trainable params: ... || all params: ... || trainable%: ...``), the trained parts and,
    for a reprogrammed model, its BSR settings. Shared parameters are counted once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # compiled, DDP or DataParallel, in any nesting: the wrapped model's names and settings
    model = unwrap_model(model)
    groups: dict[str, list[int]] = {}
    trainable = total = 0
    named = list(model.named_parameters())   # named_parameters skips shared duplicates
    root = _root([n for n, _ in named])
    for name, p in named:
        g = groups.setdefault(_group(name, root), [0, 0])
        n = p.numel()
        g[1] += n
        total += n
        if p.requires_grad:
            g[0] += n
            trainable += n
    return TrainableSummary(trainable, total, {k: tuple(v) for k, v in groups.items()},
                            bsr_config_dict(model))


def kept_masks(kept: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Boolean patch masks of the tokens kept after each drop stage.

    Args:
        kept: :func:`bsr_kernels.kept_patches` output: one (B, n_keep) int64 tensor per stage of
            original patch indices (row-major; -1 marks a fused token, which is no patch).
        grid: (rows, cols) of the patch grid.

    Returns:
        (stages, B, rows, cols) bool.
    """
    rows, cols = grid
    out = []
    for idx in kept:
        m = torch.zeros(idx.shape[0], rows * cols + 1, dtype=torch.bool)
        m.scatter_(1, torch.where(idx < 0, rows * cols, idx).cpu(), True)
        out.append(m[:, :-1].view(-1, rows, cols))
    return torch.stack(out) if out else torch.zeros(0, 0, rows, cols, dtype=torch.bool)


def draw_kept(images: torch.Tensor, kept: Sequence[torch.Tensor], patch_size,
              path: Optional[os.PathLike] = None, color: Sequence[float] = (0.2, 0.2, 0.35),
              strength: float = 0.85, titles: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Shades the dropped patches of each drop stage over the images.

    Typical use::

        kept = bsr_kernels.kept_patches(model, images)          # normalised model input
        pics = bsr_kernels.draw_kept(raw_images, kept, model.patch_embed.patch_size,
                                     path="kept.png")           # raw_images in [0, 1]

    Args:
        images: (B, 3, H, W) images in [0, 1] (un-normalised; values outside are clamped, so
            pass the images before the model's normalisation), H and W multiples of the patch.
        kept: :func:`bsr_kernels.kept_patches` of those images.
        patch_size: side of a patch in pixels (an int or an (h, w) pair).
        path: also write a PNG grid there, atomically (a row per image: the input, then one
            picture per stage; another suffix matplotlib knows, ``.svg`` or ``.pdf``, picks that
            format); needs matplotlib (the ``app`` extra), and leaves its backend and pyplot's
            figures alone.
        color: RGB in [0, 1] (3 values) that dropped patches are blended towards.
        strength: blend weight of ``color`` on dropped patches, in [0, 1].
        titles: column titles after "input" for the PNG, one per stage.

    Returns:
        (stages, B, H, W, 3) float in [0, 1]: image b after stage s, dropped patches shaded.
        ``stages`` is 0 when the model drops nothing (``keep_rate=1``: ``kept`` is empty).

    Raises:
        ValueError: for images not (B, 3, H, W), ``patch_size``, ``color`` or ``strength`` out
            of their ranges,
            or ``kept`` that does not fit the images: another batch size, patch indices
            beyond the patch grid (a ``patch_size`` too large, or ``kept`` of other images), or
            negative ones other than -1. A ``patch_size`` too small is not seen: its grid
            holds the indices, and the shading is then wrong.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    pair = (patch_size, patch_size) if not isinstance(patch_size, (tuple, list)) \
        else tuple(patch_size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
        raise ValueError(f"patch_size must be a positive int or an (h, w) pair of them, got "
                         f"{patch_size!r}")
    ph, pw = pair
    b, _, h, w = images.shape
    if h % ph or w % pw:
        raise ValueError(f"images of {h}x{w} px are not a whole number of {ph}x{pw} patches")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    rgb = _rgb(color)
    rows, cols = h // ph, w // pw
    for s, idx in enumerate(kept):
        if idx.dim() != 2 or idx.shape[0] != b:
            raise ValueError(f"kept[{s}] must be (B={b}, n_keep), got {tuple(idx.shape)}")
        if idx.numel() and int(idx.max()) >= rows * cols:
            raise ValueError(f"kept[{s}] holds patch index {int(idx.max())}, beyond the "
                             f"{rows}x{cols} grid of {h}x{w} px images in {ph}x{pw} patches: "
                             f"is patch_size {patch_size!r} the model's, and was kept computed "
                             "from these images?")
        if idx.numel() and int(idx.min()) < -1:
            raise ValueError(f"kept[{s}] holds index {int(idx.min())}: patch indices are >= 0, "
                             "and -1 marks the fused token (kept_patches' output)")
    img = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1)   # (B, H, W, 3)
    if len(kept):
        masks = kept_masks(kept, (rows, cols))                           # (S, B, rows, cols)
        masks = masks.repeat_interleave(ph, 2).repeat_interleave(pw, 3)  # (S, B, H, W)
    else:                                       # no drop stage: nothing to shade
        masks = torch.zeros(0, b, h, w, dtype=torch.bool)
    shade = img * (1 - strength) + strength * torch.tensor(rgb, dtype=torch.float32)
    out = torch.where(masks.unsqueeze(-1), img.unsqueeze(0), shade.unsqueeze(0))
    if path is not None:
        _save_grid(Path(path), img, out, masks, titles)
    return out


def _rgb(color) -> list:
    """``color`` as 3 floats in [0, 1], or a ValueError naming it."""
    try:
        rgb = None if isinstance(color, str) else [float(c) for c in color]
    except (TypeError, ValueError):
        rgb = None
    if rgb is None or len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise ValueError(f"color must be 3 values (RGB) in [0, 1], got {color!r}")
    return rgb


def _save_grid(path: Path, img: torch.Tensor, pics: torch.Tensor, masks: torch.Tensor,
               titles: Optional[Sequence[str]]) -> None:
    # A bare Figure, not pyplot: the user's backend and pyplot's open figures stay as they were.
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("draw_kept(path=...) needs matplotlib: pip install "
                          "'bsr_kernels[app]' (or use the returned tensor)") from e
    stages, b = pics.shape[:2]
    fig = Figure(figsize=(2.0 * (stages + 1), 2.0 * b), constrained_layout=True)
    try:
        axes = fig.subplots(b, stages + 1, squeeze=False)
        for r in range(b):
            axes[r, 0].imshow(img[r].numpy(), interpolation="nearest")
            for s in range(stages):
                axes[r, s + 1].imshow(pics[s, r].numpy(), interpolation="nearest")
            for ax in axes[r]:
                ax.set_axis_off()
        axes[0, 0].set_title("input", fontsize=9)
        ph_pw = masks.shape[2] * masks.shape[3]
        for s in range(stages):
            kept_px = int(masks[s, 0].sum())
            name = titles[s] if titles and s < len(titles) else f"after drop {s + 1}"
            axes[0, s + 1].set_title(f"{name}: {100 * kept_px / ph_pw:.0f}% kept", fontsize=9)
        # The temporary file's name has no image suffix: the format comes from path's.
        fmt = path.suffix[1:].lower() or matplotlib.rcParams["savefig.format"]
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))
    finally:
        fig.clear()
