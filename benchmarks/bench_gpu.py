"""One prepared GPU run for issues 9 and 10: correctness, the drop op against its peers, and the
training step against its peers. Made for a short lease on a lent GPU, where a hung
``torch.compile`` once cost a whole run (2026-11-26: the compile of a six-line function did not
return in 145 s, then 440 s, and the run produced no tables).

So every part runs in a child process of its own, in priority order, under one deadline, and
writes its results as it goes (``--out``/``part-<name>.json``; a step part after each variant's
build and after the timing). Each compilation and each step build runs under a watchdog
(``--compile-timeout-s`` for a compilation): when it overruns, the child dumps the stacks of all
its threads to ``stacks-<part>-<what>.txt`` (where it hung) and exits; the parent records the
hang and starts the part again, reusing what the child measured (op shapes, and the forward of
a shape whose fwd+bwd it did not finish; profiled steps; a step part times all its variants
again: their ratios are paired within one timing). A first
hang inside a compilation retries with ``TORCHINDUCTOR_COMPILE_THREADS=1`` (compiling
in-process: the known workaround for pool hangs, and slower; kept for the rest of the run; set
that variable beforehand to start that way), unless its stacks show the main thread waiting for
Triton's ``ptxas`` (:func:`hung_in_ptxas`: a subprocess, slow in-process too); any other hang
retries without that candidate, so
the others are still measured. Before the run's first compilation (in whichever part compiles
first) a trivial function is compiled and run under a 60 s watchdog (the compile pool probe):
when it hangs, that part is retried, and every later part runs, with
``TORCHINDUCTOR_COMPILE_THREADS=1`` at once, instead of after a real build's compile timeout;
``results.md`` says how the probe went. A child stops itself at the deadline (``check``,
``op``, ``sync`` and ``sweep`` also at a time limit of their own, against a hang in a first
Triton compile, and ``tests`` at one of its own), its stacks in
``stacks-<part>-time_limit.txt`` and what it saved kept; the parent kills it only if it has not
stopped 10 s later. A step part keeps the run's last 60 s
for timing the variants it has built (their ratios are paired within one timing): it starts a
compiled build only when the time one is expected to take fits before then (the slowest
compiled build so far in the run, 1.3 times; 75 s before any), and stops a build still running
then, so that the others are timed. ``op-compiled`` starts no shape after the targets' first one
unless what ``step-compiled`` needs for one compiled build is left when that shape ends (its
longest shape so far taken as what the next one takes; the summary lists what time left out).
The parent merges the parts into ``results.json`` and ``results.md`` after each one and prints
the summary tables last.

Parts (``--parts``, default all, in this order):

* ``check``: the Triton forward, replay and backward against the float64 reference on edge and
  ViT shapes in fp32 / bf16 / fp16 (poisoned outputs, fresh random inputs, run twice); and the
  selection at the digit widths the sweep tries (``select_radix_bits``), which must keep the
  table's tokens (one image's scores all tied).
* ``op``: forward and fwd+bwd of the drop at ViT shapes: the library op, the eager composite
  (N x N probabilities) and the CLS-row composite (plain PyTorch); a device-to-device copy
  measured in the same run gives the bandwidth bound. Inputs rotate over enough sets that L2
  does not hold them (``_timing.rotation_sets``); q and k are views of one qkv tensor, as in
  timm. ``triton.testing.do_bench`` medians, candidates interleaved over rounds; each pass is
  also timed as CUDA-graph replays (GPU time without launch overhead), interleaved over rounds
  too, which the ratios use (a ratio whose two sides were not both captured uses their eager
  calls, and the table says so). Every ratio is the median of per-round ratios
  (``_timing.paired_ratio``). Also the op's passes alone.
* ``sync``: no host sync in any memory mode's step (``torch.cuda.set_sync_debug_mode("error")``).
* ``step``: ViT-B/16 training steps (bf16 autocast, fused AdamW), eager: timm full fine-tuning,
  the authors' formulation, the plain-PyTorch BSR peer (:mod:`peer_bsr`) and ``reprogram`` in
  each memory mode; ms/step medians (interleaved), img/s, ratios, peak memory above the resident
  model. The ``train_step`` section's own code (:func:`bench_train_step.step_rows`) and
  variant names.
* ``op-compiled``: the op against ``torch.compile`` of the CLS-row composite (and the composite
  itself), forward and fwd+bwd, ratios in this process; ViT-B B=128 first.
* ``step-compiled``: ``torch.compile`` of timm full fine-tuning, of the peer and of ``reprogram``
  in each mode, and autograd mode and the peer under CUDA graphs (``mode="reduce-overhead"``:
  their own like-for-like verdict), with eager full
  fine-tuning and eager autograd and lean modes timed beside them for in-process ratios; built
  in :data:`COMPILED_STEPS` order, the targets' compiled peers first. The targets' best BSR mode
  is eager or compiled, as its peers are (CUDA-graphed rows stay in the table).
* ``tests``: the test suite's CUDA cases (``pytest tests/test_ops.py tests/test_triton_backend.py
  tests/test_modes.py tests/test_finetune.py tests/test_multitask_cli.py -k cuda``; CI has no
  GPU; the last two files' are bsr-finetune on the GPU, eager and under CUDA graphs, and its
  multitask demo): counts, failures and skip reasons.
* ``profile``: where a step's time goes (:func:`bench_train_step.step_profile`), the eager
  variants and (CUDA) compiled autograd mode and compiled peer: wall and host-issue time per
  step, kernels per step, the kernels' own device time and how busy that keeps the GPU, the top
  kernels, the share of copies/casts and the costliest host events. A host time close to the
  wall time means a launch-bound step (then CUDA graphs or compile are the lever).
* ``step-graphs``: the eager step of the peer and of each memory mode captured whole in one CUDA
  graph by hand (``<variant>+graph``, :func:`_suite.make_step`; nothing compiled, so lean and
  fast are captured with their custom backward), beside full fine-tuning and the eager forms,
  checked against the eager first step (logits and gradients).
* ``sweep``: the Triton launch table (programs per SM, warps of the gather and of the selection,
  the selection's digit width) at the op shapes but ViT-S, CUDA-graph times.
* ``sac`` (last: an experiment): :mod:`probe_sac`'s step timings, lean and fast written as
  selective activation checkpointing (compiles into one graph) against the library's modes.

Usage (device machine, repository root): ``python -m benchmarks.bench_gpu --out $OUT``
(``--deadline-s`` bounds the whole run, from the process's start; ``--parts op,step`` runs
some parts). ``--smoke`` runs the parts on tiny CPU shapes, the Triton check in its interpreter
(tests this script without a GPU).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import gc
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

import torch

import bsr_kernels
from bsr_kernels.baselines import eager_drop_composite
from bsr_kernels.ops import reference
from bsr_kernels.ops.common import num_kept

from ._suite import (SuiteConfig, Target, is_compiled, is_graphed, make_inputs, min_bytes,
                     model_label, qkv_views, shown_percent)
from ._timing import (Rotating, capture_graph, copy_gbps, do_bench_rounds, error_text,
                      l2_bytes, paired_ratio, rotation_sets)
from .peer_bsr import cls_row_drop

def process_start_time() -> float:
    """``time.time()`` when this process started (Linux: its start time in ``/proc/self/stat``
    against ``/proc/uptime``), so that a run counts its interpreter's start and imports (a cold
    torch import takes 10-30 s on a fresh machine) against its deadline; where ``/proc``
    cannot be read, now."""
    now = time.time()
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return min(now, now - uptime + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return now


#: Start of the run: the parent's (:func:`main`), which its children log on and get from
#: ``BSR_BENCH_T0``.
T0 = float(os.environ.get("BSR_BENCH_T0", time.time()))

#: The parts, in the order a short lease should spend its time on them.
#: What the verdicts of issues 9 and 10 (:func:`targets`) need comes first: correctness, the
#: op against its eager and compiled peers, no host syncs, the eager and compiled steps; then
#: the diagnostics (where a step's time goes, whole-step CUDA graphs), the launch-table sweep
#: (tuning for a later change) and the SAC experiment. ``step-compiled`` builds its variants
#: until the deadline allows no more and times those it has, so what follows it may be left
#: for a second call (the summary prints its command, and ``--merge`` joins the calls' results).
PARTS = ("check", "op", "sync", "step", "op-compiled", "step-compiled", "tests", "profile",
         "step-graphs", "sweep", "sac")

#: The ``tests`` part: the test suite's CUDA cases (the CI machine has no GPU), and the files
#: they are in; ``--smoke`` runs a CPU selection of the same files instead.
CUDA_TESTS = ("tests/test_ops.py", "tests/test_triton_backend.py", "tests/test_modes.py",
              "tests/test_finetune.py", "tests/test_multitask_cli.py")
CUDA_TESTS_SELECT, SMOKE_TESTS_SELECT = "cuda", "known_backends or assert_kept_matches"
#: Seconds the ``tests`` part needs at least (the CUDA cases took 122 s on the H100); with less
#: left it is not started, and the summary prints it for a second call.
MIN_TESTS_S = 60.0

#: Training-step variants of the ``step`` and ``step-compiled`` parts (the latter re-times the
#: first two eager ones beside the compiled ones, so every ratio is taken in one process).
EAGER_STEPS = ("full", "eager_bsr", "peer_bsr", "bsr_autograd", "bsr_fast", "bsr_lean")
#: Variants of the ``profile`` part (where a step's time goes: host or device, which kernels,
#: which host events): the eager ones, then autograd mode and the peer compiled (on the H100,
#: 2026-11-27, compiled autograd mode was timed at 33.9 ms a step against the compiled peer's
#: 22.0 and its own 14.6 under CUDA graphs, after graph-breaking models had compiled in that
#: process: where a compiled step's host time goes, alone in its process).
PROFILED_STEPS = ("full", "peer_bsr", "bsr_autograd", "bsr_fast", "bsr_lean",
                  "bsr_autograd+compile", "peer_bsr+compile")
#: Variants of the ``step-graphs`` part: whole steps captured in one CUDA graph, with their
#: eager forms and full fine-tuning timed beside them.
GRAPHED_STEPS = ("full", "peer_bsr", "bsr_autograd", "bsr_fast", "bsr_lean", "peer_bsr+graph",
                 "bsr_autograd+graph", "bsr_fast+graph", "bsr_lean+graph")
#: ``step-compiled`` builds them in this order until the deadline allows no more, and times those
#: it built. The eager ones first (seconds each): full fine-tuning and the BSR modes the targets
#: need in this process (:func:`targets` reads one part's rows: lean's target needs a lean row).
#: Then the peers the targets compare with, compiled (one call of the run may build only one or
#: two compiled variants): the peer, then full fine-tuning, so that every step target is
#: measured; with only eager BSR modes beside them a target reads low, never high (a compiled
#: mode can only raise the best). Then compiled autograd mode, the likely best mode, with
#: and without CUDA graphs, and the peer under CUDA graphs (the issue's strongest row, and the
#: like-for-like peer of the CUDA-graphed modes), lean under CUDA graphs (its own verdict
#: against the best CUDA-graphed mode), then the rest. A variant that breaks its graph would be
#: built and timed in a second phase (:func:`bench_train_step.timing_phases`): on 2026-11-27
#: compiled lean and fast still broke theirs and were built before the timing
#: (:mod:`benchmarks.probe_compile_order` shows what that does).
COMPILED_STEPS = ("full", "bsr_autograd", "bsr_lean", "peer_bsr+compile", "full+compile",
                  "bsr_autograd+compile", "bsr_autograd+cudagraphs", "peer_bsr+cudagraphs",
                  "bsr_lean+cudagraphs", "bsr_lean+compile", "bsr_fast+compile")


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def err(e: BaseException) -> str:
    return error_text(e, 300)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str, allow_nan=True)
    os.replace(tmp, path)


def stacks_file(part: str, label: str) -> str:
    """Where the watchdog dumps the thread stacks of ``label`` hanging in ``part``."""
    return f"stacks-{part}-{_slug(label)}.txt"


def _read_hung_in_ptxas(path: str) -> bool:
    """:func:`hung_in_ptxas` of a stacks file; False when it cannot be read."""
    try:
        with open(path) as f:
            return hung_in_ptxas(f.read())
    except OSError:
        return False


def hung_in_ptxas(stacks: str) -> bool:
    """Whether a hang's dump (:func:`dump_stacks`) shows it waiting for Triton's ``ptxas``: the
    main thread in ``make_cubin`` (compiling in-process), or a ``ptxas`` among the descendant
    processes (an inductor compile worker's). A compiler subprocess runs just the same when
    compiling in-process (``TORCHINDUCTOR_COMPILE_THREADS=1``). Seen on the H100 on 2026-11-27:
    the CLS-row composite's compilation hung for 180 s, and its in-process retry sat in ptxas
    for 180 s more."""
    main = stacks.partition("(MainThread)")[2].split("\n\nThread ", 1)[0]
    children = stacks.partition(CHILDREN_HEADER + ":\n")[2].splitlines()
    return "in make_cubin" in main or any(
        os.path.basename(line.split(": ", 1)[-1].split(" ", 1)[0]) == "ptxas" for line in children)


class Skipped(Exception):
    """A candidate left out: it hung in an earlier attempt of this part."""


#: Exit status of a worker that its own clock stopped (:func:`run_worker`: the run's deadline
#: or the part's time limit); a watchdog's exit is 1.
STOPPED = 3
#: The label of the part's own clock in its stacks file (``stacks-<part>-time_limit.txt``).
TIME_LIMIT = "time limit"


class Worker:
    """The part running in this process: its results and what it is doing right now, saved to
    ``part-<name>.json`` after every change, so that a hang or a crash loses nothing and the
    parent knows what hung (``running``) and whether it was compiling (``compiling``).

    A retry of the part finds the file its earlier attempt left (:func:`run_part` removes it
    only before the first): its results are ``previous`` and this attempt's start, and the part
    takes what it can reuse from them (:meth:`reuse`) instead of measuring it again.
    ``reserve_s``: seconds to leave to the parts after this one (``op-compiled`` starts no new
    shape unless that is left before ``deadline`` when the shape ends). ``build_s``: the slowest
    compiled step build of the run so far (the parent's earlier parts and this part's earlier
    attempts; None: none), what a step part expects of its next one. ``probe_pool``: probe
    inductor's compile worker pool before the first compilation (:meth:`watchdog`,
    :func:`probe_compile_pool`)."""

    def __init__(self, part: str, out_dir: str, skip: list[str], compile_timeout_s: float,
                 deadline: float, reserve_s: float = 0.0, build_s: float | None = None,
                 probe_pool: bool = False):
        self.part, self.out_dir, self.skip = part, out_dir, set(skip)
        self.compile_timeout_s, self.deadline, self.reserve_s = (compile_timeout_s, deadline,
                                                                 reserve_s)
        self.probe_pool, self.device = probe_pool, "cpu"
        self.path = os.path.join(out_dir, f"part-{part}.json")
        self.previous = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.previous = json.load(f).get("result", {})
            self.previous.pop("error", None)
        self.build_s = max(filter(None, [build_s, slowest_compiled_build({part: self.previous})]),
                           default=None)
        self.state = {"part": part, "running": None, "compiling": False,
                      "result": dict(self.previous)}

    def save(self) -> None:
        _write_json(self.path, self.state)

    def put(self, key: str, value) -> None:
        self.state["result"][key] = value
        self.save()

    def reuse(self, key: str):
        """What the earlier attempt measured under ``key`` (None: nothing, or only an error)."""
        value = self.previous.get(key)
        return None if isinstance(value, dict) and "error" in value else value

    @contextlib.contextmanager
    def watchdog(self, label: str, seconds: float | None = None, compiling: bool | None = None):
        """Runs the block with ``label`` recorded as running; past ``seconds`` (default: the
        compile timeout, and the block is recorded as compiling, as it is with ``compiling``)
        the stacks of every thread go to ``stacks-<part>-<label>.txt`` and the process exits
        (:func:`expiring`). Raises :class:`Skipped` for a label that hung before. Before the
        first compilation, with ``probe_pool``, :meth:`probe` runs (under its own watchdog)."""
        stacks = stacks_file(self.part, label)
        if label in self.skip:
            raise Skipped(f"hung in an earlier attempt ({stacks})")
        compiling = seconds is None if compiling is None else compiling
        if compiling and self.probe_pool:
            self.probe()
        seconds = self.compile_timeout_s if seconds is None else seconds
        self.state["running"], self.state["compiling"] = label, compiling
        self.save()
        try:
            with expiring(os.path.join(self.out_dir, stacks), seconds,
                          f"Timeout ({seconds} s) while running {label!r}", 1, backstop=True):
                yield
        finally:  # finished in time, or raised: nothing running
            self.state["running"], self.state["compiling"] = None, False
            self.save()

    def probe(self) -> None:
        """Once: :func:`probe_compile_pool` under a watchdog of :data:`POOL_PROBE_S` (at most the
        compile timeout), recorded as a compilation (:data:`POOL_PROBE`): when it overruns, this
        process exits and the parent retries the part with ``TORCHINDUCTOR_COMPILE_THREADS=1``
        (:func:`run_part`), as after any hung compilation, but within a minute instead of a
        whole compile timeout. What it measured goes to ``state["pool_probe"]``."""
        self.probe_pool = False
        limit = min(POOL_PROBE_S, self.compile_timeout_s)
        log(f"{POOL_PROBE}: a trivial function compiled and run (limit {limit:.0f} s)")
        try:
            with self.watchdog(POOL_PROBE, limit, compiling=True):
                record = probe_compile_pool(self.device)
        except Exception as e:  # not a hang: the part's own compilations will say more
            record = {"error": err(e)}
        record.update(part=self.part, limit_s=limit, threads=os.environ.get(
            "TORCHINDUCTOR_COMPILE_THREADS", "inductor's default"))
        self.state["pool_probe"] = record
        self.save()
        log(POOL_PROBE, record)


#: Seconds the compile pool probe (:func:`probe_compile_pool`) may take before it counts as a
#: hang (at most ``--compile-timeout-s``). On an H100 host it should take seconds: the pool's
#: start, inductor's import and one small kernel.
POOL_PROBE_S = 60.0
#: The probe's label: what a part file says is running while it runs, its stacks file.
POOL_PROBE = "compile pool probe"


def _probe_fn(x):  # a few elementwise ops: one fused kernel
    return torch.relu(x.sin() * 2.0 + x.cos()) - 0.5 * x


def probe_compile_pool(device: str) -> dict:
    """Whether inductor's parallel compile works here, cheaply: on CUDA waits until its worker
    pool is ready (when inductor uses one), then compiles (``dynamic=False``) and runs a few
    elementwise ops; a kernel compiled once the pool is ready is compiled in it. Returns
    ``{"seconds", "pool_ready_s" (CUDA), "matches_eager"}``. A hung pool hangs here, within the
    probe's watchdog (:meth:`Worker.probe`), not in a real build's compile timeout."""
    t0 = time.perf_counter()
    out = {}
    if device == "cuda":
        from torch._inductor.async_compile import AsyncCompile
        wait = getattr(AsyncCompile, "wait_pool_ready", None)  # not in every torch
        if wait is not None:
            wait(timeout=10 * POOL_PROBE_S)  # the watchdog is the limit
            out["pool_ready_s"] = time.perf_counter() - t0
    x = torch.randn(4096, device=device, generator=torch.Generator(device=device).manual_seed(3))
    y = torch.compile(_probe_fn, dynamic=False)(x)
    if device == "cuda":
        torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - t0
    out["matches_eager"] = bool(torch.allclose(y, _probe_fn(x), atol=1e-5))
    return out


def slowest_compiled_build(parts: dict) -> float | None:
    """The longest compiled step build (``build_s`` of a ``+compile`` or ``+cudagraphs`` step
    row or SAC entry) in ``parts`` (part name -> result); None: none was measured."""
    found = []
    for res in parts.values():
        if not isinstance(res, dict):
            continue
        entries = [(r.get("variant"), r) for r in res.get("rows") or [] if isinstance(r, dict)]
        if isinstance(res.get("time"), dict):
            entries += list(res["time"].items())
        found += [r["build_s"] for v, r in entries if isinstance(r, dict) and r.get("build_s")
                  and is_compiled(v)]
    return max(found, default=None)


WORKER: Worker | None = None
WATCHDOG_BACKSTOP_S = 20.0


@contextlib.contextmanager
def expiring(path: str, seconds: float, header: str, status: int, backstop: bool = False):
    """Runs the block; past ``seconds`` the stacks of every thread go to ``path`` (``header``
    first) and the process exits with ``status``. A block that ends in time (or raises) leaves
    no file.

    A Python thread takes the stacks (:func:`dump_stacks`, under the GIL). ``faulthandler``'s
    own watchdog reads the frames without the GIL: on a thread that is still busy (a slow
    compile rather than a deadlock) it has died mid-dump and left a truncated file. With
    ``backstop`` it stays, ``WATCHDOG_BACKSTOP_S`` later, for code that hangs holding the GIL
    (one per process: the innermost block has it). The process's descendants (listed in the
    dump) are killed before it exits."""
    with open(path, "w") as f:
        done = threading.Event()

        def expire():
            if not done.wait(max(seconds, 0.0)):
                stacks, children = dump_stacks(f.fileno(), header)
                keep_hang_sources(path, stacks, children)
                for pid, _ in children:  # a hung ptxas, compile workers, pytest: not left
                    with contextlib.suppress(OSError):   # running beside the next timings
                        os.kill(pid, signal.SIGKILL)
                os._exit(status)

        threading.Thread(target=expire, name="bench_gpu watchdog", daemon=True).start()
        if backstop:
            faulthandler.dump_traceback_later(seconds + WATCHDOG_BACKSTOP_S, exit=True, file=f)
        try:
            yield
        finally:
            done.set()
            if backstop:
                faulthandler.cancel_dump_traceback_later()
            os.remove(path)


def dump_stacks(fd: int, header: str) -> tuple[str, list[tuple[int, str]]]:
    """Writes the stack of every other thread to ``fd`` in one write, innermost call first (the
    ``faulthandler`` layout, every frame), then this process's descendants (command lines cut
    to 200 characters). Names and line numbers only: reading source could wait on the import
    lock that a hung thread holds. Returns the text and the descendants' whole command lines."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = [header]
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        lines.append(f"\nThread {ident:#x} ({names.get(ident, '?')}) (most recent call first):")
        while frame is not None:
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {frame.f_lineno} in {code.co_name}')
            frame = frame.f_back
    children = descendant_commands(width=None)
    if children:
        lines += ["", f"{CHILDREN_HEADER}:"] + [f"  {pid}: {cmd[:200]}" for pid, cmd in children]
    os.write(fd, ("\n".join(lines) + "\n").encode(errors="replace"))
    return "\n".join(lines), children


