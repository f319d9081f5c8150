"""Prints the README's Performance section from a suite run's results.

    python -m benchmarks.readme_section benchmarks/results/2026-11-25-cpu.json [--link PATH]

Accepts the ``results.json`` of ``python -m benchmarks.run``, its directory, or the ``.md`` next
to it (the ``.json`` with the same stem is read). The section names the machine, the date and
the command (where ``--append`` joined sections of other runs, each section's: the README must
not credit one machine with another's figures), and summarises: the training step (speed, saved
memory, FLOPs), the drop op, the largest batch within the memory budget, and every target with
its PASS/FAIL verdict.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ._suite import Target, doc_summary
from ._timing import format_table
from .bench_drop_compare import bound_cell
from .run import SECTIONS, origins_note

__all__ = ["load_results", "performance_section", "main"]


def load_results(path: str) -> dict:
    """The results dict from a results.json, its directory, or the .md beside it."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    elif path.endswith(".md"):
        path = path[:-3] + ".json"
    if not os.path.exists(path):
        raise ValueError(f"path: no results JSON at {path!r}")
    with open(path) as f:
        results = json.load(f)
    if "meta" not in results:
        raise ValueError(f"path: {path!r} is not a benchmarks.run results.json (no 'meta')")
    return results


def _machine(meta: dict) -> str:
    m = meta["machine"]
    if m.get("gpu"):
        return f"{m['gpu']} ({m.get('gpu_memory_gib', 0):.0f} GiB), CUDA {m.get('cuda')}"
    return f"{m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads)"


def _f(v, fmt: str, suffix: str = "") -> str:
    return "" if v is None else format(v, fmt) + suffix


def _ok(sec) -> bool:
    return isinstance(sec, dict) and "error" not in sec


