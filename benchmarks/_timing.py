"""Side-by-side timing: candidates run interleaved (A B A B ...), medians and ratios.

The machines this runs on are shared and noisy, so absolute times mean little; what is reported
is the ratio of medians of samples taken in one run, alternating between the candidates so that
slow phases of the machine hit all of them alike. ``torch.set_num_threads`` is left as it is.
On CUDA, each sample is bracketed by ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["Timing", "interleaved", "format_table"]


@dataclasses.dataclass
class Timing:
    """Samples of one candidate.

    Attributes:
        name: the candidate's name.
        samples: seconds per call, one per repetition.
        number: calls per sample (the sample is their mean).
    """

    name: str
    samples: list[float]
    number: int

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.samples)

    def paired_ratio(self, other: "Timing") -> float:
        """Median over repetitions of ``self / other`` (samples taken next to each other)."""
        return statistics.median(a / b for a, b in zip(self.samples, other.samples))


def _sync(device_sync: bool) -> None:
    if device_sync:
        torch.cuda.synchronize()


def interleaved(candidates: Mapping[str, Callable[[], object]], reps: int = 15,
                warmup: int = 2, min_sample_s: float = 0.02, max_number: int = 1000,
                device_sync: bool | None = None) -> dict[str, Timing]:
    """Times the candidates side by side: warmup, then ``reps`` rounds of A B C ... in turn.

    Each sample is the mean of ``number`` back-to-back calls of one candidate, ``number`` chosen
    per candidate after warmup so that a sample lasts at least ``min_sample_s``.

    Args:
        candidates: name -> no-argument callable.
        reps: rounds (samples per candidate).
        warmup: untimed calls of each candidate first.
        min_sample_s: smallest duration of one sample.
        max_number: most calls per sample.
        device_sync: synchronise CUDA around samples; default: when CUDA is initialised.

    Returns:
        name -> :class:`Timing`, in the candidates' order.
    """
    if not candidates:
        raise ValueError("candidates must name at least one callable")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if device_sync is None:
        device_sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    numbers = {}
    for name, fn in candidates.items():
        if not callable(fn):
            raise TypeError(f"candidates[{name!r}] must be callable")
        for _ in range(max(warmup, 1)):
            _sync(device_sync)
            start = time.perf_counter()
            fn()
            _sync(device_sync)
            once = time.perf_counter() - start
        numbers[name] = max(1, min(max_number, int(min_sample_s / max(once, 1e-9)) + 1))
    results = {name: Timing(name, [], numbers[name]) for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            number = numbers[name]
            _sync(device_sync)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            _sync(device_sync)
            results[name].samples.append((time.perf_counter() - start) / number)
    return results


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table (markdown pipe syntax) of ``rows`` under ``header``."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
