"""Backend selection: one dispatcher for every op.

A backend is forced, in this order, by an op's ``backend=`` argument, by the innermost
``use_backend(name)`` context, or by ``BSR_BACKEND=reference|cpp|triton`` (for users; an
unavailable forced backend raises).
Otherwise CUDA tensors go to Triton and CPU tensors to the C++ extension. There is no silent
fallback to the reference: when no backend fits, the error lists every backend and why it was
rejected. ``meta`` tensors (no data: a model's shape inference, as with ``model.to("meta")``) go
to the reference, whose ops all take them; they compute nothing, so nothing is slow there.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .. import _config
from .common import Backend, check_backend_name, compute_dtype
from .cpp import CppBackend
from .reference import ReferenceBackend
from .triton_backend import TritonBackend

__all__ = ["get_backend", "all_backends", "available_backends", "select_backend", "use_backend",
           "context_backend", "forced_backend"]

#: Every backend by name, made at import: a dict filled at first use would be seen empty by the
#: first ``torch.compile`` trace through an op, leaving a compiled entry guarded on that.
_BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CppBackend(),
                                                     TritonBackend())}
#: select_backend's answers by (device, dtypes, forced name, TRITON_INTERPRET): what decides
#: them (extension loaded, CUDA present, triton importable) does not change within a process.
_SELECTED: dict[tuple, Backend] = {}
#: ``forced``: the backend of the innermost ``use_backend`` block open in this thread. A
#: thread-local, not a ContextVar: torch.compile (dynamo) of torch 2.11 cannot trace
#: ``ContextVar.get`` (a graph break at every op call, an error under ``fullgraph=True``), while it
#: reads a thread-local's attribute and guards on it, so entering or leaving a block recompiles.
_LOCAL = threading.local()
#: The backend of tensors on a device type when none is forced (others: "cpp", which says why
#: it cannot run them).
_DEFAULTS = {"cuda": "triton", "cpu": "cpp", "meta": "reference"}


@contextlib.contextmanager
def use_backend(name: str | None):
    """Forces backend ``name`` ("reference", "cpp", "triton"; None: no forcing) for the ops called
    inside the block, ahead of ``BSR_BACKEND``::

        with bsr_kernels.use_backend("reference"):
            x, kept = bsr_kernels.drop_tokens(x, q, k, 0.5)
    """
    outer, _LOCAL.forced = context_backend(), check_backend_name(name)
    try:
        yield
    finally:
        _LOCAL.forced = outer


def context_backend() -> str:
    """The backend forced by the innermost ``use_backend`` block, or "" (the ops resolve it when
    called and carry it into their backward, which may run in another thread)."""
    return getattr(_LOCAL, "forced", "")


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``BSR_BACKEND``, or None."""
    return context_backend() or _config.forced_backend()


def all_backends() -> dict[str, Backend]:
    """Every known backend by name, available here or not."""
    return dict(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def _device_for_listing() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends(device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run here (on ``device``, default CUDA if present else CPU)
    for tensors of the floating ``dtype``.

    Raises:
        TypeError: if ``dtype`` is not a floating torch.dtype (a string such as "float32" was
            answered as if no kernel could run it).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got "
                        f"{dtype!r}")
    device = torch.device(device) if device is not None else _device_for_listing()
    return [name for name, b in _BACKENDS.items() if not _reasons(b, device, (dtype,))]


def _reasons(b: Backend, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Why backend ``b`` cannot run tensors of ``dtypes`` on ``device`` (none: it can). A backend
    that takes one dtype gets x, q and k cast to their compute dtype by the ops (float32 for
    half-precision ones), so it is judged by that; the others by each dtype."""
    if not b.mixed_dtypes:
        return b.not_supported_reasons(device, compute_dtype(*dtypes))
    out = []
    for dt in dict.fromkeys(dtypes):
        out += [r for r in b.not_supported_reasons(device, dt) if r not in out]
    return out


def select_backend(device: torch.device, *dtypes: torch.dtype, name: str = "") -> Backend:
    """The backend for tensors on ``device`` with ``dtypes`` (x's, then q's when they differ).

    ``name`` forces a backend (an op's ``backend=``); else ``use_backend`` / ``BSR_BACKEND``.

    Raises:
        RuntimeError: when the forced backend, or every default candidate, cannot run; the message
            lists each backend with its reasons.
    """
    forced = name or forced_backend()
    key = (device.type, device.index, dtypes, forced, _config.triton_interpret())
    # the cache is for eager calls: a torch.compile trace that read it would guard on its
    # contents, and the entry compiled while it was empty would be dead after the first write
    cached = not torch.compiler.is_compiling()
    hit = _SELECTED.get(key) if cached else None
    if hit is not None:
        return hit
    candidates = [forced] if forced else [_DEFAULTS.get(device.type, "cpp")]

    for cand in candidates:
        if not _reasons(_BACKENDS[cand], device, dtypes):
            if cached:
                _SELECTED[key] = _BACKENDS[cand]
            return _BACKENDS[cand]
    lines = [f"  {n}: {'; '.join(_reasons(b, device, dtypes)) or 'available'}"
             for n, b in _BACKENDS.items()]
    how = (f"backend {forced!r} was forced" if forced
           else f"the default for {device.type} tensors is {candidates[0]}")
    raise RuntimeError(
        f"no bsr_kernels backend can run on {device} "
        f"{' and '.join(map(str, dict.fromkeys(dtypes)))} ({how}).\n" + "\n".join(lines)
        + "\nUse backend='reference' (or bsr_kernels.use_backend('reference'), or "
        "BSR_BACKEND=reference) to run the slow pure-PyTorch definition explicitly.")
