"""The bsr_kernels benchmark suite: one command, every comparison side by side.

    python -m benchmarks.run --device cpu|cuda [--quick] --out DIR

(from the repository root: ``benchmarks`` is a package).

writes ``DIR/results.json`` (sections ``drop_tokens``, ``attention``, ``train_step``,
``memory``, plus ``meta`` and ``targets``), ``DIR/results.md`` (readable tables and one
PASS/FAIL line per target) and PNG plots (``DIR/*.png``).

Sections (each module documents what it measures):

* ``drop_tokens`` (:mod:`bench_drop_compare`): the drop op, every backend, against the eager
  composite, SDPA + a separate CLS-row softmax and ``torch.compile`` of the reference; ViT-S and
  ViT-B at N=197 and 577, several batches; achieved GB/s (and % of the bound on CUDA).
* ``attention`` (:mod:`bench_attention`): TokenDropAttention against timm ``Attention``, fused
  and eager, forward and forward+backward, with and without the drop.
* ``train_step`` (:mod:`bench_train_step`): timm full fine-tuning, linear probe, the authors'
  eager BSR formulation, the plain-PyTorch BSR peer and ``reprogram`` autograd / lean / fast /
  compressed, eager and under ``torch.compile`` (and CUDA graphs on CUDA): step time, img/s,
  saved activation MiB/image, training GFLOPs/image, CUDA peak memory; the model-layer targets.
* ``memory`` (:mod:`bench_scaling`): memory and time against batch (1 to 128) and image size
  (224, 384); the largest batch within a memory budget (default 4 GiB).

Timings are ratios taken side by side in one run (A B A B rounds, medians): absolute times on a
shared machine mean little. On CUDA everything runs in bf16 (autocast for the models), and the
train step uses B=128. ``--quick`` shortens every section (< 3 min on 2 CPU cores, unloaded).
``--archive`` also copies the results to ``benchmarks/results/<date>-<device>.md/.json``.

On a GPU machine with a per-command time limit, run the sections one at a time into one
directory: ``--sections drop_tokens`` first, then ``--sections attention --append`` and so on
(the last one with ``--archive``).

README: ``python -m benchmarks.readme_section DIR/results.json`` prints the Performance section.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback

import torch

from ._suite import SuiteConfig, Target, machine_info

HERE = os.path.dirname(os.path.abspath(__file__))

__all__ = ["main", "run_suite", "merge_results", "SECTIONS", "write_markdown", "write_plots",
           "section_origins", "origins_note"]

#: Section name -> module implementing ``run(cfg, log)`` and ``table(section)``.
SECTIONS = {"drop_tokens": "bench_drop_compare", "attention": "bench_attention",
            "train_step": "bench_train_step", "memory": "bench_scaling", "moe": "bench_moe"}


def _module(section: str):
    import importlib
    return importlib.import_module(f"{__package__}.{SECTIONS[section]}")


def run_suite(cfg: SuiteConfig, sections=None, command: str = "", log=print) -> dict:
    """Runs the sections; a section that raises is recorded with its traceback (``error``)."""
    sections = list(sections or SECTIONS)
    now = _dt.datetime.now()
    results = {"meta": dict(date=now.strftime("%Y-%m-%d"), time=now.strftime("%H:%M:%S"),
                            command=command, config=cfg.describe(),
                            machine=machine_info(cfg.device), section_seconds={})}
    t_all = time.perf_counter()
    for name in sections:
        log(f"[{name}]")
        t0 = time.perf_counter()
        try:
            results[name] = _module(name).run(cfg, log=log)
        except Exception as e:  # keep going: the other sections still report
            results[name] = {"error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()}
            log(f"  {name} FAILED: {type(e).__name__}: {e}")
        results["meta"]["section_seconds"][name] = time.perf_counter() - t0
    results["meta"]["total_seconds"] = time.perf_counter() - t_all
    results["targets"] = [t for name in sections for t in _section_targets(cfg, name, results)]
    return results


def _section_targets(cfg: SuiteConfig, name: str, results: dict) -> list[dict]:
    """The targets of section ``name``; for a section that failed, its targets with nothing
    measured (NOT MEASURED, saying the section failed), so that none vanishes from the list."""
    section = results[name]
    if "error" not in section:
        return section.get("targets", [])
    make = getattr(_module(name), "targets", None)
    out = make(cfg, []) if make else []
    return [{**t, "where": f"{t['where']}; the {name} section failed"} for t in out]


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _origin(meta: dict) -> dict:
    """Where and when a run measured: date, machine (GPU, else CPU), commit, command."""
    m = meta.get("machine", {})
    return dict(date=meta.get("date"), machine=m.get("gpu") or m.get("cpu"),
                commit=m.get("git_commit"), command=meta.get("command"))


def section_origins(results: dict) -> dict:
    """Section name -> :func:`_origin` of the run that measured it (``--append`` records them;
    a result without the record: its own meta for every section)."""
    recorded = results["meta"].get("section_origins", {})
    return {s: recorded.get(s, _origin(results["meta"])) for s in SECTIONS if s in results}


def origins_note(results: dict) -> str:
    """Where each section was measured, when ``--append`` joined sections of runs that differ
    in it (machine, commit, date or command: the header names the newest run's machine and
    date alone), as one sentence; "" otherwise. results.md and the README section both say
    it. A record without a command (before it was kept) names none."""
    origins = section_origins(results)
    if len({tuple(o.items()) for o in origins.values()}) < 2:
        return ""
    return "Sections measured apart (`--append`): " + "; ".join(
        f"{s}: {o['machine']}, commit {o.get('commit') or '?'}, {o['date']}"
        + (f", `{o['command']}`" if o.get("command") else "") for s, o in origins.items())


def merge_results(prev: dict, new: dict, sections) -> dict:
    """``prev`` with the ``sections`` of ``new`` replacing its own (``--append``).

    Raises:
        ValueError: if the two runs used another device or mode (their figures do not mix).
    """
    keys = ("device", "quick", "tiny")
    a, b = prev["meta"]["config"], new["meta"]["config"]
    if any(a.get(k) != b.get(k) for k in keys):
        raise ValueError(f"--append: the existing results are from another configuration "
                         f"({ {k: a.get(k) for k in keys} } vs { {k: b.get(k) for k in keys} })")
    merged = dict(prev)
    meta = dict(prev["meta"])
    meta["commands"] = list(prev["meta"].get("commands", [prev["meta"]["command"]])) + [
        new["meta"]["command"]]
    meta["command"] = " && ".join(meta["commands"])
    meta["section_seconds"] = {**prev["meta"].get("section_seconds", {}),
                               **new["meta"]["section_seconds"]}
    meta["total_seconds"] = sum(meta["section_seconds"].values())
    meta["machine"] = new["meta"]["machine"]
    meta["date"] = new["meta"]["date"]
    # where each section was measured: the header's machine is the newest run's only
    meta["section_origins"] = {**section_origins(prev),
                               **{s: _origin(new["meta"]) for s in sections if s in new}}
    merged["meta"] = meta
    for name in sections:
        merged[name] = new[name]
    merged["targets"] = [t for name in SECTIONS if name in merged
                         for t in merged[name].get("targets", [])]
    return merged


def _target_line(t: dict) -> str:
    return Target(**{k: t[k] for k in ("name", "value", "op", "bound", "unit", "where")}).line()


def write_markdown(results: dict, path: str, plots=()) -> str:
    """Writes (and returns) the readable report."""
    meta = results["meta"]
    m = meta["machine"]
    cfg = meta["config"]
    device = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} threads)"
    lines = [f"# bsr_kernels benchmarks: {meta['date']}, {device}", "",
             f"- Command: `{meta['command']}`",
             f"- Device: {cfg['device']} ({cfg['precision']}); machine: {m['cpu']}, "
             f"{m['cpu_count']} CPU cores" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             f"- Software: torch {m['torch']}, timm {m['timm']}, bsr_kernels {m['bsr_kernels']} "
             f"(commit {m.get('git_commit') or '?'}), backends: {', '.join(m['backends'])}",
             f"- Mode: {'quick' if cfg['quick'] else 'full'}{', TINY models (test only)' if cfg['tiny'] else ''}; "
             f"took {meta['total_seconds']:.0f} s"
             + (f"; load average at start {m['load_average'][0]:.1f}" if "load_average" in m
                else ""),
             "- Times are side by side in one run (A B A B rounds, medians; speedups are medians "
             "of per-round ratios). The machine may be shared: ratios mean more than absolutes.",
             "", "## Targets", ""]
    note = origins_note(results)
    if note:   # appended from other runs
        lines[-3:-3] = [f"- {note}"]
    lines += [f"- {_target_line(t)}" for t in results.get("targets", [])] or ["- (none)"]
    for name in SECTIONS:
        if name not in results:
            continue
        sec = results[name]
        lines += ["", f"## {name}", ""]
        if "error" in sec:
            lines += [f"**FAILED**: `{sec['error']}`", "", "```", sec["traceback"], "```"]
            continue
        lines.append(_module(name).table(sec))
        for note in sec.get("notes", []):
            lines.append(f"\n_{note}_")
        if name == "drop_tokens" and sec.get("bandwidth"):
            bw = sec["bandwidth"]
            nominal = (f"; the GPU's nominal peak: {bw['nominal_gbps']:.0f} GB/s"
                       if bw.get("nominal_gbps") else "")
            lines.append(f"\nBandwidth bound: {bw['bound_gbps']:.0f} GB/s "
                         f"({bw['bound_source']}, this run){nominal}")
        if name == "drop_tokens":
            bad = [a for a in sec.get("agreement", [])
                   if any(v is None or v < 1.0 for k, v in a.items() if k.startswith("bsr "))]
            lines.append("\nKept sets equal to the reference backend's in every row"
                         if not bad else f"\nKept-set agreement below 100 %: {bad}")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                          for p in plots]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_plots(results: dict, out_dir: str) -> list[str]:
    """PNG plots of the sections that ran; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    title = f"{results['meta']['date']}, {results['meta']['config']['device']}"

    sec = results.get("drop_tokens", {})
    if sec.get("rows"):
        op = [r for r in sec["rows"] if r["scope"] == "op"]
        combos = sorted({(r["size"], r["N"]) for r in op}, key=lambda s: (s[1], s[0]))
        fig, axes = plt.subplots(2, len(combos), figsize=(4 * len(combos), 6.5), squeeze=False)
        for j, (size, n) in enumerate(combos):
            for i, pass_ in enumerate(("forward", "fwd+bwd")):
                ax = axes[i][j]
                sel = [r for r in op if (r["size"], r["N"], r["pass_"]) == (size, n, pass_)]
                for cand in dict.fromkeys(r["candidate"] for r in sel):
                    pts = sorted((r["B"], r["paired_speedup_vs_eager"]) for r in sel
                                 if r["candidate"] == cand)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cand)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{size} N={n} {pass_}", fontsize=9)
                ax.set_xlabel("batch")
                if j == 0:
                    ax.set_ylabel("speedup vs eager composite")
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"drop_tokens ({title})")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "drop_tokens.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    sec = results.get("train_step", {})
    if sec.get("rows"):
        rows = sec["rows"]
        names = [r["variant"] for r in rows]
        panels = [("speedup vs full FT (step)", [r["speedup_vs_full"] for r in rows]),
                  ("saved activations, MiB/img", [r["saved_mib_per_image"] for r in rows]),
                  ("training GFLOP/img", [r["train_gflops_per_image"] for r in rows])]
        if any(r.get("peak_mib") is not None for r in rows):
            panels.append(("peak MiB (CUDA)", [r["peak_mib"] for r in rows]))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
        for ax, (label, vals) in zip(axes, panels):
            # a failed (or, compiled, not profiled) variant has no bar but keeps its place
            ax.bar(range(len(vals)), [0.0 if v is None else v for v in vals], color="tab:blue")
            ax.set_xticks(range(len(vals)))
            ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
            ax.set_title(label, fontsize=9)
            for k, v in enumerate(vals):
                text = f"{v:.3g}" if v is not None else ("failed" if "error" in rows[k] else "")
                ax.text(k, v or 0.0, text, ha="center", va="bottom", fontsize=7)
        cfg = sec["config"]
        fig.suptitle(f"train step: time {cfg['time_model']} B={cfg['time_batch']}, memory/FLOPs "
                     f"{cfg['memory_model']} B={cfg['memory_batch']} ({title})", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "train_step.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    sec = results.get("memory", {})
    if sec.get("saved"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        ax = axes[0]
        sizes = sorted({r["img_size"] for r in sec["saved"]})
        for r in sec["saved"]:
            if "error" in r:
                continue
            key = "peak_mib" if r.get("peak_mib") else "estimate_mib"
            pts = sorted((int(b), v) for b, v in r[key].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts],
                    linestyle="-" if r["img_size"] == sizes[0] else "--", marker=".",
                    label=f"{r['variant']} {r['img_size']}px")
        ax.axhline(sec["config"]["budget_gib"] * 1024, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("training memory MiB" + (" (estimate)" if not any(
            r.get("peak_mib") for r in sec["saved"]) else " (peak)"))
        ax.set_title(f"memory vs batch ({sec['config']['memory_model']}); line: budget",
                     fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
        ax = axes[1]
        for (size, variant) in dict.fromkeys((r["img_size"], r["variant"]) for r in sec["time"]):
            pts = sorted((r["batch"], r["images_per_s"]) for r in sec["time"]
                         if (r["img_size"], r["variant"]) == (size, variant)
                         and r["images_per_s"] is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="-" if size == sizes[0] else "--", label=f"{variant} {size}px")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s (training)")
        ax.set_title(f"throughput vs batch ({sec['config']['time_model']})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        fig.suptitle(f"memory and time scaling ({title})", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "memory.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _slug(results: dict) -> str:
    m = results["meta"]["machine"]
    if results["meta"]["config"]["device"] == "cuda":
        name = m.get("gpu", "gpu").lower().replace("nvidia", "")
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"
    return "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="bsr_kernels benchmark suite: writes DIR/results.json, results.md and plots")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="short run (< 3 min on 2 cores)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--budget-gib", type=float, default=4.0,
                        help="memory budget of the largest-batch figure (default 4)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave torch.compile out: of the drop comparison (the reference) "
                             "and of the training step (the compiled variants)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice; 1 with --tiny)")
    parser.add_argument("--archive", action="store_true",
                        help="also copy results to benchmarks/results/<date>-<device>.md/.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the other sections of an existing DIR/results.json (run the "
                             "sections one command at a time, e.g. under a per-command limit)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models and shapes (for the test suite; figures meaningless)")
    parser.add_argument("--no-plots", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    threads = args.threads if args.threads is not None else (1 if args.tiny else None)
    if threads is not None:
        if threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(threads)
    cfg = SuiteConfig(device=args.device, quick=args.quick, tiny=args.tiny,
                      compile=not args.no_compile, budget_gib=args.budget_gib)
    os.makedirs(args.out, exist_ok=True)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    results = run_suite(cfg, sections, command)
    prev_path = os.path.join(args.out, "results.json")
    if args.append and os.path.exists(prev_path):
        results = merge_results(_load(prev_path), results, sections)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    plots = [] if args.no_plots else write_plots(results, args.out)
    write_markdown(results, os.path.join(args.out, "results.md"), plots)
    print()
    for t in results["targets"]:
        print(_target_line(t))
    if args.archive:
        dest = os.path.join(HERE, "results")
        os.makedirs(dest, exist_ok=True)
        stem = os.path.join(dest, f"{results['meta']['date']}-{_slug(results)}")
        shutil.copyfile(os.path.join(args.out, "results.json"), stem + ".json")
        write_markdown(results, stem + ".md")
        print(f"archived: {stem}.md / .json")
    failed = [n for n in SECTIONS if n in results and "error" in results[n]]
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, results.md, {len(plots)} plots; "
          f"{results['meta']['total_seconds']:.0f} s"
          + (f"; FAILED sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
