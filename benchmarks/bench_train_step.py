"""The ``train_step`` section of the suite: one fine-tuning step of a ViT, six ways.

Variants (see ``_suite.VARIANTS``), all from the same random-init timm model:

* ``full``: timm full fine-tuning (every parameter trained, timm's fused SDPA attention);
* ``linear_probe``: only the classifier head trained;
* ``eager_bsr``: the authors' eager BSR formulation (:class:`bsr_kernels.baselines.EagerBSR`:
  materialised attention probabilities in every block);
* ``bsr_lean`` / ``bsr_fast``: ``bsr_kernels.reprogram(model, memory_mode="lean" | "fast")``;
* ``bsr_lean_bf16``: ``reprogram(..., memory_mode="lean", activation_dtype=torch.bfloat16)``
  (compressed saved activations; approximate gradients).

BSR settings are the defaults: blocks 3, 7, 11 + head trained, drops in blocks 3, 6, 9 at keep
rate 0.5 with the fused token.

Figures:

* **step time** (forward, cross-entropy, backward, AdamW step), timed side by side
  (``_timing.interleaved``: the six variants in turn, several rounds, medians, paired ratios):
  DeiT-S at B=16 on CPU (fp32), ViT-B/16 at B=128 on CUDA (bf16 autocast);
* **saved activation MiB per image** and **training GFLOPs per image**
  (:func:`bsr_kernels.profile`: distinct storages autograd keeps, parameters excluded;
  ``FlopCounterMode`` over forward + backward with the CPU SDPA kernels counted): ViT-B/16 at
  B=8, fp32 (device independent; ``--quick`` uses B=2, the figures are per image);
* **peak memory** on CUDA: ``torch.cuda.max_memory_allocated`` of a step (parameters,
  gradients, AdamW state and activations) at the timing batch.

The design anchors (DESIGN.md, ViT-B/16, B=8, fp32) are shown next to the measured figures.
FLOP anchors were taken without the CPU SDPA kernels counted; the ``GFLOP/img, SDPA uncounted``
column gives the full and linear-probe figures in that convention (eager BSR has no SDPA).

Usage: ``python -m benchmarks.bench_train_step [--device cpu|cuda] [--quick]``
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import bsr_kernels

from ._suite import (MIB, VARIANT_LABELS, VARIANTS, SuiteConfig, Target, build_variant,
                     create_vit, cuda_peak_step, free_memory, make_step, model_label,
                     section_main)
from ._timing import error_text, format_table, robust_interleaved

__all__ = ["run", "profile_variant", "fixed_memory_bytes", "sdpa_gflops", "ANCHORS", "table",
           "targets"]

#: The DESIGN.md anchors (the one table), ViT-B/16 B=8 fp32 CPU: variant -> (saved MiB/img,
#: train GFLOP/img, forward GMAC/img).
ANCHORS = {"full": (112.7, 100.9, 16.85), "eager_bsr": (25.3, 29.6, 8.82)}


def fixed_memory_bytes(model: torch.nn.Module) -> dict:
    """Parameter, gradient and AdamW-state bytes of ``model`` as set up (trained params grad)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return dict(param_bytes=total, grad_bytes=trained, optimizer_bytes=2 * trained,
                fixed_bytes=total + 3 * trained, trained_params=sum(
                    p.numel() for p in model.parameters() if p.requires_grad))


def sdpa_gflops(model: torch.nn.Module, variant: str, batch: int) -> float | None:
    """GFLOPs that ``bsr_kernels.profile`` counts for the CPU SDPA kernels of a plain timm model
    (full: forward + backward of every block; linear probe: forward only); None otherwise."""
    if variant not in ("full", "linear_probe"):
        return None
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    total = 0
    for blk in model.blocks:
        a = blk.attn
        shape = (batch, a.num_heads, n, a.head_dim)
        total += sdpa_flop_count(shape, shape, shape)
        if variant == "full":
            total += sdpa_backward_flop_count(shape, shape, shape, shape)
    return total / 1e9


def _variant_batch(cfg: SuiteConfig, variant: str, model_name: str, batch: int,
                   g: torch.Generator, img_size: int | None = None):
    """A fresh model set up as ``variant`` and a random batch for it, on ``cfg.device``.

    Returns:
        ``(model, module, params, images, labels)`` (see ``build_variant``).
    """
    model = create_vit(model_name, img_size, cfg.device)
    module, params = build_variant(variant, model)
    images = torch.randn(batch, 3, *model.patch_embed.img_size, generator=g).to(cfg.device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g).to(cfg.device)
    return model, module, params, images, labels


