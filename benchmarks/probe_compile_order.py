"""Probe: whether a model compiled later in a process slows down one compiled before it.

dynamo keeps its compiled entries per code object, and with nn.Module inlining an entry of
timm's ``VisionTransformer.forward`` can match any ViT. A model that breaks its graph inside its
blocks leaves an entry guarded only on what precedes the break; that entry matches the other
ViTs and is tried first, so a one-graph model compiled before it then runs frame by frame. On
2026-11-27 compiled lean and fast did that (their custom backward calls
``torch.autograd.grad``); they now compile as selective checkpointing, in one graph, and only
compressed lean (``bsr_lean_bf16``) keeps the custom backward under ``torch.compile``.

The probe compiles ``--first`` (a ``train_step`` variant name, e.g. ``bsr_autograd+compile``),
times its training step and counts the compiled functions one step runs; then compiles each of
``--then`` in turn and measures ``--first`` again after each. One graph each way is two compiled
functions a step (forward and backward); frame by frame is more.

Usage: ``python -m benchmarks.probe_compile_order [--full-size] [--first V] [--then V,V]
[--json PATH]``.
"""
from __future__ import annotations

import argparse
import json

import torch

from ._suite import SuiteConfig, doc_summary, is_compiled, make_step
from ._timing import interleaved

__all__ = ["run", "compiled_functions_per_step"]


def compiled_functions_per_step(step) -> int:
    """How many compiled functions (forward and backward graphs) one call of ``step`` runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events()
               if e.name in ("CompiledFunction", "CompiledFunctionBackward"))


def run(cfg: SuiteConfig, first: str, then, reps: int = 7, log=print) -> dict:
    """``first``'s step time (median ms, :func:`_timing.interleaved`) and compiled functions per
    step, before and after each of ``then`` is compiled (and its own step time)."""
    from .bench_train_step import _default_build
    for v in (first, *then):
        if not is_compiled(v):
            raise ValueError(f"variants must be compiled (+compile / +cudagraphs), got {v!r}")
    build = _default_build(cfg)
    steps = {}

    def make(variant):
        _, module, params, images, labels = build(variant, cfg.time_batch)
        steps[variant] = make_step(module, params, images, labels, cfg)
        for _ in range(2):   # compiles
            steps[variant]()

    def measure(label):
        ms = interleaved({first: steps[first]}, reps=reps)[first].median * 1e3
        rec = dict(after=label, first_ms=ms,
                   first_compiled_functions=compiled_functions_per_step(steps[first]))
        log(json.dumps(rec))
        return rec

    make(first)
    out = {"model": cfg.time_model, "batch": cfg.time_batch, "first": first,
           "rounds": [measure(None)], "then_ms": {}}
    for v in then:
        make(v)
        out["then_ms"][v] = interleaved({v: steps[v]}, reps=reps)[v].median * 1e3
        out["rounds"].append(measure(v))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=doc_summary(__doc__))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--full-size", action="store_true",
                    help="the train_step section's model and batch (CPU: DeiT-S B=16; CUDA: "
                         "ViT-B/16 B=128) instead of its tiny ViT, where the host dominates")
    ap.add_argument("--first", default="bsr_autograd+compile")
    ap.add_argument("--then", default="bsr_lean+compile,bsr_fast+compile,bsr_lean_bf16+compile")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SuiteConfig(device=args.device, tiny=not args.full_size)
    res = run(cfg, args.first, [v for v in args.then.split(",") if v])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
