"""benchmarks.bench_malloc and the setting it measures (benchmarks._malloc): glibc keeping the
memory a step frees for the next step. The call changes the whole process for good, so it runs in
child processes here."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import _malloc as host_malloc
from benchmarks import bench_malloc as bm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_glibc() -> bool:
    import ctypes
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None),
                                                        "gnu_get_libc_version")


needs_glibc = pytest.mark.skipif(not _is_glibc(), reason="glibc's malloc only (Linux, glibc)")

#: A child: optionally retains freed memory, then runs a step shaped like a training step's
#: (ViT-B-sized activations of 37 MiB: a linear layer, GELU, a product; then five 40 MiB tensors
#: alive together) sixteen times and prints the minor page faults per step of the last twelve
#: (none with steps=0: the setting's outcome only).
#: Every block is above glibc's largest dynamic mmap threshold (32 MiB), so with glibc's
#: defaults each is mmap'd afresh and faulted in page by page, every step (smaller blocks made
#: the defaults noisy: glibc sometimes served them from heap space that larger frees had left).
#: The first four steps are warm-up: with memory retained, the heap takes a few steps to grow
#: to the step's high-water mark (glibc's memalign of 64-byte aligned blocks wants a little more
#: than a freed block of the same size). Measured per step with glibc 2.36, 4 KiB pages:
#: defaults [201787, 201225, 193397, 200326, 200104, ...] (every step);
#: retained [141129, 30720, 20481, 30720, 0, 0, 0, 0, 0, 0, 0, 0, 29936, 0, 0, 0].
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from benchmarks._malloc import retain_freed_memory
    result = retain_freed_memory() if sys.argv[1] == "retain" else (False, "")
    def step():
        x = torch.randn(64, 197, 768)
        h = torch.nn.functional.gelu(x @ torch.randn(768, 768))
        xs = [torch.full((10 << 20,), 0.5) * i for i in range(1, 6)]
        return float((h * x).sum()) + float(sum(xs).sum())
    steps = int(sys.argv[2])
    for _ in range(4 if steps else 0):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"changed": result[0], "what": result[1],
                      "faults_per_step": faults / steps if steps else None}))
""")


def _child(mode: str, steps: int = 12, **env) -> dict:
    environ = bm._child_env()   # glibc's defaults, as bench_malloc's children get them
    environ.update(env)
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _CHILD, mode, str(steps)], capture_output=True,
                       text=True, env=environ, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@needs_glibc
def test_retained_memory_is_reused_with_far_fewer_page_faults():
    default = _child("system")
    retained = _child("retain")
    assert retained["changed"] and "kept for reuse" in retained["what"], retained
    assert "1024 MiB" in retained["what"]
    # glibc's defaults: about 200 thousand faults a step here; retained: past the warm-up, freed
    # blocks are reused and a step seldom extends the heap (measured: 0-2600 a step). With a
    # smaller step and one warm-up step, CI once saw only 3.6 times fewer.
    assert retained["faults_per_step"] * 10 < default["faults_per_step"], (default, retained)


@needs_glibc
def test_malloc_options_in_the_environment_are_left_alone():
    r = _child("retain", MALLOC_TRIM_THRESHOLD_="131072")
    assert not r["changed"] and "MALLOC_TRIM_THRESHOLD_" in r["what"], r
    # the user's own setting stands: large blocks are still mmap'd afresh every step
    assert r["faults_per_step"] > 4 * _child("retain")["faults_per_step"], r
    r = _child("retain", 0, GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert not r["changed"] and "GLIBC_TUNABLES" in r["what"], r
    r = _child("retain", 0, GLIBC_TUNABLES="glibc.pthread.rseq=0")   # not a malloc tunable
    assert r["changed"], r


@pytest.mark.parametrize("environ, platform, why", [
    ({}, "linux", None),
    ({}, "darwin", "not Linux"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "linux", "jemalloc"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "linux", "tcmalloc"),
    ({"LD_PRELOAD": "/opt/libfoo.so"}, "linux", None),
    ({"MALLOC_ARENA_MAX": "2"}, "linux", "MALLOC_ARENA_MAX"),
    ({"MALLOC_MMAP_THRESHOLD_": "1", "MALLOC_TOP_PAD_": "1"}, "linux",
     "MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}, "linux", "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"}, "linux", None),
])
def test_when_the_settings_are_left_alone(environ, platform, why):
    got = host_malloc._why_not(environ, platform)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got


@pytest.mark.parametrize("bad", [0, 1 << 19, 1 << 31, -1, 2.5e8, True, "1G", None])
def test_bad_threshold_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="threshold"):
        host_malloc.retain_freed_memory(bad)


def test_bench_malloc_rows_pair_rounds_and_settings():
    children = [dict(variant="full", setting=s, round=r, step_ms=ms, faults_per_step=f,
                     peak_rss_mib=p, rss_after_mib=p - 1)
                for s, r, ms, f, p in [
                    ("system", 0, 120.0, 900, 500), ("retained", 0, 100.0, 9, 510),
                    ("system", 1, 90.0, 800, 505), ("retained", 1, 100.0, 7, 520),
                    ("system", 2, 150.0, 700, 499)]]
    children += [dict(variant="drop_op", setting=s, round=r, peak_rss_mib=1, rss_after_mib=1,
                      passes={"fwd+bwd": {"bsr cpp": c, "torch.compile(reference)": 2 * c,
                                          "no-compute floor": 1.0, "speedup_vs_compiled": x}})
                 for s, r, c, x in [("system", 0, 3.0, 1.5), ("retained", 0, 2.0, 2.5),
                                    ("retained", 1, 4.0, 1.9)]]
    rows = {r["setting"]: r for r in bm._rows(children, ("full", "drop_op"))}
    assert rows["system"]["step_ms"] == 120.0 and rows["system"]["runs"] == 3
    assert rows["system"]["speedup_vs_system"] == 1.0
    # per-round ratios 1.2 and 0.9 (round 2 has no retained run): median 1.05
    assert abs(rows["retained"]["speedup_vs_system"] - 1.05) < 1e-12
    assert rows["retained"]["peak_rss_mib"] == 520 and rows["retained"]["faults_per_step"] == 8
    op = {r["setting"]: r for r in bm._op_rows(children)}
    assert op["retained"]["speedup_vs_compiled"] == 2.2 and op["retained"]["bsr cpp"] == 3.0
    assert op["system"]["runs"] == 1 and op["system"]["torch.compile(reference)"] == 6.0
    text = bm.table(dict(rows=list(rows.values()), op_rows=list(op.values())))
    assert "1.05x" in text and "2.20x" in text and "Drop op" in text


@pytest.mark.parametrize("argv, message", [
    (["--variants", "full,nope"], "nope"), (["--variants", ","], "none given"),
    (["--rounds", "0"], "rounds"), (["--steps", "-1"], "steps")])
def test_bench_malloc_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bm.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@needs_glibc
def test_bench_malloc_runs_children(tmp_path):
    lines = []
    result = bm.run(("full",), rounds=1, steps=1, batch=2, model="tiny", log=lines.append)
    assert not result["errors"], result["errors"]
    assert {(c["setting"], c["variant"]) for c in result["children"]} == {
        ("system", "full"), ("retained", "full")}
    assert all(c["step_ms"] > 0 and c["peak_rss_mib"] > 0 for c in result["children"])
    assert len(lines) == 2 and "full" in lines[0]
