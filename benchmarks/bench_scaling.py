"""The ``memory`` section of the suite: how training memory and time grow with batch and image size,
and the largest batch that fits a memory budget.

* **Saved activations vs batch**: :func:`bsr_kernels.measure.saved_activations` (distinct
  storages autograd keeps, parameters excluded) of ViT-B/16 at 224 and 384 px, for timm full
  fine-tuning, the authors' eager BSR formulation and ``reprogram`` (lean, fast, compressed),
  at a few measured batch sizes; the per-image slope is fitted through the origin (saved
  memory is proportional to the batch; the fit's largest deviation is reported).
* **Training memory vs batch, 1 to 128**: parameters + gradients of the trained parameters +
  AdamW state (2 per trained parameter) + batch x saved activations per image. On CPU this is
  an *estimate* from the measured figures (transient workspace during backward is not
  included): 128-image ViT-B batches are not allocated on a small CPU machine. On CUDA the
  step's peak ``torch.cuda.max_memory_allocated`` is measured at every batch 1, 2, 4 ... 128.
* **Largest batch within the budget** (default 4 GiB), for full fine-tuning and for BSR: the
  figure an on-device user cares about. From the estimate on CPU; on CUDA from a linear fit of
  the measured peaks, and the largest measured batch that stayed within the budget.
* **Step time vs batch and image size**: side by side (interleaved rounds, medians) for full
  fine-tuning, the eager formulation and BSR lean: DeiT-S on CPU at small batches, ViT-B/16 on
  CUDA up to B=128.

Usage: ``python -m benchmarks.bench_scaling [--device cpu|cuda] [--quick] [--budget-gib 4]``
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from bsr_kernels.measure import saved_activations

from ._suite import (GIB, MIB, VARIANT_LABELS, SuiteConfig, build_variant, create_vit,
                     cuda_peak_step, free_memory, make_step, model_label, section_main)
from ._timing import error_text, format_table, robust_interleaved
from .bench_train_step import fixed_memory_bytes

__all__ = ["run", "plan", "fit_slope", "max_batch", "table"]

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def plan(cfg: SuiteConfig) -> dict:
    """What is measured: variants, batches per image size, for memory and for time."""
    sizes = cfg.image_sizes
    if cfg.tiny:
        return dict(mem_variants=("full", "eager_bsr", "bsr_lean"),
                    mem_batches={sizes[0]: (1, 2), sizes[1]: (1,)},
                    time_variants=("full", "bsr_lean"),
                    time_batches={sizes[0]: (1, 2), sizes[1]: (1,)}, time_reps=1)
    if cfg.cuda:
        all_b = BATCHES
        return dict(mem_variants=("full", "eager_bsr", "bsr_lean", "bsr_fast", "bsr_lean_bf16"),
                    mem_batches={s: all_b for s in sizes},
                    time_variants=("full", "eager_bsr", "bsr_lean", "bsr_fast"),
                    time_batches={s: all_b for s in sizes}, time_reps=3 if cfg.quick else 5)
    if cfg.quick:
        return dict(mem_variants=("full", "eager_bsr", "bsr_lean"),
                    mem_batches={sizes[0]: (1, 2), sizes[1]: (1,)},
                    time_variants=("full", "bsr_lean"),
                    time_batches={sizes[0]: (1, 2)}, time_reps=1)
    return dict(mem_variants=("full", "eager_bsr", "bsr_lean", "bsr_fast", "bsr_lean_bf16"),
                mem_batches={sizes[0]: (1, 2, 4), sizes[1]: (1, 2)},
                time_variants=("full", "eager_bsr", "bsr_lean"),
                time_batches={sizes[0]: (1, 4, 8), sizes[1]: (1, 2)}, time_reps=2)


def fit_slope(batches, values) -> tuple[float, float]:
    """Least-squares slope through the origin, and the largest relative deviation from it."""
    slope = sum(b * v for b, v in zip(batches, values)) / sum(b * b for b in batches)
    dev = max(abs(v - slope * b) / max(slope * b, 1e-30) for b, v in zip(batches, values))
    return slope, dev


def max_batch(budget_bytes: float, fixed_bytes: float, per_image_bytes: float) -> int:
    """Largest B with ``fixed + B * per_image <= budget`` (0 when even B=1 does not fit)."""
    if per_image_bytes <= 0:
        raise ValueError(f"per_image_bytes must be > 0, got {per_image_bytes}")
    return max(0, math.floor((budget_bytes - fixed_bytes) / per_image_bytes))


def _inputs(model, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *model.patch_embed.img_size, generator=g).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    return images, labels


def _saved_bytes(cfg, module, model, batch) -> int:
    images, labels = _inputs(model, batch, cfg.device)

    def loss():
        with cfg.autocast():
            logits = module(images)
        return F.cross_entropy(logits.float(), labels)
    saved = saved_activations(loss, exclude=[model])
    return saved.bytes


def _memory(cfg: SuiteConfig, p: dict, log, t0) -> list[dict]:
    budget = cfg.budget_gib * GIB
    rows = []
    for size, batches in p["mem_batches"].items():
        for variant in p["mem_variants"]:
            try:
                rows.append(_memory_row(cfg, size, batches, variant, budget))
            except Exception as e:  # noqa: BLE001 - reported in the results
                rows.append(dict(model=model_label(cfg.memory_model), img_size=size,
                                 variant=variant, label=VARIANT_LABELS[variant],
                                 error=error_text(e)))
                log(f"  memory: {variant} {size}px FAILED: {error_text(e)}")
            free_memory(cfg.device)
            log(f"  memory: {variant} {size}px ({time.perf_counter() - t0:.0f} s)")
    return rows


def _memory_row(cfg: SuiteConfig, size: int, batches, variant: str, budget: float) -> dict:
    model = create_vit(cfg.memory_model, size, cfg.device)
    module, params = build_variant(variant, model)
    fixed = fixed_memory_bytes(model)
    saved = [_saved_bytes(cfg, module, model, b) for b in batches]
    slope, dev = fit_slope(batches, saved)
    row = dict(model=model_label(cfg.memory_model), img_size=size,
               tokens=model.patch_embed.num_patches + model.num_prefix_tokens,
               variant=variant, label=VARIANT_LABELS[variant],
               measured_batches=list(batches),
               saved_mib=[s / MIB for s in saved], saved_mib_per_image=slope / MIB,
               linear_fit_max_rel_dev=dev, fixed_mib=fixed["fixed_bytes"] / MIB,
               param_mib=fixed["param_bytes"] / MIB,
               trained_params=fixed["trained_params"],
               estimate_mib={str(b): (fixed["fixed_bytes"] + b * slope) / MIB
                             for b in BATCHES},
               max_batch_estimate=max_batch(budget, fixed["fixed_bytes"], slope))
    if cfg.cuda:
        peaks = {}
        for b in batches:
            images, labels = _inputs(model, b, cfg.device)
            step = make_step(module, params, images, labels, cfg)
            try:
                peaks[b] = cuda_peak_step(step)
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                del step
                free_memory("cuda")
        row["peak_mib"] = {str(b): v / MIB for b, v in peaks.items()}
        fit_b = [b for b in peaks if b >= 8] or list(peaks)
        if len(fit_b) >= 2:
            n = len(fit_b)
            mb = sum(fit_b) / n
            mv = sum(peaks[b] for b in fit_b) / n
            sl = (sum((b - mb) * (peaks[b] - mv) for b in fit_b)
                  / sum((b - mb) ** 2 for b in fit_b))
            row["peak_fit_mib"] = dict(intercept=(mv - sl * mb) / MIB, per_image=sl / MIB)
            row["max_batch_peak_fit"] = max_batch(budget, mv - sl * mb, sl)
        within = [b for b, v in peaks.items() if v <= budget]
        row["max_measured_batch_within_budget"] = max(within) if within else 0
    return row


def _time(cfg: SuiteConfig, p: dict, log, t0) -> list[dict]:
    rows = []
    for size, batches in p["time_batches"].items():
        for b in batches:
            steps = {}
            for variant in p["time_variants"]:
                model = create_vit(cfg.time_model, size, cfg.device)
                module, params = build_variant(variant, model)
                images, labels = _inputs(model, b, cfg.device)
                steps[variant] = make_step(module, params, images, labels, cfg)
            errors: dict = {}
            timings = robust_interleaved(steps, errors, reps=p["time_reps"], warmup=1,
                                         min_sample_s=0.0 if not cfg.cuda else 0.05,
                                         device_sync=cfg.cuda)
            full = timings.get("full")
            for variant in p["time_variants"]:
                t = timings.get(variant)
                row = dict(model=model_label(cfg.time_model), img_size=size, batch=b,
                           variant=variant, label=VARIANT_LABELS[variant],
                           step_s=t.median if t else None,
                           images_per_s=b / t.median if t else None,
                           speedup_vs_full=full.paired_ratio(t) if t and full else None,
                           reps=len(t.samples) if t else 0)
                if variant in errors:
                    row["error"] = errors[variant]
                rows.append(row)
            del steps, timings
            free_memory(cfg.device)
            log(f"  memory: step time {size}px B={b} ({time.perf_counter() - t0:.0f} s)")
    return rows


def run(cfg: SuiteConfig, log=print) -> dict:
    """Runs the section; returns ``{"config", "saved", "time", "max_batch", "notes"}``."""
    t0 = time.perf_counter()
    p = plan(cfg)
    saved = _memory(cfg, p, log, t0)
    times = _time(cfg, p, log, t0)
    fits = []
    for r in saved:
        fits.append(dict(img_size=r["img_size"], variant=r["variant"], label=r["label"],
                         budget_gib=cfg.budget_gib, max_batch_estimate=r.get("max_batch_estimate"),
                         max_batch_peak_fit=r.get("max_batch_peak_fit"),
                         max_measured_batch_within_budget=r.get(
                             "max_measured_batch_within_budget")))
    notes = [
        "Training memory = parameters + gradients of trained parameters + AdamW state "
        "(2 per trained parameter) + batch x saved activations per image"
        + (" (estimate: transient backward workspace not included; measured on CPU)."
           if not cfg.cuda else "; the peak columns are measured with "
           "torch.cuda.max_memory_allocated."),
        f"Saved activations: {'bf16 autocast' if cfg.cuda else 'fp32'}, "
        f"{model_label(cfg.memory_model)}; per-image slope fitted through the origin.",
    ] + [f"{r['variant']} {r['img_size']}px{' B=' + str(r['batch']) if 'batch' in r else ''} "
         f"FAILED: {r['error']}" for r in saved + times if "error" in r]
    config = dict(memory_model=model_label(cfg.memory_model),
                  time_model=model_label(cfg.time_model), budget_gib=cfg.budget_gib,
                  precision="bf16 autocast" if cfg.cuda else "fp32",
                  plan={k: ({str(s): list(b) for s, b in v.items()} if isinstance(v, dict)
                            else v) for k, v in p.items()})
    return dict(config=config, saved=saved, time=times, max_batch=fits, notes=notes)


def table(section: dict) -> str:
    """Markdown tables: memory per variant and size, batch that fits, step time vs batch."""
    out = []
    budget = section["config"]["budget_gib"]
    has_peak = any("peak_mib" in r for r in section["saved"])
    header_base = ["px", "tokens", "variant", "saved MiB/img", "fit dev",
                   "params+grads+AdamW MiB", "est. MiB @B=8", "est. MiB @B=128",
                   f"max batch in {budget:g} GiB (est.)"]
    rows = []
    for r in section["saved"]:
        if "error" in r:
            rows.append([r["img_size"], "", r["label"] + " (FAILED)"] + [""] * (
                len(header_base) - 3 + (2 if has_peak else 0)))
            continue
        rows.append([r["img_size"], r["tokens"], r["label"], f"{r['saved_mib_per_image']:.2f}",
                     f"{100 * r['linear_fit_max_rel_dev']:.1f}%", f"{r['fixed_mib']:.0f}",
                     f"{r['estimate_mib']['8']:.0f}", f"{r['estimate_mib']['128']:.0f}",
                     r["max_batch_estimate"]]
                    + ([r.get("max_batch_peak_fit", ""),
                        r.get("max_measured_batch_within_budget", "")] if has_peak else []))
    header = list(header_base)
    if has_peak:
        header += ["max batch (peak fit)", "max measured batch within budget"]
    out.append(format_table(rows, header))
    if has_peak:
        rows = []
        for r in section["saved"]:
            for b, v in r.get("peak_mib", {}).items():
                rows.append([r["img_size"], r["label"], b, f"{v:.0f}"])
        out.append(format_table(rows, ["px", "variant", "batch", "peak MiB"]))
    if section["time"]:
        def f(v, fmt, suffix=""):
            return "" if v is None else format(v, fmt) + suffix
        rows = [[r["model"], r["img_size"], r["batch"],
                 r["label"] + (" (FAILED)" if "error" in r else ""),
                 f(r["step_s"] and r["step_s"] * 1e3, ".0f"), f(r["images_per_s"], ".2f"),
                 f(r["speedup_vs_full"], ".2f", "x")] for r in section["time"]]
        out.append(format_table(rows, ["model", "px", "batch", "variant", "step ms", "img/s",
                                       "speedup vs full"]))
    return "\n\n".join(out)


def main(argv=None) -> None:
    section_main(__doc__, run, table, argv,
                 options=[(("--budget-gib",), dict(type=float, default=4.0,
                                                  help="memory budget of the largest batch"))],
                 config=lambda args: dict(budget_gib=args.budget_gib))


if __name__ == "__main__":
    main()
