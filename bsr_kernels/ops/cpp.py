"""C++ (CPU) backend: the ``bsr_kernels::cpp_*`` operators of the extension ``bsr_kernels.ops._C``.

The kernels (``csrc/``) follow :mod:`bsr_kernels.ops.reference` exactly, never build an N x N
matrix, and run in parallel over the batch. They take float32 and float64 CPU tensors (the ops
cast bf16 and fp16 inputs to float32 for them and cast the results back).

When the extension has not been built, importing this module warns once and the backend reports
itself unavailable, with the command that builds it; nothing raises on import.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import warnings

import torch

from .common import Backend

__all__ = ["CppBackend", "BUILD_COMMAND", "extension_error"]

#: How to build the extension, from the repository root.
BUILD_COMMAND = "pip install --no-build-isolation -e ."

_DTYPES = (torch.float32, torch.float64)


def _missing_extension() -> str:
    """Why no ``_C`` extension module is found for this Python (said plainly, rather than
    Python's "partially initialized module ... (most likely due to a circular import)")."""
    here = os.path.dirname(__file__)
    want = f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    if not os.path.isdir(here):
        return (f"{here} is inside an archive, and Python loads no extension module from one; "
                "install bsr_kernels unpacked")
    other = sorted(f for f in os.listdir(here) if f.startswith("_C.") and f != want)
    if other:
        return f"{here} holds {', '.join(other)}, built for another Python, and no {want}"
    return f"not built: {here} holds no {want} for this Python"


try:
    if importlib.util.find_spec(f"{__package__}._C") is None:
        raise ImportError(_missing_extension())
    from . import _C  # noqa: F401  (loading the library registers torch.ops.bsr_kernels.cpp_*)

    #: Every operator the extension registers; a build from older sources lacks some.
    _OPS = ("cpp_cls_scores", "cpp_cls_scores_backward", "cpp_drop_forward", "cpp_drop_backward",
            "cpp_gather_backward")
    _missing = [n for n in _OPS if not hasattr(torch.ops.bsr_kernels, n)]
    _LOAD_ERROR: str | None = (
        f"bsr_kernels.ops._C is out of date: it lacks {', '.join(_missing)}" if _missing else None)
except (ImportError, OSError, ValueError) as exc:  # not built, built against another torch;
    # ValueError: find_spec of a bsr_kernels.ops._C in sys.modules without a __spec__ (a stub)
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
if _LOAD_ERROR is not None:
    warnings.warn(
        "bsr_kernels: the C++ extension bsr_kernels.ops._C could not be loaded "
        f"({_LOAD_ERROR}); the 'cpp' backend is unavailable. Build it from the repository root "
        f"with: {BUILD_COMMAND}",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_error() -> str | None:
    """Why ``bsr_kernels.ops._C`` failed to load, or None when it is loaded."""
    return _LOAD_ERROR


class CppBackend(Backend):
    """The token-drop ops on CPU, in C++ (``torch.ops.bsr_kernels.cpp_*``)."""

    name = "cpp"

    def not_supported_reasons(self, device, dtype) -> list[str]:
        reasons = []
        if _LOAD_ERROR is not None:
            reasons.append(f"the C++ extension bsr_kernels.ops._C is not built or failed to load "
                           f"({_LOAD_ERROR}); build it from the repository root with: "
                           f"{BUILD_COMMAND}")
        device = torch.device(device)
        if device.type != "cpu":
            reasons.append(f"runs on CPU tensors only, got device {device}")
        if dtype not in _DTYPES:
            reasons.append(f"supports float32 and float64 only, got {dtype}")
        return reasons

    def cls_scores(self, q, k, scale, num_prefix_tokens):
        return torch.ops.bsr_kernels.cpp_cls_scores(q, k, scale, num_prefix_tokens)

    def cls_scores_backward(self, grad_scores, q, k, lse, scale, num_prefix_tokens):
        return torch.ops.bsr_kernels.cpp_cls_scores_backward(grad_scores, q, k, lse, scale,
                                                             num_prefix_tokens)

    def drop_forward(self, x, q, k, scale, num_prefix_tokens, n_keep, fuse_token):
        return torch.ops.bsr_kernels.cpp_drop_forward(x, q, k, scale, num_prefix_tokens, n_keep,
                                                      fuse_token)

    def drop_replay(self, x, q, k, kept, scale, num_prefix_tokens, fuse_token):
        # The C++ forward selects inside its kernel and has no replay entry point; a replay
        # (scores + gather of given rows) runs the reference formulation, a few torch ops.
        from .reference import drop_replay
        return drop_replay(x, q, k, kept, scale, num_prefix_tokens, fuse_token)

    def drop_backward(self, grad_out, x, q, k, kept, scores, lse, scale, num_prefix_tokens):
        return torch.ops.bsr_kernels.cpp_drop_backward(grad_out, x, q, k, kept, scores, lse,
                                                       scale, num_prefix_tokens)

    def gather_backward(self, grad_out, kept, n_tokens, num_prefix_tokens):
        return torch.ops.bsr_kernels.cpp_gather_backward(grad_out, kept, n_tokens,
                                                         num_prefix_tokens)
