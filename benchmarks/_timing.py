"""The benchmarks' one timer module: candidates run interleaved (A B A B ...), medians and ratios.

* :func:`interleaved`: wall-clock samples of every candidate in turn (CPU, and CUDA with syncs);
  :func:`robust_interleaved` the same, setting aside the candidates that raise.
* :func:`do_bench_rounds`: GPU medians from ``triton.testing.do_bench``, interleaved over rounds
  (``bench_gpu.py``); :func:`capture_graph`: calls captured in one CUDA graph (timed
  interleaved by ``bench_gpu.graph_times``); :func:`copy_gbps`: the copy bandwidth (CPU or
  CUDA) that drop timings are compared with.
* :func:`paired_ratio`: the one ratio of two candidates' samples, the median of per-round ratios.
* :class:`Rotating`, :func:`rotation_sets`: inputs rotated over several sets, so that the
  GPU's L2 (:func:`l2_bytes`) does not hold them between two calls of a candidate.

The machines this runs on are shared and noisy, so absolute times mean little; what is reported
is the median of per-round ratios of samples taken in one run, alternating between the
candidates so that slow phases of the machine hit all of them alike. ``torch.set_num_threads``
is left as it is. On CUDA, each sample is bracketed by ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["Timing", "interleaved", "format_table", "copy_gbps", "paired_ratio", "Rotating",
           "rotation_count", "rotation_sets", "l2_bytes", "capture_graph",
           "do_bench_rounds"]


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: samples of two candidates taken in the same round
    (next to each other), so that a slow phase of the machine cancels out of each ratio. A
    candidate timed for fewer rounds (it failed in a later one) pairs its first rounds."""
    pairs = [x / y for x, y in zip(a, b)]
    if not pairs:
        raise ValueError("paired_ratio needs at least one round with both samples")
    return statistics.median(pairs)


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
        """:func:`paired_ratio` of ``self / other`` (samples taken next to each other)."""
        return paired_ratio(self.samples, other.samples)


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


def error_text(e: BaseException, limit: int | None = None) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:limit] if limit is not None else msg}"


def robust_interleaved(steps: dict, errors: dict, **kwargs) -> dict:
    """:func:`interleaved` over ``steps``; when one raises, each is tried alone, those that
    fail are moved to ``errors`` (name -> message) and the rest are timed again."""
    if not steps:
        return {}
    try:
        return interleaved(steps, **kwargs)
    except Exception:  # noqa: BLE001 - find which candidate fails
        ok = {}
        for name, fn in steps.items():
            try:
                fn()
                ok[name] = fn
            except Exception as e:  # noqa: BLE001 - reported in the results
                errors[name] = error_text(e)
        return interleaved(ok, **kwargs) if ok else {}


class Rotating:
    """Calls ``fn(*sets[i])`` with i cycling over several input sets: between two uses of one
    set the others are read, so that the GPU's L2 no longer holds it (the design's rule;
    :func:`rotation_sets` makes enough sets)."""

    def __init__(self, fn, sets):
        if not sets:
            raise ValueError("Rotating needs at least one input set")
        self.fn, self.sets, self.i = fn, sets, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*self.sets[self.i])


def rotation_count(set_bytes: int, cache_bytes: int, most: int = 32) -> int:
    """How many input sets of ``set_bytes`` each :class:`Rotating` needs so that the sets read
    between two uses of one set (all the others) exceed ``cache_bytes``: at least 2, at most
    ``most`` (tiny shapes would need hundreds)."""
    if set_bytes <= 0 or cache_bytes < 0:
        raise ValueError(f"set_bytes must be > 0 and cache_bytes >= 0, got {set_bytes}, "
                         f"{cache_bytes}")
    return max(2, min(most, 1 + -(-cache_bytes // set_bytes)))


def rotation_sets(make: Callable[[], tuple], cache_bytes: int, most: int = 32) -> list[tuple]:
    """Input sets for :class:`Rotating`: ``make()`` called :func:`rotation_count` times, for
    sets the size of its first one (the bytes of the distinct storages of its tensors: views
    of one tensor count once). ``cache_bytes`` 0: the first set alone, nothing rotated."""
    first = make()
    if not cache_bytes:
        return [first]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in first if torch.is_tensor(t)}
    count = rotation_count(max(sum(storages.values()), 1), cache_bytes, most)
    return [first] + [make() for _ in range(count - 1)]


def l2_bytes(device: int = 0) -> int:
    """The L2 cache size of a CUDA device, in bytes (50 MiB, an H100's, where torch does not
    say)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
               or 50 << 20)


def capture_graph(fn, n_calls: int) -> "torch.cuda.CUDAGraph":
    """``n_calls`` calls of ``fn`` captured in one CUDA graph (after a warm call on the capturing
    stream, as PyTorch advises): ``graph.replay()`` runs them with no launch overhead."""
    prev = torch.cuda.current_stream()
    side = torch.cuda.Stream()  # warm up on the stream that captures, as PyTorch advises
    side.wait_stream(prev)
    with torch.cuda.stream(side):
        fn()
    prev.wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            for _ in range(n_calls):
                fn()
    finally:  # a failed capture raises in the context's exit before it restores the stream
        torch.cuda.set_stream(prev)
    return graph


def copy_gbps(device: str = "cuda", nbytes: int | None = None) -> float:
    """Copy bandwidth of ``device``, measured now: bytes read + written per second / 1e9, of
    ``dst.copy_(src)`` between two existing buffers. The bound the drop kernels are held against.

    CUDA: a device-to-device copy of ``nbytes`` (default 1 GiB), ``triton.testing.do_bench``
    median. CPU: ``nbytes`` default 256 MiB (far beyond the last-level cache, so the copy streams
    from and to memory), with torch's threads as they are; median of 9 copies after 2."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if nbytes is None:
        nbytes = 1 << 30 if device == "cuda" else 1 << 28
    if nbytes <= 0:
        raise ValueError(f"nbytes must be > 0, got {nbytes}")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100,
                                     return_mode="median")
        return 2 * nbytes / ms / 1e6
    src.fill_(1)
    dst.fill_(0)  # both buffers paged in before timing
    times = []
    for i in range(11):
        t0 = time.perf_counter()
        dst.copy_(src)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def do_bench_rounds(fns: dict, cuda: bool, rounds: int = 3, rep_ms: int = 60,
                    log=print, limit: int | None = 300) -> dict:
    """Median ms per call of each candidate, interleaved over ``rounds`` rounds: on CUDA each
    sample is ``triton.testing.do_bench``'s median, on CPU the mean of 3 calls after one.

    Returns:
        name -> ``{"ms", "spread", "samples"}`` (spread: (max - min) / median over rounds;
        samples: ms per round, in round order, for :func:`paired_ratio`), or ``{"error"}`` for
        a candidate that raised (the others go on).
    """
    samples = {k: [] for k in fns}
    errors = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                if cuda:
                    import triton.testing
                    ms = triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
                else:
                    fn()
                    t = time.perf_counter()
                    for _ in range(3):
                        fn()
                    ms = (time.perf_counter() - t) / 3 * 1e3
                samples[name].append(ms)
            except Exception as e:  # one failing candidate must not stop the others
                errors[name] = error_text(e, limit)
                log("  FAILED", name, errors[name])
    out = {k: {"ms": statistics.median(v), "spread": (max(v) - min(v)) / statistics.median(v),
               "samples": v} for k, v in samples.items() if v}
    out.update({k: {"error": e} for k, e in errors.items()})
    return out


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table (markdown pipe syntax) of ``rows`` under ``header``."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
