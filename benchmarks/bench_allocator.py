"""CPU training steps with and without ``bsr_kernels.finetune.allocator.keep_freed_memory``
(what ``bsr-finetune --keep-freed-memory``, its default on CPU, does to the process).

The setting is process-wide and cannot be undone, so each measurement runs in a child process of
its own: rounds alternate the two settings (system, keep, system, keep, ...), each child builds
the variants, takes two warm steps of each and then times ``--steps`` steps of each in turn.
Reported per variant: the median ms/step of each setting and the median of the per-round ratios
(system time over keep time: > 1 means keeping freed memory is faster).

Usage: ``python -m benchmarks.bench_allocator [--model deit_s] [--batch 16] [--rounds 3]
[--json PATH]``. CPU only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SETTINGS = ("system", "keep")
DEFAULT_VARIANTS = ("full", "eager_bsr", "bsr_lean", "bsr_fast")


def child(args) -> dict:
    """Times the variants in this process under one setting; returns {variant: [s, ...]}."""
    if args.setting == "keep":
        from bsr_kernels.finetune.allocator import keep_freed_memory
        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory() was refused here (no glibc mallopt)")
    import torch

    from ._suite import SuiteConfig, make_step
    from .bench_train_step import _variant_batch
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SuiteConfig(device="cpu", tiny=args.model == "tiny")
    steps = {}
    for variant in args.variants.split(","):
        _, module, params, images, labels = _variant_batch(
            cfg, variant, args.model, args.batch, torch.Generator().manual_seed(0))
        steps[variant] = make_step(module, params, images, labels, cfg)
        steps[variant]()
        steps[variant]()
    times: dict = {v: [] for v in steps}
    for _ in range(args.steps):
        for variant, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - t0)
    return times


def run(model: str, batch: int, variants, rounds: int, steps: int, threads: int,
        log=print) -> dict:
    """The parent: ``rounds`` rounds of one child per setting. Returns ``{"config", "rows"}``."""
    per: dict = {s: [] for s in SETTINGS}  # per setting: one {variant: median s} per round
    for r in range(rounds):
        for setting in SETTINGS:
            cmd = [sys.executable, "-m", "benchmarks.bench_allocator", "--child", setting,
                   "--model", model, "--batch", str(batch), "--variants", ",".join(variants),
                   "--steps", str(steps), "--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times = json.loads(out.strip().splitlines()[-1])
            per[setting].append({v: statistics.median(t) for v, t in times.items()})
            log(f"  allocator: round {r + 1}/{rounds} {setting}: "
                + ", ".join(f"{v} {1e3 * t:.1f} ms" for v, t in per[setting][-1].items()))
    rows = []
    for v in variants:
        ms = {s: 1e3 * statistics.median(rd[v] for rd in per[s]) for s in SETTINGS}
        ratio = statistics.median(a[v] / b[v] for a, b in zip(per["system"], per["keep"]))
        rows.append(dict(variant=v, system_ms=ms["system"], keep_ms=ms["keep"],
                         speedup=ratio))
    from ._suite import machine_info
    return dict(config=dict(model=model, batch=batch, rounds=rounds, steps=steps,
                            threads=threads or "torch default"),
                machine=machine_info("cpu"), date=time.strftime("%Y-%m-%d"), rows=rows)


def table(res: dict) -> str:
    lines = ["| variant | ms/step, system malloc | ms/step, freed memory kept | speedup |",
             "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['system_ms']:.1f} | {r['keep_ms']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in res["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_s", help="suite model name (deit_s, vit_b16, tiny)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and child")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", choices=SETTINGS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("batch", "rounds", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.child:
        args.setting = args.child
        print(json.dumps(child(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    res = run(args.model, args.batch, variants, args.rounds, args.steps, args.threads)
    res["command"] = "python -m benchmarks.bench_allocator " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
