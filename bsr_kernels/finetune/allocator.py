"""CPU training without first-touching every activation again each step.

glibc's ``malloc`` serves large blocks with ``mmap`` and returns them to the system when they are
freed (and trims the top of its heap past a threshold). A training step frees its activations and
the next one allocates them again, so on CPU every step page-faults all of its activation memory
anew: the kernel zeroes each 4 KiB page on first touch. Setting ``M_MMAP_THRESHOLD`` and
``M_TRIM_THRESHOLD`` with ``mallopt`` keeps freed memory in the process for the next step instead
(the effect of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or of the jemalloc and
tcmalloc preloads that PyTorch's CPU tuning guide recommends, without restarting the process).
Measured by ``python -m benchmarks.bench_allocator`` (child processes alternating the two
settings; DeiT-S, B=16, fp32, 2 EPYC cores; benchmarks/results/2026-11-26-cpu-allocator.json),
ms/step without -> with: full fine-tuning 2939 -> 2663 (1.11x), the eager BSR formulation
824 -> 782 (1.07x), BSR lean 947 -> 910 (1.04x), BSR fast 864 -> 844 (1.02x); the more a step
allocates, the more it gains. The price: the process keeps the memory of its largest step mapped
until it exits, which a training loop reaches every step anyway.

Only the application (``bsr-finetune``) calls this, on CPU runs: a library must not change how its
host process allocates memory. Elsewhere than glibc (macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this size come from the heap and are reused after free (1 GiB: every activation
#: of a ViT-B/16 step at batch 128); larger ones still go to ``mmap``.
MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = (1 << 31) - 1   # the largest int: never trim the heap's top


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse (see the module docstring), once per
    process.

    Returns:
        True when both settings were accepted, False where there is no glibc ``mallopt`` or it
        refused them (nothing is changed then, or only the first setting).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it: musl's mallopt is a stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
