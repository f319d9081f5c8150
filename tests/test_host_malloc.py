"""bsr-finetune's host allocator setting (bsr_kernels.finetune.host_malloc): glibc keeps the
memory a step frees for the next step. The real call changes the whole process for good, so it
runs in child processes here; in-process CLI runs get tests/conftest.py's recorder."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from bsr_kernels.finetune import cli, host_malloc
from bsr_kernels.finetune import multitask as mt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_glibc() -> bool:
    import ctypes
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None),
                                                        "gnu_get_libc_version")


needs_glibc = pytest.mark.skipif(not _is_glibc(), reason="glibc's malloc only (Linux, glibc)")

#: A child: optionally retains freed memory, then runs eight times a step shaped like a training
#: step's (ViT-B-sized activations of 38.5 MiB: a linear layer, GELU, a product; then eleven
#: 16 MiB tensors alive together) and prints the minor page faults per step of the last seven.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from bsr_kernels.finetune.host_malloc import retain_freed_memory
    result = retain_freed_memory() if sys.argv[1] == "retain" else (False, "")
    def step():
        x = torch.randn(64, 197, 768)
        h = torch.nn.functional.gelu(x @ torch.randn(768, 768))
        xs = [torch.randn(4 << 20) * i for i in range(1, 12)]
        return float((h * x).sum()) + float(sum(xs).sum())
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(7):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"changed": result[0], "what": result[1], "faults_per_step": faults / 7}))
""")


def _child(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in host_malloc.ENV_SETTINGS}
    environ.update(env)
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                       env=environ, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@needs_glibc
def test_retained_memory_is_reused_with_far_fewer_page_faults():
    default = _child("system")
    retained = _child("retain")
    assert retained["changed"] and "kept for reuse" in retained["what"], retained
    assert "1024 MiB" in retained["what"]
    # glibc's defaults: blocks above 32 MiB are mmap'd afresh every step and faulted in page by
    # page (tens of thousands of faults a step here); retained: freed blocks are reused. Not
    # all faults go: torch asks for 64-byte aligned blocks, and glibc's memalign needs a little
    # more than a freed block of the same size, so some steps still extend the heap (measured:
    # 10-25 times fewer faults with glibc 2.36).
    assert retained["faults_per_step"] * 4 < default["faults_per_step"], (default, retained)


@needs_glibc
def test_malloc_options_in_the_environment_are_left_alone():
    r = _child("retain", MALLOC_TRIM_THRESHOLD_="131072")
    assert not r["changed"] and "MALLOC_TRIM_THRESHOLD_" in r["what"], r
    # the user's own setting stands: large blocks are still mmap'd afresh every step
    assert r["faults_per_step"] > 4 * _child("retain")["faults_per_step"], r
    r = _child("retain", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert not r["changed"] and "GLIBC_TUNABLES" in r["what"], r
    r = _child("retain", GLIBC_TUNABLES="glibc.pthread.rseq=0")   # not a malloc tunable
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


FAST = ["--method", "linear", "--epochs", "1", "--batch-size", "128", "--timing-rounds", "0",
        "--profile-batch", "2", "--samples", "0", "--no-progress", "--device", "cpu"]


def test_bsr_finetune_retains_on_cpu_unless_system_malloc(tmp_path, capsys,
                                                          _recorded_malloc_retention):
    assert cli.main([*FAST, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert _recorded_malloc_retention.calls == 1
    assert "recorded by tests/conftest.py" in out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "recorded by tests/conftest.py" in summary["malloc"]

    assert cli.main([*FAST, "--system-malloc", "--out", str(tmp_path / "b")]) == 0
    assert _recorded_malloc_retention.calls == 1   # not called again
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["malloc"] == "malloc settings left as they are: --system-malloc"
    # a resumed run asks again: where it runs is not taken from the earlier run
    assert "system_malloc" in cli._NOT_RESUMED


def test_multitask_mode_retains_too(capsys, _recorded_malloc_retention):
    argv = ["--method", "linear", "--epochs", "1", "--batch-size", "16", "--max-train-images",
            "16", "--experts", "2", "--top-k", "1", "--timing-rounds", "0", "--profile-batch",
            "2", "--device", "cpu"]
    assert mt.main(argv) == 0
    assert _recorded_malloc_retention.calls == 1
    assert mt.main([*argv, "--system-malloc"]) == 0
    assert _recorded_malloc_retention.calls == 1
    assert "--system-malloc" in capsys.readouterr().out


@needs_glibc
def test_bsr_finetune_child_process_really_retains(tmp_path):
    """The real call, end to end, in a child bsr-finetune (no conftest there)."""
    environ = {k: v for k, v in os.environ.items() if k not in host_malloc.ENV_SETTINGS}
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "bsr_kernels.finetune", *FAST, "--out",
                        str(tmp_path)], capture_output=True, text=True, env=environ,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "kept for reuse" in summary["malloc"], summary["malloc"]
    assert "kept for reuse" in p.stdout