def profile_variant(cfg: SuiteConfig, variant: str, model_name: str, batch: int,
                    img_size: int | None = None) -> dict:
    """``bsr_kernels.profile`` of one variant on a fresh model (fp32), per image."""
    model, module, _, images, labels = _variant_batch(
        cfg, variant, model_name, batch, torch.Generator().manual_seed(0), img_size)
    prof = bsr_kernels.profile(module, images, labels)
    if variant == "eager_bsr" and module.last is not None:
        prof["tokens_per_block"] = list(module.last.tokens_in)
    sdpa = sdpa_gflops(model, variant, batch)
    prof["train_gflops_per_image_sdpa_uncounted"] = (
        prof["train_gflops_per_image"] - sdpa / batch if sdpa is not None else
        (prof["train_gflops_per_image"] if variant == "eager_bsr" else None))
    prof.update(fixed_memory_bytes(model))
    del module, model
    free_memory(cfg.device)
    return prof


def compressed_gradient_error(cfg: SuiteConfig) -> dict:
    """How far the compressed lean backward (bf16 saved activations) is from the exact one:
    gradients of one fp32 cross-entropy step of the memory model, same weights and batch.

    Returns:
        ``{"global_rel_err", "max_param_rel_err", "max_param"}``: ||g~ - g|| / ||g|| over all
        trained parameters together, and the worst single parameter.
    """
    grads = {}
    for variant in ("bsr_lean", "bsr_lean_bf16"):
        model, module, _, images, labels = _variant_batch(
            cfg, variant, cfg.memory_model, cfg.memory_batch, torch.Generator().manual_seed(0))
        F.cross_entropy(module(images), labels).backward()
        grads[variant] = {n: p.grad.detach().double() for n, p in model.named_parameters()
                          if p.grad is not None}
        del module, model
        free_memory(cfg.device)
    exact, approx = grads["bsr_lean"], grads["bsr_lean_bf16"]
    errs = {n: ((approx[n] - exact[n]).norm() / exact[n].norm().clamp_min(1e-30)).item()
            for n in exact}
    worst = max(errs, key=errs.get)
    total = (sum((approx[n] - exact[n]).square().sum() for n in exact)
             / sum(exact[n].square().sum() for n in exact)).sqrt().item()
    return dict(global_rel_err=total, max_param_rel_err=errs[worst], max_param=worst)


def _setup_step(cfg: SuiteConfig, variant: str, g: torch.Generator):
    _, module, params, images, labels = _variant_batch(cfg, variant, cfg.time_model,
                                                       cfg.time_batch, g)
    return make_step(module, params, images, labels, cfg)


def _time_variants(cfg: SuiteConfig, log) -> tuple[dict, dict, dict]:
    """Step timings of the variants (side by side), their CUDA peak memory, and the errors of
    variants that could not run (they are left out, the others still compared)."""
    g = torch.Generator().manual_seed(0)
    peaks, steps, errors = {}, {}, {}
    for variant in VARIANTS:
        step = None
        try:
            step = _setup_step(cfg, variant, g)
            if cfg.cuda:  # measured alone, before the other variants' models exist
                peaks[variant] = cuda_peak_step(step)
            else:
                steps[variant] = step
        except Exception as e:  # noqa: BLE001 - reported in the results
            errors[variant] = error_text(e)
            log(f"  train_step: {variant} FAILED: {errors[variant]}")
        if cfg.cuda:
            del step
            free_memory("cuda")
    if cfg.cuda:
        for variant in VARIANTS:  # rebuild for the side-by-side timing
            if variant not in errors:
                steps[variant] = _setup_step(cfg, variant, g)
    log(f"  train_step: timing {len(steps)} variants of {model_label(cfg.time_model)} at "
        f"B={cfg.time_batch}, {cfg.reps} rounds")
    timings = robust_interleaved(steps, errors, reps=cfg.reps, warmup=1, min_sample_s=0.0,
                                 device_sync=cfg.cuda)
    del steps
    free_memory(cfg.device)
    return timings, peaks, errors