def keep_hang_sources(path: str, stacks: str, children) -> list[str]:
    """Copies what a hung compilation was compiling next to its stacks file ``path``: the
    inductor modules in the stacks (``/tmp/torchinductor_*/**.py``, as ``<stem>.module<i>.py``)
    and the PTX that a ``ptxas`` descendant was reading (as ``<stem>.ptx<i>.ptx``), so that a
    compiler hang names its kernel. Returns the files written (none where nothing can be read).
    On 2026-11-27 such a hang was recorded without its kernel."""
    sources = sorted(set(re.findall(r'File "(/tmp/torchinductor[^"]+\.py)"', stacks)))
    sources = [("module", s) for s in sources] + [
        ("ptx", a) for _, cmd in children
        if os.path.basename(cmd.split(" ", 1)[0]) == "ptxas"
        for a in cmd.split() if a.endswith(".ptx")]
    kept = []
    for kind, src in sources:
        dst = (f"{os.path.splitext(path)[0]}.{kind}{sum(f'.{kind}' in k for k in kept)}"
               f"{os.path.splitext(src)[1]}")
        with contextlib.suppress(OSError):
            shutil.copyfile(src, dst)
            kept.append(dst)
    return kept


#: The heading of :func:`dump_stacks`'s list of the process's descendants.
CHILDREN_HEADER = "Child processes (pid: command line)"


