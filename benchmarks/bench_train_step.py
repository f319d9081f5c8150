"""The ``train_step`` section of the suite: one fine-tuning step of a ViT, every way it can be
run, eager and compiled.

Eager variants (``_suite.VARIANTS``), all from the same random-init timm model:

* ``full``: timm full fine-tuning (every parameter trained, timm's fused SDPA attention);
* ``linear_probe``: only the classifier head trained;
* ``eager_bsr``: the authors' eager BSR formulation (:class:`bsr_kernels.baselines.EagerBSR`:
  materialised attention probabilities in every block);
* ``peer_bsr``: BSR written in plain PyTorch (:mod:`benchmarks.peer_bsr`: SDPA, the CLS-row
  drop, plain autograd), the strongest thing a user could write instead of the library;
* ``bsr_autograd`` / ``bsr_lean`` / ``bsr_fast``: ``bsr_kernels.reprogram(model,
  memory_mode=...)``;
* ``bsr_lean_bf16``: ``reprogram(..., memory_mode="lean", activation_dtype=torch.bfloat16)``
  (compressed saved activations; approximate gradients).

Compiled variants (``_suite.COMPILED_VARIANTS``, unless ``--no-compile``): ``torch.compile`` of
timm full fine-tuning, of the peer and of ``reprogram`` autograd / fast / lean, and on CUDA
autograd mode under CUDA graphs (``mode="reduce-overhead"``); each is checked against its eager
form (first step's logits and gradients).

BSR settings are the defaults: blocks 3, 7, 11 + head trained, drops in blocks 3, 6, 9 at keep
rate 0.5 with the fused token.

Figures:

* **step time** (forward, cross-entropy, backward, AdamW step), timed side by side
  (``_timing.interleaved``: the variants in turn, several rounds, medians, paired ratios):
  DeiT-S at B=16 on CPU (fp32), ViT-B/16 at B=128 on CUDA (bf16 autocast, fused AdamW);
* **saved activation MiB per image** and **training GFLOPs per image**
  (:func:`bsr_kernels.profile`: distinct storages autograd keeps, parameters excluded;
  ``FlopCounterMode`` over forward + backward with the CPU SDPA kernels counted): ViT-B/16 at
  B=8, fp32 (device independent; ``--quick`` uses B=2, the figures are per image);
* **peak memory** on CUDA: ``torch.cuda.max_memory_allocated`` of a step (parameters,
  gradients, AdamW state and activations) at the timing batch, and the same above the resident
  model and batch.

The design anchors (DESIGN.md, ViT-B/16, B=8, fp32) are shown next to the measured figures.
FLOP anchors were taken without the CPU SDPA kernels counted; the ``GFLOP/img, SDPA uncounted``
column gives the full and linear-probe figures in that convention (eager BSR has no SDPA).

Usage: ``python -m benchmarks.bench_train_step [--device cpu|cuda] [--quick] [--no-compile]``
(``python -m benchmarks.bench_gpu --parts step,step-compiled`` times the same variants on a lent
GPU, each compilation under a watchdog).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import signal
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

import bsr_kernels

from ._suite import (COMPILED_VARIANTS, GIB, GRAPHED_VARIANTS, MIB, VARIANTS, SuiteConfig,
                     Target, build_variant, create_vit, digest_diff, free_memory, is_compiled,
                     is_graphed, make_step, model_label, section_main, split_variant, variant_label)
from ._timing import error_text, format_table, robust_interleaved

__all__ = ["run", "step_variants", "time_steps", "step_rows", "profile_variant",
           "fixed_memory_bytes", "sdpa_gflops", "ANCHORS", "table", "step_table", "targets",
           "best_bsr", "compiled_build_room_s", "OutOfTime"]

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


def step_variants(cfg: SuiteConfig) -> tuple[str, ...]:
    """The variants the section times: every eager one, then (``cfg.compile``) the compiled
    ones, ``+cudagraphs`` on CUDA only."""
    graphed = GRAPHED_VARIANTS if cfg.cuda else ()
    if not cfg.compile:
        return VARIANTS + graphed
    return VARIANTS + tuple(v for v in COMPILED_VARIANTS if cfg.cuda or "cudagraphs" not in v) \
        + graphed


#: Seconds a compiled step build (the compilation and the first two steps) is expected to take
#: before one has been measured in the run: ViT-B/16 forward and backward graphs compiled cold.
COMPILED_BUILD_PRIOR_S = 75.0
#: Margin on that expectation: builds of one run differ (full fine-tuning's backward is the
#: largest graph; later builds find kernels already compiled).
COMPILED_BUILD_MARGIN = 1.3


def compiled_build_room_s(slowest_s: float | None = None) -> float:
    """The time a compiled step build must have before the build deadline to be started: the
    slowest compiled build measured so far in the run (``slowest_s``; before any,
    :data:`COMPILED_BUILD_PRIOR_S`) times :data:`COMPILED_BUILD_MARGIN`. An expectation, not a
    limit: a build still running at the deadline is stopped there (:func:`time_steps`), and a
    hang is a caller's watchdog's business (``bench_gpu --compile-timeout-s``). The one place
    that rule is written (``bench_gpu`` also keeps this room for ``step-compiled``)."""
    return COMPILED_BUILD_MARGIN * (COMPILED_BUILD_PRIOR_S if slowest_s is None else slowest_s)


class OutOfTime(BaseException):
    """Raised inside a build still running at the build deadline (:func:`stopped_at`). A
    BaseException, like KeyboardInterrupt: the compiler's ``except Exception`` fallbacks must
    not swallow it."""


#: The signal that :func:`stopped_at` sends to the main thread (None: not on this platform).
STOP_SIGNAL = getattr(signal, "SIGALRM", None)


@contextlib.contextmanager
def stopped_at(when: float | None):
    """Runs the block; if it is still running at ``when`` (``time.time()``), raises
    :class:`OutOfTime` in it. A thread sends :data:`STOP_SIGNAL` to the main thread, whose
    handler raises: a wait on a compile worker pool is interrupted too (lock waits are), while
    code that holds the GIL in C++ is left at its next Python line. No ``when``, not in the
    main thread or no :data:`STOP_SIGNAL`: the block runs uninterrupted."""
    if (when is None or STOP_SIGNAL is None
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    armed = [True]
    started = time.time()

    def handler(signum, frame):
        if armed[0]:  # a signal that arrives after the block ended is dropped
            armed[0] = False
            raise OutOfTime(f"stopped at the deadline after {time.time() - started:.0f} s")

    previous = signal.signal(STOP_SIGNAL, handler)
    done = threading.Event()
    main = threading.main_thread().ident

    def fire():
        if not done.wait(max(when - time.time(), 0.0)):
            signal.pthread_kill(main, STOP_SIGNAL)

    timer = threading.Thread(target=fire, name="build deadline", daemon=True)
    timer.start()
    try:
        yield
    finally:
        try:
            armed[0] = False  # no call before it: a pending signal is not handled in between
        finally:
            done.set()
            timer.join()
            signal.signal(STOP_SIGNAL, previous)  # handles a pending signal first (dropped)


#: Seconds the timing waits for inductor's compile workers to shut down after a build was
#: stopped (:func:`shut_compile_workers`) before it starts anyway.
WORKERS_SHUTDOWN_S = 20.0


def shut_compile_workers(limit_s: float = WORKERS_SHUTDOWN_S) -> str:
    """Shuts down inductor's compile worker pools (``shutdown_compile_workers``, where this
    torch has it), so that the compilations a stopped build had handed them do not run beside
    the timing that follows. The shutdown returns when the workers have finished what they
    were given (torch 2.11), so it runs in a thread, waited for at most ``limit_s``. Returns
    what happened (for the stopped build's error), or '' where inductor was not used."""
    compile_module = sys.modules.get("torch._inductor.async_compile")
    shutdown = getattr(compile_module, "shutdown_compile_workers", None)
    if shutdown is None or not getattr(compile_module, "_pool_set", True):  # no pool started
        return ""
    done, failed = threading.Event(), []

    def run():
        try:
            shutdown()
        except Exception as e:  # noqa: BLE001 - reported in the stopped build's error
            failed.append(error_text(e))
        finally:
            done.set()

    t0 = time.perf_counter()
    threading.Thread(target=run, name="compile workers shutdown", daemon=True).start()
    if not done.wait(limit_s):
        return f"compile workers still busy after {limit_s:g} s: timings may be skewed"
    if failed:
        return f"compile workers shutdown failed: {failed[0]}"
    return f"compile workers shut down in {time.perf_counter() - t0:.0f} s"


def time_steps(cfg: SuiteConfig, variants, log=print, guard=None,
               deadline: float | None = None, build=None, build_s: float | None = None,
               report=None) -> dict:
    """Training steps of ``variants`` (:func:`_suite.split_variant` names) at
    ``cfg.time_model`` / ``cfg.time_batch``, timed side by side.

    ``build(variant, batch)`` makes a variant's ``(model, module, params, images, labels)``;
    default: :func:`_suite.build_variant` on a fresh ``cfg.time_model`` and a random batch, the
    same weights and batch for every variant (``probe_sac`` passes its own). A name with ``+``
    (``<base>+compile``) is a compiled variant of ``<base>``.

    Each variant gets its own fresh model and batch and takes two steps first (compiled variants
    compile there, inside ``guard(variant)`` when given: ``bench_gpu`` puts its watchdog there).
    On CUDA a third step follows, and the peak memory is ``max_memory_allocated`` over the
    second and third steps (a variant under CUDA graphs records its graphs in one of them: a
    replay allocates nothing; a ``+graph`` step gives its capture's peak) above what was
    allocated before the variant was built (its parameters, gradients, AdamW state and
    activations), and the same above its resident model and batch. Then all are timed in turn
    (:func:`_timing.robust_interleaved`), and after that the forward of each compiled variant's
    base (of those built) goes through ``torch._dynamo.explain`` (:func:`graph_breaks`, once per
    base). A variant that raises is left out with its error.

    With ``deadline`` (``time.time()``; the caller keeps its time for the timing after it): no
    variant is built after it, and a compiled one starts only when
    :func:`compiled_build_room_s` of the slowest compiled build so far (``build_s``: measured
    before this call, e.g. by an earlier part of the run; then each one built here) fits before
    it. A build still running at the deadline is stopped there (:func:`stopped_at`; its error
    says so), inductor's compile workers are shut down (:func:`shut_compile_workers`: what
    they were compiling for it must not run beside the timing) and the variants built are
    timed; no explain starts after it.

    ``report(partial)``, when given, is called with the result so far after each variant is
    built (or fails, or is skipped) and after the timing, so that a caller killed later keeps
    what was measured (the timings, peaks and errors so far; ``timings`` stays empty until all
    are timed: their ratios are paired within one timing).

    Returns:
        ``{"timings": {v: Timing}, "peaks": {v: {"peak_mib", "peak_gib_above_model"}},
        "digests": {v: step_digest of the first step}, "errors": {v: message},
        "build_s": {v: seconds of its build (inside ``guard``)},
        "graph_breaks": {compiled v: graph_breaks(...)}}``.
    """
    build = build or _default_build(cfg)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return _time_steps(cfg, variants, log, guard, deadline, build, build_s,
                           report or (lambda partial: None))


def _default_build(cfg: SuiteConfig):
    def build(variant, batch):  # same weights and batch for every variant
        return _variant_batch(cfg, variant, cfg.time_model, batch,
                              torch.Generator().manual_seed(0))
    return build


def step_profile(cfg: SuiteConfig, variant: str, steps: int = 3, top: int = 8,
                 build=None) -> dict:
    """Where one training step of ``variant`` spends its time (``cfg.time_model`` at
    ``cfg.time_batch``, after three warm steps):

    * ``wall_ms``: the step to completion (device synchronised before and after), median;
    * ``host_ms``: until ``step()`` returns, from an idle device, median: the time Python and
      the launches take to issue the step. When it is close to ``wall_ms`` the step is bound by
      the host, and fewer launches (fusion, ``torch.compile``, CUDA graphs) are what helps;
    * from ``torch.profiler`` over ``steps`` steps: ``ops_per_step`` (aten ops called on the
      host), ``top_host`` (:func:`host_summary`: where the host's own time goes, by event) and
      on CUDA ``kernels_per_step``, ``kernel_ms_per_step`` (the sum of the kernels'
      own device time), ``device_busy`` (that over ``wall_ms``) and the ``top`` kernels by
      device time (``name``, ``ms_per_step``, ``share``), and ``copy_share``: the share of
      kernel time in copies and dtype casts. When the profiler records no device kernel on
      CUDA (CUPTI not permitted), ``error`` says so instead (the other figures stay).

    Returns that dict, or ``{"error"}``.
    """
    from torch.profiler import ProfilerActivity, profile
    build = build or _default_build(cfg)
    sync = torch.cuda.synchronize if cfg.cuda else (lambda: None)
    try:
        _, module, params, images, labels = build(variant, cfg.time_batch)
        step = make_step(module, params, images, labels, cfg)
        for _ in range(3):
            step()
        host, wall = [], []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            sync()
            wall.append(time.perf_counter() - t0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync()
        out = dict(variant=variant, wall_ms=1e3 * statistics.median(wall),
                   host_ms=1e3 * statistics.median(host), steps_profiled=steps)
        events = prof.events()
        device = [e for e in events if _on_device(e)]
        out["ops_per_step"] = sum(1 for e in events if not _on_device(e)
                                  and e.name.startswith("aten::")) / steps
        out["top_host"] = host_summary([e for e in events if not _on_device(e)], steps, top)
        if cfg.cuda:
            out.update(kernel_summary(device, steps, out["wall_ms"], top))
        return out
    except Exception as e:  # noqa: BLE001 - reported in the results
        return dict(variant=variant, error=error_text(e))
    finally:
        free_memory(cfg.device)


def host_summary(events, steps: int, top: int = 8) -> list[dict]:
    """The ``top`` host events (profiler events, ``name`` and ``self_cpu_time_total`` in µs) by
    their own host time, summed by name: ``name``, ``ms_per_step``, ``calls_per_step``. Where a
    host-bound step spends its time: a compiled step's launches, guards, runtime wrappers and
    compiled functions (one per graph: more when it runs frame by frame) show here, not in its
    kernels."""
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        total[e.name] += float(getattr(e, "self_cpu_time_total", 0.0))
        calls[e.name] += 1
    return [dict(name=name, ms_per_step=us / 1e3 / steps, calls_per_step=calls[name] / steps)
            for name, us in total.most_common(top)]


def kernel_summary(kernels, steps: int, wall_ms: float, top: int = 8) -> dict:
    """Per-step figures of the device events ``kernels`` (profiler events, ``name`` and their
    own device time in µs) recorded over ``steps`` steps of ``wall_ms`` each: see
    :func:`step_profile`. No kernels: ``{"error"}`` saying so, not zero kernels and an idle
    GPU."""
    if not kernels:  # a CUDA step launches kernels: the profiler could not see them
        return dict(error="the profiler recorded no device kernels (CUPTI unavailable or not "
                          "permitted?): kernel figures not measured")
    per_name: dict[str, float] = {}
    for e in kernels:
        per_name[e.name] = per_name.get(e.name, 0.0) + _device_us(e)
    total = sum(per_name.values())
    kernel_ms = total / 1e3 / steps
    return dict(
        kernels_per_step=len(kernels) / steps, kernel_ms_per_step=kernel_ms,
        device_busy=kernel_ms / wall_ms,
        copy_share=sum(v for k, v in per_name.items() if _is_copy(k)) / total if total else None,
        top=[dict(name=k[:120], ms_per_step=v / 1e3 / steps, share=v / total if total else None)
             for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]])


def _on_device(event) -> bool:
    """A kernel or copy on the GPU; the device-side ranges of ``record_function`` annotations
    (``is_user_annotation``) are left out, as PyTorch's own tables do."""
    return (str(getattr(event, "device_type", "")).endswith("CUDA")
            and not getattr(event, "is_user_annotation", False))


def _device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _is_copy(kernel_name: str) -> bool:
    """Copy and dtype-cast kernels (``aten::copy_`` and ``.to()`` on CUDA)."""
    low = kernel_name.lower()
    return "copy" in low or "memcpy" in low  # copy_kernel, bfloat16_copy_kernel; Memcpy DtoD


#: dynamo's recompile limit while the section compiles: the compiled variants share the code
#: objects of timm's and bsr_kernels' modules, so their entries add up (a fast and a lean model
#: fill the default 8 of ``_LeanBlock.forward``); alone in a process each stays within 8
#: (tests/test_modes.py).
RECOMPILE_LIMIT = 64


def _time_steps(cfg, variants, log, guard, deadline, build, slowest, report) -> dict:
    res = dict(timings={}, peaks={}, digests={}, errors={}, build_s={}, graph_breaks={})
    peaks, digests, errors = res["peaks"], res["digests"], res["errors"]
    steps = {}
    compiled = [v for v in variants if is_compiled(v)]  # +graph compiles nothing
    for variant in variants:
        need = compiled_build_room_s(slowest) if variant in compiled else 0.0
        left = deadline - time.time() if deadline is not None else float("inf")
        if need > left:
            errors[variant] = ("skipped: out of time" if variant not in compiled else
                               f"skipped: out of time ({max(left, 0):.0f} s left; a compiled "
                               f"build needs {need:.0f} s)")
            report(res)
            continue
        try:
            if cfg.cuda:
                free_memory("cuda")
                base = torch.cuda.memory_allocated()
            # the stop inside the guard: the guard's own work and cleanup are not interrupted
            with guard(variant) if guard is not None else contextlib.nullcontext(), \
                    stopped_at(deadline):
                t0 = time.perf_counter()
                _, module, params, images, labels = build(variant, cfg.time_batch)
                resident = torch.cuda.memory_allocated() - base if cfg.cuda else 0
                step = make_step(module, params, images, labels, cfg, digest=True,
                                 graph=is_graphed(variant))
                step()
                if cfg.cuda:  # the peak of steps 2 and 3: see the docstring
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                step()
                res["build_s"][variant] = time.perf_counter() - t0
            if cfg.cuda:
                step()
                torch.cuda.synchronize()
                peak = getattr(step, "peak_bytes", torch.cuda.max_memory_allocated()) - base
                peaks[variant] = dict(peak_mib=peak / MIB,
                                      peak_gib_above_model=(peak - resident) / GIB)
            digests[variant] = dict(step.first)
            steps[variant] = step
            if variant in compiled:
                slowest = max(slowest or 0.0, res["build_s"][variant])
            log(f"  train_step: {variant} ready ({res['build_s'][variant]:.0f} s)")
        except OutOfTime as e:  # the variants built are still timed
            note = shut_compile_workers()  # what the build compiled must not run beside them
            errors[variant] = f"out of time: {e}" + (f"; {note}" if note else "")
            log(f"  train_step: {variant} {errors[variant]}")
        except Exception as e:  # noqa: BLE001 - reported in the results
            errors[variant] = error_text(e)
            log(f"  train_step: {variant} FAILED: {errors[variant]}")
        if variant in errors:  # what the failed build made is freed before the next one
            res["build_s"].pop(variant, None)
            module = params = images = labels = step = None
            free_memory(cfg.device)
        report(res)
    log(f"  train_step: timing {len(steps)} variants of {model_label(cfg.time_model)} at "
        f"B={cfg.time_batch}, {cfg.reps} rounds")
    res["timings"] = robust_interleaved(steps, errors, reps=cfg.reps, warmup=1,
                                        min_sample_s=0.0, device_sync=cfg.cuda)
    report(res)
    del steps
    free_memory(cfg.device)
    # last: torch._dynamo.explain resets dynamo (the compiled variants' code is then dropped)
    built = [v for v in compiled if v in digests]  # none for a variant that did not run
    by_base: dict[str, dict] = {}
    for variant in built:
        base = variant.partition("+")[0]
        if base not in by_base:
            by_base[base] = (graph_breaks(cfg, variant, build)
                             if deadline is None or time.time() < deadline
                             else dict(error="skipped: out of time"))
    res["graph_breaks"] = {v: by_base[v.partition("+")[0]] for v in built}
    return res


def graph_breaks(cfg: SuiteConfig, variant: str, build) -> dict:
    """``torch._dynamo.explain`` of the forward of ``variant``'s module (its uncompiled base from
    ``build``, see :func:`time_steps`, at batch 2, under the step's autocast): ``{"count",
    "reasons"}`` (at most 3 reasons, shortened), or ``{"error"}``. Resets dynamo: compiled
    modules recompile after it (call it when they are done)."""
    try:
        _, module, _, images, _ = build(variant.partition("+")[0], 2)
        with cfg.autocast():
            out = torch._dynamo.explain(module)(images)
        return dict(count=out.graph_break_count,
                    reasons=[str(r.reason)[:160] for r in out.break_reasons[:3]])
    except Exception as e:  # noqa: BLE001 - reported in the results
        return dict(error=error_text(e, 300))
    finally:
        free_memory(cfg.device)


def step_rows(cfg: SuiteConfig, variants, log=print, guard=None,
              deadline: float | None = None, build_s: float | None = None,
              report=None) -> list[dict]:
    """:func:`time_steps` as one row per variant: ms, img/s, speedups over timm full fine-tuning
    (eager and compiled), the eager formulation and the compiled peer (paired medians, when those
    ran), peak memory (CUDA), its build's seconds (``build_s``: a compiled one's compilation),
    and for a compiled variant how far its first step's logits and gradients are from its eager
    form's (``vs_eager``, when both ran). Timed in the phases of :func:`timing_phases` (a ratio
    is paired within its phase: a graph-breaking compiled variant has none to the compiled
    ones). ``report(rows)``, when given, gets the rows of the variants tried so far each time
    :func:`time_steps` reports."""
    done: dict[str, dict] = {}   # rows of the phases timed so far
    digests: dict = {}

    def merged(rows):   # rows of the phase running, after those already done
        by = {**{r["variant"]: r for r in rows}, **done}
        return [by[v] for v in variants if v in by]

    for phase in timing_phases(variants):
        res = time_steps(cfg, phase, log, guard, deadline, build_s=build_s,
                         report=report and (lambda partial, phase=phase: report(merged(
                             _rows(cfg, phase, partial, {**digests, **partial["digests"]})))))
        digests.update(res["digests"])
        for row in _rows(cfg, phase, res, digests):
            done.setdefault(row["variant"], row)   # a reference keeps its first phase's row
        build_s = max(filter(None, [build_s, *(s for v, s in res.get("build_s", {}).items()
                                               if is_compiled(v))]), default=None)
    return merged([])


#: Variants whose compiled form breaks its graph (compressed lean keeps the custom backward,
#: which calls ``torch.autograd.grad``; lean and fast did so too until they compiled as
#: selective checkpointing). Once such a model has compiled, its cache entry for timm's
#: ``VisionTransformer.forward`` (a graph of what comes before the break, guarded only on that)
#: also matches other ViTs, and is tried first: a one-graph model compiled earlier in the
#: process then runs frame by frame (:mod:`benchmarks.probe_compile_order`: compiled autograd
#: mode 8.6 -> 12.1 ms a step, 2 -> 12 compiled functions, after compressed lean compiled).
GRAPH_BREAKING = ("bsr_lean_bf16",)
#: Eager variants timed again beside the graph-breaking compiled ones, so that their ratios to
#: full fine-tuning and to the eager formulation are paired too.
PHASE_REFERENCES = ("full", "eager_bsr")


def timing_phases(variants, breaking_bases=GRAPH_BREAKING,
                  references=PHASE_REFERENCES) -> list[tuple[str, ...]]:
    """``variants`` in the order of their timings (:func:`step_rows`, ``probe_sac``): first
    everything but the compiled forms of ``breaking_bases`` (``<base>+<how>`` names); then
    those, built only after the first timing (so that they cannot slow the one-graph compiled
    models down while those are timed), timed beside the ``references`` among ``variants``."""
    breaking = [v for v in variants
                if is_compiled(v) and v.partition("+")[0] in breaking_bases]
    first = tuple(v for v in variants if v not in breaking)
    if not breaking:
        return [first]
    refs = tuple(v for v in references if v in variants)
    return [first, refs + tuple(breaking)] if first else [tuple(breaking)]


def _rows(cfg: SuiteConfig, variants, res: dict, digests: dict | None = None) -> list[dict]:
    """:func:`step_rows`' rows from a (partial) :func:`time_steps` result: the variants built or
    failed so far. ``digests``: the first-step digests to compare with (default ``res``'s; an
    earlier phase's eager forms included)."""
    timings, errors = res["timings"], res["errors"]
    digests = res["digests"] if digests is None else digests
    rows = []
    for variant in variants:
        if variant not in res["digests"] and variant not in errors:
            continue  # not tried yet
        t = timings.get(variant)
        row = dict(variant=variant, label=variant_label(variant),
                   step_s=t.median if t else None,
                   images_per_s=cfg.time_batch / t.median if t else None,
                   step_samples_s=list(t.samples) if t else [])
        for key, ref in (("speedup_vs_full", "full"), ("speedup_vs_eager", "eager_bsr"),
                         ("speedup_vs_full_compiled", "full+compile"),
                         ("speedup_vs_peer_compiled", "peer_bsr+compile"),
                         ("speedup_vs_peer_cudagraphs", "peer_bsr+cudagraphs")):
            row[key] = timings[ref].paired_ratio(t) if t and ref in timings else None
        row["time_vs_eager"] = (t.paired_ratio(timings["eager_bsr"])
                                if t and "eager_bsr" in timings else None)
        row["build_s"] = res.get("build_s", {}).get(variant)
        row.update(res["peaks"].get(variant, {}))
        base, how = split_variant(variant)
        if how is not None and variant in digests and base in digests:
            row["vs_eager"] = digest_diff(digests[variant], digests[base])
        if variant in res["graph_breaks"]:
            row["graph_breaks"] = res["graph_breaks"][variant]
        if variant in errors:
            row["error"] = f"step: {errors[variant]}"
        rows.append(row)
    return rows


def run(cfg: SuiteConfig, log=print) -> dict:
    """Runs the section; returns ``{"config", "rows", "targets", "notes"}``.

    A variant that raises (in its step or its profile) gets ``error`` in its row and None
    figures; the other variants are still measured and compared. Compiled variants are timed
    only (their saved memory and FLOPs are their eager form's).
    """
    t0 = time.perf_counter()
    variants = step_variants(cfg)
    rows = step_rows(cfg, variants, log)
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
    for row in rows:
        variant = row["variant"]
        prof = profiles.get(variant, {})
        row.update(saved_mib_per_image=prof.get("saved_activation_mib_per_image"),
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
        if variant in prof_errors:
            row["error"] = "; ".join(filter(None, [row.get("error"),
                                                   f"profile: {prof_errors[variant]}"]))
    config = dict(time_model=model_label(cfg.time_model), time_batch=cfg.time_batch,
                  memory_model=model_label(cfg.memory_model), memory_batch=cfg.memory_batch,
                  reps=cfg.reps, precision="bf16 autocast" if cfg.cuda else "fp32",
                  variants=list(variants),
                  optimizer="AdamW (fused)" if cfg.cuda else "AdamW",
                  bsr=dict(train_blocks="default (3, 7, 11 for 12 blocks)",
                           drop_at="default (3, 6, 9)", keep_rate=0.5, fuse_token=True))
    notes = [
        "Saved MiB/image and GFLOPs/image come from bsr_kernels.profile (fp32, "
        f"{model_label(cfg.memory_model)}, B={cfg.memory_batch}); the SDPA kernels are counted "
        "(the design's FLOP anchors left them out: see the 'SDPA uncounted' column).",
        "Step time: median of interleaved rounds; speedups are medians of per-round ratios.",
        "Compiled variants: torch.compile(module, dynamic=False) (+cudagraphs: "
        "mode='reduce-overhead'); their first two steps (the compilation) are not timed, and "
        "their first step's logits and gradients are compared with the eager form's (vs_eager: "
        "relative difference of the logits and of a random projection of every gradient).",
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


#: GPU step targets (issue 10; ViT-B/16 B=128 bf16): (name, what, op, bound, unit).
GPU_STEP_TARGETS = (
    ("GPU step: best BSR mode / compiled plain-PyTorch BSR", "speedup_vs_peer_compiled", ">=",
     1.2, "x"),
    ("GPU step: best BSR mode / timm full fine-tuning", "speedup_vs_full", ">=", 3.5, "x"),
    ("GPU step: best BSR mode / timm full fine-tuning compiled", "speedup_vs_full_compiled",
     ">=", 2.8, "x"),
)


#: How a BSR variant may run to be compared with the peers of :data:`GPU_STEP_TARGETS` (eager
#: full fine-tuning, ``full+compile``, ``peer_bsr+compile``): eagerly ('') or compiled without
#: CUDA graphs.
COMPARABLE = ("", "compile")


def best_bsr(rows: list[dict], prefix: str = "bsr_", runs=COMPARABLE) -> dict | None:
    """The fastest timed row whose variant starts with ``prefix``, among those run as ``runs``
    says (default :data:`COMPARABLE`, as the peers of :data:`GPU_STEP_TARGETS` are: eager or
    ``torch.compile``d without CUDA graphs); the compressed lean variant is left out (its
    gradients are approximate). Under CUDA graphs (``+cudagraphs``, ``+graph``) a step sheds
    its launch overhead, which the compiled peer and full fine-tuning keep: those rows stay in
    the table, beside their own peers (``peer_bsr+cudagraphs``, ``peer_bsr+graph``), and are
    compared with the peer under CUDA graphs in a target of their own
    (:data:`CUDAGRAPHS_TARGET`)."""
    timed = [r for r in rows if r["variant"].startswith(prefix) and r.get("step_s")
             and not r["variant"].startswith("bsr_lean_bf16")
             and r["variant"].partition("+")[2] in runs]
    return min(timed, key=lambda r: r["step_s"]) if timed else None


#: Like for like under CUDA graphs: the fastest BSR mode compiled with
#: ``mode="reduce-overhead"`` against the plain-PyTorch peer compiled the same way (issue 10's
#: strongest row, 13.9 ms on the H100), with the bound of the first of
#: :data:`GPU_STEP_TARGETS`. Not one of the issue's targets, which compare with the peer
#: compiled without CUDA graphs: the CUDA-graphed modes' own verdict.
CUDAGRAPHS_TARGET = ("GPU step under CUDA graphs: best BSR mode / plain-PyTorch BSR, both "
                     "torch.compile(mode='reduce-overhead')", "speedup_vs_peer_cudagraphs",
                     ">=", 1.2, "x")


def _measured(by: dict[str, dict], variant: str, key: str, where: str, *others: str) -> dict:
    """``by[variant][key]`` and ``where`` as Target keywords (value, where): where names a failure
    of the variant (or of what it is compared to)."""
    failed = [f"{v} failed: {by[v]['error']}" for v in (variant,) + others
              if v in by and "error" in by[v]]
    return dict(value=by.get(variant, {}).get(key), where="; ".join([where] + failed))


def targets(cfg: SuiteConfig, rows: list[dict]) -> list[dict]:
    """The model-layer targets (CPU) and the GPU step targets, with verdicts."""
    by = {r["variant"]: r for r in rows}
    val = functools.partial(_measured, by)
    mem_where = f"{model_label(cfg.memory_model)} B={cfg.memory_batch} fp32"
    time_where = (f"{model_label(cfg.time_model)} B={cfg.time_batch} "
                  + (f"bf16 autocast, {torch.cuda.get_device_name(0)}" if cfg.cuda
                     else "fp32 CPU"))

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
        out += gpu_step_targets([], "ViT-B/16 B=128 bf16 autocast, H100; needs a GPU run "
                                    "(--device cuda, or python -m benchmarks.bench_gpu)")
        return [t.to_dict() for t in out]
    return [t.to_dict() for t in out + gpu_step_targets(rows, time_where)]


def gpu_step_targets(rows: list[dict], where: str, memory_rows: list[dict] | None = None,
                     memory_where: str | None = None) -> list[Target]:
    """Issue 10's GPU step targets (:data:`GPU_STEP_TARGETS`, lean against the best mode, lean's
    peak memory) over ``rows`` timed in one process (their ratios are paired within it); lean's
    peak memory from ``memory_rows`` (default ``rows``, described by ``memory_where``, default
    ``where``), where eager lean ran. The suite's
    ``train_step`` section on CUDA and ``bench_gpu``'s summary both use it."""
    best, lean = best_bsr(rows), best_bsr(rows, "bsr_lean")
    best_where = lean_where = where  # no rows: nothing ran (the CPU suite's NOT MEASURED lines)
    if rows:
        best_where += f"; best: {best['variant']}" if best else "; no BSR mode ran"
        lean_where += f"; lean: {lean['variant']}" if lean else "; lean did not run"
    out = [Target(name, value=best.get(key) if best else None, where=best_where, op=op,
                  bound=bound, unit=unit) for name, key, op, bound, unit in GPU_STEP_TARGETS]
    graphed = best_bsr(rows, runs=("cudagraphs",))
    if any(r["variant"] == "peer_bsr+cudagraphs" for r in rows):
        name, key, op, bound, unit = CUDAGRAPHS_TARGET
        out.append(Target(name, value=graphed.get(key) if graphed else None, op=op, bound=bound,
                          unit=unit, where=where + (f"; best: {graphed['variant']}" if graphed
                                                    else "; no BSR mode ran under CUDA graphs")))
    lean_graphed = best_bsr(rows, "bsr_lean", runs=("cudagraphs",))
    if graphed and lean_graphed:
        out.append(Target(
            "GPU step under CUDA graphs: lean throughput / best BSR mode",
            value=statistics.median(b / v for b, v in zip(graphed["step_samples_s"],
                                                          lean_graphed["step_samples_s"])),
            where=f"{where}; lean: {lean_graphed['variant']}, best: {graphed['variant']}",
            op=">=", bound=0.85, unit="x"))
    mem = {r["variant"]: r for r in (rows if memory_rows is None else memory_rows)}
    out += [Target("GPU step: lean throughput / best BSR mode",
                   value=statistics.median(
                       b / v for b, v in zip(best["step_samples_s"], lean["step_samples_s"]))
                   if best and lean else None,
                   where=lean_where + (f", best: {best['variant']}" if best else ""), op=">=",
                   bound=0.85, unit="x"),
            Target("GPU step: lean peak memory above the resident model",
                   **_measured(mem, "bsr_lean", "peak_gib_above_model", memory_where or where),
                   op="<=", bound=1.1, unit="GiB")]
    return out


def _f(v, fmt, suffix=""):
    return "" if v is None else format(v, fmt) + suffix


def step_table(rows: list[dict]) -> str:
    """The timing columns of the rows (also ``bench_gpu``'s step table): ms, img/s, speedups,
    peak memory (CUDA), compiled-against-eager differences and the forward's graph breaks;
    empty cells: not measured."""
    cuda = any("peak_mib" in r for r in rows)
    cells = []
    for r in rows:
        ve = r.get("vs_eager")
        cells.append([r["label"] + (" (FAILED)" if "error" in r else ""),
                      _f(r["step_s"] and r["step_s"] * 1e3, ".1f"), _f(r["images_per_s"], ".1f"),
                      _f(r["speedup_vs_full"], ".2f", "x"),
                      _f(r["speedup_vs_full_compiled"], ".2f", "x"),
                      _f(r["speedup_vs_peer_compiled"], ".2f", "x"),
                      _f(r["speedup_vs_eager"], ".2f", "x")]
                     + ([_f(r.get("peak_mib"), ".0f"), _f(r.get("peak_gib_above_model"), ".2f")]
                        if cuda else [])
                     + [f"{ve['logits_rel']:.1e} / {ve['grad_proj_rel']:.1e}" if ve else "",
                        str(r.get("graph_breaks", {}).get("count", ""))])
    header = (["variant", "step ms", "img/s", "x full", "x full compiled", "x peer compiled",
               "x eager formulation"]
              + (["peak MiB", "peak GiB above model"] if cuda else [])
              + ["vs eager (logits / grads)", "graph breaks"])
    return format_table(cells, header)


def table(section: dict) -> str:
    """Markdown tables of the section: step timings (:func:`step_table`), then the profile
    figures of the eager variants (empty cells: not measured; see the notes)."""
    cells = []
    for r in section["rows"]:
        if r.get("saved_mib_per_image") is None and "+" in r["variant"]:
            continue  # compiled: timed only
        anchor = ""
        if r["anchor_saved_mib_per_image"] is not None:
            anchor = f"{r['anchor_saved_mib_per_image']} / {r['anchor_train_gflops_per_image']}"
        cells.append([r["label"] + (" (FAILED)" if "error" in r else ""),
                      _f(r["saved_mib_per_image"], ".2f"), _f(r["train_gflops_per_image"], ".1f"),
                      _f(r["train_gflops_per_image_sdpa_uncounted"], ".1f"),
                      _f(r["forward_gmacs_per_image"], ".2f"), anchor])
    header = ["variant", "saved MiB/img", "GFLOP/img", "GFLOP/img, SDPA uncounted",
              "fwd GMAC/img", "design anchor (MiB / GFLOP)"]
    return step_table(section["rows"]) + "\n\n" + format_table(cells, header)


def main(argv=None) -> None:
    section_main(__doc__, run, table, argv,
                 options=[(("--no-compile",), dict(action="store_true",
                                                  help="time the eager variants only"))],
                 config=lambda args: dict(compile=not args.no_compile))


if __name__ == "__main__":
    main()
