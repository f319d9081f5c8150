"""CPU training steps and the drop op under glibc's default malloc settings and with freed memory
retained (:func:`benchmarks._malloc.retain_freed_memory`: glibc keeps the blocks a step frees for
the next step instead of returning them to the kernel and faulting them in again). This measures
what that buys and what it costs, for the training steps of the suite's ``train_step`` section
(DeiT-S, fp32, the same variants, weights and batch) and for the drop op.

The setting is process-wide and cannot be undone, so every measurement is a child process of
its own: one variant, one setting (``system``: glibc's defaults; ``retained``: the call above).
Rounds alternate the order of the two settings, so a slow phase of the machine hits both alike.
Each child builds its variant, takes two warm-up steps and times ``--steps`` steps; it reports
the median step time, the minor page faults per timed step, its peak resident memory
(``ru_maxrss``, the interpreter and torch included) and its resident memory after the last step.
The speedup is the median over rounds of the per-round ratio ``system / retained``.

``drop_op`` (a child too): the drop op's C++ forward and backward against ``torch.compile`` of the
reference at the shape of issue 9's CPU target (ViT-B N=197 B=32 fp32), with the ``drop_tokens``
section's candidates and timer, in its two backward passes (gradients to x and the qkv tensor;
to x, q and k as leaves), beside the no-compute floor; the ratio is taken inside each child and
its median over rounds reported per setting.

Usage: ``python -m benchmarks.bench_malloc [--variants full,peer_bsr,bsr_lean,bsr_fast,drop_op]
[--rounds 3] [--steps 6] [--batch 16] [--json PATH]``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

__all__ = ["measure_child", "run", "table", "main"]

SETTINGS = ("system", "retained")
#: The drop op's "variant": the C++ backend's forward and backward against torch.compile of the
#: reference (the drop_tokens section's candidates and timer) at the shape of issue 9's CPU
#: target, ViT-B N=197 B=32 fp32, in both of that section's backward passes.
OP = "drop_op"
OP_CANDIDATES = ("bsr cpp", "torch.compile(reference)", "no-compute floor")
DEFAULT_VARIANTS = ("full", "peer_bsr", "bsr_lean", "bsr_fast", OP)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_child(variant: str, setting: str, steps: int, batch: int, model: str) -> dict:
    """One child's measurement (module doc), in this process: call it in a fresh one."""
    import torch

    from ._malloc import retain_freed_memory

    from ._suite import SuiteConfig, make_step
    from .bench_train_step import _variant_batch

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if setting == "retained":
        changed, what = retain_freed_memory()
        if not changed:
            raise RuntimeError(what)
    cfg = SuiteConfig(device="cpu")
    if variant == OP:
        return _measure_op(cfg, setting)
    _, module, params, images, labels = _variant_batch(cfg, variant, model, batch,
                                                       torch.Generator().manual_seed(0))
    step = make_step(module, params, images, labels, cfg)
    for _ in range(2):
        step()
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return dict(variant=variant, setting=setting, step_ms=statistics.median(times) * 1e3,
                faults_per_step=faults / steps,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                rss_after_mib=_rss_mib(), threads=torch.get_num_threads())