def performance_section(results: dict, link: str | None = None) -> str:
    """The markdown section."""
    meta = results["meta"]
    cfg = meta["config"]
    m = meta["machine"]
    lines = ["## Performance", ""]
    lines.append(
        f"Measured on {meta['date']} on {_machine(meta)}, "
        f"{'bf16 autocast' if cfg['device'] == 'cuda' else 'fp32'}, with torch {m['torch']} and "
        f"timm {m['timm']} (bsr_kernels commit {m.get('git_commit') or '?'}), by")
    lines += ["", "```", meta["command"], "```", ""]
    note = origins_note(results)   # the header names the newest run of an --append alone
    if note:
        lines += [note, ""]
    lines.append("Times are taken side by side in one run (A B A B rounds, medians; speedups are "
                 "medians of per-round ratios)"
                 + (", on a shared machine: read the ratios, not the absolute times."
                    if cfg["device"] == "cpu" else ".")
                 + (f" Full tables and plots: [{link}]({link})." if link else ""))
    if cfg.get("quick"):
        lines.append("This was a `--quick` run (smaller batches, fewer rounds).")
    if cfg.get("tiny"):
        lines.append("**This was a `--tiny` run (test models): the figures mean nothing.**")

    ts = results.get("train_step")
    if _ok(ts):
        c = ts["config"]
        lines += ["", f"**Training step** (time: {c['time_model']} B={c['time_batch']}; saved "
                      f"activations and FLOPs: {c['memory_model']} B={c['memory_batch']}, per "
                      "image):", ""]
        peak = any("peak_mib" in r for r in ts["rows"])
        rows = [[r["label"] + (" (failed)" if "error" in r else ""),
                 _f(r["speedup_vs_full"], ".2f", "x"), _f(r["speedup_vs_eager"], ".2f", "x"),
                 _f(r.get("speedup_vs_peer_compiled"), ".2f", "x"),
                 _f(r["saved_mib_per_image"], ".1f"), _f(r["train_gflops_per_image"], ".1f")]
                + ([_f(r.get("peak_mib"), ".0f")] if peak else []) for r in ts["rows"]]
        lines.append(format_table(rows, ["variant", "step speedup vs full FT",
                                         "vs eager BSR", "vs compiled plain-PyTorch BSR",
                                         "saved MiB/img", "train GFLOP/img"]
                                  + (["peak MiB"] if peak else [])))
        comp = ts.get("compressed_gradient_error") or {}
        if "global_rel_err" in comp:
            lines += ["", f"Compressed mode (bf16 saved activations) against exact lean, same "
                          f"{c['memory_model']} weights and batch: gradient relative error "
                          f"{comp['global_rel_err']:.1e} over all trained parameters (worst "
                          f"parameter {comp['max_param_rel_err']:.1e})."]

    dt = results.get("drop_tokens")
    if _ok(dt) and dt.get("rows"):
        op = [r for r in dt["rows"] if r["scope"] == "op"]
        big = [r for r in op if r["size"] == "ViT-B" and r["N"] == 197] or op
        b = max(r["B"] for r in big)
        sel = [r for r in big if r["B"] == b]
        size, n = sel[0]["size"], sel[0]["N"]
        lines += ["", f"**Token drop op** ({size}, N={n}, B={b}, {sel[0]['dtype']}; speedup over "
                      "the eager composite, which materialises the N x N probabilities):", ""]
        rows = []
        for cand in dict.fromkeys(r["candidate"] for r in sel):
            fw = next((r for r in sel if r["candidate"] == cand and r["pass_"] == "forward"), None)
            bw = next((r for r in sel if r["candidate"] == cand and r["pass_"] == "fwd+bwd"), None)
            lv = next((r for r in sel if r["candidate"] == cand
                       and r["pass_"] == "fwd+bwd leaves"), None)
            rows.append([cand, f"{fw['median_ms']:.3f}" if fw else "",
                         f"{fw['paired_speedup_vs_eager']:.2f}x" if fw else "",
                         f"{bw['paired_speedup_vs_eager']:.2f}x" if bw else "",
                         f"{lv['paired_speedup_vs_eager']:.2f}x" if lv else "",
                         f"{fw['gbps']:.0f}" if fw and "gbps" in fw else "",
                         bound_cell(fw) if fw else ""])
        lines.append(format_table(rows, ["candidate", "forward ms", "forward speedup",
                                         "fwd+bwd speedup", "fwd+bwd speedup, q/k leaves",
                                         "GB/s", "% of bound"]))

    mem = results.get("memory")
    if _ok(mem) and mem.get("max_batch"):
        budget = mem["config"]["budget_gib"]
        sizes = sorted({r["img_size"] for r in mem["max_batch"]})
        variants = list(dict.fromkeys(r["label"] for r in mem["max_batch"]))
        measured = cfg["device"] == "cuda"
        key = "max_batch_peak_fit" if measured else "max_batch_estimate"
        lines += ["", f"**Largest training batch within {budget:g} GiB** ({mem['config']['memory_model']}, "
                      + ("fitted to measured peak memory" if measured else
                         "parameters + gradients + AdamW state + measured saved activations "
                         "per image; an estimate") + "):", ""]
        rows = []
        for v in variants:
            row = [v]
            for s in sizes:
                r = next((r for r in mem["max_batch"] if r["label"] == v and r["img_size"] == s),
                         None)
                row.append("" if r is None or r.get(key) is None else str(r[key]))
            rows.append(row)
        lines.append(format_table(rows, ["variant"] + [f"{s} px" for s in sizes]))

    if results.get("targets"):
        lines += ["", "**Targets**:", ""]
        for t in results["targets"]:
            lines.append("- " + Target(**{k: t[k] for k in (
                "name", "value", "op", "bound", "unit", "where")}).line())
    failed = [n for n in SECTIONS if isinstance(results.get(n), dict) and "error" in results[n]]
    if failed:
        lines += ["", f"Sections that failed in this run: {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=doc_summary(__doc__))
    parser.add_argument("path", help="results.json, its directory, or the .md beside it")
    parser.add_argument("--link", help="path of the full report to link from the section")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.path)
    except ValueError as e:
        parser.error(str(e))
    sys.stdout.write(performance_section(results, args.link))
    return 0


if __name__ == "__main__":
    sys.exit(main())