def descendant_commands(root: int | None = None,
                        width: int | None = 200) -> list[tuple[int, str]]:
    """The processes descended from ``root`` (this one by default) with their command lines
    (``width`` characters at most; None: whole), read from ``/proc`` (empty where it cannot be
    read): a compile that hangs in a compiler subprocess (``ptxas``, run by an inductor worker
    or by this process) shows there."""
    root = os.getpid() if root is None else root
    parent = {}
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry}/stat") as f:
                        parent[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
    except OSError:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in sorted(c for c, pp in parent.items() if pp == pid):
            todo.append(child)
            with contextlib.suppress(OSError):
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append((child, cmd[:width]))
    return found


def bench(fns: dict, cuda: bool, rounds: int = 3, rep_ms: int = 60) -> dict:
    """Median ms per call of each candidate, interleaved over ``rounds`` rounds."""
    return do_bench_rounds(fns, cuda, rounds, rep_ms, log=log)


def warmed(candidates: dict, errors: dict, compiled: dict[str, str]) -> dict:
    """The candidates that ran once: compiled ones (``compiled``: name -> watchdog label) under
    the watchdog (a hang ends this process; :func:`run_part` retries or skips that label);
    failures go to ``errors``."""
    ok = {}
    for name, fn in candidates.items():
        try:
            if name in compiled:
                with WORKER.watchdog(compiled[name]):
                    fn()
            else:
                fn()
            ok[name] = fn
        except Exception as e:  # a failing candidate is reported; the others go on
            errors[name] = err(e)
            log("  FAILED", name, errors[name])
    return ok


# --- the drop op ----------------------------------------------------------------------------------

OP_SHAPES = [("ViT-B B=128", 128, 12, 197, 64), ("ViT-B B=32 N=577", 32, 12, 577, 64),
             ("ViT-S B=256", 256, 6, 197, 64), ("ViT-B B=8", 8, 12, 197, 64)]
#: The op shape of ``--smoke`` (CPU).
SMOKE_OP_SHAPES = [("tiny", 4, 2, 17, 8)]
EAGER_PEER, ROW_PEER, COMPILED_PEER = ("eager composite", "CLS-row composite",
                                       "compile(CLS-row composite)")
#: The watchdog label of the compiled peer's fwd+bwd compilation (its forward's is
#: :data:`COMPILED_PEER`): a hang there leaves the forward compiled at every shape.
COMPILED_PEER_FWD_BWD = f"{COMPILED_PEER} fwd+bwd"


def part_op(cuda: bool, device: str, compiled: bool = False) -> dict:
    """The drop against its eager peers (``compiled=False``) or against the compiled CLS-row
    composite (``compiled=True``); ratios are taken within this call. The shapes in
    :data:`OP_SHAPES` order, the targets' shape first; a shape measured by an earlier attempt
    of the part is kept (with its copy bandwidth), and so is the forward of a shape whose
    fwd+bwd it did not finish (saved before the fwd+bwd starts; the compiled peer's two passes
    compile under separate watchdog labels, so a hang in its fwd+bwd leaves its forward
    measured, there and at the later shapes). ``op-compiled`` (a cold compile per shape and
    pass) starts no shape after the first unless the worker's ``reserve_s`` and the longest
    shape so far (``seconds``, its two passes) are left, so that a shape started ends before
    the reserve: those are ``{"error"}`` (with the forward, if an earlier attempt measured it)
    and listed in ``skipped_for_time``."""
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = OP_SHAPES if cuda else SMOKE_OP_SHAPES
    g = torch.Generator(device=device).manual_seed(1)
    out = {"copy_gbps": WORKER.reuse("copy_gbps") or copy_gbps(device, None if cuda else 1 << 24),
           "skipped_for_time": []}
    WORKER.put("copy_gbps", out["copy_gbps"])
    log(f"copy: {out['copy_gbps']:.0f} GB/s")
    ours = "bsr " + bsr_kernels.ops.select_backend(torch.device(device), dtype).name
    op = lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5)  # noqa: E731
    peers = {ROW_PEER: cls_row_drop}
    if compiled:  # one dynamo entry per shape and pass: the limit must not leave some eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   4 * len(shapes))
        peers[COMPILED_PEER] = torch.compile(cls_row_drop, dynamic=False)
    else:
        peers[EAGER_PEER] = lambda x, q, k: eager_drop_composite(x, q, k, 0.5)
    longest = 0.0  # seconds of the longest shape so far: what the next one may take
    for i, (label, b, h, n, d) in enumerate(shapes):
        res = WORKER.reuse(label)
        if res is not None and "fwd+bwd" in res:
            out[label] = res
            longest = max(longest, res.get("seconds", 0.0))
            log(label, "measured by an earlier attempt of this part")
            continue
        left = WORKER.deadline - time.time()
        if compiled and i and left < WORKER.reserve_s + longest:  # a forward measured is kept
            out[label] = {**(res or {}), "error": f"skipped: out of time ({left:.0f} s left, "
                                                  f"{WORKER.reserve_s:.0f} s kept for the later "
                                                  f"parts, a shape takes {longest:.0f} s)"}
            out["skipped_for_time"].append(label)
            WORKER.put(label, out[label])
            WORKER.put("skipped_for_time", out["skipped_for_time"])
            log(label, out[label]["error"])
            continue
        c = h * d
        started = time.time() - (res or {}).get("seconds", 0.0)  # the forward's, if measured
        if res is not None:
            log(label, "forward measured by an earlier attempt of this part")
        else:
            res = _op_forward(ours, op, peers, (b, h, n, d), dtype, device, g, cuda, compiled)
            forward_figures(res, ours, peers, out["copy_gbps"])
            res["seconds"] = time.time() - started
            WORKER.put(label, res)  # a hang in the fwd+bwd keeps the forward
        gsets = rotation_sets(lambda: make_inputs(b, n, h, c, dtype, device, True, generator=g),
                              l2_bytes() if cuda else 0)

        def fb(fn):  # grads to x and the qkv tensor with a fixed cotangent
            def run(x, q, k, v, qkv):
                # the graph to differentiate is made in the call, on its stream: a captured
                # backward must not reach nodes made on another stream (the default one, where
                # the inputs were built), which invalidates the capture
                x, qkv = x.detach().requires_grad_(), qkv.detach().requires_grad_()
                q, k, _ = qkv_views(qkv)
                o = fn(x, q, k)
                o = o[0] if isinstance(o, tuple) else o
                return torch.autograd.grad(o, (x, qkv), torch.ones_like(o))
            return Rotating(run, gsets)
        errors = {}
        fbs = warmed({name: fb(fn) for name, fn in [(ours, op), *peers.items()]
                      if name in res["forward"]}, errors, {COMPILED_PEER: COMPILED_PEER_FWD_BWD})
        res["fwd+bwd"] = bench(fbs, cuda)
        if cuda:
            res["fwd+bwd_graph"] = graph_times(fbs, len(gsets))
        res["errors"].update({f"{name} (fwd+bwd)": e for name, e in errors.items()})
        fwd_bwd_figures(res, ours, peers)
        res["seconds"] = time.time() - started
        longest = max(longest, res["seconds"])
        out[label] = res
        WORKER.put(label, res)  # per shape: a later hang loses nothing
        log(label, json.dumps({k: v for k, v in res.items() if k != "passes"}, default=str)[:900])
        gsets = None  # free before the next shape
        gc.collect()
    return out


