"""Global switches, driven by environment variables (read at call time, so tests can change them)."""
from __future__ import annotations

import os

__all__ = ["BACKEND_NAMES", "forced_backend", "triton_interpret"]

#: Every backend the dispatcher knows, in preference order for documentation.
BACKEND_NAMES = ("reference", "cpp", "triton")


def forced_backend() -> str | None:
    """The backend named by ``BSR_BACKEND``, or None when unset/empty.

    Raises:
        ValueError: if ``BSR_BACKEND`` names no known backend.
    """
    name = os.environ.get("BSR_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"BSR_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks Triton to run its kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
