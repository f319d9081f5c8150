"""The fused Triton token drop on a GPU vs the eager composite, with achieved bandwidth.

Default problem: ViT-B/16 at 224 px, B=128, H=12, N=197, C=768 (head dim 64), bfloat16,
keep_rate 0.5, fused token on. q and k are views of one qkv tensor, as timm's Attention makes them.

Candidates (timed with ``triton.testing.do_bench``, interleaved A B A B over ``rounds`` rounds,
median of the per-round medians, as DESIGN.md asks for ratios):

* ``triton kernel``: ``TritonBackend().drop_forward``, the one fused launch (plus output
  allocation);
* ``triton op``: the public ``bsr_kernels.drop_tokens`` with ``BSR_BACKEND=triton`` (adds the
  custom-op dispatch and argument checks);
* ``eager``: :func:`bsr_kernels.baselines.eager_drop_composite`, the authors' way: the full
  (B, H, N, N) attention probabilities, topk, gather, fused token.

Bandwidth is reported against the bytes that must move: read x (B, N, C), read the CLS query rows
(B, H, d) and the key rows (B, H, N, d), write x_out (B, P + n_keep + 1, C). At the default sizes
that is about 97 MB (DESIGN.md: ~32 us at 3 TB/s; the aim is within 2x).

Only runs where CUDA is available; otherwise prints "no CUDA device" and returns None.

Usage: ``python benchmarks/bench_triton_drop.py [--batch 128] [--dtype bfloat16] [--sweep]
[--backward] [--json PATH]``
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from typing import Callable

import torch

__all__ = ["bench_triton", "min_bytes", "make_inputs"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def min_bytes(b: int, h: int, n: int, c: int, n_keep: int, p: int, fused: bool,
              dtype: torch.dtype) -> int:
    """Bytes a token drop must move: read x, q_cls and K rows, write x_out."""
    es = torch.empty((), dtype=dtype).element_size()
    d = c // h
    read = b * n * c + b * h * d + b * h * n * d
    write = b * (p + n_keep + int(fused)) * c
    return (read + write) * es


def make_inputs(b: int, n: int, h: int, c: int, dtype: torch.dtype, device: str = "cuda",
                requires_grad: bool = False, seed: int = 0):
    """x (B, N, C) and q, k (B, H, N, C/H) as views of one qkv projection, like timm's.

    With ``requires_grad`` x and the qkv tensor (``q._base``) are leaves that need grad.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g).to(device=device, dtype=dtype)
    qkv = torch.randn(b, n, 3, h, c // h, generator=g).to(device=device, dtype=dtype)
    if requires_grad:
        x.requires_grad_()
        qkv.requires_grad_()
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return x, q, k


def _interleaved_do_bench(fns: dict[str, Callable], rounds: int, rep_ms: int) -> dict:
    """name -> median over rounds of do_bench's median (ms), rounds alternating the candidates."""
    from triton.testing import do_bench

    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"))
    return {name: statistics.median(v) for name, v in per.items()}


def bench_triton(batch: int = 128, heads: int = 12, dim: int = 768, n_tokens: int = 197,
                 dtype: torch.dtype = torch.bfloat16, keep_rate: float = 0.5, prefix: int = 1,
                 sweep: bool = False, backward: bool = False, rounds: int = 5,
                 rep_ms: int = 50) -> dict | None:
    """Times the fused Triton drop against the eager composite on the current CUDA device.

    Args:
        batch, heads, dim, n_tokens: B, H, C, N (head dim C / H).
        dtype: dtype of x, q and k.
        keep_rate: fraction of the N - P candidates kept.
        prefix: P, prefix tokens.
        sweep: also try launch parameters of the Triton kernel (warps, tile sizes) and report
            each; the best setting is left in ``triton_backend.LAUNCH``.
        backward: also time forward + backward (grad to x and qkv) of the public op vs eager.
        rounds: interleaved rounds; each gives one do_bench median per candidate.
        rep_ms: do_bench's ``rep`` (ms of repetitions per measurement).

    Returns:
        A dict of results (times in microseconds, GB/s, the kept-set agreement with the
        reference backend), or None without a CUDA device.
    """
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device: the compiled Triton kernels need a GPU; nothing "
              "was timed. (On CPU, TRITON_INTERPRET=1 runs them in the interpreter, which is for "
              "testing, not timing.)")
        return None
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        print("bench_triton: TRITON_INTERPRET is set; unset it to time the compiled kernels.")
        return None

    import bsr_kernels
    from bsr_kernels.baselines import eager_drop_composite
    from bsr_kernels.ops import reference
    from bsr_kernels.ops import triton_backend as tb
    from bsr_kernels.ops.common import num_kept

    h, c, n, p = heads, dim, n_tokens, prefix
    m = n - p
    n_keep = num_kept(keep_rate, m)
    fused = n_keep < m
    scale = (c // h) ** -0.5
    x, q, k = make_inputs(batch, n, h, c, dtype)
    backend = tb.TritonBackend()
    nbytes = min_bytes(batch, h, n, c, n_keep, p, fused, dtype)

    # agreement with the reference (fp32 scores) before timing anything
    x_out, kept, scores, _ = backend.drop_forward(x, q, k, scale, p, n_keep, True)
    r_out, r_kept, r_scores, _ = reference.drop_tokens(x, q, k, scale, p, n_keep, True)
    rows_differ = int((kept.long() != r_kept).any(dim=1).sum())
    score_err = float((scores - r_scores).abs().max())

    def op():
        os.environ["BSR_BACKEND"] = "triton"
        try:
            return bsr_kernels.drop_tokens(x, q, k, keep_rate, num_prefix_tokens=p)
        finally:
            del os.environ["BSR_BACKEND"]

    fns = {
        "triton kernel": lambda: backend.drop_forward(x, q, k, scale, p, n_keep, True),
        "triton op": op,
        "eager": lambda: eager_drop_composite(x, q, k, keep_rate, num_prefix_tokens=p),
    }
    sweep_rows = []
    if sweep:
        base = dict(tb.LAUNCH)
        best = (float("inf"), base)
        for warps, tile, bc in itertools.product((4, 8, 16), (2048, 4096, 8192), (128, 256, 512)):
            tb.LAUNCH.update(fwd_num_warps=warps, tile_elems=tile, max_block_c=bc)
            ms = _interleaved_do_bench({"k": fns["triton kernel"]}, 1, rep_ms)["k"]
            sweep_rows.append(dict(fwd_num_warps=warps, tile_elems=tile, max_block_c=bc,
                                   us=ms * 1e3, gbps=nbytes / (ms * 1e-3) / 1e9))
            if ms < best[0]:
                best = (ms, dict(tb.LAUNCH))
        tb.LAUNCH.clear()
        tb.LAUNCH.update(best[1])
    times = _interleaved_do_bench(fns, rounds, rep_ms)
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": dict(B=batch, H=h, N=n, C=c, P=p, n_keep=n_keep, dtype=str(dtype)),
        "min_bytes": nbytes,
        "launch": dict(tb.LAUNCH),
        "rows_with_other_kept_set_than_reference": rows_differ,
        "max_score_err_vs_reference": score_err,
        "us": {name: ms * 1e3 for name, ms in times.items()},
        "gbps": {name: nbytes / (ms * 1e-3) / 1e9 for name, ms in times.items()},
        "speedup_vs_eager": {name: times["eager"] / ms for name, ms in times.items()},
        "sweep": sweep_rows,
    }
    if backward:
        xg, qg, kg = make_inputs(batch, n, h, c, dtype, requires_grad=True)
        go = torch.randn_like(x_out)

        def fwd_bwd(fn):
            def run():
                out = fn(xg, qg, kg)[0]
                torch.autograd.grad(out, (xg, qg._base), go)
            return run

        def op_g(a, b_, c_):
            os.environ["BSR_BACKEND"] = "triton"
            try:
                return bsr_kernels.drop_tokens(a, b_, c_, keep_rate, num_prefix_tokens=p)
            finally:
                del os.environ["BSR_BACKEND"]

        bt = _interleaved_do_bench(
            {"triton op fwd+bwd": fwd_bwd(op_g),
             "eager fwd+bwd": fwd_bwd(lambda a, b_, c_: eager_drop_composite(
                 a, b_, c_, keep_rate, num_prefix_tokens=p))}, rounds, rep_ms)
        result["us_fwd_bwd"] = {name: ms * 1e3 for name, ms in bt.items()}

    print(f"{result['device']}: B={batch} H={h} N={n} C={c} {dtype}, keep {n_keep}/{m}, "
          f"minimum traffic {nbytes / 1e6:.1f} MB")
    print(f"kept sets differing from the reference backend: {rows_differ}/{batch} rows "
          f"(max score error {score_err:.2e})")
    for name in times:
        print(f"  {name:<14} {result['us'][name]:9.1f} us  {result['gbps'][name]:8.1f} GB/s  "
              f"{result['speedup_vs_eager'][name]:5.2f}x vs eager")
    for name, us in result.get("us_fwd_bwd", {}).items():
        print(f"  {name:<18} {us:9.1f} us")
    if sweep_rows:
        print("sweep (fwd_num_warps, tile_elems, max_block_c -> us, GB/s):")
        for r in sorted(sweep_rows, key=lambda r: r["us"]):
            print(f"  {r['fwd_num_warps']:>2} {r['tile_elems']:>5} {r['max_block_c']:>4} -> "
                  f"{r['us']:8.1f} us {r['gbps']:8.1f} GB/s")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--sweep", action="store_true", help="try launch parameters")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = bench_triton(args.batch, args.heads, args.dim, args.tokens, _DTYPES[args.dtype],
                          args.keep_rate, sweep=args.sweep, backward=args.backward)
    if result is not None and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