def _op_forward(ours: str, op, peers: dict, shape, dtype, device: str, g, cuda: bool,
                compiled: bool) -> dict:
    """One shape's forward in :func:`part_op`: ``forward`` (``do_bench`` medians of ours and
    the peers), on CUDA ``forward_graph`` (CUDA-graph replays) and, in the eager part,
    ``passes`` (the op's passes alone); ``errors`` of the candidates that failed, and
    ``min_bytes``. Inputs rotate over several sets (:func:`_timing.rotation_sets`; freed on
    return)."""
    b, h, n, d = shape
    c = h * d
    sets = rotation_sets(lambda: make_inputs(b, n, h, c, dtype, device, generator=g)[:3],
                         l2_bytes() if cuda else 0)
    res, errors = {}, {}
    fwd = warmed({ours: Rotating(op, sets),
                  **{name: Rotating(fn, sets) for name, fn in peers.items()}},
                 errors, {COMPILED_PEER: COMPILED_PEER})
    res["forward"] = bench(fwd, cuda)
    if cuda:  # GPU time without launch overhead (what a captured or compiled step sees)
        res["forward_graph"] = graph_times(fwd, len(sets))
    if cuda and not compiled:  # the passes of the forward and of the backward, alone
        try:
            res["passes"] = bench(op_passes(*sets[0], d ** -0.5), cuda, rounds=2)
        except Exception as e:  # a diagnostic: its failure must not cost the shape's figures
            res["passes"] = {"error": err(e)}
    res["errors"] = errors
    res["min_bytes"] = min_bytes(b, h, n, c, dtype=dtype, fused=True)
    return res


def op_passes(x, q, k, scale: float) -> dict:
    """The Triton op's kernels one by one, as calls (name -> function): the forward's logits and
    selection, and its gather; the backward's row pass (scatter of grad_out, the fused row's
    score gradient) and its CLS pass (grad_q, grad_k), on a random grad_out. One prefix token,
    keep rate 0.5, float32 scores (the forward's own for half inputs)."""
    from bsr_kernels.ops import triton_backend as tb
    n = x.shape[1]
    nk = num_kept(0.5, n - 1)
    scores, lse, kept, slot = tb._launch_scores(q, k, scale, 1, torch.float32, nk)
    x_out = tb._launch_gather(x, slot, scores, 1, nk, True)
    grad_out = torch.randn_like(x_out)
    _, grad_scores = tb._launch_rows_bwd(grad_out, kept, x, scores, n, 1, True)
    return {"logits+select": lambda: tb._launch_scores(q, k, scale, 1, torch.float32, nk),
            "gather": lambda: tb._launch_gather(x, slot, scores, 1, nk, True),
            "backward rows": lambda: tb._launch_rows_bwd(grad_out, kept, x, scores, n, 1, True),
            "backward cls": lambda: tb._launch_cls_bwd(grad_scores, q, k, lse, scale, 1)}


def graph_times(candidates: dict, n_calls: int, rounds: int = 3) -> dict:
    """GPU time per call of each candidate without launch overhead: ``n_calls`` calls captured
    in one CUDA graph per candidate (:func:`_timing.capture_graph`), then the replays timed
    interleaved over ``rounds`` rounds (A B C A B C ..., :func:`bench`), so that a ratio pairs
    samples taken side by side (timed one after the other, a drift of the GPU's clocks between
    two candidates would go into their ratio). name -> ``{"ms", "spread", "samples"}`` per
    call, or ``{"error"}`` where its capture or a replay failed (reported; the others go on).
    Every candidate's graph is held until all are timed."""
    out, replays = {}, {}
    for name, fn in candidates.items():
        try:
            replays[name] = capture_graph(fn, n_calls).replay
        except Exception as e:  # capture can fail: report, go on
            out[name] = {"error": err(e)}
    for name, t in bench(replays, True, rounds).items():
        out[name] = t if "error" in t else dict(t, ms=t["ms"] / n_calls,
                                                samples=[ms / n_calls for ms in t["samples"]])
    return {name: out[name] for name in candidates}


def speedup(times: dict, peer: str, ours: str) -> float:
    """``peer``'s time over ``ours`` in one timing (name -> ``{"ms", "samples"}``): the median
    of per-round ratios (:func:`_timing.paired_ratio`); a timing recorded without its samples
    (results written before they were kept) gives the ratio of its medians."""
    a, b = times[peer], times[ours]
    if a.get("samples") and b.get("samples"):
        return paired_ratio(a["samples"], b["samples"])
    return a["ms"] / b["ms"]


def fwd_bwd_figures(res: dict, ours: str, peers) -> None:
    """Per peer ``fwd+bwd speedup vs <peer>`` (:func:`speedup`) of one shape's result ``res``:
    from the CUDA-graph replays (``fwd+bwd_graph``: GPU time, as the forward's ratios) when both
    sides were captured, else from the eager calls (``fwd+bwd``); ``fwd+bwd_ratio_from[peer]``
    names which.
    The eager ratio is kept too (``... (eager calls)``): on a slow host it measures Python and
    launches, which are the same few microseconds at every size."""
    res["fwd+bwd_ratio_from"] = {}
    for peer in peers:
        for key in ("fwd+bwd_graph", "fwd+bwd"):
            t = res.get(key, {})
            if "ms" in t.get(peer, {}) and "ms" in t.get(ours, {}):
                ratio = speedup(t, peer, ours)
                if f"fwd+bwd speedup vs {peer}" not in res:
                    res[f"fwd+bwd speedup vs {peer}"] = ratio
                    res["fwd+bwd_ratio_from"][peer] = key
                if key == "fwd+bwd":
                    res[f"fwd+bwd speedup vs {peer} (eager calls)"] = ratio


def forward_figures(res: dict, ours: str, peers, copy_gbps: float) -> None:
    """The forward figures of one shape's result ``res`` (``forward``: eager calls timed by
    ``do_bench``; on CUDA ``forward_graph``: CUDA-graph replays, GPU time without launch
    overhead), set in it: our op's bandwidth (``gbps``, ``fraction_of_copy``) from its graph
    replays when it was captured, else from its eager calls (``forward_from`` names which), and
    per peer ``forward speedup vs <peer>`` (:func:`speedup`) from the graph replays when both
    ours and that peer were captured, else from the eager calls of both
    (``forward_ratio_from[peer]``): a peer whose capture failed keeps its ratio."""
    def source(*names):  # where all of names have a time: graph replays first
        return next((key for key in ("forward_graph", "forward")
                     if all("ms" in res.get(key, {}).get(name, {}) for name in names)), None)

    own = source(ours)
    res["forward_from"] = own or "forward"
    if own:
        res["gbps"] = res["min_bytes"] / res[own][ours]["ms"] / 1e6
        res["fraction_of_copy"] = res["gbps"] / copy_gbps
    res["forward_ratio_from"] = {}
    for peer in peers:
        key = source(ours, peer)
        if key:
            res[f"forward speedup vs {peer}"] = speedup(res[key], peer, ours)
            res["forward_ratio_from"][peer] = key


def part_check(cuda: bool, device: str) -> dict:
    """Triton vs float64 reference, forward (+replay) and backward."""
    from bsr_kernels.ops.triton_backend import TritonBackend
    tb = TritonBackend()
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(3, 2, 2, 4, 6, 1, 1), (2, 3, 15, 8, 12, 1, 7), (2, 2, 31, 16, 20, 5, 8),
              (2, 2, 15, 8, 12, 1, 13), (4, 12, 197, 64, 768, 1, 98), (2, 12, 577, 64, 768, 1, 288),
              (2, 6, 1025, 80, 480, 1, 512)]
    if not cuda:
        shapes = shapes[:3]
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if cuda else [torch.float32]
    rows, failures = [], []
    for (b, h, n, d, c, p, nk) in shapes:
        for dt in dtypes:
            for fuse in (True, False):
                x, q, k, _, _ = make_inputs(b, n, h, h * d, dt, device, generator=g)
                scale = d ** -0.5
                out1 = tb.drop_forward(x, q, k, scale, p, nk, fuse)
                out2 = tb.drop_forward(x, q, k, scale, p, nk, fuse)
                x_out, kept, scores, lse = out1
                det = all(torch.equal(a, b_) for a, b_ in zip(out1, out2))
                x64, q64, k64 = (t.double() for t in (x, q, k))
                r_scores, r_lse = reference.cls_scores(q64, k64, scale, p)
                own_kept = reference.select_tokens(scores, nk)[0].to(torch.int32)
                r_out, _, _, _ = reference.drop_tokens(x64, q64, k64, scale, p, nk, fuse,
                                                       kept=kept)
                rel = lambda a, r: float((a.double() - r).norm() / r.norm().clamp_min(1e-30))
                rep_out, _, _ = tb.drop_replay(x, q, k, kept, scale, p, fuse)
                # backward: grads vs float64 autograd of the reference on the same selection
                xg, qg, kg = (t.double().requires_grad_() for t in (x, q, k))
                ro, _, _, _ = reference.drop_tokens(xg, qg, kg, scale, p, nk, fuse, kept=kept)
                gout = torch.randn(ro.shape, generator=g, device=device, dtype=torch.float64)
                rgx, rgq, rgk = torch.autograd.grad(ro, (xg, qg, kg), gout, allow_unused=True)
                if x_out.shape[1] > p + nk:
                    gx, gq, gk = tb.drop_backward(gout.to(dt), x, q, k, kept, scores, lse, scale,
                                                  p)
                    gerr = max(rel(gx, rgx), rel(gq, rgq), rel(gk, rgk))
                else:
                    gx = tb.gather_backward(gout.to(dt), kept, n, p)
                    gerr = rel(gx, rgx)
                row = dict(shape=(b, h, n, d, c, p, nk), dtype=str(dt), fuse=fuse,
                           deterministic=det,
                           kept_is_rule_of_own_scores=bool(torch.equal(kept, own_kept)),
                           scores_rel=rel(scores, r_scores), lse_rel=rel(lse, r_lse),
                           out_rel=rel(x_out, r_out),
                           replay_equal=bool(torch.equal(rep_out, x_out)),
                           grad_rel=gerr)
                tol = 1e-5 if dt == torch.float32 else 2e-2
                ok = (det and row["kept_is_rule_of_own_scores"] and row["replay_equal"]
                      and row["scores_rel"] < tol and row["out_rel"] < tol
                      and row["grad_rel"] < (1e-4 if dt == torch.float32 else 3e-2))
                row["ok"] = ok
                rows.append(row)
                WORKER.put("cases", rows)
                if not ok:
                    failures.append(row)
    # the sweep's other digit widths of the selection keep the same tokens (batch 0 all tied)
    from bsr_kernels.ops.triton_backend import LAUNCH, launch_settings
    for (b, h, n, d, c, p, nk) in shapes:
        dt = dtypes[-1]
        x, q, k, _, _ = make_inputs(b, n, h, h * d, dt, device, generator=g)
        q[0, :, 0] = 0
        want = tb.drop_forward(x, q, k, d ** -0.5, p, nk, True)[1]
        for radix in (1, 2, 4):
            if radix == LAUNCH["select_radix_bits"]:
                continue
            with launch_settings(select_radix_bits=radix):
                same = bool(torch.equal(tb.drop_forward(x, q, k, d ** -0.5, p, nk, True)[1],
                                        want))
            row = dict(shape=(b, h, n, d, c, p, nk), dtype=str(dt), select_radix_bits=radix,
                       same_kept_as_table=same, ok=same)
            rows.append(row)
            WORKER.put("cases", rows)
            if not same:
                failures.append(row)
    log(f"check: {len(rows)} cases, {len(failures)} failures")
    for f in failures:
        log("  FAIL", f)
    return {"cases": rows, "failures": len(failures)}


