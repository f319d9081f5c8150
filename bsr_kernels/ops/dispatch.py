"""Backend selection: one dispatcher for every op.

``BSR_BACKEND=reference|cpp|triton`` forces a backend (an unavailable forced backend raises).
Otherwise CUDA tensors go to Triton and CPU tensors to the C++ extension. There is no silent
fallback to the reference: when no backend fits, the error lists every backend and why it was
rejected.
"""
from __future__ import annotations

import torch

from .. import _config
from .common import Backend

__all__ = ["get_backend", "all_backends", "available_backends", "select_backend"]

_BACKENDS: dict[str, Backend] = {}


def _load() -> dict[str, Backend]:
    if not _BACKENDS:
        from .cpp import CppBackend
        from .reference import ReferenceBackend
        from .triton_backend import TritonBackend

        for backend in (ReferenceBackend(), CppBackend(), TritonBackend()):
            _BACKENDS[backend.name] = backend
    return _BACKENDS


def all_backends() -> dict[str, Backend]:
    """Every known backend by name, available here or not."""
    return dict(_load())


def get_backend(name: str) -> Backend:
    """The backend called ``name``."""
    backends = _load()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(backends)}")
    return backends[name]


def _device_for_listing() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends(device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run here (on ``device``, default CUDA if present else CPU)."""
    device = torch.device(device) if device is not None else _device_for_listing()
    return [name for name, b in _load().items() if not b.not_supported_reasons(device, dtype)]


def select_backend(device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend for tensors on ``device`` with ``dtype``.

    Raises:
        RuntimeError: when the forced backend, or every default candidate, cannot run; the message
            lists each backend with its reasons.
    """
    backends = _load()
    forced = _config.forced_backend()
    candidates = [forced] if forced else (["triton"] if device.type == "cuda" else ["cpp"])
    for name in candidates:
        if not backends[name].not_supported_reasons(device, dtype):
            return backends[name]
    lines = [f"  {name}: {'; '.join(b.not_supported_reasons(device, dtype)) or 'available'}"
             for name, b in backends.items()]
    how = (f"BSR_BACKEND={forced} was forced" if forced
           else f"the default for {device.type} tensors is {candidates[0]}")
    raise RuntimeError(
        f"no bsr_kernels backend can run on {device} {dtype} ({how}).\n" + "\n".join(lines)
        + "\nSet BSR_BACKEND=reference to use the slow pure-PyTorch definition explicitly.")
