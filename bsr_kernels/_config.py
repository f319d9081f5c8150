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


#: The values of ``TRITON_INTERPRET`` that Triton reads as on, in any case, with nothing around
#: them (its ``getenv_bool``, triton 3.6 to 3.8); every other value, "0", "false" and "off" among
#: them, is off.
_TRITON_TRUE = ("1", "true", "on", "yes", "y")


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run its kernels on CPU tensors.

    Read as Triton reads it (``_TRITON_TRUE``), so that both agree: ``TRITON_INTERPRET=false``
    turns the interpreter off for this backend too, rather than sending CPU tensors to it.
    """
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_TRUE