def part_sweep(cuda: bool, device: str) -> dict:
    """Forward time of the op over a grid of launch settings (programs per SM, warps), and the
    selection's other digit widths (``select_radix_bits`` of 1, 2, 4 other than the table's) at
    the table's gather settings."""
    if not cuda:
        return {}
    from bsr_kernels.ops import triton_backend as tb
    g = torch.Generator(device=device).manual_seed(2)
    base = dict(tb.LAUNCH)
    radix = base["select_radix_bits"]
    grid = [dict(programs_per_sm=pps, num_warps=w, select_warps=sw, select_radix_bits=radix)
            for pps in (4, 8, 16) for w in (4, 8) for sw in (1, 4, 8)]
    grid += [dict(programs_per_sm=base["programs_per_sm"], num_warps=base["num_warps"],
                  select_warps=sw, select_radix_bits=r)
             for r in (1, 2, 4) if r != radix for sw in (4, 8)]
    out = {}
    for label, b, h, n, d in [s for s in OP_SHAPES if s[0] != "ViT-S B=256"]:
        sets = rotation_sets(lambda: make_inputs(b, n, h, h * d, torch.bfloat16, device,
                                                 generator=g)[:3], l2_bytes())
        fn = Rotating(lambda x, q, k: bsr_kernels.drop_tokens(x, q, k, 0.5), sets)

        def under(setting):   # the setting's launches, baked into its graph at capture
            def call():
                with tb.launch_settings(**setting):
                    return fn()
            return call

        # every setting's graph replayed interleaved by round (graph_times): the settings'
        # medians are taken side by side, not one setting after another
        times = graph_times({i: under(st) for i, st in enumerate(grid)}, len(sets))
        res = [(t["ms"], st) if "error" not in t else (float("inf"), {**st, "error": t["error"]})
               for st, t in zip(grid, times.values())]
        res.sort(key=lambda r: r[0])
        out[label] = {"best": res[0], "all": res, "default": [r for r in res if all(
            r[1].get(k) == base[k] for k in ("programs_per_sm", "num_warps", "select_warps",
                                             "select_radix_bits"))][:1]}
        WORKER.put(label, out[label])
        log("sweep", label, "best", res[0])
    return out


# --- the training step ----------------------------------------------------------------------------

#: Seconds a step part keeps at the end of the run for timing the variants it has built (on
#: CUDA; 5 s in ``--smoke``): it builds none after ``deadline - this``.
STEP_TIMING_RESERVE_S = 60.0
#: Watchdog of an eager build (a step variant, a profiled step): Triton compiles the library's
#: kernels there the first time.
EAGER_BUILD_S = 180.0


def _step_timing(cuda: bool) -> dict:
    """The keywords of :func:`bench_train_step.time_steps` for a step part: each build under the
    watchdog (``guard``: a hang), and the build deadline, the run's deadline less the timing
    reserve: no build starts after it, a compiled one only when the time it is expected to take
    fits before it (:func:`bench_train_step.compiled_build_room_s` of the run's slowest compiled
    build so far, ``build_s``), and one still running there is stopped, so that the variants
    built are timed (a build the run's deadline stopped would leave them all untimed)."""
    return dict(guard=_step_guard, deadline=WORKER.deadline - (STEP_TIMING_RESERVE_S if cuda
                                                               else 5.0),
                build_s=WORKER.build_s)


def _compiled_step_reserve(build_s: float | None) -> float:
    """Seconds ``step-compiled`` needs to build and time one compiled variant: its eager builds
    and the process start (30 s), the room a compiled build needs to start
    (:func:`bench_train_step.compiled_build_room_s` of ``build_s``, the run's slowest compiled
    build so far) and the timing reserve. What ``op-compiled`` leaves it."""
    from .bench_train_step import compiled_build_room_s
    return 30.0 + compiled_build_room_s(build_s) + STEP_TIMING_RESERVE_S


def _step_guard(variant: str):
    """The watchdog of a step variant's build: the compile timeout for a compiled one (a
    compilation: a hang there retries with TORCHINDUCTOR_COMPILE_THREADS=1), ``EAGER_BUILD_S``
    for an eager or hand-captured (``+graph``) one."""
    return WORKER.watchdog(variant, None if is_compiled(variant) else EAGER_BUILD_S)


def part_step(cuda: bool, device: str, variants) -> dict:
    """The ``train_step`` section's step timings (:func:`bench_train_step.step_rows`) of
    ``variants``: ms/step (interleaved medians), img/s, ratios, peak memory, compiled-vs-eager
    differences; each variant built and compiled under the watchdog. The rows so far are saved
    after each build and after the timing (a stop keeps them). A retry builds and times every
    variant again: ratios are paired within one timing."""
    from .bench_train_step import step_rows
    cfg = SuiteConfig(device=device, tiny=not cuda)
    variants = [v for v in variants if cuda or not (v.endswith("cudagraphs") or is_graphed(v))]
    WORKER.put("batch", cfg.time_batch)
    WORKER.put("model", model_label(cfg.time_model))
    rows = step_rows(cfg, variants, log, report=lambda rows: WORKER.put("rows", rows),
                     **_step_timing(cuda))
    return {"rows": rows, "batch": cfg.time_batch, "model": model_label(cfg.time_model)}


def part_profile(cuda: bool, device: str) -> dict:
    """:func:`bench_train_step.step_profile` of each of :data:`PROFILED_STEPS` (the compiled
    ones on CUDA), each under the watchdog (a compiled one's: the compile timeout); a variant
    that hung in an earlier attempt, or that the deadline leaves out, gets a row with the error
    and the others go on; rows an earlier attempt measured are kept."""
    from .bench_train_step import step_profile
    cfg = SuiteConfig(device=device, tiny=not cuda)
    out = {"model": model_label(cfg.time_model), "batch": cfg.time_batch, "rows": []}
    done = {r["variant"]: r for r in WORKER.reuse("rows") or []
            if not r.get("error", "").startswith("skipped")}
    # compiled variants on CUDA only: --smoke keeps the run's first compilation (and the
    # compile pool probe) in op-compiled, and a tiny CPU model's host time says nothing of a GPU's
    for variant in (v for v in PROFILED_STEPS if cuda or not is_compiled(v)):
        if variant in done:
            row = done[variant]
        elif time.time() > WORKER.deadline - 20:
            row = dict(variant=variant, error="skipped: out of time")
        else:
            try:   # a compiled variant compiles in its build: the compile timeout
                with WORKER.watchdog(variant, None if is_compiled(variant) else EAGER_BUILD_S):
                    row = step_profile(cfg, variant)
            except Skipped as e:
                row = dict(variant=variant, error=f"skipped: {e}")
        out["rows"].append(row)
        WORKER.put("rows", out["rows"])
        log("profile", row)
    return out


def part_sac(cuda: bool, device: str) -> dict:
    """The SAC probe's step timings (:mod:`probe_sac`: lean and fast as selective checkpointing,
    eager and compiled, against the library's modes); its other checks are device independent
    and run on CPU."""
    from .probe_sac import run
    cfg = SuiteConfig(device=device, tiny=not cuda, quick=True)
    return run(cfg, parts=("time",) if cuda else ("exact",), log=log,
               report=lambda t: WORKER.put("time", t), **_step_timing(cuda))


def part_tests(cuda: bool, device: str) -> dict:
    """Runs :data:`CUDA_TESTS` under pytest (``-k cuda``; on CPU the ``--smoke`` selection) in
    a child process, until this part's stop (its time limit or the deadline, 10 s kept to
    report): ``counts`` (passed, failed, skipped, ... from pytest's last line), ``returncode``,
    the ``failed`` and ``skipped`` lines (``-rfEs``) and the output's ``tail``."""
    select = CUDA_TESTS_SELECT if cuda else SMOKE_TESTS_SELECT
    # -v: each test's outcome is printed as it ends, so a run stopped early still tells them
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider",
           *CUDA_TESTS, "-k", select]
    command = shlex.join(["pytest", *cmd[3:]])
    left = WORKER.stop_at - time.time() - 10.0   # stop_at: the limit or the deadline, sooner
    if left < MIN_TESTS_S:
        return {"command": command, "error": f"skipped: out of time ({left:.0f} s left)"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)   # its own group: killed whole, below
    try:
        text, _ = proc.communicate(timeout=left)
        return tests_result(text, proc.returncode, command)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and what it started (ptxas, workers)
        text, _ = proc.communicate()
        return {**tests_result(text, None, command),
                "error": f"stopped: out of time after {left:.0f} s"}


