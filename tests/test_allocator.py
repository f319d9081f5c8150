"""bsr_kernels.finetune.allocator: bsr-finetune keeps freed memory for the next step on CPU.

The setting is process-wide and one-way, so its effect is checked in child processes.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from bsr_kernels.finetune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import sys, torch
from bsr_kernels.finetune.allocator import keep_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

if sys.argv[1] == "keep":
    assert keep_freed_memory() is True and keep_freed_memory() is True  # once, cached
before = rss()
t = torch.ones(64 << 20)  # 256 MiB, touched
held = rss()
del t
after = rss()
print(before, held, after)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt and /proc/self/statm: Linux with glibc only")
def test_freed_memory_is_kept_only_when_asked():
    """Without the setting glibc hands a freed 256 MiB block back to the system at once (the
    next step would page-fault it in again); with it the block stays in the process."""
    out = {}
    for setting in ("system", "keep"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, setting], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[setting] = [int(v) for v in proc.stdout.split()]
    for before, held, _ in out.values():
        assert held - before > 200 << 20  # the block was touched
    before, held, after = out["system"]
    assert held - after > 200 << 20, out  # returned to the system
    before, held, after = out["keep"]
    assert held - after < 16 << 20, out   # still mapped, for reuse


def test_cli_option_applies_on_cpu_only_and_can_be_turned_off(monkeypatch):
    calls, lines = [], []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    args = cli.build_parser().parse_args([])
    assert args.keep_freed_memory is True  # the default
    cli.apply_allocator_option(args, torch.device("cpu"), lines.append)
    assert len(calls) == 1 and "--no-keep-freed-memory" in lines[0]
    cli.apply_allocator_option(args, torch.device("cuda"), lines.append)
    off = cli.build_parser().parse_args(["--no-keep-freed-memory"])
    cli.apply_allocator_option(off, torch.device("cpu"), lines.append)
    assert len(calls) == 1 and len(lines) == 1
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: False)  # no glibc: nothing said
    cli.apply_allocator_option(args, torch.device("cpu"), lines.append)
    assert len(lines) == 1
    assert "keep_freed_memory" in cli._NOT_RESUMED  # where a run executes, not what it computes


def test_multitask_has_the_option():
    from bsr_kernels.finetune import multitask
    p = multitask.build_parser()
    assert p.parse_args([]).keep_freed_memory is True
    assert p.parse_args(["--no-keep-freed-memory"]).keep_freed_memory is False
