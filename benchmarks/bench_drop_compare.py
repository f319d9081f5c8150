"""The ``drop_tokens`` section of the suite: the drop op against every way of writing it.

Three scopes (the third, ``host``, is described below), each timed side by side
(``_timing.interleaved``: A B A B rounds, medians, and ratios the medians of per-round ratios;
on CUDA each candidate's inputs rotate over sets that the L2 cannot hold, :func:`_time`):

* ``op``: the drop alone, from x, q and k:
    - ``eager composite``: :func:`bsr_kernels.baselines.eager_drop_composite`, the authors' way:
      the full (B, H, N, N) attention probabilities, head mean, topk, gather, fused token;
    - ``bsr <backend>``: the public ``bsr_kernels.drop_tokens`` with ``backend=`` forced, for
      every backend available on the device (the Triton interpreter on CPU is left out: it is for
      testing, not timing);
    - ``no-compute floor`` (backward passes only): an autograd.Function with the op's output and
      gradient shapes that computes nothing, what an infinitely fast kernel would take there;
    - ``torch.compile(reference)``: the pure-PyTorch definition
      (:func:`bsr_kernels.ops.reference.drop_tokens`) through ``torch.compile(dynamic=True)``:
      one compilation serves every shape (compilation is not timed).
* ``attention+drop``: what a drop block needs, the attention output *and* the dropped tokens:
    - ``eager attention + composite``: one probability matrix serves ``probs @ v`` and the drop
      (the authors' block);
    - ``SDPA + CLS-row softmax``: ``F.scaled_dot_product_attention`` for the output and a
      separate CLS-row softmax, head mean, topk and gather in plain PyTorch (the reference
      definition, called directly);
    - ``SDPA + bsr drop``: SDPA plus ``bsr_kernels.drop_tokens`` (default dispatch: C++ on CPU,
      Triton on CUDA).

Passes: ``forward`` (tensors need no grad), ``fwd+bwd`` (``torch.autograd.grad`` to x and
the qkv tensor with random cotangents: q and k are views of it, as in timm, so autograd's
``UnbindBackward`` stacks grad_q, grad_k and zeros for v into one new (3, B, H, N, d) tensor for
every candidate) and, for the op alone, ``fwd+bwd leaves`` (q and k are leaf tensors of their
own: the op's forward and backward without that stack, which a model pays once for attention
anyway). Shapes: ViT-S (H=6, C=384) and ViT-B (H=12, C=768), head dim 64, N=197 (224 px) and
N=577 (384 px), several batch sizes; fp32 on CPU, bf16 on CUDA; keep_rate 0.5, fused token, one
prefix token.

Host time (scope ``host``): per-call time at a tiny shape (B=1, N=17, H=2, C=16), where the
kernels take next to nothing and what is measured is the Python and dispatch path, with inputs
that need grad: ``registered op`` (``torch.ops.bsr_kernels.drop_tokens`` called directly: the
``torch.library.custom_op`` autograd, which every call went through before the eager path, and
which tracers still get), ``bsr_kernels.drop_tokens`` (the public function: checks, backend
choice, the eager path's ``autograd.Function``) and ``backend kernel`` (the default backend's
forward, and backward, called with no autograd at all: the floor). Its "speedup vs eager"
column is against the registered op.

Bandwidth: achieved GB/s of the op's forward over the bytes that must move
(``_suite.min_bytes``: read x, the q_cls and K rows, write x_out), and its fraction of the
bound: a copy between two buffers measured in the same run on the same device (CPU or GPU; on
a GPU the table's nominal peak is reported beside it).

Usage: ``python -m benchmarks.bench_drop_compare [--device cpu|cuda] [--quick]``
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

import bsr_kernels
from bsr_kernels import _config
from bsr_kernels.baselines import _drop_from_probs, eager_drop_composite
from bsr_kernels.ops import reference
from bsr_kernels.ops.common import num_kept
from bsr_kernels.ops.dispatch import select_backend

from ._suite import SuiteConfig, Target, make_inputs, min_bytes, section_main, shown_percent
from ._timing import (Rotating, Timing, copy_gbps, error_text, format_table, l2_bytes,
                      paired_ratio, robust_interleaved, rotation_sets)

__all__ = ["run", "shapes", "op_candidates", "block_candidates", "host_candidates", "FLOOR",
           "peak_bandwidth", "backend_fn", "NOMINAL_GBPS", "HOST_SHAPE", "FRACTION_TARGET",
           "bound_cell"]

KEEP_RATE = 0.5
PREFIX = 1
SIZES = {"ViT-S": (6, 384), "ViT-B": (12, 768)}
TINY_SIZES = {"tiny": (2, 64)}

#: Nominal peak memory bandwidth (GB/s) by a substring of ``torch.cuda.get_device_name()``;
#: the first match wins, so specific names come first.
NOMINAL_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("GH200", 4000.0),
                ("H100", 3350.0), ("H200", 4800.0), ("A100-SXM4-80GB", 2039.0),
                ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0),
                ("A10", 600.0), ("V100", 900.0), ("T4", 320.0), ("RTX 4090", 1008.0))


def shapes(cfg: SuiteConfig) -> list[tuple[str, int, int, int, int]]:
    """(size name, H, C, N, B) of the op timings, in order."""
    if cfg.tiny:
        return [(s, h, c, 17, b) for s, (h, c) in TINY_SIZES.items() for b in (2, 4)]
    if cfg.cuda:
        per_n = {197: (32, 128), 577: (32, 128)} if cfg.quick else \
            {197: (8, 32, 128, 256), 577: (8, 32, 128, 256)}
    else:
        per_n = {197: (8, 32)} if cfg.quick else {197: (1, 8, 32), 577: (1, 8)}
    return [(s, h, c, n, b) for s, (h, c) in SIZES.items() for n, bs in per_n.items()
            for b in bs]


def _block_batch(cfg: SuiteConfig, n: int) -> int:
    """The one batch per (size, N) of the attention+drop scope."""
    return max(b for (_, _, _, nn_, b) in shapes(cfg) if nn_ == n)


def backend_fn(name: str) -> Callable:
    """``bsr_kernels.drop_tokens`` on backend ``name`` (its ``backend=`` argument)."""
    def fn(x, q, k):
        return bsr_kernels.drop_tokens(x, q, k, KEEP_RATE, backend=name)
    return fn


def _timed_backends(cfg: SuiteConfig) -> list[str]:
    names = bsr_kernels.available_backends(cfg.device, cfg.op_dtype)
    if not cfg.cuda and _config.triton_interpret():
        names = [n for n in names if n != "triton"]  # the interpreter is for tests, not timing
    return names


def _reference_drop(x, q, k, scale: float, n_keep: int):
    return reference.drop_tokens(x, q, k, scale, PREFIX, n_keep, True)[0]


_COMPILED: dict = {}


def _compiled_reference(cfg: SuiteConfig):
    key = cfg.device
    if key not in _COMPILED:
        import torch._dynamo.config as dcfg
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(64, getattr(dcfg, name)))
        # static shapes, one compile per shape (untimed, in the warm-up): the strongest peer;
        # dynamic=True made its forward 7-15 % slower on CPU (paired, ViT-S/B)
        _COMPILED[key] = torch.compile(_reference_drop, dynamic=False)
    return _COMPILED[key]


#: Candidate of the op scope's backward passes only: an autograd.Function with the op's output
#: and gradient shapes and layouts that computes nothing (:class:`_NoCompute`). Its time is what
#: an infinitely fast kernel would take in that pass: autograd, the allocations and, through
#: qkv, autograd's UnbindBackward stack of the gradient.
FLOOR = "no-compute floor"


class _NoCompute(torch.autograd.Function):
    """x, q, k -> an uninitialised (B, P + n_keep + 1, C) output; backward: uninitialised
    gradients laid out like x, q and k (as the backends' are)."""

    @staticmethod
    def forward(ctx, x, q, k, n_keep):
        ctx.save_for_backward(x, q, k)
        return x.new_empty(x.shape[0], PREFIX + n_keep + 1, x.shape[2])

    @staticmethod
    def backward(ctx, grad_out):
        return (*(torch.empty_like(t) for t in ctx.saved_tensors), None)


def op_candidates(cfg: SuiteConfig, scale: float, n_keep: int) -> dict[str, Callable]:
    """name -> fn(x, q, k, v) -> x_out, the eager composite first; :data:`FLOOR` last (the
    backward passes only)."""
    out: dict[str, Callable] = {
        "eager composite": lambda x, q, k, v: eager_drop_composite(
            x, q, k, KEEP_RATE, num_prefix_tokens=PREFIX)[0]}
    for name in _timed_backends(cfg):
        fn = backend_fn(name)
        out[f"bsr {name}"] = lambda x, q, k, v, fn=fn: fn(x, q, k)[0]
    if cfg.compile:
        comp = _compiled_reference(cfg)
        out["torch.compile(reference)"] = lambda x, q, k, v: comp(x, q, k, scale, n_keep)
    out[FLOOR] = lambda x, q, k, v: _NoCompute.apply(x, q, k, n_keep)
    return out


def block_candidates(cfg: SuiteConfig, scale: float, n_keep: int) -> dict[str, Callable]:
    """name -> fn(x, q, k, v) -> (attention output, x_out), eager first."""
    def eager(x, q, k, v):
        probs = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return probs @ v, _drop_from_probs(x, probs, PREFIX, n_keep, True)[0]

    def sdpa_cls(x, q, k, v):
        return F.scaled_dot_product_attention(q, k, v), _reference_drop(x, q, k, scale, n_keep)

    def sdpa_bsr(x, q, k, v):
        return (F.scaled_dot_product_attention(q, k, v),
                bsr_kernels.drop_tokens(x, q, k, KEEP_RATE, num_prefix_tokens=PREFIX)[0])

    return {"eager attention + composite": eager, "SDPA + CLS-row softmax": sdpa_cls,
            "SDPA + bsr drop": sdpa_bsr}


def peak_bandwidth(cfg: SuiteConfig) -> dict:
    """The bandwidth bound of the drop timings, in GB/s: a copy measured now on the device
    (``_timing.copy_gbps``; the design's rule), and on CUDA the nominal peak of the GPU's table
    entry, reported beside it as information."""
    nominal = name = None
    if cfg.cuda:
        name = torch.cuda.get_device_name(0)
        nominal = next((gbps for key, gbps in NOMINAL_GBPS if key in name), None)
    measured = copy_gbps(cfg.device, 1 << 24 if cfg.tiny else None)  # tiny: figures meaningless
    return dict(device=name or "cpu", nominal_gbps=nominal, copy_gbps=measured,
                bound_gbps=measured, bound_source="measured copy")


#: pass name -> what the backward differentiates to (None: forward only)
PASSES = {"forward": None, "fwd+bwd": "qkv", "fwd+bwd leaves": "leaves"}


def _inputs(make, grad: str | None) -> tuple:
    """One input set of :func:`_time`: ``(x, q, k, v, wrt)``, ``wrt`` what the backward
    differentiates to (``grad``: see :func:`_time`)."""
    x, q, k, v, qkv = make(grad is not None)
    if grad == "leaves":
        q, k, v = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
        return x, q, k, v, (x, q, k)
    return x, q, k, v, (x, qkv)


def _time(cands: dict[str, Callable], make, grad: str | None, cfg: SuiteConfig, reps: int,
          min_sample: float, errors: dict, cache_bytes: int | None = None):
    """Interleaved timings of the candidates; one that raises goes to ``errors``.

    ``grad``: None (forward only), "qkv" (grads to x and the qkv tensor that q, k, v view) or
    "leaves" (grads to x and to q and k as leaf tensors of their own).

    Each candidate's calls rotate over several input sets (``_timing.rotation_sets``), enough
    that the others' exceed ``cache_bytes`` (default: the GPU's L2 on CUDA, as the design asks;
    0 on CPU, one set: the CPU timings keep the inputs they have always been taken with, and
    the CPU target's shape, ViT-B N=197 B=32 fp32, reads 77 MB of inputs, more than most CPUs'
    last-level cache)."""
    if cfg.cuda:
        torch.cuda.empty_cache()
    if cache_bytes is None:
        cache_bytes = l2_bytes() if cfg.cuda else 0
    sets = rotation_sets(lambda: _inputs(make, grad), cache_bytes)
    if grad is None:
        fns = {name: Rotating(lambda x, q, k, v, wrt, fn=fn: fn(x, q, k, v), sets)
               for name, fn in cands.items()}
    else:
        cot_gen = torch.Generator(device=cfg.device).manual_seed(1)
        fns = {}
        for name, fn in cands.items():
            try:
                outs = fn(*sets[0][:4])
            except Exception as e:  # noqa: BLE001 - reported in the results
                errors[name] = error_text(e)
                continue
            outs = outs if isinstance(outs, tuple) else (outs,)
            cots = [torch.randn(o.shape, generator=cot_gen, device=o.device, dtype=o.dtype)
                    for o in outs]
            del outs

            def step(x, q, k, v, wrt, fn=fn, cots=cots):
                o = fn(x, q, k, v)
                return torch.autograd.grad(o if isinstance(o, tuple) else (o,), wrt, cots)
            fns[name] = Rotating(step, sets)
    return robust_interleaved(fns, errors, reps=reps, warmup=2, min_sample_s=min_sample,
                              device_sync=cfg.cuda)


def _row(t: Timing, base: Timing | None, **where) -> dict:
    """One candidate's row: ``where`` (scope, shape, pass), its median, its samples (ms per
    round, in round order: the candidates of one timing share rounds, so :func:`_vs_compiled`
    pairs them) and its speedups over ``base`` (the timing's baseline; None: NaN), the paired
    one the median of per-round ratios."""
    nan = float("nan")
    return dict(**where, candidate=t.name, median_ms=t.median * 1e3,
                samples_ms=[s * 1e3 for s in t.samples],
                speedup_vs_eager=base.median / t.median if base else nan,
                paired_speedup_vs_eager=base.paired_ratio(t) if base else nan,
                reps=len(t.samples), number=t.number)


#: (B, N, H, C) of the host-time scope: small enough that the kernels cost next to nothing.
HOST_SHAPE = (1, 17, 2, 16)


def host_candidates(cfg: SuiteConfig, grad: bool) -> dict[str, Callable]:
    """name -> fn() of the host-time scope (module doc), the registered op first. ``grad``:
    forward and backward (``torch.autograd.grad`` to x, q and k; the backend kernel's own
    backward for the floor), else the forward alone, its inputs still needing grad."""
    b, n, h, c = HOST_SHAPE
    x, q, k, _, _ = make_inputs(b, n, h, c, cfg.op_dtype, cfg.device)
    x, q, k = (t.contiguous().requires_grad_() for t in (x, q, k))
    scale, n_keep = (c // h) ** -0.5, num_kept(KEEP_RATE, n - PREFIX)
    impl = select_backend(torch.device(cfg.device), cfg.op_dtype)  # what the public call uses
    name = impl.name
    calls = {
        "registered op": lambda: torch.ops.bsr_kernels.drop_tokens(x, q, k, scale, PREFIX,
                                                                    n_keep, True, name)[0],
        "bsr_kernels.drop_tokens": lambda: bsr_kernels.drop_tokens(
            x, q, k, KEEP_RATE, num_prefix_tokens=PREFIX)[0]}
    cot = torch.randn(b, PREFIX + n_keep + 1, c, device=cfg.device, dtype=cfg.op_dtype)

    def kernel():
        with torch.no_grad():
            out, kept, scores, lse = impl.drop_forward(x, q, k, scale, PREFIX, n_keep, True)
            if grad:
                impl.drop_backward(cot, x, q, k, kept, scores, lse, scale, PREFIX)
        return out

    fns = {cand: ((lambda f=f: torch.autograd.grad(f(), (x, q, k), cot)) if grad else f)
           for cand, f in calls.items()}
    return {**fns, "backend kernel": kernel}


def host_rows(cfg: SuiteConfig, reps: int, min_sample: float, failed: list) -> list[dict]:
    """Rows of the host-time scope: forward and fwd+bwd, interleaved per pass."""
    b, n, h, c = HOST_SHAPE
    rows = []
    for pass_, grad in (("forward, inputs need grad", False), ("fwd+bwd", True)):
        errors: dict = {}
        timings = robust_interleaved(host_candidates(cfg, grad), errors, reps=reps, warmup=2,
                                     min_sample_s=min_sample, device_sync=cfg.cuda)
        failed += [dict(scope="host", size="tiny", N=n, B=b, pass_=pass_, candidate=name,
                        error=err) for name, err in errors.items()]
        base = timings.get("registered op")
        rows += [_row(t, base, scope="host", size="tiny", H=h, C=c, N=n, B=b,
                      dtype=str(cfg.op_dtype)[6:], pass_=pass_) for t in timings.values()]
    return rows


def _agreement(cfg, x, q, k, scale, n_keep) -> dict[str, float]:
    """Fraction of batch rows whose kept set equals the reference's, per backend (None: the
    backend raised)."""
    r_kept = reference.drop_tokens(x, q, k, scale, PREFIX, n_keep, True)[1]
    out = {}
    for name in _timed_backends(cfg):
        try:
            kept = backend_fn(name)(x, q, k)[1].long()
        except Exception:  # noqa: BLE001 - the timing reports the error
            out[f"bsr {name}"] = None
            continue
        out[f"bsr {name}"] = float((kept == r_kept).all(dim=1).float().mean())
    return out


def run(cfg: SuiteConfig, log=print) -> dict:
    """Runs the section. Returns ``{"config", "bandwidth", "rows", "agreement", "targets",
    "notes"}``."""
    reps = 3 if cfg.tiny else (5 if cfg.quick else 10)
    min_sample = 0.002 if cfg.tiny else (0.01 if cfg.quick else 0.05)
    if cfg.cuda:
        min_sample = 0.02
    dtype = cfg.op_dtype
    bw = peak_bandwidth(cfg)
    rows, agreement, notes, failed = [], [], [], []
    if cfg.compile:
        notes.append("torch.compile(reference) is compiled once with dynamic=True "
                     "(compilation is not timed).")
    if not cfg.cuda and "triton" in bsr_kernels.available_backends("cpu"):
        notes.append("the Triton backend on CPU is the interpreter (TRITON_INTERPRET=1): "
                     "left out of the timings.")
    t0 = time.perf_counter()
    for size, h, c, n, b in shapes(cfg):
        d = c // h
        scale = d ** -0.5
        n_keep = num_kept(KEEP_RATE, n - PREFIX)

        def make(grad, b=b, n=n, h=h, c=c):
            return make_inputs(b, n, h, c, dtype, cfg.device, grad)

        x, q, k, _, _ = make(False)
        agreement.append(dict(size=size, N=n, B=b, **_agreement(cfg, x, q, k, scale, n_keep)))
        nbytes = min_bytes(b, h, n, c, KEEP_RATE, PREFIX, dtype)
        scopes = [("op", op_candidates(cfg, scale, n_keep))]
        if b == _block_batch(cfg, n):
            scopes.append(("attention+drop", block_candidates(cfg, scale, n_keep)))
        for scope, cands in scopes:
            for pass_, grad in PASSES.items():
                if grad == "leaves" and scope != "op":
                    continue
                errors: dict = {}
                timed = {name: fn for name, fn in cands.items()
                         if grad is not None or name != FLOOR}
                timings = _time(timed, make, grad, cfg, reps, min_sample, errors)
                failed += [dict(scope=scope, size=size, N=n, B=b, pass_=pass_, candidate=name,
                                error=err) for name, err in errors.items()]
                eager = timings.get(next(iter(cands)))
                if eager is None:  # no baseline: nothing to compare against
                    continue
                for t in timings.values():
                    row = _row(t, eager, scope=scope, size=size, H=h, C=c, N=n, B=b,
                               dtype=str(dtype)[6:], pass_=pass_)
                    if scope == "op" and pass_ == "forward":
                        row["min_bytes"] = nbytes
                        row["gbps"] = nbytes / t.median / 1e9
                        if bw:
                            row["bound_fraction"] = row["gbps"] / bw["bound_gbps"]
                    rows.append(row)
        log(f"  drop_tokens {size} N={n} B={b}: done ({time.perf_counter() - t0:.0f} s)")
    rows += host_rows(cfg, reps, min_sample, failed)
    log(f"  drop_tokens host time: done ({time.perf_counter() - t0:.0f} s)")
    return dict(config=dict(keep_rate=KEEP_RATE, fuse_token=True, prefix=PREFIX,
                            dtype=str(dtype)[6:], reps=reps, min_sample_s=min_sample,
                            backends=_timed_backends(cfg)),
                bandwidth=bw, rows=rows, agreement=agreement, failed=failed,
                targets=targets(cfg, rows),
                notes=notes + [f"FAILED: {f['candidate']} ({f['scope']}, {f['size']} N={f['N']} "
                               f"B={f['B']} {f['pass_']}): {f['error']}" for f in failed])


def _default_backend_name(cfg: SuiteConfig) -> str:
    return "bsr triton" if cfg.cuda else "bsr cpp"


def _vs_compiled(rows: list[dict], pass_: str, size: str, n: int, b: int, ours: str):
    """torch.compile(reference)'s time over ours, one pass and shape, as every ratio of the
    suite: the median of per-round ratios of their samples, taken in the same rounds
    (``_timing.paired_ratio``); None if either is missing."""
    pick = {r["candidate"]: r["samples_ms"] for r in rows if r["scope"] == "op"
            and (r["pass_"], r["size"], r["N"], r["B"]) == (pass_, size, n, b)}
    if ours in pick and "torch.compile(reference)" in pick:
        return paired_ratio(pick["torch.compile(reference)"], pick[ours])
    return None


def cpu_targets(cfg: SuiteConfig, rows: list[dict]) -> list[dict]:
    """Issue 9's CPU target: the C++ drop's fwd+bwd >= 2x torch.compile(reference) at ViT-B
    N=197 B=32 fp32, q and k views of one qkv tensor (the ``fwd+bwd`` pass). The same ratio with
    q and k as leaves (``fwd+bwd leaves``) is reported beside it, as information."""
    if cfg.cuda or cfg.tiny:
        return []
    where = "ViT-B N=197 B=32 fp32 CPU, grads to x and qkv"
    if not cfg.compile:
        return [Target("CPU drop fwd+bwd speedup vs torch.compile(reference)", None, ">=", 2.0,
                       "x", f"{where}; needs torch.compile (the run had --no-compile)").to_dict()]
    value = _vs_compiled(rows, "fwd+bwd", "ViT-B", 197, 32, "bsr cpp")
    leaves = _vs_compiled(rows, "fwd+bwd leaves", "ViT-B", 197, 32, "bsr cpp")
    if leaves is not None:
        where += f"; with q, k as leaves (no UnbindBackward stack): {leaves:.2f}x"
    floor = _vs_compiled(rows, "fwd+bwd", "ViT-B", 197, 32, FLOOR)
    if floor is not None:
        where += f"; the {FLOOR} of this pass: {floor:.2f}x"
    return [Target("CPU drop fwd+bwd speedup vs torch.compile(reference)", value, ">=", 2.0, "x",
                   where).to_dict()]


def targets(cfg: SuiteConfig, rows: list[dict]) -> list[dict]:
    """The GPU targets of the drop op (ViT-B, N=197, B=128, bf16, forward), and on CPU
    :func:`cpu_targets`."""
    return cpu_targets(cfg, rows) + _gpu_targets(cfg, rows)


#: The bound of the GPU target on the drop's fraction of the bandwidth bound (>=).
FRACTION_TARGET = 0.5


def bound_cell(row: dict) -> str:
    """A row's fraction of the bandwidth bound as a table cell ("" where not measured): against
    :data:`FRACTION_TARGET` (``_suite.shown_percent``), so that no row reads "50%" below it."""
    if "bound_fraction" not in row:
        return ""
    return shown_percent(row["bound_fraction"], FRACTION_TARGET)


def _gpu_targets(cfg: SuiteConfig, rows: list[dict]) -> list[dict]:
    # the target was set on an H100; a measured value names the GPU that measured it
    where = "ViT-B N=197 B=128 bf16 forward, " + (torch.cuda.get_device_name(0) if cfg.cuda
                                                   else "H100")
    pick = [r for r in rows if r["scope"] == "op" and r["pass_"] == "forward"
            and r["size"] == "ViT-B" and r["N"] == 197 and r["B"] == 128
            and r["candidate"] == _default_backend_name(cfg)]
    if not cfg.cuda or not pick:
        why = "needs a GPU run (--device cuda)" if not cfg.cuda else "shape not run"
        return [Target("fused drop op speedup vs eager composite", None, ">=", 5.0, "x",
                       f"{where}; {why}").to_dict(),
                Target("fused drop op fraction of the bandwidth bound", None, ">=",
                       FRACTION_TARGET, "", f"{where}; {why}").to_dict()]
    r = pick[0]
    return [Target("fused drop op speedup vs eager composite", r["paired_speedup_vs_eager"],
                   ">=", 5.0, "x", where).to_dict(),
            Target("fused drop op fraction of the bandwidth bound", r.get("bound_fraction"),
                   ">=", FRACTION_TARGET, "", where).to_dict()]


def table(section: dict) -> str:
    """Markdown table of the section's rows."""
    rows = []
    for r in section["rows"]:
        rows.append((r["scope"], r["size"], r["N"], r["B"], r["pass_"], r["candidate"],
                     f"{r['median_ms']:.3f}", f"{r['paired_speedup_vs_eager']:.2f}x",
                     f"{r['gbps']:.1f}" if "gbps" in r else "", bound_cell(r)))
    return format_table(rows, ["scope", "size", "N", "B", "pass", "candidate", "median ms",
                               "speedup vs eager", "GB/s", "% of bound"])


def main(argv=None) -> None:
    section_main(__doc__, run, table, argv,
                 options=[(("--no-compile",), dict(action="store_true",
                                                  help="leave torch.compile(reference) out"))],
                 config=lambda args: dict(compile=not args.no_compile))


if __name__ == "__main__":
    main()