def run(cfg: SuiteConfig, log=print) -> dict:
    """Runs the section; returns ``{"config", "rows", "targets", "notes"}``.

    A variant that raises (in its step or its profile) gets ``error`` in its row and None
    figures; the other variants are still measured and compared.
    """
    t0 = time.perf_counter()
    timings, peaks, errors = _time_variants(cfg, log)
    log(f"  train_step: timed ({time.perf_counter() - t0:.0f} s)")
    profiles, prof_errors = {}, {}
    for variant in VARIANTS:
        try:
            profiles[variant] = profile_variant(cfg, variant, cfg.memory_model,
                                                cfg.memory_batch)
        except Exception as e:  # noqa: BLE001 - reported in the results
            prof_errors[variant] = error_text(e)
            free_memory(cfg.device)
        log(f"  train_step: profiled {variant} ({time.perf_counter() - t0:.0f} s)"
            + (f" FAILED: {prof_errors[variant]}" if variant in prof_errors else ""))
    try:
        compressed = compressed_gradient_error(cfg)
    except Exception as e:  # noqa: BLE001 - reported in the results
        compressed = dict(error=error_text(e))
    log(f"  train_step: compressed gradient error ({time.perf_counter() - t0:.0f} s)")
    full, eager = timings.get("full"), timings.get("eager_bsr")
    rows = []
    for variant in VARIANTS:
        t, prof = timings.get(variant), profiles.get(variant, {})
        row = dict(variant=variant, label=VARIANT_LABELS[variant],
                   step_s=t.median if t else None,
                   images_per_s=cfg.time_batch / t.median if t else None,
                   speedup_vs_full=full.paired_ratio(t) if t and full else None,
                   speedup_vs_eager=eager.paired_ratio(t) if t and eager else None,
                   time_vs_eager=t.paired_ratio(eager) if t and eager else None,
                   step_samples_s=list(t.samples) if t else [],
                   saved_mib_per_image=prof.get("saved_activation_mib_per_image"),
                   train_gflops_per_image=prof.get("train_gflops_per_image"),
                   train_gflops_per_image_sdpa_uncounted=prof.get(
                       "train_gflops_per_image_sdpa_uncounted"),
                   forward_gmacs_per_image=prof.get("forward_gmacs_per_image"),
                   tokens_per_block=prof.get("tokens_per_block"),
                   trained_params=prof.get("trained_params"), param_bytes=prof.get("param_bytes"),
                   fixed_bytes=prof.get("fixed_bytes"),
                   anchor_saved_mib_per_image=None, anchor_train_gflops_per_image=None,
                   anchor_forward_gmacs_per_image=None)
        if variant in ANCHORS and cfg.memory_model == "vit_b16":
            (row["anchor_saved_mib_per_image"], row["anchor_train_gflops_per_image"],
             row["anchor_forward_gmacs_per_image"]) = ANCHORS[variant]
        if cfg.cuda:
            row["peak_mib"] = peaks[variant] / MIB if variant in peaks else None
        errs = [f"step: {errors[variant]}"] if variant in errors else []
        errs += [f"profile: {prof_errors[variant]}"] if variant in prof_errors else []
        if errs:
            row["error"] = "; ".join(errs)
        rows.append(row)
    config = dict(time_model=model_label(cfg.time_model), time_batch=cfg.time_batch,
                  memory_model=model_label(cfg.memory_model), memory_batch=cfg.memory_batch,
                  reps=cfg.reps, precision="bf16 autocast" if cfg.cuda else "fp32",
                  optimizer="AdamW", bsr=dict(train_blocks="default (3, 7, 11 for 12 blocks)",
                                              drop_at="default (3, 6, 9)", keep_rate=0.5,
                                              fuse_token=True))
    notes = [
        "Saved MiB/image and GFLOPs/image come from bsr_kernels.profile (fp32, "
        f"{model_label(cfg.memory_model)}, B={cfg.memory_batch}); the SDPA kernels are counted "
        "(the design's FLOP anchors left them out: see the 'SDPA uncounted' column).",
        "Step time: median of interleaved rounds; speedups are medians of per-round ratios.",
        ("Compressed lean (bf16 saved activations) against exact lean, same "
         f"{model_label(cfg.memory_model)} weights and batch (fp32): gradient relative error "
         f"{compressed['global_rel_err']:.2e} over all trained parameters, worst parameter "
         f"{compressed['max_param_rel_err']:.2e} ({compressed['max_param']})."
         if "error" not in compressed else
         f"Compressed gradient error not measured: {compressed['error']}"),
    ] + [f"{r['variant']} FAILED ({r['error']}): its figures are missing."
         for r in rows if "error" in r]
    return dict(config=config, rows=rows, targets=targets(cfg, rows), notes=notes,
                compressed_gradient_error=compressed)


