"""Reports of ``bsr-finetune``: the printed table, ``summary.json``, the per-epoch
``summary.csv`` and the PNG figure. Every file is written atomically, JSON strictly (a NaN
becomes null), through :mod:`bsr_kernels.checkpoint`."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..checkpoint import atomic_write, write_json
from ..summary import draw_kept, kept_masks

__all__ = ["format_table", "write_summary", "write_history_csv", "draw_report",
           "HISTORY_COLUMNS"]

#: Columns of ``summary.csv``, one row per method and epoch.
HISTORY_COLUMNS = ("method", "epoch", "train_loss", "test_loss", "accuracy", "lr")

_LABELS = {"full": "full fine-tuning", "linear": "linear probe", "bitfit": "BitFit (bias)",
           "bsr": "BSR"}
_COLORS = {"full": "#4c72b0", "linear": "#8c8c8c", "bitfit": "#dd8452", "bsr": "#55a868"}


def _fmt(value, spec: str, missing: str = "-", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec) + unit


def format_table(results: dict) -> str:
    """A plain-text table, one row per method.

    Args:
        results: ``{method: record}``; a record holds ``accuracy`` (0-1),
            ``saved_activation_mib_per_image``, ``train_gflops_per_image``, ``step_time_s``
            and, when full fine-tuning ran alongside, ``step_time_vs_full``.

    Returns:
        The table, lines joined by newlines.
    """
    head = ["method", "accuracy", "saved MiB/img", "train GFLOP/img", "step time",
            "vs full", "trained params"]
    rows = []
    for name, r in results.items():
        mode = r.get("memory_mode") if name == "bsr" else None   # its saved memory depends on it
        rows.append([
            _LABELS.get(name, name) + (f" ({mode})" if mode else ""),
            _fmt(None if r.get("accuracy") is None else 100 * r["accuracy"], ".1f", "-", " %"),
            _fmt(r.get("saved_activation_mib_per_image"), ".3f"),
            _fmt(r.get("train_gflops_per_image"), ".4f"),
            _fmt(None if r.get("step_time_s") is None else 1e3 * r["step_time_s"], ".1f", "-",
                 " ms"),
            _fmt(r.get("step_time_vs_full"), ".2f", "-", "x"),
            _fmt(r.get("trainable_params"), ",d"),
        ])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_summary(path: os.PathLike, results: dict, meta: Optional[dict] = None) -> Path:
    """Writes ``{"methods": results, **meta}`` as strict JSON (NaN becomes null), atomically.

    Returns:
        The path written.
    """
    return write_json(path, {"methods": results, **(meta or {})})


def write_history_csv(path: os.PathLike, histories: dict) -> Path:
    """Writes ``summary.csv``: one row per method and epoch (:data:`HISTORY_COLUMNS`),
    atomically.

    Args:
        path: the CSV file.
        histories: ``{method: [per-epoch dict, ...]}`` as in ``fit``'s ``history``.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HISTORY_COLUMNS)
    for method, history in histories.items():
        for h in history:
            row = [method] + [h.get(k) for k in HISTORY_COLUMNS[1:]]
            w.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v))
                        else v for v in row])
    return atomic_write(path, buf.getvalue())


def draw_report(path: os.PathLike, results: dict, images: Optional[torch.Tensor] = None,
                kept: Optional[Sequence[torch.Tensor]] = None, patch_size: int = 1,
                drop_at: Sequence[int] = (), title: str = "") -> Path:
    """Draws bars (accuracy, saved memory, training FLOPs, step time per method), the loss and
    accuracy curves over epochs (from each record's ``history``, when there are 2 or more
    epochs) and, when given, the tokens BSR keeps after each drop stage over sample images.

    Args:
        path: PNG file to write.
        results: ``{method: record}`` as in :func:`format_table`.
        images: (B, 3, H, W) sample images in [0, 1] (already un-normalised).
        kept: :func:`bsr_kernels.kept_patches` of those images.
        patch_size: side of a patch in pixels.
        drop_at: block index of each drop stage (for the column titles).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(results)
    metrics = [("accuracy", "test accuracy (%)", 100.0),
               ("saved_activation_mib_per_image", "saved activations (MiB / image)", 1.0),
               ("train_gflops_per_image", "training GFLOPs / image", 1.0),
               ("step_time_vs_full", "step time (x full fine-tuning)", 1.0)]
    metrics = [m for m in metrics if any(results[k].get(m[0]) is not None for k in methods)]
    show_kept = images is not None and kept is not None and len(kept) > 0
    n_img = images.shape[0] if show_kept else 0
    n_cols = max(len(metrics), (len(kept) + 1) if show_kept else 0)
    curves = [("train_loss", "train loss per epoch"), ("test_loss", "test loss per epoch"),
              ("accuracy", "test accuracy (%) per epoch")]
    show_curves = any(len(results[m].get("history") or []) > 1 for m in methods)
    n_cols = max(n_cols, len(curves) if show_curves else 0)
    first_img = 1 + show_curves
    n_rows = first_img + n_img
    fig = plt.figure(figsize=(3.2 * n_cols, 3.0 + 2.6 * show_curves + 1.9 * n_img),
                     constrained_layout=True)
    gs = fig.add_gridspec(n_rows, n_cols,
                          height_ratios=[1.6] + [1.4] * show_curves + [1.0] * n_img)
    for i, (key, label, scale) in enumerate(metrics):
        ax = fig.add_subplot(gs[0, i])
        vals = [(results[m].get(key) or 0.0) * scale for m in methods]
        bars = ax.bar(range(len(methods)), vals, color=[_COLORS.get(m, "#999") for m in methods])
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(label, fontsize=10)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.15)
    if show_curves:   # loss and accuracy curves from each method's per-epoch history
        for i, (key, label) in enumerate(curves):
            ax = fig.add_subplot(gs[1, i])
            for m in methods:
                hist = [h for h in results[m].get("history") or []
                        if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
                if hist:
                    scale = 100.0 if key == "accuracy" else 1.0
                    ax.plot([h["epoch"] for h in hist], [scale * h[key] for h in hist],
                            marker=".", color=_COLORS.get(m, "#999"), label=m)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if i == 0:
                ax.legend(fontsize=7)
    if show_kept:
        pics = draw_kept(images, kept, patch_size)        # (stages, B, H, W, 3), dropped shaded
        masks = kept_masks(kept, (images.shape[2] // patch_size, images.shape[3] // patch_size))
        for r in range(n_img):
            img = images[r].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
            ax = fig.add_subplot(gs[first_img + r, 0])
            ax.imshow(img, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title("input", fontsize=10)
            for s in range(masks.shape[0]):
                ax = fig.add_subplot(gs[first_img + r, 1 + s])
                ax.imshow(pics[s, r].numpy(), interpolation="nearest")
                ax.set_axis_off()
                if r == 0:
                    where = f" (block {drop_at[s]})" if s < len(drop_at) else ""
                    ax.set_title(f"kept after drop {s + 1}{where}: {int(masks[s, r].sum())}",
                                 fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
