"""The ``attention`` section of the suite: TokenDropAttention against timm ``Attention``.

Candidates, timed side by side (``_timing.interleaved``: A B A B rounds, medians, ratios), each
a module with the same weights (qkv_bias=True, as in ViT/DeiT), forward and forward+backward
(gradients to the input and to every weight, random cotangents):

* ``timm Attention (fused)``: timm's module with ``fused_attn=True`` (SDPA), the baseline;
* ``timm Attention (eager)``: ``fused_attn=False`` (materialised probabilities);
* ``TokenDropAttention``: :class:`bsr_kernels.TokenDropAttention`, no drop (same output as timm);
* ``eager attention + composite drop``: the authors' drop block: eager attention whose
  probabilities also give the CLS scores, residual add, head mean, topk, gather, fused token
  (``bsr_kernels.baselines``);
* ``TokenDropAttention + bsr drop``: ``forward_qk`` (SDPA), residual add, then
  ``bsr_kernels.drop_tokens`` (C++ on CPU, Triton on CUDA).

Shapes: ViT-S (H=6, C=384) and ViT-B (H=12, C=768) at N=197 (and N=577 in the full run);
fp32 on CPU, bf16 autocast on CUDA; keep_rate 0.5 with the fused token.

Usage: ``python -m benchmarks.bench_attention [--device cpu|cuda] [--quick]``
"""
from __future__ import annotations

import copy
import time

import torch
from timm.layers import Attention

import bsr_kernels
from bsr_kernels.baselines import _drop_from_probs, eager_attention
from bsr_kernels.ops.common import num_kept

from ._suite import SuiteConfig, section_main
from ._timing import Rotating, format_table, interleaved, l2_bytes, rotation_sets

__all__ = ["run", "shapes", "candidates", "table"]

KEEP_RATE = 0.5
SIZES = {"ViT-S": (6, 384), "ViT-B": (12, 768)}


def shapes(cfg: SuiteConfig) -> list[tuple[str, int, int, int, int]]:
    """(size, H, C, N, B) in order."""
    if cfg.tiny:
        return [("tiny", 2, 64, 17, 4)]
    if cfg.cuda:
        per_n = ((197, 128), (577, 128)) if cfg.quick else ((197, 32), (197, 128), (577, 128))
    else:
        per_n = ((197, 8),) if cfg.quick else ((197, 32), (577, 8))
    return [(s, h, c, n, b) for s, (h, c) in SIZES.items() for n, b in per_n]


def candidates(dim: int, heads: int, n: int, device: str):
    """name -> (module, fn(x) -> output); all modules share the weights of the first."""
    torch.manual_seed(0)
    fused = Attention(dim, num_heads=heads, qkv_bias=True).to(device)
    fused.fused_attn = True
    eager = copy.deepcopy(fused)
    eager.fused_attn = False
    tda = copy.deepcopy(fused)
    tda.__class__ = bsr_kernels.TokenDropAttention
    drop_eager = copy.deepcopy(fused)
    drop_tda = copy.deepcopy(tda)
    n_keep = num_kept(KEEP_RATE, n - 1)

    def authors(x):
        out, probs = eager_attention(drop_eager, x)
        return _drop_from_probs(x + out, probs, 1, n_keep, True)[0]

    def ours(x):  # under autocast: fp32 residual beside bf16 q, k, which the drop takes as is
        out, q, k = drop_tda.forward_qk(x)
        return bsr_kernels.drop_tokens(x + out, q, k, KEEP_RATE, num_prefix_tokens=1)[0]

    return {
        "timm Attention (fused)": (fused, fused),
        "timm Attention (eager)": (eager, eager),
        "TokenDropAttention": (tda, tda),
        "eager attention + composite drop": (drop_eager, authors),
        "TokenDropAttention + bsr drop": (drop_tda, ours),
    }


def run(cfg: SuiteConfig, log=print) -> dict:
    """Runs the section; returns ``{"config", "rows", "notes"}``."""
    reps = 3 if cfg.tiny or cfg.quick else 10
    min_sample = 0.002 if cfg.tiny else (0.02 if cfg.quick and not cfg.cuda else 0.05)
    rows = []
    t0 = time.perf_counter()
    for size, h, c, n, b in shapes(cfg):
        cands = candidates(c, h, n, cfg.device)
        g = torch.Generator().manual_seed(1)
        # on a GPU, inputs rotated past L2 (the design's rule): at these shapes one x fits it
        xs = rotation_sets(lambda: (torch.randn(b, n, c, generator=g).to(cfg.device)
                                    .requires_grad_(),), l2_bytes() if cfg.cuda else 0)
        for pass_ in ("forward", "fwd+bwd"):
            grad = pass_ == "fwd+bwd"
            fns = {}
            for name, (mod, fn) in cands.items():
                with cfg.autocast(), torch.no_grad():
                    ref = fn(xs[0][0])
                cot = torch.randn(ref.shape, generator=g).to(cfg.device, ref.dtype)
                weights = list(mod.parameters())

                def call(x, fn=fn, cot=cot, weights=weights, grad=grad):
                    if not grad:
                        with cfg.autocast(), torch.no_grad():
                            return fn(x)
                    with cfg.autocast():
                        out = fn(x)
                    return torch.autograd.grad(out, [x, *weights], cot)
                fns[name] = Rotating(call, xs)
            if cfg.cuda:
                torch.cuda.empty_cache()
            timings = interleaved(fns, reps=reps, warmup=2, min_sample_s=min_sample,
                                  device_sync=cfg.cuda)
            base = timings["timm Attention (fused)"]
            eager_drop = timings["eager attention + composite drop"]
            for name, t in timings.items():
                rows.append(dict(size=size, H=h, C=c, N=n, B=b, pass_=pass_, candidate=name,
                                 median_ms=t.median * 1e3,
                                 paired_speedup_vs_timm_fused=base.paired_ratio(t),
                                 paired_speedup_vs_eager_drop=(eager_drop.paired_ratio(t)
                                                               if "drop" in name else None),
                                 reps=len(t.samples), number=t.number))
        log(f"  attention {size} N={n} B={b}: done ({time.perf_counter() - t0:.0f} s)")
    notes = ["TokenDropAttention without a drop computes exactly timm's fused attention; the "
             "two drop rows include the residual add and the token drop after it."]
    if cfg.cuda:
        notes.append("Under bf16 autocast the residual stream is fp32 and q, k are bf16; the "
                     "Triton drop reads them as they are (no cast). Inputs rotate past L2.")
    return dict(config=dict(keep_rate=KEEP_RATE, reps=reps, min_sample_s=min_sample,
                            precision="bf16 autocast" if cfg.cuda else "fp32"),
                rows=rows, notes=notes)


def table(section: dict) -> str:
    rows = [(r["size"], r["N"], r["B"], r["pass_"], r["candidate"], f"{r['median_ms']:.3f}",
             f"{r['paired_speedup_vs_timm_fused']:.2f}x",
             "" if r["paired_speedup_vs_eager_drop"] is None
             else f"{r['paired_speedup_vs_eager_drop']:.2f}x")
            for r in section["rows"]]
    return format_table(rows, ["size", "N", "B", "pass", "candidate", "median ms",
                               "speedup vs timm fused", "speedup vs eager drop"])


def main(argv=None) -> None:
    section_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