def _measure_op(cfg, setting: str) -> dict:
    import torch

    from bsr_kernels.ops.common import num_kept

    from ._suite import make_inputs
    from .bench_drop_compare import KEEP_RATE, PASSES, PREFIX, _time, op_candidates

    b, h, n, c = 32, 12, 197, 768
    n_keep = num_kept(KEEP_RATE, n - PREFIX)
    cands = {k: v for k, v in op_candidates(cfg, (c // h) ** -0.5, n_keep).items()
             if k in OP_CANDIDATES}
    out = dict(variant=OP, setting=setting, passes={})
    for pass_ in ("fwd+bwd", "fwd+bwd leaves"):
        errors: dict = {}
        t = _time(cands, lambda grad: make_inputs(b, n, h, c, torch.float32, "cpu", grad),
                  PASSES[pass_], cfg, 10, 0.05, errors)
        if errors:
            raise RuntimeError(f"{pass_}: {errors}")
        cpp, comp = t["bsr cpp"], t["torch.compile(reference)"]
        out["passes"][pass_] = dict(
            {name: t[name].median * 1e3 for name in OP_CANDIDATES},
            speedup_vs_compiled=comp.paired_ratio(cpp))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_after_mib"] = _rss_mib()
    return out


def _child_env() -> dict:
    """The environment of a child: this one without glibc malloc options, so that the
    ``system`` setting is glibc's defaults and ``retained`` is not refused."""
    from ._malloc import ENV_SETTINGS
    return {k: v for k, v in os.environ.items() if k not in ENV_SETTINGS}


def run(variants=DEFAULT_VARIANTS, rounds: int = 3, steps: int = 6, batch: int = 16,
        model: str = "deit_s", log=print) -> dict:
    """Runs every (variant, setting) child ``rounds`` times, alternating the settings' order.

    Returns:
        ``{"config", "children": [child dicts with "round"], "rows": [per variant and setting:
        median step ms, speedup over system, faults, memory], "errors": [...]}``.
    """
    for name, v in (("rounds", rounds), ("steps", steps), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    children, errors = [], []
    for r in range(rounds):
        order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
        for variant in variants:
            for setting in order:
                cmd = [sys.executable, "-m", "benchmarks.bench_malloc", "--child", variant,
                       setting, str(steps), str(batch), model]
                p = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
                if p.returncode != 0:
                    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    errors.append(dict(round=r, variant=variant, setting=setting, error=tail))
                    log(f"round {r + 1}/{rounds} {variant} {setting}: FAILED: {tail}")
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                res["round"] = r
                children.append(res)
                what = (", ".join(f"{p}: cpp {v['bsr cpp']:.2f} ms, "
                                  f"{v['speedup_vs_compiled']:.2f}x compiled"
                                  for p, v in res["passes"].items()) if variant == OP else
                        f"{res['step_ms']:8.1f} ms/step {res['faults_per_step']:8.0f} faults/step")
                log(f"round {r + 1}/{rounds} {variant:<10} {setting:<8} {what}, "
                    f"peak {res['peak_rss_mib']:.0f} MiB")
    return dict(config=dict(variants=list(variants), rounds=rounds, steps=steps, batch=batch,
                            model=model),
                children=children, rows=_rows(children, variants),
                op_rows=_op_rows(children), errors=errors)


def _op_rows(children: list[dict]) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        mine = [c for c in children if c["variant"] == OP and c["setting"] == setting]
        for pass_ in (mine[0]["passes"] if mine else ()):
            got = [c["passes"][pass_] for c in mine]
            rows.append(dict(setting=setting, pass_=pass_, runs=len(got), **{
                key: statistics.median(g[key] for g in got)
                for key in (*OP_CANDIDATES, "speedup_vs_compiled")}))
    return rows


def _rows(children: list[dict], variants) -> list[dict]:
    by = {(c["variant"], c["setting"], c["round"]): c for c in children}
    rows = []
    for variant in (v for v in variants if v != OP):
        for setting in SETTINGS:
            mine = [c for c in children if c["variant"] == variant and c["setting"] == setting]
            if not mine:
                continue
            ratios = [by[(variant, "system", c["round"])]["step_ms"] / c["step_ms"]
                      for c in mine if (variant, "system", c["round"]) in by]
            rows.append(dict(
                variant=variant, setting=setting,
                step_ms=statistics.median(c["step_ms"] for c in mine),
                speedup_vs_system=statistics.median(ratios) if ratios else float("nan"),
                faults_per_step=statistics.median(c["faults_per_step"] for c in mine),
                peak_rss_mib=max(c["peak_rss_mib"] for c in mine),
                rss_after_mib=statistics.median(c["rss_after_mib"] for c in mine),
                runs=len(mine)))
    return rows


def table(result: dict) -> str:
    from ._timing import format_table
    head = ("variant", "malloc", "step ms", "speedup vs system", "page faults/step",
            "peak RSS MiB", "RSS after step MiB")
    body = [(r["variant"], r["setting"], f"{r['step_ms']:.1f}",
             f"{r['speedup_vs_system']:.2f}x", f"{r['faults_per_step']:.0f}",
             f"{r['peak_rss_mib']:.0f}", f"{r['rss_after_mib']:.0f}") for r in result["rows"]]
    text = format_table(body, head) if body else ""
    if result.get("op_rows"):
        head = ("malloc", "pass", *(f"{name} ms" for name in OP_CANDIDATES),
                "bsr cpp vs compiled")
        body = [(r["setting"], r["pass_"], *(f"{r[name]:.2f}" for name in OP_CANDIDATES),
                 f"{r['speedup_vs_compiled']:.2f}x") for r in result["op_rows"]]
        text += ("\n\n" if text else "") + "Drop op, ViT-B N=197 B=32 fp32:\n\n" + \
            format_table(body, head)
    return text


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        variant, setting, steps, batch, model = sys.argv[2:7]
        print(json.dumps(measure_child(variant, setting, int(steps), int(batch), model)))
        return 0
    from ._suite import doc_summary
    parser = argparse.ArgumentParser(description=doc_summary(__doc__))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated train_step variants, and drop_op for the drop "
                             "op's forward and backward (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="children per variant and setting (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6,
                        help="timed steps per child, after 2 warm-up steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument("--model", default="deit_s", help="suite model (default: deit_s)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    from ._suite import VARIANTS
    bad = [v for v in variants if v not in VARIANTS and v != OP]
    if bad or not variants:
        parser.error(f"--variants: {', '.join(bad) or 'none given'}; choose from "
                     f"{', '.join(VARIANTS)}, {OP}")
    try:
        result = run(variants, args.rounds, args.steps, args.batch, args.model,
                     log=lambda line: print(line, flush=True))
    except ValueError as e:
        parser.error(str(e))
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
