"""pytest setup shared by the bsr_kernels tests.

``TRITON_INTERPRET`` has to be in the environment before any Triton kernel is *defined*:
``triton.jit`` reads ``triton.knobs.runtime.interpret`` when it decorates a function and returns a
compiled ``JITFunction`` (CUDA only) or an ``InterpretedFunction`` (runs on CPU tensors), and
Triton's standard library (``tl.sum``, ...) is decorated when ``triton.language`` is first
imported. ``import torch`` does not import Triton, but ``import torch._dynamo`` (and so
``torch.compile``) does. This file is the first thing pytest imports from ``tests/``, so it sets
the variable first, before importing ``bsr_kernels``, and refuses to go on if ``bsr_kernels`` or
``triton.language`` was imported earlier (by a plugin, say). ``test_ops.py`` checks the outcome.

On a machine with CUDA the variable is left alone (unless already set), so the Triton kernels
compile for the GPU and the tests also run on CUDA tensors.
"""
from __future__ import annotations

import os
import sys

import torch  # does not import triton (checked below)

_preset = "TRITON_INTERPRET" in os.environ
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_too_late = sorted(m for m in sys.modules
                   if m in ("bsr_kernels", "triton.language") or m.startswith("bsr_kernels."))
if _too_late and not _preset and os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    raise RuntimeError("imported before tests/conftest.py could set TRITON_INTERPRET=1 (a pytest "
                       f"plugin?): {_too_late}; run with TRITON_INTERPRET=1 in the environment")

try:
    import bsr_kernels  # noqa: E402
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bsr_kernels  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "bsr",
    deadline=None,  # kernels (and the Triton interpreter) have uneven first-call costs
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bsr"))


def pytest_report_header(config):
    """Lists every backend with what it can run here, so a skipped backend is never silent."""
    from bsr_kernels.ops.dispatch import all_backends

    from _backends import DEVICES, DTYPES

    lines = [f"bsr_kernels {bsr_kernels.__version__}; TRITON_INTERPRET="
             f"{os.environ.get('TRITON_INTERPRET', '')!r}; BSR_BACKEND="
             f"{os.environ.get('BSR_BACKEND', '')!r}"]
    for name, backend in all_backends().items():
        for device in DEVICES:
            for dtype in DTYPES:
                reasons = backend.not_supported_reasons(torch.device(device), dtype)
                state = "available" if not reasons else "UNAVAILABLE: " + "; ".join(reasons)
                lines.append(f"  backend {name:<9} {device} {str(dtype)[6:]:<8} {state}")
    return lines


class BackendCase:
    """A forced backend for one test: its name, device and dtype."""

    def __init__(self, name: str, device: str, dtype: torch.dtype):
        self.name, self.device, self.dtype = name, device, dtype

    def __repr__(self) -> str:
        return f"BackendCase({self.name}, {self.device}, {self.dtype})"


@pytest.fixture
def backend(request):
    """Forces the backend for the test (``bsr_kernels.use_backend``). Parametrise it indirectly
    with ``backend_params()``."""
    name, device, dtype = request.param
    with bsr_kernels.use_backend(name):
        yield BackendCase(name, device, dtype)