def targets(cfg: SuiteConfig, rows: list[dict]) -> list[dict]:
    """The model-layer targets (CPU) and the GPU throughput targets, with verdicts."""
    by = {r["variant"]: r for r in rows}
    mem_where = f"{model_label(cfg.memory_model)} B={cfg.memory_batch} fp32"
    time_where = (f"{model_label(cfg.time_model)} B={cfg.time_batch} "
                  + (f"bf16 autocast, {torch.cuda.get_device_name(0)}" if cfg.cuda
                     else "fp32 CPU"))

    def val(variant, key, where, *others):
        """value and where (as Target keywords): where names a failure of the variant (or of what it is compared to)."""
        failed = [f"{v} failed: {by[v]['error']}" for v in (variant,) + others
                  if "error" in by[v]]
        return dict(value=by[variant].get(key), where="; ".join([where] + failed))

    out = [
        Target("saved activations, lean", **val("bsr_lean", "saved_mib_per_image", mem_where),
               op="<=", bound=10, unit="MiB/img"),
        Target("saved activations, fast", **val("bsr_fast", "saved_mib_per_image", mem_where),
               op="<=", bound=20, unit="MiB/img"),
        Target("saved activations, lean + bf16 (compressed)",
               **val("bsr_lean_bf16", "saved_mib_per_image", mem_where), op="<=", bound=6,
               unit="MiB/img"),
        Target("training FLOPs, lean",
               **val("bsr_lean", "train_gflops_per_image", mem_where + ", SDPA counted"),
               op="<=", bound=36, unit="GFLOP/img"),
    ]
    if not cfg.cuda:
        out += [
            Target("CPU step: lean speedup over timm full fine-tuning",
                   **val("bsr_lean", "speedup_vs_full", time_where, "full"), op=">=", bound=3.3,
                   unit="x"),
            Target("CPU step: lean time / eager formulation time",
                   **val("bsr_lean", "time_vs_eager", time_where, "eager_bsr"), op="<=",
                   bound=1.15, unit="x"),
            Target("CPU step: fast time / eager formulation time",
                   **val("bsr_fast", "time_vs_eager", time_where, "eager_bsr"), op="<=",
                   bound=1.0, unit="x"),
        ]
    for mode in ("bsr_lean", "bsr_fast"):
        if cfg.cuda:
            full = val(mode, "speedup_vs_full", time_where, "full")
            eager = val(mode, "speedup_vs_eager", time_where, "eager_bsr")
        else:
            full = eager = dict(value=None, where="ViT-B/16 B=128 bf16 autocast, H100; needs "
                                                  "a GPU run (--device cuda)")
        out += [Target(f"GPU step: {mode[4:]} throughput / timm full fine-tuning", **full,
                       op=">=", bound=3.5, unit="x"),
                Target(f"GPU step: {mode[4:]} throughput / eager formulation", **eager,
                       op=">=", bound=1.3, unit="x")]
    return [t.to_dict() for t in out]


def table(section: dict) -> str:
    """Markdown table of the section (empty cells: not measured; see the notes)."""
    has_peak = any("peak_mib" in r for r in section["rows"])

    def f(v, fmt, suffix=""):
        return "" if v is None else format(v, fmt) + suffix

    rows = []
    for r in section["rows"]:
        anchor = ""
        if r["anchor_saved_mib_per_image"] is not None:
            anchor = f"{r['anchor_saved_mib_per_image']} / {r['anchor_train_gflops_per_image']}"
        rows.append([r["label"] + (" (FAILED)" if "error" in r else ""),
                     f(r["step_s"] and r["step_s"] * 1e3, ".0f"), f(r["images_per_s"], ".1f"),
                     f(r["speedup_vs_full"], ".2f", "x"), f(r["speedup_vs_eager"], ".2f", "x"),
                     f(r["saved_mib_per_image"], ".2f"), f(r["train_gflops_per_image"], ".1f"),
                     f(r["train_gflops_per_image_sdpa_uncounted"], ".1f"),
                     f(r["forward_gmacs_per_image"], ".2f"), anchor]
                    + ([f(r.get("peak_mib"), ".0f")] if has_peak else []))
    header = ["variant", "step ms", "img/s", "speedup vs full", "speedup vs eager",
              "saved MiB/img", "GFLOP/img", "GFLOP/img, SDPA uncounted", "fwd GMAC/img",
              "design anchor (MiB / GFLOP)"] + (["peak MiB"] if has_peak else [])
    return format_table(rows, header)


def main(argv=None) -> None:
    section_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
