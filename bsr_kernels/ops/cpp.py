"""C++ (CPU) backend. PLACEHOLDER: being written; reports itself unavailable until then."""
from __future__ import annotations

from .common import Backend

__all__ = ["CppBackend"]


class CppBackend(Backend):
    name = "cpp"

    def not_supported_reasons(self, device, dtype):
        return ["not implemented yet"]
