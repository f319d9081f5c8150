"""glibc ``malloc`` with freed memory retained: the setting ``bench_malloc`` measures.

PyTorch's CPU tensors come from the C library's ``malloc``. By default glibc serves every block
above its mmap threshold (128 KiB at start, raised after frees up to 32 MiB) with fresh pages
from the kernel, and hands the free top of its heap back to the kernel once it exceeds the trim
threshold (twice the mmap threshold). A training step allocates and frees the same large
activation and gradient buffers every step, so those pages go back to the kernel and are faulted
in again, each one zeroed by the kernel first, at every step.

:func:`retain_freed_memory` raises both thresholds (``mallopt``), so that freed blocks stay in
the process and are reused. ``python -m benchmarks.bench_malloc`` compares it with glibc's
defaults: it cuts page faults 10 to 100 times and makes the C++ drop's forward and backward
through timm's qkv tensor twice as fast, but DeiT-S training steps no faster (README,
"Host memory allocator"), so neither the library nor ``bsr-finetune`` sets it. The cost would be
a process that keeps the memory of its largest step until it exits. Nothing changes with another
allocator (``LD_PRELOAD`` of jemalloc, tcmalloc or mimalloc), off glibc, or when the environment
already sets glibc's malloc options (``MALLOC_*_`` variables or ``GLIBC_TUNABLES``).

Process-wide state, set once, that cannot be undone: call it in a child process.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Mapping, Optional

__all__ = ["retain_freed_memory", "DEFAULT_THRESHOLD", "ENV_SETTINGS"]

#: Blocks up to this size come from the heap and are reused; a free heap top up to this size
#: is kept (1 GiB: above any single activation of ViT-L at batch 64).
DEFAULT_THRESHOLD = 1 << 30

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Environment variables that set glibc's malloc options (GLIBC_TUNABLES counts when it holds
#: a ``glibc.malloc.`` tunable): when one is set, :func:`retain_freed_memory` changes nothing.
ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _why_not(environ: Mapping[str, str], platform: str) -> Optional[str]:
    """Why the settings must be left alone in this process (None: they may be changed)."""
    if not platform.startswith("linux"):
        return f"not Linux ({platform})"
    preload = environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded (LD_PRELOAD)"
    given = [v for v in ENV_SETTINGS if v in environ and (
        v != "GLIBC_TUNABLES" or "glibc.malloc." in environ[v])]
    if given:
        return f"the environment sets malloc options ({', '.join(given)})"
    return None


def retain_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> tuple[bool, str]:
    """Has glibc's ``malloc`` keep freed blocks up to ``threshold`` bytes for reuse (module doc).

    Args:
        threshold: bytes; the mmap and trim thresholds (``mallopt(M_MMAP_THRESHOLD)`` and
            ``mallopt(M_TRIM_THRESHOLD)``), in ``[1 MiB, 2 GiB)``.

    Returns:
        ``(changed, what)``: whether the settings were changed, and a line saying what was done
        or why nothing was.

    Raises:
        ValueError: ``threshold`` out of range (nothing changed).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) \
            or not (1 << 20) <= threshold < (1 << 31):
        raise ValueError(f"threshold must be an int of bytes in [1 MiB, 2 GiB), got {threshold!r}")
    why = _why_not(os.environ, sys.platform)
    if why is not None:
        return False, f"malloc settings left as they are: {why}"
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False, "malloc settings left as they are: the C library is not glibc"
    version.restype = ctypes.c_char_p
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: a refusal there leaves glibc's dynamic thresholds untouched.
    if not mallopt(_M_MMAP_THRESHOLD, threshold):
        return False, "malloc settings left as they are: glibc refused the mmap threshold"
    if not mallopt(_M_TRIM_THRESHOLD, threshold):
        return False, "malloc: glibc refused the trim threshold (the mmap threshold was set)"
    mib = threshold >> 20
    return True, (f"malloc (glibc {version().decode()}): freed blocks up to {mib} MiB are kept "
                  f"for reuse (mmap and trim thresholds {mib} MiB)")