def tests_result(text: str, returncode, command: str) -> dict:
    """:func:`part_tests`'s result from pytest's output ``text`` (``-v -rfEs``): ``counts`` from
    its last line, or, where it has none (stopped early), from the ``PASSED``/``FAILED``/...
    words of the lines ``-v`` printed so far."""
    lines = text.splitlines()
    last = next((ln for ln in reversed(lines) if re.search(
        r"\d+ (passed|failed|errors?|skipped|deselected)", ln) and ln.startswith("=")), "")
    if not last:
        done = collections.Counter(m.group(1).lower() for ln in lines for m in [re.search(
            r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", ln)] if m)
        last = ", ".join(f"{n} {w}" for w, n in done.items())
    counts = {word: int(n) for n, word in re.findall(
        r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", last)}
    return {"command": command, "returncode": returncode, "counts": counts,
            "failed": [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))][:50],
            "skipped": [ln for ln in lines if ln.startswith("SKIPPED ")][:50],
            "tail": "\n".join(lines[-40:])}


#: What the ``sync`` part checks: each memory mode eagerly, and on CUDA autograd and lean modes
#: under ``torch.compile`` (compiled lean runs as selective checkpointing, a path of its own).
SYNC_CHECKS = ("autograd", "fast", "lean", "autograd+compile", "lean+compile")


def part_sync(cuda: bool, device: str) -> dict:
    """No host sync in the forward and backward of :data:`SYNC_CHECKS`: every memory mode, and
    on CUDA the compiled ones (CUDA sync debug mode ``"error"``; a compiled model is compiled
    and warmed first, under the compile watchdog)."""
    from timm.models.vision_transformer import VisionTransformer
    out = {}
    g = torch.Generator(device=device).manual_seed(4)
    kw = dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=5)
    images = torch.randn(4, 3, 64, 64, generator=g, device=device)
    for check in SYNC_CHECKS:
        mode, _, how = check.partition("+")
        if how and not cuda:
            continue   # nothing is checked without CUDA: no compilation for nothing
        torch.manual_seed(0)
        m = bsr_kernels.reprogram(VisionTransformer(**kw).to(device), memory_mode=mode)
        run = torch.compile(m, dynamic=False) if how else m
        key = f"{mode}{' compiled' if how else ''} sync-free"
        try:
            with WORKER.watchdog(check) if how else contextlib.nullcontext():
                run(images).sum().backward()  # warm (and compile)
        except Exception as e:  # hung before, or failed: not checked; the others go on
            out[key] = f"skipped: {e}" if isinstance(e, Skipped) else (
                f"skipped: the warm-up step failed: {err(e)}")
            WORKER.put(key, out[key])
            continue
        m.zero_grad()
        try:
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            run(images).sum().backward()
            out[key] = True if cuda else None  # None: not checked (no CUDA)
        except Exception as e:
            out[key] = err(e)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        WORKER.put(key, out[key])
    log("sync", out)
    return out


#: Time limits (s) of the parts that have no watchdog of their own: a hang there (a first
#: Triton compile) ends the part at its limit instead of eating the run. Every part also stops
#: at the run's deadline. tests: 122 s on the H100 for the kernels' and modes' cases; the
#: bsr-finetune runs since (4 single-task, 2 of them compiled with CUDA graphs, and 2 multitask)
#: are not timed on a GPU yet, so it has more room (pytest -v reports what finished if cut).
PART_LIMITS_S = {"check": 150.0, "op": 150.0, "sync": 180.0, "sweep": 180.0, "tests": 330.0}
#: Seconds the parent waits past a worker's own stop (the deadline or the part's limit) before
#: it kills the worker: the worker stops itself first, its stacks dumped.
KILL_GRACE_S = 10.0


def run_worker(part: str, args) -> dict:
    """This process's side of ``--worker PART``: runs the part and saves its result. The part
    stops at the run's deadline or at its time limit (:data:`PART_LIMITS_S`), whichever comes
    first (``--stop-at``: when the parent has it stop, on the parent's clock; without it, the
    limit counts from here): its thread stacks go to ``stacks-<part>-time_limit.txt`` and the
    process exits with :data:`STOPPED`; what it saved stays (``state["stop"]`` says why it
    stopped)."""
    global WORKER
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    WORKER = Worker(part, args.out, [s for s in args.skip.split("|") if s],
                    args.compile_timeout_s, args.deadline_at or float("inf"), args.reserve_s,
                    build_s=args.build_s or None, probe_pool=args.probe_pool)
    WORKER.device = device
    limit = PART_LIMITS_S.get(part, float("inf"))
    stop_at = args.stop_at or min(WORKER.deadline, time.time() + limit)
    WORKER.stop_at = stop_at
    WORKER.state["stop"] = ("at the deadline" if stop_at >= WORKER.deadline
                            else f"at its {limit:.0f} s time limit")
    WORKER.save()
    parts = {"check": part_check, "op": part_op, "sync": part_sync, "sweep": part_sweep,
             "op-compiled": lambda c, d: part_op(c, d, compiled=True),
             "step": lambda c, d: part_step(c, d, EAGER_STEPS),
             "step-compiled": lambda c, d: part_step(c, d, COMPILED_STEPS), "sac": part_sac,
             "profile": part_profile,
             "step-graphs": lambda c, d: part_step(c, d, GRAPHED_STEPS), "tests": part_tests}
    clock = (expiring(os.path.join(args.out, stacks_file(part, TIME_LIMIT)),
                      stop_at - time.time(), f"Stopped {WORKER.state['stop']}", STOPPED)
             if stop_at < float("inf") else contextlib.nullcontext())
    try:
        with clock:
            WORKER.state["result"] = parts[part](cuda, device)
    except Exception as e:  # recorded; the parent goes on with the next part
        WORKER.state["result"]["error"] = err(e)
        traceback.print_exc()
    WORKER.state["running"] = None
    WORKER.save()
    return WORKER.state


def run_part(part: str, args, deadline_at: float, reserve_s: float = 0.0,
             build_s: float | None = None, probe: dict | None = None) -> dict:
    """Runs ``part`` in child processes until it completes, leaving ``reserve_s`` to the parts
    after it (:class:`Worker`; ``build_s``: the run's slowest compiled step build so far). When
    a child dies inside a watched block (a hang or a crash), the part starts again, reusing what
    that child measured (:meth:`Worker.reuse`): after the first hang in a compilation while
    inductor compiles with its worker pool, with ``TORCHINDUCTOR_COMPILE_THREADS=1`` (compiling
    in-process, the known workaround for pool hangs; kept for the rest of the run: the children
    inherit this process's environment); otherwise without that candidate. A child stopped at
    the deadline or at its part's time limit (:func:`run_worker`) is not retried; the parent
    kills one that overruns that by :data:`KILL_GRACE_S`: it gives the child that stop time
    (``--stop-at``), counted from the spawn, so that the child's clock (started after its
    imports) cannot run past the parent's. Results a child saved are kept.

    ``probe``: the run's record of the compile pool probe, filled here. While it is empty and
    the pool is in use (``TORCHINDUCTOR_COMPILE_THREADS`` is not 1), a child probes the pool
    before its first compilation (:meth:`Worker.probe`); a probe that hangs is a hung
    compilation, so the retry and every later child compile in-process."""
    hangs, skip = [], []
    threads = "TORCHINDUCTOR_COMPILE_THREADS"
    path = os.path.join(args.out, f"part-{part}.json")
    if os.path.exists(path):
        os.remove(path)  # an earlier run's: only this run's attempts are reused
    limit = PART_LIMITS_S.get(part, float("inf"))
    result = {}
    while True:
        left = deadline_at - time.time()
        if left < 15:
            result["error"] = ("skipped: out of time" if not hangs else "out of time to retry "
                               f"after the worker ended while running {hangs[-1]['while']!r}")
            result["hangs"] = hangs
            return result
        probing = probe is not None and not probe and os.environ.get(threads) != "1"
        stop_at = min(deadline_at, time.time() + limit)
        cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--worker", part, "--out", args.out,
               "--skip", "|".join(skip), "--compile-timeout-s", str(args.compile_timeout_s),
               "--deadline-at", str(deadline_at), "--stop-at", str(stop_at),
               "--reserve-s", str(reserve_s), "--build-s", str(build_s or 0.0)] + (
                   ["--smoke"] if args.smoke else []) + (["--probe-pool"] if probing else [])
        try:
            rc = subprocess.run(cmd, timeout=stop_at - time.time() + KILL_GRACE_S).returncode
        except subprocess.TimeoutExpired:
            rc = "killed at the deadline"
        state = {}
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
        result = state.get("result", {})
        running = state.get("running")
        if probing and state.get("pool_probe"):
            probe.update(state["pool_probe"])
        if rc == 0 and not running:
            result["hangs"] = hangs
            return result
        stacks = (stacks_file(part, TIME_LIMIT) if rc == STOPPED
                  else stacks_file(part, running) if running else None)
        if stacks and os.path.exists(os.path.join(args.out, stacks)):
            # numbered by attempt: a retry's watchdog writes (and, if it ends in time,
            # removes) the same name
            numbered = f"{stacks[:-len('.txt')]}-attempt{len(hangs) + 1}.txt"
            os.replace(os.path.join(args.out, stacks), os.path.join(args.out, numbered))
            stacks = numbered
        in_ptxas = bool(stacks and state.get("compiling")
                        and _read_hung_in_ptxas(os.path.join(args.out, stacks)))
        hangs.append({"while": running, "exit": rc, "stacks": stacks,
                      **({"in_ptxas": True} if in_ptxas else {})})
        log(f"part {part}: the worker ended ({rc}) while running {running!r}"
            + (f"; thread stacks in {stacks}" if stacks else ""))
        if rc == STOPPED:
            if running:  # the stacks file of the block it was in, left empty
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(args.out, stacks_file(part, running)))
            result["error"] = f"stopped {state.get('stop')} while running {running!r}"
        elif not running or running in skip or rc == "killed at the deadline":
            result["error"] = f"worker ended ({rc}) while running {running!r}"
        elif state.get("compiling") and os.environ.get(threads) != "1" and not in_ptxas:
            os.environ[threads] = "1"
            hangs[-1]["then"] = "retried with TORCHINDUCTOR_COMPILE_THREADS=1"
            if probing and running == POOL_PROBE:
                probe.update(part=part, hung=True, limit_s=min(POOL_PROBE_S,
                                                              args.compile_timeout_s),
                             stacks=stacks, threads="1 from then on")
            continue
        else:
            skip.append(running)
            hangs[-1]["then"] = f"retried without {running!r}"
            if probing and running == POOL_PROBE:  # hung in ptxas: not retried in-process
                probe.update(part=part, hung=True, in_ptxas=True, stacks=stacks,
                             limit_s=min(POOL_PROBE_S, args.compile_timeout_s))
            continue
        result["hangs"] = hangs
        return result


#: Issue 9's targets for the drop op (H100, bf16): (name, part, shape, key of the shape's result,
#: op, bound). The op's forward against the bandwidth of a copy measured in the same part, and
#: against the CLS-row composite (six lines of PyTorch), compiled or not.
_TARGET_SHAPES = ("ViT-B B=128", "ViT-B B=32 N=577", "ViT-S B=256")
OP_TARGETS = (
    ("drop forward: fraction of the measured copy bandwidth", "op", "ViT-B B=128",
     "fraction_of_copy", ">=", 0.5),
    ("drop forward: fraction of the measured copy bandwidth", "op", "ViT-B B=32 N=577",
     "fraction_of_copy", ">=", 0.3),
    *[("drop forward: speedup vs compiled CLS-row composite", "op-compiled", shape,
       f"forward speedup vs {COMPILED_PEER}", ">=", 2.5) for shape in _TARGET_SHAPES],
    ("drop forward: speedup vs compiled CLS-row composite", "op-compiled", "ViT-B B=8",
     f"forward speedup vs {COMPILED_PEER}", ">=", 1.5),
    *[("drop fwd+bwd: speedup vs CLS-row composite", "op", shape,
       f"fwd+bwd speedup vs {ROW_PEER}", ">=", 2.0) for shape in _TARGET_SHAPES],
)


