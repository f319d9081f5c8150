"""The token-drop op on CPU: every available backend vs the eager composite.

Candidates, timed side by side (interleaved, medians):

* ``eager``: :func:`bsr_kernels.baselines.eager_drop_composite`, the authors' way: full (B, H, N, N)
  attention probabilities, topk, gather, fused token.
* one row per backend of ``bsr_kernels.available_backends("cpu")`` (``reference``, ``cpp``, and
  ``triton`` when ``TRITON_INTERPRET=1``), through the public ``bsr_kernels.drop_tokens`` with
  ``BSR_BACKEND`` forcing the backend.

Sizes: ViT-S (H=6, C=384) and ViT-B (H=12, C=768), head dim 64, N=197, B=32, float32,
keep_rate 0.5, fused token on. q and k are views of one qkv tensor, laid out as timm's
Attention makes them. "forward" runs on tensors that need no grad; "fwd+bwd" runs forward and
``torch.autograd.grad`` to x, q and k with a random cotangent.

Usage: ``python benchmarks/bench_drop.py [--quick] [--json PATH]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import format_table, interleaved  # noqa: E402

import bsr_kernels  # noqa: E402
from bsr_kernels.baselines import eager_drop_composite  # noqa: E402

SIZES = {"ViT-S": (6, 384), "ViT-B": (12, 768)}
KEEP_RATE = 0.5


def make_inputs(b: int, n: int, h: int, c: int, requires_grad: bool, seed: int = 0):
    """x (B, N, C) and q, k (B, H, N, C/H) as views of one qkv projection, like timm's."""
    g = torch.Generator().manual_seed(seed)
    d = c // h
    x = torch.randn(b, n, c, generator=g)
    qkv = torch.randn(b, n, 3, h, d, generator=g)
    if requires_grad:
        x.requires_grad_()
        qkv.requires_grad_()
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return x, q, k, qkv


def backend_fn(name: str) -> Callable:
    """``bsr_kernels.drop_tokens`` with ``BSR_BACKEND`` forced to ``name`` for the call."""
    def fn(x, q, k):
        old = os.environ.get("BSR_BACKEND")
        os.environ["BSR_BACKEND"] = name
        try:
            return bsr_kernels.drop_tokens(x, q, k, KEEP_RATE)
        finally:
            if old is None:
                del os.environ["BSR_BACKEND"]
            else:
                os.environ["BSR_BACKEND"] = old
    return fn


def candidates() -> dict[str, Callable]:
    """name -> drop function (x, q, k) -> (x_out, kept), eager composite first."""
    out = {"eager": lambda x, q, k: eager_drop_composite(x, q, k, KEEP_RATE)}
    for name in bsr_kernels.available_backends("cpu"):
        out[name] = backend_fn(name)
    return out


def check_agreement(fns: dict[str, Callable], x, q, k) -> None:
    """Every candidate keeps the same tokens and gives the same x_out as the reference."""
    ref_out, ref_kept = backend_fn("reference")(x, q, k)
    for name, fn in fns.items():
        out, kept = fn(x, q, k)
        if not torch.equal(kept, ref_kept):
            raise AssertionError(f"{name} keeps other tokens than the reference")
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def run(quick: bool = False, batch: int = 32, n_tokens: int = 197) -> list[dict]:
    """Runs the benchmark; returns one dict per (size, pass, candidate)."""
    reps, min_sample = (5, 0.01) if quick else (15, 0.05)
    fns = candidates()
    rows = []
    for size, (h, c) in SIZES.items():
        for pass_ in ("forward", "fwd+bwd"):
            grad = pass_ == "fwd+bwd"
            x, q, k, qkv = make_inputs(batch, n_tokens, h, c, requires_grad=grad)
            if not grad:
                check_agreement(fns, x, q, k)
            n_out = 1 + -(-(n_tokens - 1) // 2) + 1
            cot = torch.randn(batch, n_out, c, generator=torch.Generator().manual_seed(1))

            def bench(fn, x=x, q=q, k=k, qkv=qkv, grad=grad, cot=cot):
                if not grad:
                    return lambda: fn(x, q, k)

                def step():
                    out, _ = fn(x, q, k)
                    return torch.autograd.grad(out, (x, qkv), cot)
                return step

            timings = interleaved({name: bench(fn) for name, fn in fns.items()}, reps=reps,
                                  min_sample_s=min_sample)
            eager = timings["eager"]
            for name, t in timings.items():
                rows.append(dict(size=size, heads=h, dim=c, batch=batch, tokens=n_tokens,
                                 dtype="float32", pass_=pass_, candidate=name,
                                 median_ms=t.median * 1e3, vs_eager=t.median / eager.median,
                                 paired_vs_eager=t.paired_ratio(eager), reps=reps,
                                 number=t.number, threads=torch.get_num_threads()))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    print(f"drop_tokens on CPU, B=32 N=197 float32 keep_rate={KEEP_RATE} fused token, "
          f"{torch.get_num_threads()} threads, backends: "
          f"{', '.join(bsr_kernels.available_backends('cpu'))}")
    print("time/eager: ratio of medians (lower is faster); paired: median of per-round ratios\n")
    table = [(r["size"], r["pass_"], r["candidate"], f"{r['median_ms']:.3f}",
              f"{r['vs_eager']:.3f}", f"{r['paired_vs_eager']:.3f}") for r in rows]
    print(format_table(table, ["size", "pass", "candidate", "median ms", "time/eager",
                               "paired"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
