"""The ``moe`` section: a Mixture-of-Experts MLP against the dense MLP of the same active FLOPs.

Candidates, timed side by side (``_timing.interleaved``: A B A B rounds, medians, paired ratios),
forward + backward (gradients to the input and to every weight, a random cotangent):

* ``dense MLP (hidden k x H)``: timm ``Mlp(C, k*H)``, the baseline: it does the same multiply-adds
  per token as k experts of hidden H (for ViT-B, E=16, top-4: hidden 4 x 3072);
* ``bsr_kernels MoEMlp``: :class:`bsr_kernels.moe.MoEMlp` (E experts of ``Mlp(C, H)``, a gate,
  softmax + top-k, (token, expert) pairs sorted by expert, the experts' matmuls batched over a
  padded layout when loads are balanced, else one per expert slice; custom backward);
* ``naive MoE (mask loop, autograd)``: what one writes without a grouped kernel: for each expert,
  find its tokens with a mask, run ``F.linear`` on them under autograd, ``index_add`` back.

The gate is randomly initialised and the tokens random, so the load is close to balanced (its
max/mean is reported). Shapes: ViT-B width (C=768, H=3072), E=16, top-4, 100 tokens x B=32 on
CPU in fp32; B=128 under bf16 autocast on CUDA.

Usage: ``python -m benchmarks.bench_moe [--device cpu|cuda] [--quick]``, or the suite's ``moe``
section (``python -m benchmarks.run --sections moe``).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from timm.layers import Mlp

from bsr_kernels.moe import MoEMlp

from ._suite import SuiteConfig, Target, section_main
from ._timing import format_table, interleaved

__all__ = ["run", "shapes", "candidates", "naive_moe", "table", "targets"]

#: Ratio target: MoE forward+backward time / dense MLP of the same active FLOPs.
TARGET_RATIO = 1.3
DENSE = "dense MLP (same active FLOPs)"
OURS = "bsr_kernels MoEMlp"
NAIVE = "naive MoE (mask loop, autograd)"


def shapes(cfg: SuiteConfig) -> list[tuple[str, int, int, int, int, int, int]]:
    """(label, C, H, E, k, tokens per image, B) in order."""
    if cfg.tiny:
        return [("tiny", 32, 64, 4, 2, 9, 4)]
    b = 128 if cfg.cuda else 32
    return [("ViT-B", 768, 3072, 16, 4, 100, b)]


def naive_moe(moe: MoEMlp, x: torch.Tensor) -> torch.Tensor:
    """The same MoE as ``moe`` written with plain autograd, one masked gather per expert."""
    h = x.reshape(-1, x.shape[-1])
    probs = moe.gates[moe.task](h).softmax(-1)
    w, idx = probs.topk(moe.top_k, dim=-1)
    out = torch.zeros_like(h)
    for e in range(moe.num_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        a = F.linear(h[tok], moe.fc1_weight[e], moe.fc1_bias[e])
        y = F.linear(moe.act(a), moe.fc2_weight[e], moe.fc2_bias[e])
        out = out.index_add(0, tok, y * w[tok, slot, None])
    return out.reshape(x.shape)


def candidates(c: int, hidden: int, experts: int, k: int, device: str):
    """name -> (parameters, fn(x) -> output)."""
    torch.manual_seed(0)
    dense = Mlp(c, k * hidden).to(device)
    moe = MoEMlp.from_mlp(Mlp(c, hidden), experts, k).to(device)
    with torch.no_grad():   # experts that differ, as after training
        moe.fc1_weight.add_(0.01 * torch.randn_like(moe.fc1_weight))
    return {DENSE: (list(dense.parameters()), dense),
            OURS: (list(moe.parameters()), moe),
            NAIVE: (list(moe.parameters()), lambda x: naive_moe(moe, x))}, moe


def run(cfg: SuiteConfig, log=print) -> dict:
    """Runs the section; returns ``{"config", "rows", "targets", "notes"}``."""
    reps = 3 if cfg.tiny or cfg.quick else 7
    min_sample = 0.002 if cfg.tiny else 0.05
    rows, t0 = [], time.perf_counter()
    for label, c, hd, e, k, n, b in shapes(cfg):
        cands, moe = candidates(c, hd, e, k, cfg.device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, n, c, generator=g).to(cfg.device).requires_grad_()
        cot = torch.randn(b, n, c, generator=g).to(cfg.device)
        with torch.no_grad():
            load = torch.bincount(moe.gates[0](x.reshape(-1, c)).topk(k, -1).indices.flatten(),
                                  minlength=e).double()
        fns = {}
        for name, (params, fn) in cands.items():
            def call(fn=fn, params=params):
                with cfg.autocast():
                    out = fn(x)
                return torch.autograd.grad(out, [x] + params, cot.to(out.dtype),
                                           allow_unused=True)
            fns[name] = call
        with torch.no_grad(), cfg.autocast():   # the candidates compute the same thing
            ref = cands[NAIVE][1](x).float()
            err = ((cands[OURS][1](x).float() - ref).norm() / ref.norm()).item()
        timings = interleaved(fns, reps=reps, warmup=1, min_sample_s=min_sample,
                              device_sync=cfg.cuda)
        base = timings[DENSE]
        flops = 2 * 3 * b * n * c * hd * k * 2   # fwd + bwd (x3) of two matmuls, 2 FLOP/MAC
        for name, t in timings.items():
            rows.append(dict(size=label, C=c, H=hd, E=e, k=k, tokens=n, B=b, candidate=name,
                             median_ms=t.median * 1e3, time_vs_dense=t.paired_ratio(base),
                             gflops_per_s=flops / t.median / 1e9, reps=len(t.samples),
                             number=t.number, load_max_over_mean=(load.max() / load.mean()).item(),
                             output_rel_err_vs_naive=err if name == OURS else None))
        log(f"  moe {label} B={b}: done ({time.perf_counter() - t0:.0f} s)")
    notes = [f"Dense baseline: timm Mlp with hidden k x H = {rows[0]['k']} x {rows[0]['H']} on "
             "the same tokens, i.e. the MoE's active multiply-adds without the gate.",
             "GFLOP/s counts the six matmuls of forward + backward of the active FLOPs."]
    if cfg.cuda:
        notes.append("CUDA: bf16 autocast; MoEMlp syncs with the host for the per-expert "
                     "counts, then runs padded batched matmuls (the balanced loads here) or one "
                     "matmul per expert (uneven ones).")
    return dict(config=dict(reps=reps, min_sample_s=min_sample,
                            precision="bf16 autocast" if cfg.cuda else "fp32"),
                rows=rows, targets=targets(cfg, rows), notes=notes)


def targets(cfg: SuiteConfig, rows: list[dict]) -> list[dict]:
    """MoE forward+backward time / dense MLP of the same active FLOPs <= 1.3."""
    row = next((r for r in rows if r["candidate"] == OURS and r["size"] == "ViT-B"), None)
    where = (f"ViT-B width, E=16, top-4, 100 tokens x B={row['B'] if row else '?'}, "
             + ("bf16 autocast, CUDA" if cfg.cuda else "fp32 CPU"))
    return [Target("MoE layer fwd+bwd time / dense MLP of the same active FLOPs",
                   None if row is None else row["time_vs_dense"], "<=", TARGET_RATIO, "x",
                   where).to_dict()]


def table(section: dict) -> str:
    rows = [(r["size"], r["E"], r["k"], r["B"], r["candidate"], f"{r['median_ms']:.1f}",
             f"{r['time_vs_dense']:.2f}x", f"{r['gflops_per_s']:.0f}",
             f"{r['load_max_over_mean']:.2f}")
            for r in section["rows"]]
    return format_table(rows, ["size", "E", "k", "B", "candidate", "fwd+bwd ms", "time vs dense",
                               "GFLOP/s", "load max/mean"])


def main(argv=None) -> None:
    section_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