def targets(results: dict) -> list[Target]:
    """Verdicts of issues 9 and 10 from a run's parts: :data:`OP_TARGETS`, and the step targets
    (:func:`bench_train_step.gpu_step_targets`) over the ``step-compiled`` rows (the compiled
    peer and full fine-tuning are timed there; the ``step`` rows, every eager mode, when it
    timed no compiled variant: its eager rows alone lack fast), with
    lean's peak memory from the eager ``step`` part. NOT MEASURED where a part or shape is
    missing; a part's or shape's error is named."""
    from .bench_train_step import gpu_step_targets
    env, parts = results.get("env", {}), results.get("parts", {})
    gpu = env.get("device") not in (None, "cpu")
    dtype = "bf16" if gpu else "fp32 (--smoke: tiny CPU shapes)"
    out = []
    for name, part, shape, key, op, bound in OP_TARGETS:
        res = parts.get(part, {})
        at = res.get(shape) if isinstance(res.get(shape), dict) else {}
        value = at.get(key)
        why = ([] if value is not None else [f"part {part}: {at['error']}"] if "error" in at
               else [f"part {part}: {res['error']}"] if "error" in res
               else [f"part {part} has no {key!r} for it"])
        if value is not None and key.startswith("fwd+bwd"):
            graphed = at.get("fwd+bwd_ratio_from", {}).get(ROW_PEER) == "fwd+bwd_graph"
            why.append("CUDA-graph replays" if graphed else "eager calls")
        out.append(Target(name, value, op, bound, "" if "fraction" in key else "x",
                          "; ".join([f"{shape}, {dtype}, {env.get('device')}"] + why)))
    step = parts.get("step", {})
    timed_in = ("step-compiled" if any(r.get("step_s") and is_compiled(r.get("variant")) for r in
                                       parts.get("step-compiled", {}).get("rows") or [])
                else "step")
    timed = parts.get(timed_in, {})
    rows = timed.get("rows") or []
    where = (f"{timed.get('model')} B={timed.get('batch')} "
             f"{'bf16 autocast' if gpu else dtype}, {env.get('device')}; ratios within part "
             f"{timed_in}") if rows else "the step parts did not run"
    memory_where = (f"{step.get('model')} B={step.get('batch')}, {env.get('device')}; eager "
                    "lean in part step") if step.get("rows") else "part step did not run"
    out += gpu_step_targets(rows, where, step.get("rows") or [], memory_where)
    return out


def _fmt(x, spec=".2f", suffix="") -> str:
    return f"{x:{spec}}{suffix}" if isinstance(x, (int, float)) else "—"


def _copy_fraction(shape: str, fraction) -> str:
    """A shape's fraction of the copy bandwidth as a table cell: :func:`_suite.shown_percent`
    against the shape's target in :data:`OP_TARGETS`, if it has one (0.4999 against >= 0.5 is
    49.99%, not a "50%" beside a FAIL)."""
    if fraction is None:
        return "—"
    target = next(((bound, op) for _, _, at, key, op, bound in OP_TARGETS
                   if at == shape and key == "fraction_of_copy"), ())
    return shown_percent(fraction, *target)


def _forward_ratio(res: dict, peer: str, pass_: str = "forward") -> str:
    """The ``pass_`` (forward or fwd+bwd) speedup of a shape's result over ``peer``, as a table
    cell: ``(eager calls)`` where it is not from CUDA-graph replays (:func:`forward_figures`,
    :func:`fwd_bwd_figures`)."""
    value = res.get(f"{pass_} speedup vs {peer}")
    # runs of bench_gpu up to commit 1e474d4 timed fwd+bwd by eager calls only, and recorded
    # no source
    unrecorded = pass_ if pass_ == "fwd+bwd" else None
    eager = value is not None and res.get(f"{pass_}_ratio_from", {}).get(peer, unrecorded) == pass_
    return _fmt(value, ".2f", "×") + (" (eager calls)" if eager else "")


def _left_for_time(part: dict) -> list[str]:
    """What a part left out for time while it ran: op shapes (``skipped_for_time``), step
    variants (rows whose error says so)."""
    if not isinstance(part, dict):
        return []
    return list(part.get("skipped_for_time", [])) + [
        r["variant"] for r in part.get("rows") or [] if "out of time" in r.get("error", "")]


def _probe_line(env: dict) -> list[str]:
    """The compile pool probe's outcome (``env["compile_pool_probe"]``), as summary lines."""
    p = env.get("compile_pool_probe")
    if not p:
        return []
    where = f"{POOL_PROBE} (part {p.get('part')})"
    if "skipped" in p:
        line = f"{POOL_PROBE}: not run ({p['skipped']})"
    elif p.get("hung"):
        line = (f"{where}: did not finish in {_fmt(p.get('limit_s'), '.0f')} s (stacks: "
                f"{p.get('stacks')}): TORCHINDUCTOR_COMPILE_THREADS=1 from its retry on")
    elif "error" in p:
        line = f"{where} failed: {p['error']}"
    else:
        ready = (f" (pool ready after {p['pool_ready_s']:.1f} s)" if "pool_ready_s" in p
                 else "")
        line = (f"{where}: a trivial compile ran in {_fmt(p.get('seconds'), '.1f')} s{ready}, "
                f"compile threads {p.get('threads')}")
    return [line, ""]


def _not_run(result: dict) -> bool:
    """Whether a part's result holds nothing measured: skipped, or out of time to retry."""
    return str(result.get("error", "")).startswith(("skipped", "out of time to retry"))


#: ``env`` entries that every call merged by :func:`merge_results` must share: ratios measured
#: on another device or with other software do not compare with these, and the targets would
#: read them as one run's.
MERGE_SAME_ENV = ("device", "torch", "triton", "cuda")


def _shared_env(envs: list[dict]) -> dict:
    """The entries of the first env that every other env has with the same value."""
    return {k: v for k, v in envs[0].items() if all(k in e and e[k] == v for e in envs[1:])}


def merge_results(runs: list[dict]) -> dict:
    """One ``results.json`` from those of several calls, in call order (a lease's 600 s calls:
    the second runs the parts the first left out): each part from the last call that ran it
    (a call that skipped a part for time keeps an earlier call's result), the targets taken
    again from the merged parts. ``env`` holds what every call's env shares (the device and
    the software, :data:`MERGE_SAME_ENV`, always) and ``part_seconds`` of each part from the
    call it was taken from; ``calls`` lists each call's own env (what may differ between calls,
    as the compile threads and the compile pool probe, is there: the summary states it per
    call) and the parts taken from it.

    Raises:
        ValueError: with no call, a call that is not a bench_gpu results.json, or calls whose
            env differs in an entry of :data:`MERGE_SAME_ENV` (named in the message).
    """
    if not runs:
        raise ValueError("merge_results needs the results of at least one call")
    for i, run in enumerate(runs, 1):
        if not (isinstance(run, dict) and isinstance(run.get("parts"), dict)
                and isinstance(run.get("env"), dict)):
            raise ValueError(f"call {i}: not a bench_gpu results.json (no 'parts' and 'env'; "
                             "benchmarks.run's results merge with its --append)")
    kinds = {str(run["env"].get("device")) == "cpu" for run in runs}
    if len(kinds) > 1:   # a --smoke call's tiny CPU figures would stand in for a GPU's parts
        raise ValueError("cannot merge CPU (--smoke) results with GPU ones: the verdicts would "
                         "mix a tiny CPU model's figures into the GPU's")
    for key in MERGE_SAME_ENV:
        values = [run["env"].get(key) for run in runs]
        if any(v != values[0] for v in values):
            raise ValueError(f"cannot merge calls whose env differs in {key!r} (" + ", ".join(
                f"call {i}: {v}" for i, v in enumerate(values, 1)) + "): ratios measured on "
                "another device or with other software do not compare")
    parts, origin = {}, {}
    for i, run in enumerate(runs):
        for part, result in run.get("parts", {}).items():
            if part not in parts or not _not_run(result):
                parts[part], origin[part] = result, i
    calls = [dict(env=run["env"], parts=[p for p in parts if origin[p] == i])
             for i, run in enumerate(runs)]
    env = _shared_env([run["env"] for run in runs])
    seconds = {p: s for i, run in enumerate(runs)
               for p, s in run["env"].get("part_seconds", {}).items() if origin.get(p) == i}
    if seconds:
        env["part_seconds"] = seconds
    merged = {"env": env, "parts": parts, "calls": calls}
    merged["targets"] = [t.to_dict() for t in targets(merged)]
    return merged


def _calls_lines(results: dict) -> list[str]:
    """Summary lines of merged results (:func:`merge_results`): the parts taken from each call,
    then what the calls' envs do not share, per call (``part_seconds`` left out), the compile
    pool probe as :func:`_probe_line` says it; what they share (the header's device and
    software, and a probe they all report) once. None for one call's results."""
    calls = results.get("calls")
    if not calls or len(calls) < 2:
        return []
    shared = _shared_env([c["env"] for c in calls])
    same = all(c["env"].get(k) == calls[0]["env"].get(k) for c in calls for k in MERGE_SAME_ENV)
    each = " (the header's device and software in each)" if same else ""
    lines = [f"Merged from calls{each}: " + "; ".join(
        f"{i}: {', '.join(c['parts']) or 'no part kept'}" for i, c in enumerate(calls, 1)), ""]
    for i, c in enumerate(calls, 1):
        own = {k: v for k, v in c["env"].items() if k not in shared and k != "part_seconds"}
        probe = _probe_line({"compile_pool_probe": own.pop("compile_pool_probe", None)})
        lines += [f"- call {i}: {k}: {v}" for k, v in own.items()]
        lines += [f"- call {i}: {ln}" for ln in probe[:1]]
    if lines[-1]:
        lines.append("")
    return lines + _probe_line(shared)


def summarize(results: dict) -> str:
    """The tables of ``results.md``: the op per shape, the training step per variant."""
    env, parts = results.get("env", {}), results.get("parts", {})
    # the measurement's date (calls of other days: each call's line); results stored before
    # it was recorded have none (the day of summarizing was printed, re-stamped by a merge)
    when = env.get("date") or ("dates per call below" if results.get("calls")
                               else "date not recorded")
    lines = [f"# bench_gpu: {env.get('device')} · torch {env.get('torch')} · triton "
             f"{env.get('triton')} · {when}", ""] + (
                 _calls_lines(results) or _probe_line(env))
    if "check" in parts:
        c = parts["check"]
        lines += [f"check: {len(c.get('cases', []))} cases, {c.get('failures', '?')} failures"
                  + (f" ({c['error']})" if "error" in c else ""), ""]
    if "tests" in parts:
        t = parts["tests"]
        counts = ", ".join(f"{n} {w}" for w, n in t.get("counts", {}).items()) or "no summary"
        lines += [f"tests (`{t.get('command')}`): {counts}; exit {t.get('returncode')}"
                  + (f" ({t['error']})" if "error" in t else "")]
        lines += [f"- {ln}" for ln in t.get("failed", [])] + [""]
    sync = {k: v for k, v in parts.get("sync", {}).items() if k.endswith("sync-free")}
    if sync:
        lines += ["no host sync in forward and backward (CUDA sync debug mode 'error'): "
                  + ", ".join(f"{k.removesuffix(' sync-free')} " + (
                      "yes" if v is True else "not checked (no CUDA)" if v is None
                      else f"not checked ({v})" if str(v).startswith("skipped") else f"NO: {v}")
                      for k, v in sync.items()), ""]
    op, opc = parts.get("op", {}), parts.get("op-compiled", {})
    shapes = [k for k in {**op, **opc} if isinstance(op.get(k, opc.get(k)), dict)
              and "forward" in op.get(k, opc.get(k))]
    if shapes:
        lines += [f"## drop op, forward GPU time (CUDA-graph replay on CUDA), copy "
                  f"{_fmt(op.get('copy_gbps', opc.get('copy_gbps')), '.0f')} GB/s", "",
                  "| shape | bsr µs | of copy | × eager composite | × CLS-row | "
                  "× compiled CLS-row | fwd+bwd × CLS-row | fwd+bwd × compiled |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in shapes:
            r, rc = op.get(s, {}), opc.get(s, {})
            timed = r or rc  # the op's own time: from the eager part when it ran
            ours = next((k for k in timed["forward"] if k.startswith("bsr")), None)
            t = timed.get(timed.get("forward_from", "forward_graph"),
                          timed["forward"]).get(ours, {}).get("ms")
            eager = timed.get("forward_from") == "forward"  # no graph replay of ours
            lines.append("| " + " | ".join([
                s, _fmt(t * 1e3 if t else None, ".1f") + (" (eager calls)" if eager else ""),
                _copy_fraction(s, timed.get("fraction_of_copy")),
                _forward_ratio(r, EAGER_PEER), _forward_ratio(r, ROW_PEER),
                _forward_ratio(rc, COMPILED_PEER), _forward_ratio(r, ROW_PEER, "fwd+bwd"),
                _forward_ratio(rc, COMPILED_PEER, "fwd+bwd")]) + " |")
        lines.append("")
    for name in ("step", "step-graphs", "step-compiled"):
        rows = parts.get(name, {}).get("rows")
        if rows:
            from .bench_train_step import step_table
            lines += [f"## training step ({name}: ratios within this part's process)", "",
                      step_table(rows), ""]
            lines += [f"- {r['variant']}: {r['error']}" for r in rows if "error" in r]
    prof = parts.get("profile", {}).get("rows")
    if prof:
        p = parts["profile"]
        lines += [f"## where a step's time goes ({p.get('model')}, B={p.get('batch')}; "
                  "host: until step() returns)", "",
                  "| variant | wall ms | host ms | kernels/step | kernel ms | GPU busy | "
                  "copies/casts | top kernel | top host events (own ms/step) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in prof:
            top = (r.get("top") or [{}])[0]
            host = ", ".join(f"{h['name'][:40]} {h['ms_per_step']:.1f}"
                             for h in (r.get("top_host") or [])[:3])
            lines.append("| " + " | ".join([
                r["variant"], _fmt(r.get("wall_ms"), ".1f"), _fmt(r.get("host_ms"), ".1f"),
                _fmt(r.get("kernels_per_step"), ".0f"), _fmt(r.get("kernel_ms_per_step"), ".1f"),
                _fmt(r.get("device_busy"), ".0%"), _fmt(r.get("copy_share"), ".0%"),
                f"{top.get('name', '')[:50]} {_fmt(top.get('share'), '.0%')}"
                if top else r.get("error", "")[:60], host]) + " |")
        lines.append("")
    sweep = {k: v for k, v in parts.get("sweep", {}).items()
             if isinstance(v, dict) and v.get("best")}
    if sweep:
        def launch(r):
            digits = r[1].get("select_radix_bits")   # not swept before 2026-11-28
            return (f"{r[0] * 1e3:.1f} ({r[1]['programs_per_sm']} per SM, {r[1]['num_warps']} "
                    f"warps, selection {r[1]['select_warps']}"
                    f"{f', {digits}-bit digits' if digits else ''})")
        lines += ["## launch sweep (forward, CUDA-graph replay, µs)", "",
                  "| shape | the table's launch | fastest |", "|---|---|---|"]
        lines += [f"| {k} | {launch(v['default'][0]) if v.get('default') else '—'} | "
                  f"{launch(v['best'])} |" for k, v in sweep.items()] + [""]
    sac = parts.get("sac", {}).get("time", {})
    if sac:
        ref = next((r["reference"] for r in sac.values() if r.get("reference")), None)
        lines += ["## SAC probe (lean/fast as selective checkpointing; probe_sac.py)", ""]
        if ref == "autograd":
            lines += ["autograd+compile was not timed: the ratios are against eager autograd", ""]
        lines += [f"| model | ms/step | × {ref or 'reference'} | peak GiB above model |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(r.get('step_ms'))} | {_fmt(r.get('speed_vs_reference'))}"
                  f" | {_fmt(r.get('peak_gib_above_model'))} |" + (f" {r['error'][:80]}"
                                                                   if "error" in r else "")
                  for k, r in sac.items()] + [""]
    lines += ["## targets (issues 9 and 10)", ""] + [f"- {t.line()}" for t in targets(results)]
    lines.append("")
    failed = [(p, r["error"]) for p, r in parts.items() if isinstance(r, dict) and "error" in r]
    lines += [f"- part {p}: {e}" for p, e in failed]
    lines += [f"- part {p}: left out for time: {', '.join(left)}"
              for p, r in parts.items() for left in [_left_for_time(r)] if left]
    late = [p for p, r in parts.items() if _left_for_time(r) or any(
        why in str(r.get("error", "")) for why in ("out of time", "at the deadline"))]
    if late:
        lines += [f"- not reached before the deadline; next: `python -m benchmarks.bench_gpu "
                  f"--out DIR2 --parts {','.join(late)}`, then `python -m benchmarks.bench_gpu "
                  "--merge DIR DIR2 --out DIR3` (any machine) for one table of both calls"]
    hung = [(p, h) for p, r in parts.items() if isinstance(r, dict) for h in r.get("hangs", [])]
    for p, h in hung:
        lines.append(f"- {p}: worker ended ({h['exit']}) while running {h['while']!r}"
                     + ("; the main thread was waiting for ptxas" if h.get("in_ptxas") else "")
                     + f"; stacks: {h['stacks']}" + (f"; {h['then']}" if "then" in h else ""))
    return "\n".join(lines) + "\n"


def keep_earlier_results(out_dir: str) -> str | None:
    """Moves an earlier call's ``results.json`` and ``results.md`` in ``out_dir`` aside, to
    ``earlier-<i>/`` there (the first free i), so that a call given the ``--out`` of an earlier
    one does not overwrite what ``--merge`` needs of it (its ``part-*.json`` stay where they
    are; this call removes only those of the parts it runs). Returns that folder, or None when
    there was nothing to keep."""
    names = [n for n in ("results.json", "results.md")
             if os.path.exists(os.path.join(out_dir, n))]
    if "results.json" not in names:
        return None
    i = 1
    while os.path.exists(os.path.join(out_dir, f"earlier-{i}")):
        i += 1
    folder = os.path.join(out_dir, f"earlier-{i}")
    os.makedirs(folder)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(folder, name))
    return folder


def write_results(out_dir: str, results: dict) -> str:
    """``results.json`` and ``results.md`` (:func:`summarize`) in ``out_dir``; returns the
    latter's text."""
    _write_json(os.path.join(out_dir, "results.json"), results)
    md = summarize(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    return md


def main(argv=None) -> int:
    """The run (or, with ``--worker``, one part of it). The run starts, and ``--deadline-s``
    counts, from this process's start when ``argv`` is None (the command line: the imports
    before this call count against the caller's hard limit too), else from this call."""
    global T0
    started = process_start_time() if argv is None else time.time()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json, results.md, part-*.json")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts, run in the order given "
                         f"(default: {','.join(PARTS)})")
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="end the run this many seconds after the process started: no part "
                         "starts after it, and a part still running stops there, keeping what "
                         "it saved (default 540: a 600 s call)")
    ap.add_argument("--compile-timeout-s", type=float, default=180.0,
                    help="a compilation (warm-up) running longer is a hang: its stacks are dumped "
                         "and the part goes on without it, after one retry compiling in-process "
                         "(none when it waited for ptxas) "
                         f"(default 180; the compile pool probe's limit is {POOL_PROBE_S:.0f} s "
                         "or this, if less)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU shapes: test this script")
    ap.add_argument("--merge", nargs="+", metavar="DIR",
                    help="run nothing: merge the results.json of earlier calls' --out folders "
                         "(in call order; each part from the last call that ran it) into "
                         "--out's results.json and results.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--reserve-s", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--build-s", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--probe-pool", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_timeout_s <= 0:
        ap.error(f"--compile-timeout-s must be > 0, got {args.compile_timeout_s}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton check runs in the interpreter
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        runs = []
        for folder in args.merge:
            path = os.path.join(folder, "results.json")
            if not os.path.isfile(path):
                ap.error(f"--merge: {folder} holds no results.json")
            with open(path) as f:
                runs.append(json.load(f))
        try:
            merged = merge_results(runs)
        except ValueError as e:
            ap.error(f"--merge: {e}")
        print(write_results(args.out, merged), flush=True)
        return 0
    if args.worker:
        run_worker(args.worker, args)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: compile worker pools have hung at exit
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; known: {', '.join(PARTS)}")
    T0 = started
    os.environ["BSR_BENCH_T0"] = str(T0)
    earlier = keep_earlier_results(args.out)
    if earlier:
        log(f"{args.out} held an earlier call's results: moved to {earlier} (for --merge)")
    cuda = torch.cuda.is_available() and not args.smoke
    results = {"env": dict(torch=torch.__version__, cuda=torch.version.cuda,
                           device=torch.cuda.get_device_name() if cuda else "cpu",
                           date=time.strftime("%Y-%m-%d")),   # of the measurement, kept
               "parts": {}}                                    # through --merge
    try:
        import triton
        results["env"]["triton"] = triton.__version__
    except ImportError:
        pass
    log("env", results["env"])
    deadline_at = T0 + args.deadline_s
    parts = args.parts.split(",")
    probe = ({} if os.environ.get("TORCHINDUCTOR_COMPILE_THREADS") != "1" else
             {"skipped": "TORCHINDUCTOR_COMPILE_THREADS=1 was set: no pool"})
    for i, part in enumerate(parts):
        log("== part", part)
        build_s = slowest_compiled_build(results["parts"])
        reserve_s = (_compiled_step_reserve(build_s)
                     if "step-compiled" in parts[i + 1:] else 0.0)
        started_part = time.time()
        results["parts"][part] = run_part(part, args, deadline_at, reserve_s, build_s, probe)
        results["env"].setdefault("part_seconds", {})[part] = round(time.time() - started_part, 1)
        results["env"]["compile_threads"] = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS",
                                                           "inductor's default")
        if probe:
            results["env"]["compile_pool_probe"] = probe
        results["targets"] = [t.to_dict() for t in targets(results)]
        write_results(args.out, results)
    log("done")
    print(summarize(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
